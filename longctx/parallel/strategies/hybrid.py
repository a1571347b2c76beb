"""Hybrid (2-D) attention: Ulysses inside a group of ranks x ring attention across groups.

``P = U x R`` ranks, CP rank ``c = ring_rank * U + ulysses_rank``.  Inside each Ulysses group
(keep it inside a node) an all-to-all turns the ``U`` sequence shards into ``H/U`` heads of the
group's ``U`` shards; the ``R`` groups then run the ring over those super-shards, whose global
positions are the concatenated positions of the group's members, so every mask and layout works
as in the 1-D strategies.  The ring's point-to-point traffic is ``1/U`` of a plain ring's and
the head count only has to divide ``U``, not ``P``.

Example (each rank; ``groups = build_mesh(ParallelDims(cp=8, ulysses=4), "cuda").hybrid_groups()``)::

    out = longctx.attention(q, k, v, groups, strategy="hybrid", layout="zigzag",
                            mask=longctx.Mask(causal=True))
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from ...kernels.base import acc_dtype
from ..comm import AllToAllComm
from ..context import CPContext
from ..head_exchange import (
    TokenOrder,
    grads_to_seq,
    heads_mask,
    out_to_seq,
    qkv_to_heads,
    seq_to_heads,
    token_order,
)
from .base import StrategySpec
from .ring import ring_backward, ring_forward

__all__ = ["SPEC", "hybrid_attention", "hybrid_backward", "hybrid_forward"]


def _super_shard(cp: CPContext, ring_rank: int, U: int, device) -> TokenOrder:
    """Ring member ``ring_rank``'s Ulysses group of U shards, sorted into global order."""
    members = tuple(range(ring_rank * U, (ring_rank + 1) * U))
    return token_order(cp.layout, cp.seq_len, cp.world_size, members, str(device))


def _ring_context(cp: CPContext, comm: AllToAllComm, heads: int, kv_heads: int) -> CPContext:
    """The context of the ring across Ulysses groups: one sorted super-shard per group, and the
    mask of the heads this rank holds."""
    U = comm.world_size
    R = cp.world_size // U
    positions = tuple(_super_shard(cp, i, U, "cpu").positions for i in range(R))
    return replace(
        cp, group=cp.hybrid.ring, world_size=R, rank=cp.rank // U, positions=positions,
        hybrid=None, mask=heads_mask(cp.mask, comm, heads, kv_heads),
    )


def hybrid_forward(q: Tensor, k: Tensor, v: Tensor, cp: CPContext):
    """Local shards ``q [B, S/P, H, D]``, ``k``/``v [B, S/P, H_kv, D]`` -> out, lse, saved."""
    comm = AllToAllComm(cp.hybrid.ulysses)
    order = _super_shard(cp, cp.rank // comm.world_size, comm.world_size, q.device)
    q_h, k_h, v_h = qkv_to_heads(q, k, v, comm, order)  # [B, U*S/P, H/U, D], global order
    out_h, lse_h, _ = ring_forward(q_h, k_h, v_h, _ring_context(cp, comm, q.shape[2], k.shape[2]))
    out, lse = out_to_seq(out_h, lse_h if cp.need_lse else None, comm, order)
    return out, lse, (q_h, k_h, v_h, out_h, lse_h)


def hybrid_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, saved: tuple,
    cp: CPContext,
):
    """Gradients of the local shards from the saved head shards, in the accumulation dtype."""
    q_h, k_h, v_h, out_h, lse_h = saved  # in global token order
    comm = AllToAllComm(cp.hybrid.ulysses)
    order = _super_shard(cp, cp.rank // comm.world_size, comm.world_size, q_h.device)
    dout_h = seq_to_heads(dout, comm, order)
    grads_h = ring_backward(
        dout_h, q_h, k_h, v_h, out_h, lse_h, (), _ring_context(cp, comm, q.shape[2], k.shape[2]),
        grad_dtype=acc_dtype(q.dtype),
    )
    return grads_to_seq(*grads_h, k.shape[2], comm, order)


SPEC = StrategySpec(
    name="hybrid",
    summary="Ulysses inside a node x ring across nodes (2-D mesh); any layout, any mask",
    groups="2d",
    head_split=True,
    forward=hybrid_forward,
    backward=hybrid_backward,
)


def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, groups=None, **kwargs):
    """2-D attention on local shards; ``groups``: HybridGroups or a 2-D (ring, ulysses) mesh."""
    return SPEC.run(q, k, v, groups, **kwargs)
