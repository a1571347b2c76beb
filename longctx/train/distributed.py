"""Process-group start-up for training: torchrun's environment, an existing group, or one process.

The same trainer code runs on CPU (gloo) and GPU (NCCL):

- an existing default process group (e.g. a :class:`~longctx.testing.SimulatedMesh` worker) is
  used as is, and left alone at the end;
- under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set), the group is
  started from the environment; ``LOCAL_RANK`` picks the GPU;
- otherwise a one-process group is started on an in-memory store (nothing listens on a port).

Example::

    >>> from longctx.train.distributed import init_distributed
    >>> env = init_distributed("cpu")
    >>> env.rank, env.world_size, env.device.type, env.backend
    (0, 1, 'cpu', 'gloo')
    >>> env.close()
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "launched_by_torchrun"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher with its variables) started this process."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


@dataclass(frozen=True)
class DistEnv:
    """This process's place: ``rank`` / ``world_size`` (global), ``local_rank``, its ``device``,
    the ``backend``, and whether it started the group (then :meth:`close` destroys it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError(
                "train.device='cuda' but torch sees no CUDA device; set train.device=cpu (or "
                "auto) to train on CPU over gloo"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has {count} GPU(s); launch at most "
                f"{count} processes per node (torchrun --nproc-per-node {count})"
            )
        return torch.device("cuda", local_rank)
    if device not in ("auto", "cpu"):
        raise ValueError(f"train.device={device!r}; allowed values: 'auto', 'cpu', 'cuda'")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistEnv:
    """Join or start the default process group and pick this process's device.

    ``device``: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dist.is_initialized():
        group_backend = dist.get_backend()
        if dev.type == "cuda" and "nccl" not in str(group_backend):
            raise ValueError(
                f"the process group uses {group_backend} but training runs on CUDA; start the "
                "group with nccl, or set train.device=cpu"
            )
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev,
                       str(group_backend), owns_group=False)
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}  # NCCL: bind the GPU eagerly
    if launched_by_torchrun():
        dist.init_process_group(backend, init_method="env://", **kwargs)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend,
                   owns_group=True)
