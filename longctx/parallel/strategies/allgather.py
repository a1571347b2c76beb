"""All-gather attention: gather K/V once, attend locally, reduce-scatter dK/dV back.

One collective instead of ``P`` ring steps: the better choice when shards are short (latency
dominates) or K/V are small (GQA with few kv heads), as in Llama 3's context parallelism.  Each
rank keeps only the gathered blocks its queries may attend to (a causal rank skips later ranks'
keys) and makes one kernel call per query run over them.  Backward gathers K/V again rather than
keeping ``P`` blocks alive between the passes.

Example (on each rank of a process group; any layout)::

    from longctx.parallel.strategies.allgather import allgather_attention
    out = allgather_attention(q, k, v, group, layout="zigzag", mask=Mask(causal=True))
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.base import acc_dtype
from ...kernels.mask import Positions
from ..comm import GatherComm
from ..context import CPContext, build_context, cast_grads, save_for_cp_backward
from ..plan import needed_sources
from .blocks import attend, attend_backward

__all__ = ["allgather_forward", "allgather_backward", "AllGatherAttention", "allgather_attention"]


def _gather_needed(k: Tensor, v: Tensor, cp: CPContext):
    """Every rank's K/V, keeping the ranks this rank's queries need.

    Returns ``k_sel``/``v_sel [B, n*S/P, H_kv, D]``, their positions, and the source ranks.
    """
    comm = GatherComm(cp.group)
    positions = cp.all_positions()
    sources = needed_sources(cp.mask, positions, cp.rank)
    B, Sk, Hkv, D = k.shape
    k_all, v_all = comm.all_gather(k), comm.all_gather(v)  # [P, B, S/P, H_kv, D]
    # [n, B, S/P, H_kv, D] -> [B, n*S/P, H_kv, D]
    k_sel = k_all[sources].transpose(0, 1).reshape(B, len(sources) * Sk, Hkv, D)
    v_sel = v_all[sources].transpose(0, 1).reshape(B, len(sources) * Sk, Hkv, D)
    k_pos = Positions.cat([positions[s] for s in sources])
    return k_sel, v_sel, k_pos, sources, comm


def allgather_forward(q: Tensor, k: Tensor, v: Tensor, cp: CPContext) -> tuple[Tensor, Tensor]:
    """Local shards ``q [B, S/P, H, D]``, ``k``/``v [B, S/P, H_kv, D]`` -> out, lse ``[B, H, S/P]``."""
    k_sel, v_sel, k_pos, _, _ = _gather_needed(k, v, cp)
    return attend(q, k_sel, v_sel, cp.all_positions()[cp.rank], k_pos, cp)


def allgather_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cp: CPContext
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the local shards, in the accumulation dtype."""
    k_sel, v_sel, k_pos, sources, comm = _gather_needed(k, v, cp)
    acc = acc_dtype(q.dtype)
    q_pos = cp.all_positions()[cp.rank]
    dq, dk_sel, dv_sel = attend_backward(
        dout, q, k_sel, v_sel, out, lse, q_pos, k_pos, cp, grad_dtype=acc
    )
    B, Sk, Hkv, D = k.shape
    dk_all = torch.zeros(cp.world_size, B, Sk, Hkv, D, dtype=acc, device=k.device)
    dv_all = torch.zeros_like(dk_all)
    # [B, n*S/P, H_kv, D] -> [n, B, S/P, H_kv, D], scattered to the source ranks' slots
    dk_all[sources] = dk_sel.view(B, len(sources), Sk, Hkv, D).transpose(0, 1)
    dv_all[sources] = dv_sel.view(B, len(sources), Sk, Hkv, D).transpose(0, 1)
    return dq, comm.reduce_scatter(dk_all), comm.reduce_scatter(dv_all)


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cp: CPContext):
        out, lse = allgather_forward(q, k, v, cp)
        save_for_cp_backward(ctx, cp, q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grads = allgather_backward(dout, q, k, v, out, lse, ctx.cp)
        return (*cast_grads(q, k, v, *grads), None)


def allgather_attention(
    q: Tensor, k: Tensor, v: Tensor, group=None, *, layout="contiguous", mask=None,
    kernel="auto", scale=None, return_lse: bool = False,
):
    """All-gather attention on local shards; see :func:`longctx.attention` for the arguments."""
    cp = build_context(
        q, k, v, group, strategy="allgather", layout=layout, mask=mask, kernel=kernel, scale=scale
    )
    out, lse = AllGatherAttention.apply(q, k, v, cp)
    return (out, lse) if return_lse else out
