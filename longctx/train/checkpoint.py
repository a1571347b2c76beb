"""Checkpoints with torch.distributed.checkpoint (DCP): save, find, resume (also on another mesh).

A checkpoint is a folder ``<dir>/step-<N>`` written by every rank together (DCP: each rank writes
its own shards, the coordinator the metadata); after the save, rank 0 adds
``longctx_meta.json`` (step, mesh, time), which marks the checkpoint complete.  Folders without
it (a save cut short) are never resumed from.  The newest ``keep`` complete checkpoints are kept.

What is saved (:class:`TrainState` builds the dict):

- ``app.model`` / ``app.optim``: model and AdamW state through
  ``torch.distributed.checkpoint.state_dict.get_state_dict``: keyed by parameter name (wrappers
  such as activation checkpointing removed), plain tensors or DTensors (TP / FSDP2 shards).  DCP
  stores every tensor as its global shape and reads back whatever piece each rank now needs, so a
  run saved on one ``dp x cp x tp`` mesh resumes on another.
- ``train``: step, LR-scheduler state, the data position (the packed dataset's
  ``state_dict``, the same on every rank and independent of the dp size), the mesh sizes.
- ``rng.rank<r>``: each rank's torch RNG states (CPU, CUDA); restored when the world size is
  the one that saved them, else every rank is reseeded from ``seed`` and the step.

Example (one process)::

    >>> import tempfile, torch
    >>> from longctx.train.checkpoint import Checkpointer
    >>> from longctx.train.distributed import init_distributed
    >>> env = init_distributed("cpu")
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep=1, rank=0)
    >>> state = {"w": torch.ones(3), "train": {"step": 7}}
    >>> path = ckpt.save(7, state, meta={"note": "demo"})
    >>> ckpt.latest() == path, path.name
    (True, 'step-00000007')
    >>> back = {"w": torch.zeros(3), "train": {"step": 0}}
    >>> ckpt.load(path, back); back["train"]["step"], back["w"].tolist()
    (7, [1.0, 1.0, 1.0])
    >>> env.close()
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

__all__ = ["Checkpointer", "ModelOptimizerState", "rng_state", "set_rng_state"]

META_FILE = "longctx_meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ModelOptimizerState(Stateful):
    """DCP face of a (possibly parallelized) model and its optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model, self.optimizer,
            model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"],
        )


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and the current CUDA device's when on CUDA)."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class Checkpointer:
    """Saves to / finds / loads from ``directory`` (``step-<N>`` folders); collective calls."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 0, rank: int = 0):
        self.directory = Path(directory)
        self.keep = keep
        self.rank = rank

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step-{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the complete checkpoints in the folder, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / META_FILE).is_file() and (p / ".metadata").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    @staticmethod
    def resolve(path: str | os.PathLike[str]) -> Path:
        """A checkpoint folder from ``path``: a ``step-<N>`` folder, or a folder holding them
        (its newest complete one)."""
        p = Path(path)
        if (p / ".metadata").is_file():
            return p
        newest = Checkpointer(p).latest()
        if newest is None:
            raise FileNotFoundError(
                f"checkpoint.resume={str(p)!r} is neither a checkpoint (a step-<N> folder with "
                "DCP's .metadata) nor a folder holding complete ones; point it at one, or use "
                "checkpoint.resume=auto / none"
            )
        return newest

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        try:
            return json.loads((path / META_FILE).read_text())
        except FileNotFoundError:
            return {}

    @staticmethod
    def saved_keys(path: Path) -> set[str]:
        """Flattened keys stored in the checkpoint (DCP metadata)."""
        reader = dcp.FileSystemReader(str(path))
        return set(reader.read_metadata().state_dict_metadata)

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
        """Write ``state`` (DCP) to ``<dir>/step-<step>``, mark it complete, prune; returns the
        folder.  Every rank must call it."""
        path = self.directory / self.step_dir_name(step)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            (path / META_FILE).unlink(missing_ok=True)  # incomplete until written again
        dist.barrier()
        dcp.save(state, checkpoint_id=str(path))
        dist.barrier()
        if self.rank == 0:
            record = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **(meta or {})}
            tmp = path / (META_FILE + ".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.replace(path / META_FILE)
            self._prune()
        dist.barrier()
        return path

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Fill ``state`` (tensors, Stateful objects and plain values) from the checkpoint."""
        dcp.load(state, checkpoint_id=str(path))

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        done = self.complete()
        for _, old in done[: max(len(done) - self.keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)
