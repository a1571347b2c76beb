"""Hybrid (2-D) attention: Ulysses inside a group of ranks x ring attention across groups.

``P = U x R`` ranks, CP rank ``c = ring_rank * U + ulysses_rank``.  Inside each Ulysses group
(keep it inside a node) an all-to-all turns the ``U`` sequence shards into ``H/U`` heads of the
group's ``U`` shards; the ``R`` groups then run the ring over those super-shards, whose global
positions are the concatenated positions of the group's members, so every mask and layout works
as in the 1-D strategies.  The ring's point-to-point traffic is ``1/U`` of a plain ring's and
the head count only has to divide ``U``, not ``P``.

Example (each rank; ``groups = build_mesh(ParallelDims(cp=8, ulysses=4), "cuda").hybrid_groups()``)::

    from longctx.parallel.strategies.hybrid import hybrid_attention
    out = hybrid_attention(q, k, v, groups, layout="zigzag", mask=Mask(causal=True))
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..comm import AllToAllComm
from ..context import CPContext, build_context, cast_grads
from .ring import ring_backward, ring_forward
from .ulysses import (
    TokenOrder,
    check_head_split,
    heads_to_seq,
    kv_heads_to_seq,
    kv_seq_to_heads,
    lse_heads_to_seq,
    seq_to_heads,
    token_order,
)

__all__ = ["hybrid_forward", "hybrid_backward", "HybridAttention", "hybrid_attention"]


def _super_shard(cp: CPContext, ring_rank: int, U: int, device) -> TokenOrder:
    """Ring member ``ring_rank``'s Ulysses group of U shards, sorted into global order."""
    members = tuple(range(ring_rank * U, (ring_rank + 1) * U))
    return token_order(cp.layout, cp.seq_len, cp.world_size, members, str(device))


def _ring_context(cp: CPContext, comm: AllToAllComm) -> CPContext:
    """The context of the ring across Ulysses groups: one sorted super-shard per group."""
    U = comm.world_size
    R = cp.world_size // U
    positions = tuple(_super_shard(cp, i, U, "cpu").positions for i in range(R))
    return replace(
        cp, group=cp.hybrid.ring, world_size=R, rank=cp.rank // U, positions=positions,
        hybrid=None,
    )


def hybrid_forward(q: Tensor, k: Tensor, v: Tensor, cp: CPContext):
    """Local shards ``q [B, S/P, H, D]``, ``k``/``v [B, S/P, H_kv, D]`` -> out, lse, saved."""
    comm = AllToAllComm(cp.hybrid.ulysses)
    H = q.shape[2]
    order = _super_shard(cp, cp.rank // comm.world_size, comm.world_size, q.device)
    q_h = seq_to_heads(q, comm, order)  # [B, U*S/P, H/U, D], global order
    k_h = kv_seq_to_heads(k, H, comm, order)
    v_h = kv_seq_to_heads(v, H, comm, order)
    out_h, lse_h = ring_forward(q_h, k_h, v_h, _ring_context(cp, comm))
    out = heads_to_seq(out_h, comm, order)
    lse = lse_heads_to_seq(lse_h, comm, order)
    return out, lse, (q_h, k_h, v_h, out_h, lse_h)


def hybrid_backward(dout: Tensor, saved: tuple[Tensor, ...], kv_heads: int, cp: CPContext):
    """Gradients of the local shards from the saved head shards, in the accumulation dtype."""
    q_h, k_h, v_h, out_h, lse_h = saved  # in global token order
    comm = AllToAllComm(cp.hybrid.ulysses)
    H = q_h.shape[2] * comm.world_size
    order = _super_shard(cp, cp.rank // comm.world_size, comm.world_size, q_h.device)
    dout_h = seq_to_heads(dout, comm, order)
    dq_h, dk_h, dv_h = ring_backward(dout_h, q_h, k_h, v_h, out_h, lse_h, _ring_context(cp, comm))
    dq = heads_to_seq(dq_h, comm, order)
    dk = kv_heads_to_seq(dk_h, H, kv_heads, comm, order)
    dv = kv_heads_to_seq(dv_h, H, kv_heads, comm, order)
    return dq, dk, dv


class HybridAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cp: CPContext):
        out, lse, saved = hybrid_forward(q, k, v, cp)
        ctx.save_for_backward(q, k, v, *saved)
        ctx.cp = cp
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, *saved = ctx.saved_tensors
        grads = hybrid_backward(dout, tuple(saved), k.shape[2], ctx.cp)
        return (*cast_grads(q, k, v, *grads), None)


def hybrid_attention(
    q: Tensor, k: Tensor, v: Tensor, groups=None, *, layout="contiguous", mask=None,
    kernel="auto", scale=None, return_lse: bool = False,
):
    """2-D attention on local shards; ``groups``: HybridGroups or a 2-D (ring, ulysses) mesh."""
    cp = build_context(
        q, k, v, groups, strategy="hybrid", layout=layout, mask=mask, kernel=kernel, scale=scale
    )
    check_head_split(q.shape[2], k.shape[2], AllToAllComm(cp.hybrid.ulysses).world_size)
    out, lse = HybridAttention.apply(q, k, v, cp)
    return (out, lse) if return_lse else out
