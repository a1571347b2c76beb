"""Ulysses attention: all-to-all from sequence shards to head shards, full local attention, back.

Each of ``P`` ranks gives every other rank its tokens of that rank's heads, so rank ``j`` ends up
with the *whole* sequence for heads ``j*H/P .. (j+1)*H/P - 1`` and runs the local kernel on it
(DeepSpeed-Ulysses).  Communication per layer is four all-to-alls of a shard, independent of
``P``, but the head count bounds the degree: ``H % P == 0``, and the query heads per rank either
cover whole GQA groups or fit inside one (fewer kv heads than ranks: a kv head is replicated to
the ranks that use it, never expanded to ``H``).  The exchanges (q, k, v packed into one
all-to-all; out with lse; dq, dk, dv) live in :mod:`longctx.parallel.head_exchange`, shared with
the hybrid strategy.

Example (on each rank of a process group; any layout)::

    out = longctx.attention(q, k, v, group, strategy="ulysses", mask=longctx.Mask(causal=True))
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
from .blocks import attend, attend_backward

__all__ = ["SPEC", "ulysses_attention", "ulysses_backward", "ulysses_forward"]


def _order(cp: CPContext, device) -> TokenOrder:
    """The whole sequence, gathered in rank order, sorted into global order."""
    members = tuple(range(cp.world_size))
    return token_order(cp.layout, cp.seq_len, cp.world_size, members, str(device))


def _heads_context(cp: CPContext, comm: AllToAllComm, heads: int, kv_heads: int) -> CPContext:
    """The context of this rank's kernel call: the mask of the heads it holds."""
    mask = heads_mask(cp.mask, comm, heads, kv_heads)
    return cp if mask is cp.mask else replace(cp, mask=mask)


def ulysses_forward(q: Tensor, k: Tensor, v: Tensor, cp: CPContext):
    """Local shards ``q [B, S/P, H, D]``, ``k``/``v [B, S/P, H_kv, D]`` -> out, lse, saved.

    One kernel call over the whole sorted sequence for this rank's heads.  ``lse [B, H, S/P]``
    travels back only when the caller asked for it (``cp.need_lse``; else None).  ``saved`` holds
    the head shards backward needs, so it repeats no exchange of q, k, v or out.
    """
    comm = AllToAllComm(cp.group)
    order = _order(cp, q.device)
    q_h, k_h, v_h = qkv_to_heads(q, k, v, comm, order)  # [B, S, H/P, D], [B, S, m, D] x 2
    cp_h = _heads_context(cp, comm, q.shape[2], k.shape[2])
    out_h, lse_h = attend(q_h, k_h, v_h, order.positions, order.positions, cp_h)
    out, lse = out_to_seq(out_h, lse_h if cp.need_lse else None, comm, order)
    return out, lse, (q_h, k_h, v_h, out_h, lse_h)


def ulysses_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, saved: tuple,
    cp: CPContext,
):
    """Gradients of the local shards from the saved head shards.

    ``dq`` comes back in q's dtype; ``dk``/``dv`` in k's dtype, or in the accumulation dtype
    when replicated kv heads are summed at their owner.
    """
    q_h, k_h, v_h, out_h, lse_h = saved  # in global token order
    comm = AllToAllComm(cp.group)
    order = _order(cp, dout.device)
    replicated = k_h.shape[2] * comm.world_size > k.shape[2]
    grad_dtype = acc_dtype(q.dtype) if replicated else q.dtype
    dout_h = seq_to_heads(dout, comm, order)  # [B, S, H/P, D]
    pos = order.positions
    dq_h, dk_h, dv_h = attend_backward(
        dout_h, q_h, k_h, v_h, out_h, lse_h, pos, pos,
        _heads_context(cp, comm, q.shape[2], k.shape[2]), grad_dtype=grad_dtype,
    )
    return grads_to_seq(dq_h.to(q.dtype), dk_h, dv_h, k.shape[2], comm, order)


SPEC = StrategySpec(
    name="ulysses",
    summary="all-to-all sequence <-> heads, one local kernel call over the whole sequence; "
    "heads must split over the group",
    head_split=True,
    whole_sequence=True,
    forward=ulysses_forward,
    backward=ulysses_backward,
)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group=None, **kwargs):
    """Ulysses attention on local shards; see :func:`longctx.attention` for the arguments."""
    return SPEC.run(q, k, v, group, **kwargs)
