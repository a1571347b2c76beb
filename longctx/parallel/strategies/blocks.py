"""The math every strategy shares: attend a local query shard to one key block, accumulate.

Pure functions of tensors and a :class:`~longctx.parallel.context.CPContext`; no communication.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.base import acc_dtype
from ...kernels.mask import Positions
from ...kernels.merge import merge_into
from ..context import CPContext
from ..plan import TileCall, plan_calls


def _whole(calls: list[TileCall], q: Tensor, k: Tensor) -> bool:
    """One call over every query and key: the kernel's result needs no merge."""
    return len(calls) == 1 and calls[0] == TileCall(0, q.shape[1], 0, k.shape[1])


def forward_block(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Positions, k_pos: Positions, cp: CPContext,
    out: Tensor, lse: Tensor,
) -> None:
    """Merge ``q``'s attention to the block ``k``/``v`` into ``out [B,Sq,H,D]``, ``lse [B,H,Sq]``."""
    for c in plan_calls(cp.mask, q_pos, k_pos):
        o, l = cp.kernel.forward(
            q[:, c.q_begin : c.q_end],
            k[:, c.k_begin : c.k_end],
            v[:, c.k_begin : c.k_end],
            scale=cp.scale,
            mask=cp.mask,
            q_pos=q_pos.slice(c.q_begin, c.q_end),
            k_pos=k_pos.slice(c.k_begin, c.k_end),
        )
        merge_into(out[:, c.q_begin : c.q_end], lse[:, :, c.q_begin : c.q_end], o, l)


def backward_block(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    q_pos: Positions, k_pos: Positions, cp: CPContext,
    dq: Tensor, dk: Tensor, dv: Tensor,
) -> None:
    """Add the block's contribution to ``dq`` and to the block's ``dk``/``dv`` (in place).

    ``out``/``lse`` are the global (fully merged) results of the forward pass.
    """
    for c in plan_calls(cp.mask, q_pos, k_pos):
        qs, ks = slice(c.q_begin, c.q_end), slice(c.k_begin, c.k_end)
        dq_c, dk_c, dv_c = cp.kernel.backward(
            dout[:, qs],
            q[:, qs],
            k[:, ks],
            v[:, ks],
            out[:, qs],
            lse[:, :, qs],
            scale=cp.scale,
            mask=cp.mask,
            q_pos=q_pos.slice(c.q_begin, c.q_end),
            k_pos=k_pos.slice(c.k_begin, c.k_end),
        )
        dq[:, qs] += dq_c
        dk[:, ks] += dk_c
        dv[:, ks] += dv_c


def attend(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Positions, k_pos: Positions, cp: CPContext
) -> tuple[Tensor, Tensor]:
    """``q``'s whole attention to ``k``/``v``: out ``[B, Sq, H, D]`` (q.dtype), lse ``[B, H, Sq]``.

    When one kernel call covers the shards (Ulysses' sorted sequence), its result is returned as
    it is; otherwise the calls are merged in the accumulation dtype (:func:`forward_block`).
    """
    calls = plan_calls(cp.mask, q_pos, k_pos)
    if _whole(calls, q, k):
        return cp.kernel.forward(
            q, k, v, scale=cp.scale, mask=cp.mask, q_pos=q_pos, k_pos=k_pos
        )
    B, Sq, H, D = q.shape
    out = torch.zeros(B, Sq, H, D, dtype=acc_dtype(q.dtype), device=q.device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=out.dtype, device=q.device)
    forward_block(q, k, v, q_pos, k_pos, cp, out, lse)
    return out.to(q.dtype), lse


def attend_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    q_pos: Positions, k_pos: Positions, cp: CPContext, grad_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`attend`, ``dq``/``dk``/``dv`` in ``grad_dtype``.

    One covering kernel call returns them directly in ``grad_dtype`` (no float32 round trip);
    several calls are summed in the accumulation dtype (:func:`backward_block`), then cast.
    """
    calls = plan_calls(cp.mask, q_pos, k_pos)
    if _whole(calls, q, k):
        return cp.kernel.backward(
            dout, q, k, v, out, lse, scale=cp.scale, mask=cp.mask, q_pos=q_pos, k_pos=k_pos,
            grad_dtype=grad_dtype,
        )
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    backward_block(dout, q, k, v, out, lse, q_pos, k_pos, cp, dq, dk, dv)
    return dq.to(grad_dtype), dk.to(grad_dtype), dv.to(grad_dtype)
