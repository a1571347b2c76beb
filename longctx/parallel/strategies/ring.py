"""Ring attention: K/V blocks travel around the ring while each rank attends to them.

At step ``s`` rank ``r`` holds the keys of rank ``r - s`` and attends its queries to them; the
transfer of the next block is in flight while the current one is computed.  Partial results
merge by their LSE.  In backward the K/V blocks travel again, each followed by its dK/dV
accumulator (float32), which lands back at its owner after one last hop.

The ring runs on any layout: positions come from the layout, the mask is applied on global
positions, and steps in which no rank has an allowed pair are skipped with their communication
(a sliding window only talks to its neighbours).

Example (on each rank of a process group; ``q [B, S/P, H, D]`` shards)::

    out = longctx.attention(q, k, v, group, strategy="ring", mask=longctx.Mask(causal=True))

The zigzag and striped strategies are this ring over their layouts (``zigzag.py``,
``striped.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.base import acc_dtype
from ..comm import RingComm
from ..context import CPContext
from ..plan import ring_steps
from .base import StrategySpec
from .blocks import attend, attend_backward, backward_block, forward_block

__all__ = ["SPEC", "ring_attention", "ring_backward", "ring_forward"]


def ring_forward(q: Tensor, k: Tensor, v: Tensor, cp: CPContext) -> tuple[Tensor, Tensor, tuple]:
    """Local shards ``q [B, S/P, H, D]``, ``k``/``v [B, S/P, H_kv, D]`` -> out, lse ``[B, H, S/P]``
    and nothing more to save for backward (``()``)."""
    positions = cp.all_positions()
    n_steps = ring_steps(cp.mask, positions)
    if n_steps == 1:  # only this rank's keys (one rank, or a short window): nothing to merge
        return (*attend(q, k, v, positions[cp.rank], positions[cp.rank], cp), ())
    comm = RingComm(cp.group)
    B, Sq, H, D = q.shape
    out = torch.zeros(B, Sq, H, D, dtype=acc_dtype(q.dtype), device=q.device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=out.dtype, device=q.device)
    q_pos = positions[cp.rank]
    for step in range(n_steps):
        if step + 1 < n_steps:
            k_next, v_next = comm.send_recv([k, v])
            comm.commit()
        k_pos = positions[(cp.rank - step) % cp.world_size]
        forward_block(q, k, v, q_pos, k_pos, cp, out, lse)
        if step + 1 < n_steps:
            comm.wait()
            k, v = k_next, v_next
    return out.to(q.dtype), lse, ()


def ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, saved: tuple,
    cp: CPContext, grad_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the local shards, in ``grad_dtype`` (default: q's dtype; ``saved`` is ``()``).

    Several steps sum in the accumulation dtype and cast at the end; one step (only this rank's
    keys) gets the kernel's gradients in ``grad_dtype`` directly (no float32 round trip).
    """
    grad_dtype = q.dtype if grad_dtype is None else grad_dtype
    positions = cp.all_positions()
    n_steps = ring_steps(cp.mask, positions)
    if n_steps == 1:
        own = positions[cp.rank]
        return attend_backward(dout, q, k, v, out, lse, own, own, cp, grad_dtype=grad_dtype)
    kv_comm = RingComm(cp.group, tag_base=0)
    grad_comm = RingComm(cp.group, tag_base=2)
    acc = acc_dtype(q.dtype)
    q_pos = positions[cp.rank]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk_in = dv_in = None  # what the previous rank accumulated for the block now held
    for step in range(n_steps):
        if step + 1 < n_steps:
            k_next, v_next = kv_comm.send_recv([k, v])
            kv_comm.commit()
        k_pos = positions[(cp.rank - step) % cp.world_size]
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        backward_block(dout, q, k, v, out, lse, q_pos, k_pos, cp, dq, dk, dv)
        if step > 0:  # add what earlier ranks accumulated for this block
            grad_comm.wait()
            dk += dk_in
            dv += dv_in
        if step + 1 < n_steps:
            dk_in, dv_in = grad_comm.send_recv([dk, dv])
            grad_comm.commit()
            kv_comm.wait()
            k, v = k_next, v_next
    if n_steps > 1:
        # dk/dv hold the complete gradient of rank (rank - n_steps + 1)'s keys: send them home
        dk, dv = grad_comm.send_recv([dk, dv], offset=-(n_steps - 1))
        grad_comm.commit()
        grad_comm.wait()
    return dq.to(grad_dtype), dk.to(grad_dtype), dv.to(grad_dtype)


SPEC = StrategySpec(
    name="ring",
    summary="K/V blocks pass around the ring by p2p, overlapped with compute; any layout, any mask",
    forward=ring_forward,
    backward=ring_backward,
)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group=None, **kwargs):
    """Ring attention on local shards; see :func:`longctx.attention` for the arguments."""
    return SPEC.run(q, k, v, group, **kwargs)
