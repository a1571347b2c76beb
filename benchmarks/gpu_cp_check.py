"""GPU check for the core issue: bf16 CP error over NCCL next to the one-GPU error, and a
baseline timing of the ring against one GPU at the same total length.

    python benchmarks/gpu_cp_check.py                 # all visible GPUs (>= 2)
    python benchmarks/gpu_cp_check.py --seq 32768 --kernels reference triton

Prints two markdown tables (errors; timings) and writes them to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import pathlib
import time
from dataclasses import replace

import torch
import torch.distributed as dist

import longctx
from longctx.kernels import available_kernels, get_kernel
from longctx.testing import CPCase, SimulatedMesh, errors_against_reference, run_cp_case_on_rank

RESULTS = pathlib.Path(__file__).parent / "results"


def error_table(mesh: SimulatedMesh, kernels: list[str]) -> list[str]:
    rows = ["| kernel | strategy | mask | P | rel. err out (CP / 1 GPU) | dq | dk | dv |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kernel in kernels:
        for strategy, layout in [("ring", "contiguous"), ("zigzag", "zigzag"), ("striped", "striped"), ("allgather", "contiguous")]:
            for mask in ("causal", "documents"):
                case = CPCase(strategy, layout, mask, world_size=mesh.world_size, batch=1,
                              tokens_per_rank=1024, heads=16, kv_heads=4, head_dim=128,
                              dtype="bfloat16", kernel=kernel, device="cuda")
                cp = errors_against_reference(case, mesh.run(run_cp_case_on_rank, case), "rel_l2")
                one_case = replace(case, world_size=1, tokens_per_rank=case.seq_len)
                one = errors_against_reference(one_case, [run_cp_case_on_rank(None, one_case)], "rel_l2")
                cells = [f"{cp[n]:.2e} / {one[n]:.2e}" for n in ("out", "dq", "dk", "dv")]
                rows.append(f"| {kernel} | {strategy} | {mask} | {mesh.world_size} | " + " | ".join(cells) + " |")
    return rows


def _inputs(seq: int, heads: int, kv_heads: int, dim: int, device):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, seq, heads, dim, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, seq, kv_heads, dim, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, seq, kv_heads, dim, device=device, dtype=torch.bfloat16, generator=g)
    return q, k, v


def time_fwd_bwd(group, strategy, layout, seq, heads, kv_heads, dim, kernel, repeats=5):
    """Rank body (also used with group=None for one GPU): median fwd and fwd+bwd ms."""
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    device = torch.device("cuda", torch.cuda.current_device())
    q, k, v = (longctx.shard(t, layout, world, rank) for t in _inputs(seq, heads, kv_heads, dim, device))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = longctx.Mask(causal=True)

    def fwd():
        return longctx.attention(q, k, v, group, strategy=strategy, layout=layout, mask=mask, kernel=kernel)

    def step(backward):
        out = fwd()
        if backward:
            out.backward(torch.ones_like(out))

    times = {}
    for name, backward in (("fwd", False), ("fwd_bwd", True)):
        for _ in range(2):  # warm-up
            step(backward)
        samples = []
        for _ in range(repeats):  # fixed count on every rank: no per-rank adaptive repeats
            if group is not None:
                dist.barrier(group)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(backward)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        times[name] = sorted(samples)[len(samples) // 2]
    return times


def timing_table(mesh: SimulatedMesh, seq: int, kernels: list[str]) -> list[str]:
    heads, kv_heads, dim = 16, 16, 128
    flops_fwd = 4 * seq * seq * heads * dim / 2  # causal
    rows = ["| kernel | run | total S | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s per GPU |",
            "| --- | --- | --- | --- | --- | --- |"]
    for kernel in kernels:
        one = time_fwd_bwd(None, "ring", "contiguous", seq, heads, kv_heads, dim, kernel)
        rows.append(f"| {kernel} | 1 GPU | {seq} | {one['fwd']:.2f} | {one['fwd_bwd']:.2f} | "
                    f"{3.5 * flops_fwd / one['fwd_bwd'] / 1e9:.1f} |")
        for strategy, layout in [("ring", "contiguous"), ("zigzag", "zigzag"), ("allgather", "zigzag")]:
            per_rank = mesh.run(time_fwd_bwd, strategy, layout, seq, heads, kv_heads, dim, kernel)
            fb = max(t["fwd_bwd"] for t in per_rank)
            fw = max(t["fwd"] for t in per_rank)
            rows.append(f"| {kernel} | {strategy} x{mesh.world_size} | {seq} | {fw:.2f} | {fb:.2f} | "
                        f"{3.5 * flops_fwd / fb / 1e9 / mesh.world_size:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    parser.add_argument("--kernels", nargs="+", default=[k for k in ("reference", "triton") if k in available_kernels()])
    args = parser.parse_args()
    for k in args.kernels:
        get_kernel(k)
    RESULTS.mkdir(exist_ok=True)
    torch.cuda.set_device(0)
    print(f"device: {torch.cuda.get_device_name(0)} x{args.world_size}, torch {torch.__version__}")
    t0 = time.time()
    with SimulatedMesh(args.world_size, backend="nccl") as mesh:
        errors = error_table(mesh, args.kernels)
        timings = timing_table(mesh, args.seq, args.kernels)
    text = "\n".join(["## bf16 error vs float64 reference", *errors, "", "## timing (bf16, causal, H=16, D=128)", *timings])
    (RESULTS / "gpu_cp_check.md").write_text(text + "\n")
    print(text)
    print(f"took {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
