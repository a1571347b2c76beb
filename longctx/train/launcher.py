"""Start a run's processes on this machine when ``longctx train`` is not under torchrun.

A config that asks for ``N = dp x cp x tp > 1`` processes (``dp=null`` counts as 1) gets ``N``
spawned processes joined over ``127.0.0.1``: gloo on CPU (a simulated mesh, threads split
evenly over the cores), NCCL with one GPU each when CUDA has ``N`` devices.  Each process sees
the same environment torchrun would give it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), so the training code cannot tell the difference; for more
than one machine use torchrun (``launch/train_multi_node.sh``).

Signals: SIGTERM or Ctrl-C here is passed on to every process (they save a checkpoint at the
next step boundary and exit); a second Ctrl-C kills them.  When one process fails, the others
are stopped after a grace period (they would wait forever in a collective).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["launch_local"]

GRACE_SECONDS = 15.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, threads: int, config: Any, quiet: bool) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)
    from .cli import run_training

    raise SystemExit(run_training(config, quiet=quiet))


def launch_local(config: Any, world_size: int, *, device_type: str = "cpu",
                 quiet: bool = False) -> int:
    """Run ``config`` on ``world_size`` local processes; returns the run's exit code."""
    if device_type == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"the config asks for {world_size} processes but this machine has "
            f"{torch.cuda.device_count()} GPU(s); launch with torchrun across nodes "
            "(launch/train_multi_node.sh) or lower parallel.dp/cp/tp"
        )
    cores = os.cpu_count() or 1
    threads = max(1, cores // world_size) if device_type == "cpu" else 1
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, threads, config, quiet),
                    name=f"longctx-train-rank{r}")
        for r in range(world_size)
    ]
    interrupts = {"count": 0}

    def forward(signum, frame) -> None:
        interrupts["count"] += 1
        for p in procs:
            if p.is_alive() and p.pid is not None:
                try:
                    # the terminal already sent Ctrl-C to the children: pass on SIGTERM only
                    if signum != signal.SIGINT or interrupts["count"] > 1:
                        os.kill(p.pid, signal.SIGKILL if interrupts["count"] > 2 else signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.start()
        failed_at: float | None = None
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=0.2)
            codes = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if codes and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > GRACE_SECONDS:
                for p in procs:
                    if p.is_alive():
                        p.kill()
        codes = [p.exitcode for p in procs]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    bad = [c for c in codes if c != 0]
    if not bad:
        return 0
    # prefer a code a rank chose (2: bad config, 143: stopped by a signal) over kill codes
    chosen = [c for c in bad if c is not None and c > 0]
    return chosen[0] if chosen else 1
