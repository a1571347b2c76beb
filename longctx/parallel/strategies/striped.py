"""Striped attention: the ring over a striped layout, where causal work is even at every step.

Token ``t`` lives on rank ``(t // w) % P`` (stripe width ``w``, default 1).  Every rank then holds
an even sample of the whole sequence, so under a causal mask every (query shard, key shard) pair
is a near-triangle of the same size: each ring step costs every rank about half a block, instead
of the contiguous ring's mix of full, diagonal and empty blocks (Brandon et al., 2023).  The
kernel applies the mask on the global positions ``rank + i * P``.

Example (on each rank; shards made with ``longctx.parallel.shard(x, "striped", P, rank)``)::

    from longctx.parallel.strategies.striped import striped_attention
    out = striped_attention(q, k, v, group, mask=Mask(causal=True))
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..context import CPContext, build_context, cast_grads, save_for_cp_backward
from .ring import ring_backward, ring_forward

__all__ = ["striped_forward", "striped_backward", "StripedAttention", "striped_attention"]


def striped_forward(q: Tensor, k: Tensor, v: Tensor, cp: CPContext) -> tuple[Tensor, Tensor]:
    """Striped shards ``q [B, S/P, H, D]``, ``k``/``v [B, S/P, H_kv, D]`` -> out, lse ``[B, H, S/P]``."""
    return ring_forward(q, k, v, cp)


def striped_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cp: CPContext
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the striped shards, in the accumulation dtype."""
    return ring_backward(dout, q, k, v, out, lse, cp)


class StripedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cp: CPContext):
        out, lse = striped_forward(q, k, v, cp)
        save_for_cp_backward(ctx, cp, q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grads = striped_backward(dout, q, k, v, out, lse, ctx.cp)
        return (*cast_grads(q, k, v, *grads), None)


def striped_attention(
    q: Tensor, k: Tensor, v: Tensor, group=None, *, layout="striped", mask=None,
    kernel="auto", scale=None, return_lse: bool = False,
):
    """Striped ring attention on striped shards; see :func:`longctx.attention` for the arguments."""
    cp = build_context(
        q, k, v, group, strategy="striped", layout=layout, mask=mask, kernel=kernel, scale=scale
    )
    out, lse = StripedAttention.apply(q, k, v, cp)
    return (out, lse) if return_lse else out
