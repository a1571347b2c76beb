"""CUDA-event timing shared by the benchmarks (``bench_kernels``, ``bench_linear``, ``bench_cp``).

:func:`time_ms` picks its repeat count from a first timing (one process only).  Three ways to time
a step that may hold collectives (a fixed repeat count, so ranks stay in step):

- :func:`time_synced_ms`: each repeat starts on an idle GPU (after ``before()``, e.g. a barrier)
  and ends with a synchronize: the host's launch time of the step shows in the figure.
- :func:`time_stream_ms`: the repeats queued back to back, as a training loop runs; also the host
  time to queue one step, which tells whether the figure is host-bound (host >= GPU time).
- :func:`time_graph_ms`: the step captured once in a CUDA graph and replayed: GPU time with no
  host launch cost at all, what the step costs once the host runs ahead.

:func:`merge_intervals` joins overlapping (start, end) spans, e.g. profiler kernel times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["merge_intervals", "time_graph_ms", "time_ms", "time_stream_ms", "time_synced_ms"]


def time_ms(fn: Callable[[], object], budget_s: float = 1.0, max_reps: int = 20) -> float:
    """Median milliseconds of ``fn`` (CUDA events) after a warm-up; ~``budget_s`` of repeats
    (at least 3, at most ``max_reps``).  The count follows the first timing, which may differ
    between ranks and deadlock a collective inside ``fn`` (as ``triton.testing.do_bench`` can):
    for those use the fixed counts of the functions below."""
    fn()  # warm-up: compilation, allocator, caches
    torch.cuda.synchronize()
    start, end = _events()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    return time_synced_ms(fn, max(3, min(max_reps, int(budget_s * 1e3 / max(first, 1e-3)))))


def time_synced_ms(fn: Callable[[], object], reps: int,
                   before: Callable[[], object] | None = None) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn``, each started after ``before()`` (e.g. a
    barrier) on an idle GPU and followed by a synchronize.  No warm-up."""
    start, end = _events()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_stream_ms(fn: Callable[[], object], reps: int,
                   before: Callable[[], object] | None = None) -> tuple[float, float]:
    """``reps`` calls of ``fn`` queued back to back after ``before()`` and a synchronize, as a
    training loop runs: ``(GPU ms per call, host ms per call to queue it)``.  No warm-up."""
    if before is not None:
        before()
    torch.cuda.synchronize()
    start, end = _events()
    start.record()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host_s = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, host_s * 1e3 / reps


def time_graph_ms(fn: Callable[[], object], reps: int,
                  before: Callable[[], object] | None = None, warmup: int = 3) -> float:
    """GPU ms per call of ``fn`` captured once in a CUDA graph and replayed ``reps`` times back to
    back (after ``before()``): the step's cost with no host launch time.

    ``fn`` must be capturable: no host syncs, no CPU-to-GPU copies of new data (collectives on
    NCCL are).  It runs ``warmup`` times on a side stream first (lazy initialisation, allocator),
    as CUDA graph capture requires.  Raises what the capture raises.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()  # the first replay uploads the graph
    if before is not None:
        before()
    torch.cuda.synchronize()
    start, end = _events()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def merge_intervals(intervals) -> list[list[float]]:
    """``(start, end)`` spans joined where they overlap, sorted: the union as disjoint spans."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
