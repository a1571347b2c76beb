"""Zigzag ring attention: the ring over megatron's zigzag layout, causal work balanced per step.

The sequence is cut into ``2P`` chunks and rank ``r`` holds chunks ``r`` and ``2P-1-r``.  Under a
causal mask every ring step then costs every rank the same: the diagonal step computes chunk
``r`` against itself and chunk ``2P-1-r`` against both; a step whose keys come from an earlier
rank computes both query chunks against the first key chunk only; one from a later rank, the
second query chunk against both key chunks.  :func:`~longctx.parallel.plan.plan_calls` derives
exactly these calls from the global positions, so the kernel never sees an empty chunk pair.

Example (on each rank; shards made with ``longctx.parallel.shard(x, "zigzag", P, rank)``)::

    from longctx.parallel.strategies.zigzag import zigzag_attention
    out = zigzag_attention(q, k, v, group, mask=Mask(causal=True))
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..context import CPContext, build_context, cast_grads, save_for_cp_backward
from .ring import ring_backward, ring_forward

__all__ = ["zigzag_forward", "zigzag_backward", "ZigzagAttention", "zigzag_attention"]


def zigzag_forward(q: Tensor, k: Tensor, v: Tensor, cp: CPContext) -> tuple[Tensor, Tensor]:
    """Zigzag shards ``q [B, S/P, H, D]``, ``k``/``v [B, S/P, H_kv, D]`` -> out, lse ``[B, H, S/P]``."""
    return ring_forward(q, k, v, cp)


def zigzag_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cp: CPContext
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the zigzag shards, in the accumulation dtype."""
    return ring_backward(dout, q, k, v, out, lse, cp)


class ZigzagAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cp: CPContext):
        out, lse = zigzag_forward(q, k, v, cp)
        save_for_cp_backward(ctx, cp, q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grads = zigzag_backward(dout, q, k, v, out, lse, ctx.cp)
        return (*cast_grads(q, k, v, *grads), None)


def zigzag_attention(
    q: Tensor, k: Tensor, v: Tensor, group=None, *, layout="zigzag", mask=None,
    kernel="auto", scale=None, return_lse: bool = False,
):
    """Zigzag ring attention on zigzag shards; see :func:`longctx.attention` for the arguments."""
    cp = build_context(
        q, k, v, group, strategy="zigzag", layout=layout, mask=mask, kernel=kernel, scale=scale
    )
    out, lse = ZigzagAttention.apply(q, k, v, cp)
    return (out, lse) if return_lse else out
