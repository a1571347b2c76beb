"""Multi-GPU context-parallel attention: longctx strategies vs. torch's native context parallel.

Side by side in one run on all visible GPUs (one process each, NCCL): bf16, B=1, causal,
H=16 (and a GQA case), head dim 128, total S from ``--seqs``; forward and forward+backward
per-GPU TFLOP/s, CP efficiency (per-GPU TFLOP/s over the same local kernel on one GPU at the same
total length) and peak memory per GPU.  Every rank runs the same fixed number of repeats (no
adaptive repeat counts, which would deadlock collectives).

``--timing synced`` (default) times each repeat between a barrier and a synchronize (median);
``--timing stream`` queues the repeats back to back with no host sync, as training runs, and also
reports the host time to queue a step; ``--timing graph`` replays the step captured in a CUDA
graph (GPU time without host launch cost; torch's CP may not capture).  ``--profile`` specs get
a profiler trace of a few forward+backward steps: the NCCL/compute overlap and the top CUDA
kernels of the first and last rank; ``--profile-only`` runs just those.

    python benchmarks/bench_cp.py --seqs 32768 131072 --kernel triton
    python benchmarks/bench_cp.py --timing stream --profile ulysses:zigzag:2 hybrid:zigzag
    python benchmarks/bench_cp.py --profile-only --profile zigzag:zigzag ulysses:zigzag

Prints a markdown table and writes it to ``benchmarks/results/bench_cp.md``.
"""

from __future__ import annotations

import argparse
import pathlib
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timing import (  # benchmarks/timing.py, beside this script
    merge_intervals,
    time_graph_ms,
    time_stream_ms,
    time_synced_ms,
)

import longctx
from longctx.parallel.mesh import ParallelDims, build_mesh
from longctx.testing import SimulatedMesh

RESULTS = pathlib.Path(__file__).parent / "results"
TIMINGS = ("synced", "stream", "graph")
PROFILED_STEPS = 3
TOP_KERNELS = 12


def causal_flops(seq: int, heads: int, dim: int, backward: bool) -> float:
    fwd = 4 * seq * seq * heads * dim / 2
    return fwd * 3.5 if backward else fwd


def _sync(group) -> None:
    """All ranks of ``group`` (``None``: this process alone) here, with an idle GPU."""
    if group is not None:
        dist.barrier(group)
    torch.cuda.synchronize()


@dataclass(frozen=True)
class Schedule:
    """How every run is timed: ``warmups`` untimed steps, then ``repeats`` timed ones with
    ``timing`` (one of ``TIMINGS``, see ``benchmarks/timing.py``); the same on every rank."""

    repeats: int = 5
    timing: str = "synced"
    warmups: int = 2

    def __post_init__(self):
        if self.timing not in TIMINGS:
            raise ValueError(f"timing must be one of {TIMINGS}, got {self.timing!r}")
        if self.repeats < 1 or self.warmups < 0:
            raise ValueError(f"need repeats >= 1 and warmups >= 0, got {self}")


def timed(step, group, schedule: Schedule) -> tuple[float, float | None]:
    """ms per ``step()`` over ``schedule``'s fixed repeat count after its warm-ups, ranks in
    lock-step, and the host ms per step to queue it (``stream`` timing only, else ``None``)."""
    for _ in range(schedule.warmups):
        step()

    def barrier():
        _sync(group)

    if schedule.timing == "stream":
        return time_stream_ms(step, schedule.repeats, barrier)
    if schedule.timing == "graph":
        return time_graph_ms(step, schedule.repeats, barrier), None
    return time_synced_ms(step, schedule.repeats, barrier), None


def _inputs(seq, heads, kv_heads, dim):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(h):
        return torch.randn(1, seq, h, dim, device="cuda", dtype=torch.bfloat16, generator=g)

    return randn(heads), randn(kv_heads), randn(kv_heads)


