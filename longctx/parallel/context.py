"""What a context-parallel call needs besides q, k, v: one object, built and checked per call.

:func:`build_context` validates the inputs against the group, the layout and the mask and
raises errors that say what to change; the strategies receive the resulting :class:`CPContext`
and never look anything up through globals.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from ..kernels.base import AttentionKernel, check_qkv, get_kernel
from ..kernels.mask import Mask, Positions
from .layout import Layout

__all__ = [
    "CPContext",
    "HybridGroups",
    "all_positions",
    "check_device",
    "build_context",
    "resolve_group",
    "resolve_hybrid_groups",
    "STRATEGY_LAYOUTS",
]

# The layouts each strategy runs on (None: any layout).
STRATEGY_LAYOUTS: dict[str, tuple[str, ...] | None] = {
    "ring": None,
    "allgather": None,
    "zigzag": ("zigzag",),
    "striped": ("striped",),
    "ulysses": None,
    "hybrid": None,
    "star": ("contiguous",),
    "linear": ("contiguous",),
}


@dataclass(frozen=True, eq=False)
class HybridGroups:
    """The two groups of 2-D context parallelism: CP rank = ``ring_rank * U + ulysses_rank``.

    ``ulysses`` (size U) should be the inner one, inside a node; ``ring`` (size R) spans them.
    """

    ulysses: dist.ProcessGroup
    ring: dist.ProcessGroup


@dataclass(frozen=True, eq=False)
class CPContext:
    """Per-call state of a context-parallel attention: group, positions, mask, kernel, scale.

    ``seq_len`` is the global sequence length; ``rank``/``world_size`` are within ``group``
    (``group=None``: a single process, no communication); ``positions[r]`` are the global
    token positions rank ``r`` holds.  ``hybrid`` is set for the 2-D strategy only.
    """

    group: dist.ProcessGroup | None
    layout: Layout
    seq_len: int
    mask: Mask
    kernel: AttentionKernel
    scale: float
    world_size: int
    rank: int
    positions: tuple[Positions, ...]
    hybrid: HybridGroups | None = None

    def all_positions(self) -> tuple[Positions, ...]:
        """Global positions held by every rank of the group, in rank order."""
        return self.positions


@functools.lru_cache(maxsize=128)
def all_positions(layout: Layout, seq_len: int, world_size: int) -> tuple[Positions, ...]:
    """Every rank's global positions; a pure function of the layout, memoised across calls."""
    return tuple(layout.positions(seq_len, world_size, r) for r in range(world_size))


def _is_device_mesh(obj) -> bool:
    return hasattr(obj, "get_group") and hasattr(obj, "ndim")


def resolve_group(mesh_or_group) -> dist.ProcessGroup | None:
    """A ProcessGroup from a group, a 1-D DeviceMesh, or None (single process / no CP)."""
    if mesh_or_group is None or isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group
    if _is_device_mesh(mesh_or_group):
        if mesh_or_group.ndim != 1:
            raise ValueError(
                f"attention needs a 1-D mesh for context parallelism; got a {mesh_or_group.ndim}-D "
                "mesh: pass its cp dimension, e.g. mesh['cp'] (or use strategy='hybrid' with a "
                "2-D (ring, ulysses) mesh)"
            )
        return mesh_or_group.get_group()
    if isinstance(mesh_or_group, HybridGroups):
        raise ValueError(
            "HybridGroups are for strategy='hybrid'; pass one process group for the other strategies"
        )
    raise TypeError(
        "expected a torch.distributed ProcessGroup, a 1-D DeviceMesh or None; got "
        f"{type(mesh_or_group).__name__}"
    )


