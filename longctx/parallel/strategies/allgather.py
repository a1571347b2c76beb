"""All-gather attention: gather K/V once, attend locally, reduce-scatter dK/dV back.

One collective instead of ``P`` ring steps: the better choice when shards are short (latency
dominates) or K/V are small (GQA with few kv heads), as in Llama 3's context parallelism.  Each
rank keeps only the gathered blocks its queries may attend to (a causal rank skips later ranks'
keys) and makes one kernel call per query run over them.  Backward gathers K/V again rather than
keeping ``P`` blocks alive between the passes.

Example (on each rank of a process group; any layout)::

    out = longctx.attention(q, k, v, group, strategy="allgather", layout="zigzag",
                            mask=longctx.Mask(causal=True))
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.base import acc_dtype
from ...kernels.mask import Positions
from ..comm import GatherComm
from ..context import CPContext
from ..plan import needed_sources
from .base import StrategySpec
from .blocks import attend, attend_backward

__all__ = ["SPEC", "allgather_attention", "allgather_backward", "allgather_forward"]


def _select_slots(x_all: Tensor, sources: list[int]) -> Tensor:
    """``x_all [P, B, s, ...]`` -> ``[B, n*s, ...]``: the slots of ``sources`` (ascending ranks)
    along the token dim.  By slicing, never by indexing with a host list: that copies the index to
    the GPU and so waits for every kernel queued before it (a host sync on every call)."""
    first = sources[0] if sources else 0
    if sources == list(range(first, first + len(sources))):  # one run of ranks: causal, zigzag
        # [n, B, s, ...] -> [B, n*s, ...] (a view when B = 1)
        return x_all[first : first + len(sources)].transpose(0, 1).flatten(1, 2)
    return torch.cat([x_all[src] for src in sources], dim=1)  # [B, n*s, ...]


def _place_slots(dst_all: Tensor, x_sel: Tensor, sources: list[int]) -> None:
    """The inverse of :func:`_select_slots`: ``x_sel [B, n*s, ...]`` into the ``sources`` slots
    of ``dst_all [P, B, s, ...]`` (the other slots are left as they are)."""
    s = dst_all.shape[2]
    for i, src in enumerate(sources):
        dst_all[src].copy_(x_sel.narrow(1, i * s, s))


def _gather_needed(k: Tensor, v: Tensor, cp: CPContext):
    """Every rank's K/V, keeping the ranks this rank's queries need.

    Returns ``k_sel``/``v_sel [B, n*S/P, H_kv, D]``, their positions, and the source ranks
    (ascending).
    """
    comm = GatherComm(cp.group)
    positions = cp.all_positions()
    sources = needed_sources(cp.mask, positions, cp.rank)
    k_all, v_all = comm.all_gather(k), comm.all_gather(v)  # [P, B, S/P, H_kv, D]
    k_sel, v_sel = _select_slots(k_all, sources), _select_slots(v_all, sources)
    k_pos = Positions.cat([positions[s] for s in sources])
    return k_sel, v_sel, k_pos, sources, comm


def allgather_forward(q: Tensor, k: Tensor, v: Tensor, cp: CPContext):
    """Local shards ``q [B, S/P, H, D]``, ``k``/``v [B, S/P, H_kv, D]`` -> out, lse ``[B, H, S/P]``
    and nothing more to save (backward gathers K/V again)."""
    k_sel, v_sel, k_pos, _, _ = _gather_needed(k, v, cp)
    return (*attend(q, k_sel, v_sel, cp.all_positions()[cp.rank], k_pos, cp), ())


def allgather_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, saved: tuple,
    cp: CPContext,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the local shards, in the accumulation dtype."""
    k_sel, v_sel, k_pos, sources, comm = _gather_needed(k, v, cp)
    acc = acc_dtype(q.dtype)
    q_pos = cp.all_positions()[cp.rank]
    dq, dk_sel, dv_sel = attend_backward(
        dout, q, k_sel, v_sel, out, lse, q_pos, k_pos, cp, grad_dtype=acc
    )
    B, Sk, Hkv, D = k.shape
    new = torch.empty if len(sources) == cp.world_size else torch.zeros  # every slot written?
    dk_all = new(cp.world_size, B, Sk, Hkv, D, dtype=acc, device=k.device)
    dv_all = new(cp.world_size, B, Sk, Hkv, D, dtype=acc, device=k.device)
    _place_slots(dk_all, dk_sel, sources)  # [B, n*S/P, H_kv, D] -> the source ranks' slots
    _place_slots(dv_all, dv_sel, sources)
    return dq, comm.reduce_scatter(dk_all), comm.reduce_scatter(dv_all)


SPEC = StrategySpec(
    name="allgather",
    summary="gather K/V once (cheap with GQA), attend locally, reduce-scatter dK/dV; any layout",
    forward=allgather_forward,
    backward=allgather_backward,
)


def allgather_attention(q: Tensor, k: Tensor, v: Tensor, group=None, **kwargs):
    """All-gather attention on local shards; see :func:`longctx.attention` for the arguments."""
    return SPEC.run(q, k, v, group, **kwargs)
