"""The math every strategy shares: attend a local query shard to one key block, accumulate.

Pure functions of tensors and a :class:`~longctx.parallel.context.CPContext`; no communication.
"""

from __future__ import annotations

from torch import Tensor

from ...kernels.mask import Positions
from ...kernels.merge import merge_into
from ..context import CPContext
from ..plan import plan_calls


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
