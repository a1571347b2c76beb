"""Multi-GPU context-parallel attention: longctx strategies vs. torch's native context parallel.

Side by side in one run on all visible GPUs (one process each, NCCL): bf16, B=1, causal,
H=16 (and a GQA case), head dim 128, total S from ``--seqs``; forward and forward+backward
per-GPU TFLOP/s, CP efficiency (per-GPU TFLOP/s over the same local kernel on one GPU at the same
total length) and peak memory per GPU.  Every rank runs the same fixed number of repeats (no
adaptive repeat counts, which would deadlock collectives).

    python benchmarks/bench_cp.py --seqs 32768 131072 --kernel triton

Prints a markdown table and writes it to ``benchmarks/results/bench_cp.md``.
"""

from __future__ import annotations

import argparse
import pathlib
import time
import traceback

import torch
import torch.distributed as dist

import longctx
from longctx.parallel.mesh import ParallelDims, build_mesh
from longctx.parallel.strategies.ulysses import ulysses_attention
from longctx.testing import SimulatedMesh

RESULTS = pathlib.Path(__file__).parent / "results"


def causal_flops(seq: int, heads: int, dim: int, backward: bool) -> float:
    fwd = 4 * seq * seq * heads * dim / 2
    return fwd * 3.5 if backward else fwd