def _fwd_bwd_times(run, group, schedule: Schedule):
    """``run(backward: bool)`` timed forward-only and forward+backward, with peak memory;
    ``host_*``: host ms per step to queue it (``stream`` timing, else ``None``)."""
    torch.cuda.reset_peak_memory_stats()
    fwd, host_fwd = timed(lambda: run(False), group, schedule)
    fwd_bwd, host_fwd_bwd = timed(lambda: run(True), group, schedule)
    return {
        "fwd": fwd,
        "fwd_bwd": fwd_bwd,
        "host_fwd": host_fwd,
        "host_fwd_bwd": host_fwd_bwd,
        "mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def _longctx_step(group, strategy, layout, seq, heads, kv_heads, dim, kernel, ulysses=1):
    """This rank's q, k, v shards and ``run(backward: bool)``, one longctx attention step over
    them (``group=None``: the same kernel on one GPU; ``hybrid``: over a CP x Ulysses mesh with
    ``ulysses`` ranks per Ulysses group)."""
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    cp_group = group
    if strategy == "hybrid":
        cp_group = build_mesh(ParallelDims(cp=world, ulysses=ulysses), "cuda").hybrid_groups()
    q, k, v = (
        longctx.shard(t, layout, world, rank).requires_grad_()
        for t in _inputs(seq, heads, kv_heads, dim)
    )
    mask = longctx.Mask(causal=True)

    def run(backward):
        out = longctx.attention(
            q, k, v, cp_group, strategy=strategy, layout=layout, mask=mask, kernel=kernel
        )
        if backward:
            out.backward(torch.ones_like(out))

    return run


def longctx_on_rank(group, strategy, layout, seq, heads, kv_heads, dim, kernel,
                    schedule: Schedule, ulysses=1):
    """Rank body: one longctx strategy (``group=None``: the same kernel on one GPU)."""
    run = _longctx_step(group, strategy, layout, seq, heads, kv_heads, dim, kernel, ulysses)
    return _fwd_bwd_times(run, group, schedule)


def torch_native_on_rank(group, backend, rotate, seq, heads, kv_heads, dim, schedule: Schedule):
    """Rank body: torch's context_parallel over SDPA (``group=None``: plain SDPA on one GPU)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    # SDPA layout [B, H, S, D]
    q, k, v = (t.transpose(1, 2).contiguous() for t in _inputs(seq, heads, kv_heads, dim))
    gqa = kv_heads != heads
    try:
        if group is None:
            q, k, v = (t.requires_grad_() for t in (q, k, v))

            def run(backward):
                with sdpa_kernel(sdpa_backend):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                if backward:
                    out.backward(torch.ones_like(out))

            return _fwd_bwd_times(run, group, schedule)

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        mesh = init_device_mesh("cuda", (dist.get_world_size(group),), mesh_dim_names=("cp",))
        set_rotate_method(rotate)
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            q_l, k_l, v_l = (t.detach().requires_grad_() for t in (q, k, v))

            def run(backward):
                with sdpa_kernel(sdpa_backend):
                    out = F.scaled_dot_product_attention(
                        q_l, k_l, v_l, is_causal=True, enable_gqa=gqa
                    )
                if backward:
                    out.backward(torch.ones_like(out))

            return _fwd_bwd_times(run, group, schedule)
    except Exception:  # noqa: BLE001 -- reported in the table, not hidden
        return {"error": traceback.format_exc(limit=2).strip().splitlines()[-1][:120]}


def comm_overlap(events) -> dict:
    """How much NCCL kernel time runs while a compute kernel runs (from profiler GPU events)."""
    comm, compute = [], []
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start, e.time_range.end)
        (comm if "nccl" in e.name.lower() else compute).append(span)
    busy = merge_intervals(compute)
    comm_total = sum(end - start for start, end in merge_intervals(comm))
    overlapped = 0.0
    for start, end in merge_intervals(comm):
        overlapped += sum(max(0.0, min(end, b) - max(start, a)) for a, b in busy)
    return {
        "comm_ms": comm_total / 1e3,
        "overlapped_ms": overlapped / 1e3,
        "compute_ms": sum(b - a for a, b in busy) / 1e3,
    }


def _device_time_us(avg) -> float:
    """Total device time of a profiler average in µs (``device_time_total`` on new torch,
    ``cuda_time_total`` on older)."""
    total = getattr(avg, "device_time_total", None)
    return avg.cuda_time_total if total is None else total


def top_kernels(averages, steps: int, top: int = TOP_KERNELS) -> list[dict]:
    """The ``top`` CUDA kernels by total CUDA time from ``prof.key_averages()``: name (at most 70
    characters), calls and CUDA ms per step over ``steps`` profiled steps.  GPU-side user
    annotations (``nccl:all_to_all`` around its NCCL kernel, say) are left out: they would count
    the kernels under them twice."""
    kernels = [
        a for a in averages
        if a.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(a, "is_user_annotation", False)
    ]
    kernels.sort(key=_device_time_us, reverse=True)
    return [
        {"name": a.key[:70], "calls": a.count / steps, "ms": _device_time_us(a) / 1e3 / steps}
        for a in kernels[:top]
    ]


def profile_on_rank(group, strategy, layout, seq, heads, kv_heads, dim, kernel, ulysses=1,
                    steps=PROFILED_STEPS):
    """Rank body: ``steps`` profiled forward+backward steps back to back (after 2 warm-ups and a
    barrier); this rank's NCCL/compute overlap per step and its top CUDA kernels."""
    run = _longctx_step(group, strategy, layout, seq, heads, kv_heads, dim, kernel, ulysses)
    for _ in range(2):
        run(True)
    _sync(group)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            run(True)
        torch.cuda.synchronize()
    overlap = {key: ms / steps for key, ms in comm_overlap(prof.events()).items()}
    return {**overlap, "kernels": top_kernels(prof.key_averages(), steps)}


def _parse_spec(spec: str, ulysses: int) -> tuple[str, str, int]:
    """``strategy:layout`` or ``hybrid:layout:U`` (U ranks per Ulysses group; default
    ``ulysses``) -> (strategy, layout, Ulysses group size)."""
    strategy, layout, *n = spec.split(":")
    if n and strategy != "hybrid":
        raise SystemExit(f"--strategies {spec!r}: only hybrid takes a third field (U)")
    return strategy, layout, int(n[0]) if n else ulysses


def _label(strategy, layout, ulysses) -> str:
    extra = f", U={ulysses}" if strategy == "hybrid" else ""
    return f"{strategy} ({layout}{extra})"


def _row(name, seq, heads, kv_heads, dim, world, times, one):
    """One table row; ``one``: the one-GPU baseline's times, measured at ``one["seq"]`` tokens."""
    if "error" in times:
        return f"| {name} | {seq} | {heads}/{kv_heads} | failed: {times['error']} | | | | | |"
    tf = causal_flops(seq, heads, dim, True) / times["fwd_bwd"] / 1e9 / world
    tf_fwd = causal_flops(seq, heads, dim, False) / times["fwd"] / 1e9 / world
    eff = ""
    if one is not None and "error" not in one:
        one_tf = causal_flops(one["seq"], heads, dim, True) / one["fwd_bwd"] / 1e9
        eff = f"{100 * tf / one_tf:.0f}%"
    host = times.get("host_fwd_bwd")
    host = f"{host:.2f}" if host is not None else ""
    return (
        f"| {name} | {seq} | {heads}/{kv_heads} | {tf_fwd:.0f} | {tf:.0f} | {eff} | "
        f"{times['fwd_bwd']:.1f} | {times['mem_gib']:.1f} | {host} |"
    )


def _timing_rows(mesh, args, world, u):
    """The timing table, printed as it goes: per (seq, heads) the one-GPU baseline (at most
    ``--baseline-seq`` tokens), every ``--strategies`` spec and every ``--torch-native`` spec, all
    timed by ``--timing`` after ``--warmups``."""
    schedule = Schedule(args.repeats, args.timing, args.warmups)
    rows = [
        "| run | total S | H/H_kv | fwd TFLOP/s/GPU | fwd+bwd TFLOP/s/GPU | CP efficiency | fwd+bwd ms | peak GiB/GPU | host ms/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(rows), flush=True)
    for seq in args.seqs:
        for heads, kv_heads in zip(args.heads, args.kv_heads):
            common = (seq, heads, kv_heads, args.dim)
            # the one-GPU baseline: at the same length, or shorter where one GPU would take minutes
            base = min(seq, args.baseline_seq or seq)
            one_common = (base, heads, kv_heads, args.dim)
            one = longctx_on_rank(None, "ring", "contiguous", *one_common, args.kernel, schedule)
            one["seq"] = base
            new = [_row(f"longctx {args.kernel} 1 GPU", *one_common, 1, one, one)]
            for spec in args.strategies:
                strategy, layout, uu = _parse_spec(spec, u)
                times = mesh.run(longctx_on_rank, strategy, layout, *common, args.kernel, schedule,
                                 uu)
                slowest = max(times, key=lambda t: t["fwd_bwd"])
                name = f"longctx {_label(strategy, layout, uu)} x{world}"
                new.append(_row(name, *common, world, slowest, one))
            for spec in args.torch_native:
                backend, rotate = spec.split(":")
                one_t = torch_native_on_rank(None, backend, rotate, *one_common, schedule)
                one_t["seq"] = base
                times = mesh.run(torch_native_on_rank, backend, rotate, *common, schedule)
                failed = [t for t in times if "error" in t]
                slowest = failed[0] if failed else max(times, key=lambda t: t["fwd_bwd"])
                new.append(_row(f"torch SDPA {backend} 1 GPU", *one_common, 1, one_t, one_t))
                new.append(_row(f"torch CP {backend} {rotate} x{world}", *common, world, slowest, one_t))
            print("\n".join(new), flush=True)
            rows += new
    return rows


def _profile_rows(mesh, args, world, u):
    """Per ``--profile`` spec at the first seq and heads: the NCCL/compute overlap table (every
    rank) and the top CUDA kernels table (rank 0 and the last rank), per step."""
    seq, heads, kv_heads = args.seqs[0], args.heads[0], args.kv_heads[0]
    overlap_rows = [
        "",
        f"{PROFILED_STEPS} profiled fwd+bwd steps, per step:",
        "",
        "| profiled run (rank 0..P-1) | NCCL ms | of which overlapped with compute | compute ms |",
        "| --- | --- | --- | --- |",
    ]
    kernel_rows = [
        "",
        f"top {TOP_KERNELS} CUDA kernels by CUDA time, per step:",
        "",
        "| run | rank | kernel | calls/step | CUDA ms/step |",
        "| --- | --- | --- | --- | --- |",
    ]
    for spec in args.profile:
        strategy, layout, uu = _parse_spec(spec, u)
        per_rank = mesh.run(profile_on_rank, strategy, layout, seq, heads, kv_heads, args.dim,
                            args.kernel, uu)
        run = f"{_label(strategy, layout, uu)} S={seq} H={heads}/{kv_heads}"
        for r, o in enumerate(per_rank):
            frac = o["overlapped_ms"] / o["comm_ms"] if o["comm_ms"] else 1.0
            overlap_rows.append(f"| {run} rank {r} | {o['comm_ms']:.2f} | {o['overlapped_ms']:.2f} ({100 * frac:.0f}%) | {o['compute_ms']:.2f} |")
        for r in sorted({0, world - 1}):
            for kern in per_rank[r]["kernels"]:
                name = kern["name"].replace("|", "\\|")
                kernel_rows.append(f"| {run} | {r} | `{name}` | {kern['calls']:.3g} | {kern['ms']:.3f} |")
    rows = overlap_rows + kernel_rows
    print("\n".join(rows), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--kernel", default="triton")
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 16], help="paired with --kv-heads")
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmups", type=int, default=2, help="untimed steps before the repeats")
    parser.add_argument(
        "--baseline-seq", type=int, default=None,
        help="time the one-GPU baselines at most this many tokens (default: the total S); the "
             "efficiency then compares TFLOP/s at the two lengths (causal attention's TFLOP/s is "
             "flat past 128k), for lengths where one GPU would take minutes per step",
    )
    parser.add_argument(
        "--timing", choices=TIMINGS, default="synced",
        help="synced: median of repeats, each between a barrier and a synchronize; stream: the "
             "repeats queued back to back with no host sync (as training runs), mean ms per step, "
             "plus the host ms per step to queue them; graph: the step captured in a CUDA graph and "
             "replayed back to back (GPU time without host launch cost)",
    )
    parser.add_argument(
        "--strategies", nargs="+",
        help="strategy:layout; hybrid:layout:U for "
             "U ranks per Ulysses group (default 2)",
        default=["ring:contiguous", "zigzag:zigzag", "striped:striped", "allgather:zigzag", "ulysses:zigzag", "hybrid:zigzag"],
    )
    parser.add_argument("--torch-native", nargs="*", default=["cudnn:alltoall", "cudnn:allgather", "flash:alltoall", "flash:allgather"])
    parser.add_argument(
        "--profile", nargs="*", default=["ring:contiguous", "zigzag:zigzag"],
        help="strategy:layout (or ulysses:layout:N) specs profiled over "
             f"{PROFILED_STEPS} fwd+bwd steps at the first seq/heads: comm/compute overlap and "
             f"the top {TOP_KERNELS} CUDA kernels",
    )
    parser.add_argument(
        "--profile-only", action="store_true",
        help="skip the timing tables, only run the --profile specs",
    )
    args = parser.parse_args()
    world = torch.cuda.device_count()
    torch.cuda.set_device(0)
    RESULTS.mkdir(exist_ok=True)
    u = min(world, 2)
    rows = [
        f"device: {torch.cuda.get_device_name(0)} x{world}, torch {torch.__version__}, bf16, B=1, causal, D={args.dim}, kernel={args.kernel}, timing={args.timing}, "
        f"{args.warmups} warm-ups + {args.repeats} repeats"
        + (f", one-GPU baselines at <= {args.baseline_seq} tokens" if args.baseline_seq else ""),
        "",
    ]
    print("\n".join(rows), flush=True)
    t0 = time.time()
    with SimulatedMesh(world, backend="nccl", timeout=900) as mesh:
        if not args.profile_only:
            rows += _timing_rows(mesh, args, world, u)
        if args.profile:
            rows += _profile_rows(mesh, args, world, u)
    rows.append(f"\n(took {time.time() - t0:.0f}s)")
    (RESULTS / "bench_cp.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
