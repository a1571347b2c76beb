"""What a context-parallel call needs besides q, k, v: one object, built and checked per call.

:func:`build_context` validates the inputs against the group, the layout and the mask and
raises errors that say what to change; the strategies receive the resulting :class:`CPContext`
and never look anything up through globals.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.base import (
    AttentionKernel,
    check_qkv,
    get_kernel,
    kernel_unsupported_reason,
    resolve_scale,
    takes_positions,
)
from ..kernels.mask import Mask, Positions
from .layout import Layout
from .plan import plan_calls

__all__ = [
    "CPContext",
    "HybridGroups",
    "all_positions",
    "build_context",
    "check_device",
    "check_equal_shards",
    "check_head_split",
    "check_kernel",
    "resolve_group",
    "resolve_hybrid_groups",
]

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
    need_lse: bool = True

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


def _group_shape(strategy, group, q: Tensor):
    """(group or None, hybrid groups or None, world size, rank) of the call."""
    if strategy.groups == "2d":
        hybrid = resolve_hybrid_groups(group)
        u_world, u_rank = dist.get_world_size(hybrid.ulysses), dist.get_rank(hybrid.ulysses)
        r_world, r_rank = dist.get_world_size(hybrid.ring), dist.get_rank(hybrid.ring)
        check_device(q, hybrid.ulysses)
        check_device(q, hybrid.ring)
        return None, hybrid, u_world * r_world, r_rank * u_world + u_rank
    group = resolve_group(group)
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    check_device(q, group)
    return group, None, world, rank


def check_kernel(
    kernel: AttentionKernel, q: Tensor, kv_heads: int, mask: Mask,
    positions: tuple[Positions, ...], whole_sequence: bool,
) -> None:
    """Refuse, before any communication and identically on every rank, a kernel that cannot run
    the calls of this strategy: a wrong device or dtype, a head dim or a mask piece it lacks, or
    (for kernels that look at positions) the diagonal calls of any rank, or the whole sorted
    sequence where the strategy attends over it (``whole_sequence``, as the spec says: Ulysses)."""
    reason = kernel_unsupported_reason(kernel, q, mask, kv_heads=kv_heads)
    if reason is None and takes_positions(kernel):
        if whole_sequence:
            seq = Positions.contiguous(0, sum(len(p) for p in positions))
            pairs = [(seq, seq)]
        else:
            pairs = [
                (pos.slice(c.q_begin, c.q_end), pos.slice(c.k_begin, c.k_end))
                for pos in positions
                for c in plan_calls(mask, pos, pos)
            ]
        for q_pos, k_pos in pairs:
            reason = kernel_unsupported_reason(kernel, q, mask, q_pos, k_pos, kv_heads=kv_heads)
            if reason is not None:
                break
    if reason is not None:
        raise ValueError(
            f"kernel {getattr(kernel, 'name', kernel)!r} cannot run this call: {reason}. "
            "kernel='auto' picks one that can"
        )


def check_equal_shards(q: Tensor, k: Tensor, group: dist.ProcessGroup | None) -> None:
    """Opt-in (``check_shards=True``): one small all-gather that every rank holds shards of the
    same shapes and dtype; raises on every rank otherwise (instead of a hang or an abort in the
    strategy's collectives)."""
    if group is None:
        return
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    mine = torch.tensor(
        [*q.shape, *k.shape, dtypes.index(q.dtype)], dtype=torch.int64, device=q.device
    )
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = [tuple(t.tolist()) for t in every]
    if len(set(rows)) > 1:
        listing = "; ".join(
            f"rank {r}: q {list(row[:4])}, k {list(row[4:8])}, {dtypes[row[8]]}"
            for r, row in enumerate(rows)
        )
        raise ValueError(
            "the ranks hold shards of different shapes or dtypes: " + listing + ". Shard one "
            "global sequence with longctx.shard(x, layout, world_size, rank) on every rank"
        )


def build_context(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group,
    *,
    strategy,
    layout: str | Layout,
    mask: Mask | None,
    kernel: str | AttentionKernel,
    scale: float | None,
    need_lse: bool = True,
    check_shards: bool = False,
) -> CPContext:
    """Check the local shards and the call, and bundle what the strategy needs.

    ``strategy`` is the :class:`~longctx.parallel.strategies.base.StrategySpec` being run.
    Every check that can fail runs here, before any communication, and depends only on what
    every rank shares (shapes, the layout, the mask), so a refused call is refused on every
    rank and leaves the group usable.  ``check_shards=True`` adds one small collective that
    compares the ranks' shard shapes (see :func:`check_equal_shards`).
    """
    check_qkv(q, k, v)
    group, hybrid, world, rank = _group_shape(strategy, group, q)
    layout = Layout.parse(layout)
    if not strategy.accepts_layout(layout.kind):
        first = strategy.layouts[0]
        raise ValueError(
            f"strategy {strategy.name!r} runs on layout {first!r} but got layout {str(layout)!r}: "
            f"shard q/k/v with longctx.parallel.shard(x, {first!r}, world_size, rank) and pass "
            f"layout={first!r}, or use strategy='ring', which runs on any layout"
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
    if strategy.head_split:
        degree = world if hybrid is None else dist.get_world_size(hybrid.ulysses)
        check_head_split(q.shape[2], k.shape[2], degree)
    mask = mask if mask is not None else Mask()
    mask.validate(seq_len)
    scale = resolve_scale(scale, q.shape[-1])
    kern = get_kernel(kernel)
    positions = all_positions(layout, seq_len, world)
    check_kernel(kern, q, k.shape[2], mask, positions, whole_sequence=strategy.whole_sequence)
    if check_shards:
        check_equal_shards(q, k, group if hybrid is None else hybrid.ulysses)
        if hybrid is not None:
            check_equal_shards(q, k, hybrid.ring)
    return CPContext(
        group=group,
        layout=layout,
        seq_len=seq_len,
        mask=mask,
        kernel=kern,
        scale=scale,
        world_size=world,
        rank=rank,
        positions=positions,
        hybrid=hybrid,
        need_lse=need_lse,
    )


def check_head_split(heads: int, kv_heads: int, degree: int) -> None:
    """Raise a ValueError saying what to change when ``heads``/``kv_heads`` can't split ``degree``
    ways (Ulysses, and the Ulysses dimension of the hybrid).

    Example::

        >>> check_head_split(16, 4, 4)      # 4 query heads per rank, one GQA group each
        >>> check_head_split(12, 4, 8)
        Traceback (most recent call last):
        ...
        ValueError: ulysses over 8 ranks needs num_heads divisible by 8, got 12 heads; use strategy='ring'/'zigzag'/'striped', or 'hybrid' with a ulysses degree dividing 12
    """
    if heads % degree:
        raise ValueError(
            f"ulysses over {degree} ranks needs num_heads divisible by {degree}, got {heads} heads; "
            "use strategy='ring'/'zigzag'/'striped', or 'hybrid' with a ulysses degree dividing "
            f"{heads}"
        )
    per_rank, group = heads // degree, heads // kv_heads
    if per_rank % group and group % per_rank:
        raise ValueError(
            f"ulysses over {degree} ranks gives each rank {per_rank} query heads, which neither "
            f"cover whole GQA groups of {group} nor fit inside one ({heads} heads, {kv_heads} kv "
            "heads); choose a degree such that the heads per rank divide or are divided by the "
            "group size, or use a ring strategy"
        )
