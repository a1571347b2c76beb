"""A simulated device mesh: N real processes joined in a process group, reused across calls.

Starting processes and a process group costs seconds, so a :class:`SimulatedMesh` is started
once (per test module) and then runs many functions: :meth:`SimulatedMesh.run` sends a function
to every rank, each calls ``fn(group, *args)``, and the per-rank results come back in rank order.
A failure on any rank raises here with that rank's traceback; a hang raises after ``timeout``
and the mesh is torn down.

Example::

    from longctx.testing import SimulatedMesh

    def world_sum(group, x):                       # module-level: it is sent by reference
        import torch.distributed as dist
        dist.all_reduce(x, group=group)
        return x

    with SimulatedMesh(4) as mesh:                 # 4 gloo processes on this machine
        results = mesh.run(world_sum, torch.ones(2))   # [tensor([4., 4.])] * 4
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["MeshConfig", "MeshError", "MeshPool", "SimulatedMesh"]


class MeshError(RuntimeError):
    """A rank of the simulated mesh failed or timed out."""


@dataclass(frozen=True)
class MeshConfig:
    world_size: int
    backend: str = "gloo"  # "nccl": one GPU per rank
    timeout: float = 300.0  # seconds one run() may take
    threads_per_rank: int = 1
    env: tuple[tuple[str, str], ...] = ()  # set in every worker before it starts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, config: MeshConfig, port: int, tasks, results) -> None:
    os.environ.update(dict(config.env))
    torch.set_num_threads(config.threads_per_rank)
    if config.backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        config.backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=config.world_size,
    )
    group = dist.group.WORLD
    results.put((rank, True, "ready"))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(group, *args, **kwargs)))
        except BaseException:  # report everything, keep serving
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class SimulatedMesh:
    """``world_size`` processes in one process group (gloo on CPU by default).

    ``env`` is set in the workers only (e.g. ``{"TRITON_INTERPRET": "1"}``), not in this process.
    """

    def __init__(
        self,
        world_size: int,
        backend: str = "gloo",
        timeout: float = 300.0,
        env: dict[str, str] | None = None,
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.config = MeshConfig(
            world_size, backend, timeout, env=tuple(sorted((env or {}).items()))
        )
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        env_before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(self.config.threads_per_rank)
        try:
            self._procs = [
                ctx.Process(
                    target=_worker,
                    args=(rank, self.config, port, self._tasks[rank], self._results),
                    daemon=True,
                )
                for rank in range(world_size)
            ]
            for p in self._procs:
                p.start()
        finally:
            if env_before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_before
        self._collect("process group start-up")  # every rank has joined the group

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def alive(self) -> bool:
        """Not closed, and every worker still running."""
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable[..., Any], *args, **kwargs) -> list[Any]:
        """Call ``fn(group, *args, **kwargs)`` on every rank; return the results in rank order."""
        if not self._procs:
            raise MeshError("this SimulatedMesh was closed")
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", repr(fn)))

    def _collect(self, what: str) -> list[Any]:
        """One result per rank, in rank order; raises MeshError on a failure or a time-out."""
        out: list[Any] = [None] * self.world_size
        errors = []
        deadline = time.monotonic() + self.config.timeout
        for _ in range(self.world_size):
            while True:
                try:
                    rank, ok, value = self._results.get(timeout=1.0)
                    break
                except queue.Empty:
                    dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                    if dead:  # a worker that died (e.g. its function's module failed to import)
                        codes = {r: self._procs[r].exitcode for r in dead}
                        self.close(force=True)
                        raise MeshError(
                            f"{what}: rank(s) {dead} exited (exit codes {codes}) before "
                            "answering; the mesh was shut down"
                        ) from None
                    if time.monotonic() > deadline:
                        self.close(force=True)
                        raise MeshError(
                            f"{what} did not finish on all {self.world_size} ranks within "
                            f"{self.config.timeout:.0f}s (a collective mismatch or deadlock); "
                            "the mesh was shut down"
                        ) from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            raise MeshError(
                f"{what} failed on {len(errors)} rank(s):\n" + "\n".join(sorted(errors))
            )
        return out

    def close(self, force: bool = False) -> None:
        if not self._procs:
            return
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=30)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []

    def __enter__(self) -> "SimulatedMesh":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close(force=True)
        except Exception:
            pass


class MeshPool:
    """Simulated meshes shared by many users (a whole test session), started on first use.

    ``get(world_size, env)`` returns a live mesh of that size and worker environment, starting it
    if needed (or again after a failure closed it).  At most ``max_ranks`` worker processes are
    kept: the least recently used meshes are closed to make room.

    Example::

        pool = MeshPool(max_ranks=16)
        pool.get(2).run(world_sum, torch.ones(2))     # started here
        pool.get(2).run(world_sum, torch.ones(2))     # the same processes again
        pool.close()
    """

    def __init__(self, max_ranks: int = 16):
        self.max_ranks = max_ranks
        self._meshes: dict[tuple, SimulatedMesh] = {}  # least recently used first

    def get(self, world_size: int, env: dict[str, str] | None = None) -> SimulatedMesh:
        key = (world_size, tuple(sorted((env or {}).items())))
        mesh = self._meshes.pop(key, None)
        if mesh is None or not mesh.alive:
            if mesh is not None:
                mesh.close(force=True)
            while self._meshes and self._ranks() + world_size > self.max_ranks:
                self._meshes.pop(next(iter(self._meshes))).close()
            mesh = SimulatedMesh(world_size, env=env)
        self._meshes[key] = mesh
        return mesh

    def _ranks(self) -> int:
        return sum(m.world_size for m in self._meshes.values())

    def close(self) -> None:
        for mesh in self._meshes.values():
            mesh.close()
        self._meshes.clear()