def timed(step, group, repeats: int) -> float:
    """Median ms of ``step()`` over a fixed repeat count, after 2 warm-ups, ranks in lock-step."""
    for _ in range(2):
        step()
    samples = []
    for _ in range(repeats):
        if group is not None:
            dist.barrier(group)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return sorted(samples)[len(samples) // 2]


def _inputs(seq, heads, kv_heads, dim):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(h):
        return torch.randn(1, seq, h, dim, device="cuda", dtype=torch.bfloat16, generator=g)

    return randn(heads), randn(kv_heads), randn(kv_heads)


def _fwd_bwd_times(run, group, repeats):
    """``run(backward: bool)`` timed forward-only and forward+backward, with peak memory."""
    torch.cuda.reset_peak_memory_stats()
    fwd = timed(lambda: run(False), group, repeats)
    fwd_bwd = timed(lambda: run(True), group, repeats)
    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def longctx_on_rank(group, strategy, layout, seq, heads, kv_heads, dim, kernel, repeats, ulysses=1,
                    head_chunks=None):
    """Rank body: one longctx strategy (``group=None``: the same kernel on one GPU);
    ``head_chunks``: Ulysses' pipelined head chunks instead of its default."""
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
        if head_chunks is not None:
            out = ulysses_attention(q, k, v, cp_group, layout=layout, mask=mask, kernel=kernel,
                                    chunks=head_chunks)
        else:
            out = longctx.attention(
                q, k, v, cp_group, strategy=strategy, layout=layout, mask=mask, kernel=kernel
            )
        if backward:
            out.backward(torch.ones_like(out))

    return _fwd_bwd_times(run, group, repeats)


def torch_native_on_rank(group, backend, rotate, seq, heads, kv_heads, dim, repeats):
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

            return _fwd_bwd_times(run, group, repeats)

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

            return _fwd_bwd_times(run, group, repeats)
    except Exception:  # reported in the table, not hidden
        return {"error": traceback.format_exc(limit=2).strip().splitlines()[-1][:120]}


def _merge_intervals(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def comm_overlap(events) -> dict:
    """How much NCCL kernel time runs while a compute kernel runs (from profiler GPU events)."""
    comm, compute = [], []
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start, e.time_range.end)
        (comm if "nccl" in e.name.lower() else compute).append(span)
    busy = _merge_intervals(compute)
    comm_total = sum(end - start for start, end in _merge_intervals(comm))
    overlapped = 0.0
    for start, end in _merge_intervals(comm):
        overlapped += sum(max(0.0, min(end, b) - max(start, a)) for a, b in busy)
    return {
        "comm_ms": comm_total / 1e3,
        "overlapped_ms": overlapped / 1e3,
        "compute_ms": sum(b - a for a, b in busy) / 1e3,
    }


def profile_on_rank(group, strategy, layout, seq, heads, kv_heads, dim, kernel):
    """Rank body: one profiled forward+backward; the NCCL/compute overlap of this rank."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v = (
        longctx.shard(t, layout, world, rank).requires_grad_()
        for t in _inputs(seq, heads, kv_heads, dim)
    )
    mask = longctx.Mask(causal=True)

    def step():
        out = longctx.attention(q, k, v, group, strategy=strategy, layout=layout, mask=mask, kernel=kernel)
        out.backward(torch.ones_like(out))

    for _ in range(2):
        step()
    dist.barrier(group)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    return comm_overlap(prof.events())


def _row(name, seq, heads, kv_heads, dim, world, times, one):
    if "error" in times:
        return f"| {name} | {seq} | {heads}/{kv_heads} | failed: {times['error']} | | | | |"
    tf = causal_flops(seq, heads, dim, True) / times["fwd_bwd"] / 1e9 / world
    tf_fwd = causal_flops(seq, heads, dim, False) / times["fwd"] / 1e9 / world
    eff = ""
    if one is not None and "error" not in one:
        one_tf = causal_flops(seq, heads, dim, True) / one["fwd_bwd"] / 1e9
        eff = f"{100 * tf / one_tf:.0f}%"
    return (
        f"| {name} | {seq} | {heads}/{kv_heads} | {tf_fwd:.0f} | {tf:.0f} | {eff} | "
        f"{times['fwd_bwd']:.1f} | {times['mem_gib']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--kernel", default="triton")
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 16], help="paired with --kv-heads")
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--strategies", nargs="+",
        help="strategy:layout, or ulysses:layout:N for N pipelined head chunks",
        default=["ring:contiguous", "zigzag:zigzag", "striped:striped", "allgather:zigzag", "ulysses:zigzag", "hybrid:zigzag"],
    )
    parser.add_argument("--torch-native", nargs="*", default=["cudnn:alltoall", "cudnn:allgather", "flash:alltoall", "flash:allgather"])
    parser.add_argument(
        "--profile", nargs="*", default=["ring:contiguous", "zigzag:zigzag"],
        help="strategies whose comm/compute overlap is measured from a profiler trace (first seq)",
    )
    args = parser.parse_args()
    world = torch.cuda.device_count()
    torch.cuda.set_device(0)
    RESULTS.mkdir(exist_ok=True)
    header = [
        f"device: {torch.cuda.get_device_name(0)} x{world}, torch {torch.__version__}, bf16, B=1, causal, D={args.dim}, kernel={args.kernel}",
        "",
        "| run | total S | H/H_kv | fwd TFLOP/s/GPU | fwd+bwd TFLOP/s/GPU | CP efficiency | fwd+bwd ms | peak GiB/GPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(header), flush=True)
    rows = list(header)
    t0 = time.time()
    with SimulatedMesh(world, backend="nccl", timeout=900) as mesh:
        for seq in args.seqs:
            for heads, kv_heads in zip(args.heads, args.kv_heads):
                common = (seq, heads, kv_heads, args.dim)
                one = longctx_on_rank(None, "ring", "contiguous", *common, args.kernel, args.repeats)
                new = [_row(f"longctx {args.kernel} 1 GPU", *common, 1, one, one)]
                for spec in args.strategies:
                    strategy, layout, *chunks = spec.split(":")
                    head_chunks = int(chunks[0]) if chunks else None
                    u = 2 if world > 2 else world
                    times = mesh.run(longctx_on_rank, strategy, layout, *common, args.kernel, args.repeats, u,
                                     head_chunks)
                    slowest = max(times, key=lambda t: t["fwd_bwd"])
                    extra = f", U={u}" if strategy == "hybrid" else ""
                    extra += f", {head_chunks} head chunks" if head_chunks is not None else ""
                    name = f"longctx {strategy} ({layout}{extra}) x{world}"
                    new.append(_row(name, *common, world, slowest, one))
                for spec in args.torch_native:
                    backend, rotate = spec.split(":")
                    one_t = torch_native_on_rank(None, backend, rotate, *common, args.repeats)
                    times = mesh.run(torch_native_on_rank, backend, rotate, *common, args.repeats)
                    failed = [t for t in times if "error" in t]
                    slowest = failed[0] if failed else max(times, key=lambda t: t["fwd_bwd"])
                    new.append(_row(f"torch SDPA {backend} 1 GPU", *common, 1, one_t, one_t))
                    new.append(_row(f"torch CP {backend} {rotate} x{world}", *common, world, slowest, one_t))
                print("\n".join(new), flush=True)
                rows += new
        overlap_rows = ["", "| profiled run (rank 0..P-1) | NCCL ms | of which overlapped with compute | compute ms |", "| --- | --- | --- | --- |"]
        for spec in args.profile:
            strategy, layout = spec.split(":")
            per_rank = mesh.run(profile_on_rank, strategy, layout, args.seqs[0], args.heads[0], args.kv_heads[0], args.dim, args.kernel)
            for r, o in enumerate(per_rank):
                frac = o["overlapped_ms"] / o["comm_ms"] if o["comm_ms"] else 1.0
                overlap_rows.append(f"| {strategy} S={args.seqs[0]} rank {r} | {o['comm_ms']:.2f} | {o['overlapped_ms']:.2f} ({100 * frac:.0f}%) | {o['compute_ms']:.2f} |")
        print("\n".join(overlap_rows), flush=True)
        rows += overlap_rows
    rows.append(f"\n(took {time.time() - t0:.0f}s)")
    (RESULTS / "bench_cp.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
