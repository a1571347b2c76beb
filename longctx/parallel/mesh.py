"""Device meshes with named dimensions: ``dp x cp x tp``, with ``cp`` split as ``ring x ulysses``.

Ranks are laid out with the fastest-communicating dimensions innermost: ``tp`` (all-reduces every
layer) varies fastest, then ``ulysses`` (all-to-alls every attention), then ``ring``, then ``dp``.
With 8 GPUs per node and ``tp * ulysses <= 8``, tensor and Ulysses traffic stays on NVLink and
only the ring's point-to-point and data-parallel reductions cross nodes.

Everything downstream takes the mesh or its groups as arguments; nothing is stored globally.

Example (on each of 8 ranks after ``dist.init_process_group``)::

    from longctx.parallel.mesh import ParallelDims, build_mesh
    pm = build_mesh(ParallelDims(dp=2, cp=4, ulysses=2), device_type="cuda")
    pm.group("cp")          # the 4 ranks sharing one sequence
    pm.hybrid_groups()      # HybridGroups(ulysses=<2 ranks>, ring=<2 ranks>) for strategy="hybrid"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .context import HybridGroups

__all__ = ["ParallelDims", "ParallelMesh", "build_mesh"]

DIM_NAMES = ("dp", "cp", "tp")
SPLIT_DIM_NAMES = ("dp", "ring", "ulysses", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the parallel dimensions; ``ulysses`` divides ``cp`` (``ring = cp // ulysses``)."""

    dp: int = 1
    cp: int = 1
    tp: int = 1
    ulysses: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "cp", "tp", "ulysses"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelDims.{name} must be >= 1, got {getattr(self, name)}")
        if self.cp % self.ulysses:
            raise ValueError(
                f"ParallelDims.ulysses={self.ulysses} must divide cp={self.cp} (cp = ring x ulysses)"
            )

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp


@dataclass(frozen=True, eq=False)
class ParallelMesh:
    """The meshes built by :func:`build_mesh` and their process groups by name."""

    dims: ParallelDims
    mesh: DeviceMesh  # ("dp", "cp", "tp")
    split_mesh: DeviceMesh  # ("dp", "ring", "ulysses", "tp"), same ranks
    fsdp_mesh: DeviceMesh  # ("dp_cp", "tp"), same ranks: FSDP shards over dp x cp, TP over tp

    def group(self, name: str) -> dist.ProcessGroup:
        """Process group of ``dp``, ``cp``, ``tp``, ``ring`` or ``ulysses``."""
        if name in DIM_NAMES:
            return self.mesh.get_group(name)
        if name in ("ring", "ulysses"):
            return self.split_mesh.get_group(name)
        raise ValueError(f"unknown mesh dimension {name!r}; choose one of {DIM_NAMES + ('ring', 'ulysses')}")

    def hybrid_groups(self) -> HybridGroups:
        """The (ulysses, ring) pair for ``strategy="hybrid"``."""
        return HybridGroups(ulysses=self.group("ulysses"), ring=self.group("ring"))


def build_mesh(dims: ParallelDims, device_type: str = "cuda") -> ParallelMesh:
    """Build the meshes on every rank of the default group (a collective call)."""
    world = dist.get_world_size()
    if dims.world_size != world:
        raise ValueError(
            f"dp x cp x tp = {dims.dp} x {dims.cp} x {dims.tp} = {dims.world_size} but there are "
            f"{world} ranks; choose sizes whose product is {world}"
        )
    ranks = torch.arange(world)
    mesh = DeviceMesh(device_type, ranks.view(dims.dp, dims.cp, dims.tp), mesh_dim_names=DIM_NAMES)
    split = DeviceMesh(
        device_type,
        ranks.view(dims.dp, dims.ring, dims.ulysses, dims.tp),  # cp rank = ring * U + ulysses
        mesh_dim_names=SPLIT_DIM_NAMES,
    )
    fsdp = DeviceMesh(
        device_type,
        ranks.view(dims.dp * dims.cp, dims.tp),  # [dp, cp, tp] -> [dp*cp, tp], cp fastest
        mesh_dim_names=("dp_cp", "tp"),
    )
    return ParallelMesh(dims, mesh, split, fsdp)