def resolve_hybrid_groups(mesh_or_groups) -> HybridGroups:
    """HybridGroups from HybridGroups or a 2-D DeviceMesh with dims (ring, ulysses), inner last."""
    if isinstance(mesh_or_groups, HybridGroups):
        return mesh_or_groups
    if _is_device_mesh(mesh_or_groups) and mesh_or_groups.ndim == 2:
        return HybridGroups(ulysses=mesh_or_groups.get_group(1), ring=mesh_or_groups.get_group(0))
    raise ValueError(
        "strategy='hybrid' needs HybridGroups(ulysses=..., ring=...) or a 2-D DeviceMesh with "
        "dims (ring, ulysses), e.g. longctx.parallel.mesh.build_mesh(...).hybrid_groups(); got "
        f"{type(mesh_or_groups).__name__}"
    )


def check_device(q: Tensor, group: dist.ProcessGroup | None) -> None:
    """Raise when the tensors' device does not suit the group's backend (NCCL: CUDA, gloo: CPU)."""
    if group is None:
        return
    backend = str(dist.get_backend(group)).lower()
    if q.device.type == "cuda" and "nccl" not in backend:
        raise ValueError(
            f"q/k/v are on {q.device} but the process group uses {backend!r}; create it with "
            "backend='nccl' (or 'cpu:gloo,cuda:nccl') for CUDA tensors"
        )
    if q.device.type == "cpu" and "gloo" not in backend:
        raise ValueError(
            f"q/k/v are on the CPU but the process group uses {backend!r}; move them to the GPU "
            "(.cuda()) or use a gloo group for CPU tensors"
        )


def build_context(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group,
    *,
    strategy: str,
    layout: "str | Layout",
    mask: Mask | None,
    kernel: "str | AttentionKernel",
    scale: float | None,
) -> CPContext:
    """Check the local shards and the call, and bundle what the strategy needs."""
    check_qkv(q, k, v)
    hybrid = None
    if strategy == "hybrid":
        hybrid = resolve_hybrid_groups(group)
        group = None
        u_world, u_rank = dist.get_world_size(hybrid.ulysses), dist.get_rank(hybrid.ulysses)
        r_world, r_rank = dist.get_world_size(hybrid.ring), dist.get_rank(hybrid.ring)
        world, rank = u_world * r_world, r_rank * u_world + u_rank
        check_device(q, hybrid.ulysses)
    else:
        group = resolve_group(group)
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        check_device(q, group)
    layout = Layout.parse(layout)
    allowed = STRATEGY_LAYOUTS[strategy]
    if allowed is not None and layout.kind not in allowed:
        raise ValueError(
            f"strategy {strategy!r} runs on layout {allowed[0]!r} but got layout {str(layout)!r}: "
            f"shard q/k/v with longctx.parallel.shard(x, {allowed[0]!r}, world_size, rank) and pass "
            f"layout={allowed[0]!r}, or use strategy='ring', which runs on any layout"
        )
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q holds {q.shape[1]} local tokens but k/v hold {k.shape[1]}: shard q, k and v of the "
            "same sequence with the same layout (context-parallel self-attention)"
        )
    seq_len = q.shape[1] * world
    need = layout.required_multiple(world)
    if seq_len % need:
        raise ValueError(
            f"layout {str(layout)!r} on {world} ranks needs a global length that is a multiple of "
            f"{need}; the local shards of {q.shape[1]} tokens make {seq_len}. Pad the global "
            "sequence with longctx.parallel.layout.pad_to_multiple before sharding"
        )
    mask = mask if mask is not None else Mask()
    mask.validate(seq_len)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return CPContext(
        group=group,
        layout=layout,
        seq_len=seq_len,
        mask=mask,
        kernel=get_kernel(kernel),
        scale=float(scale),
        world_size=world,
        rank=rank,
        positions=all_positions(layout, seq_len, world),
        hybrid=hybrid,
    )


def save_for_cp_backward(fn_ctx, cp: CPContext, q, k, v, out, lse) -> None:
    """Shared body of each strategy's autograd ``forward``: keep what backward needs."""
    fn_ctx.save_for_backward(q, k, v, out, lse)
    fn_ctx.cp = cp
    fn_ctx.mark_non_differentiable(lse)


def cast_grads(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor):
    """Gradients from the accumulation dtype back to the inputs' dtypes."""
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

