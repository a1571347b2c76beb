"""CUDA-event timing shared by the single-GPU benchmarks (``bench_kernels``, ``bench_linear``)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], budget_s: float = 1.0, max_reps: int = 20) -> float:
    """Median milliseconds of ``fn`` (CUDA events) after a warm-up; ~``budget_s`` of repeats
    (at least 3, at most ``max_reps``).  The count follows the first timing, which may differ
    between ranks: when ``fn`` holds a collective, use :func:`time_ms_fixed`."""
    fn()  # warm-up: compilation, allocator, caches
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    return _median_ms(fn, max(3, min(max_reps, int(budget_s * 1e3 / max(first, 1e-3)))))


def time_ms_fixed(fn: Callable[[], object], reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` over exactly ``reps`` repeats after ``warmup`` calls: the
    count never depends on a measurement, so ranks running a collective inside ``fn`` stay in
    step (an adaptive count, as in :func:`time_ms` or ``triton.testing.do_bench``, can differ
    between ranks and deadlock)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return _median_ms(fn, reps)


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn``, each followed by a synchronize."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
