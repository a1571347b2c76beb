"""Linear attention on the GPU, side by side in one run: longctx's Triton kernel vs
flash-linear-attention's ``chunk_simple_gla`` (when ``fla`` is importable), linear vs dense causal
time per token, and (``--cp``) the ``linear`` CP strategy over NCCL.

Defaults follow issue 5: bf16, B=1, H=16, head dim 128, per-head decay (RetNet), S = 8k, 32k, 128k,
forward and forward+backward, tokens/s.  Timing: CUDA events around each call, warm-up first,
median of repeats.  Before timing, each implementation's output is compared with the float32
torch reference at a short length (and ours with fla's at every length).

Usage (rerunnable; writes ``bench_linear_<gpu>.md`` to ``--out``)::

    pip install fla-core                                   # optional: the fla baseline
    python benchmarks/bench_linear.py                      # kernel table + linear-vs-dense table
    python benchmarks/bench_linear.py --seqs 32768 --sweep # also a few LinearTritonConfig variants
    python benchmarks/bench_linear.py --profile 32768      # + CUDA time per kernel, ours and fla
    python benchmarks/bench_linear.py --cp --cp-tokens 32768   # + CP on all visible GPUs

Tables (markdown, printed and written):

1. kernels: fwd ms, fwd+bwd ms, Mtok/s fwd+bwd for longctx and fla, and the ratio (>1: ours faster).
2. linear vs dense: fwd+bwd ns/token of the linear kernel and of causal SDPA (flash backend) per
   length; dense grows linearly per token, linear is flat, the table shows where they cross.
3. CP (``--cp``): one GPU at T tokens vs P GPUs at T tokens each (P*T total); efficiency =
   t(1 GPU, T) / t(P GPUs, T per GPU), ideal 100% (one all-gather of [B, H, Dk, Dv] per call);
   timed per step with a barrier ("synced") and back to back ("stream"), plus CUDA time per
   kernel of one step on one GPU and on the first and last CP rank.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import (  # benchmarks/timing.py, beside this script
    time_graph_ms,
    time_ms,
    time_stream_ms,
    time_synced_ms,
)

from longctx.kernels.linear import (
    LinearReferenceConfig,
    LinearTritonConfig,
    linear_attention_reference,
    linear_attention_triton,
    retnet_log_decay,
)

try:
    from fla.ops.simple_gla import chunk_simple_gla  # fla-core

    _FLA_ERROR: Exception | None = None
except Exception as exc:  # noqa: BLE001 - any import failure means "no fla baseline"
    chunk_simple_gla = None
    _FLA_ERROR = exc


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    heads: int
    dim: int


def inputs(shape: Shape, seed: int = 0, requires_grad: bool = True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, S, H, D = shape.batch, shape.seq, shape.heads, shape.dim

    def randn():  # unit-norm-ish rows keep the un-normalised linear attention in bf16 range
        x = torch.randn(B, S, H, D, device="cuda", generator=g) * D**-0.5
        return x.to(torch.bfloat16).requires_grad_(requires_grad)

    return randn(), randn(), randn()


# -- the implementations, as fwd / fwd+bwd closures ---------------------------------------------
def on_host(g: torch.Tensor | None) -> torch.Tensor | None:
    """The decay as :func:`ours` takes it: on the CPU, as the models pass it (a decay on the GPU
    costs a read-back per call for its value check); fla takes it on the GPU."""
    return g.cpu() if g is not None else None


def ours(q, k, v, g, config: LinearTritonConfig):
    return linear_attention_triton(q, k, v, log_decay=g, scale=q.shape[-1] ** -0.5, config=config)


def fla(q, k, v, g):
    scale = q.shape[-1] ** -0.5
    if g is None:  # no decay
        out, _ = chunk_simple_gla(q, k, v, scale=scale)
    elif "g_gamma" in inspect.signature(chunk_simple_gla).parameters:  # per-head constant decay
        out, _ = chunk_simple_gla(q, k, v, g_gamma=g, scale=scale)
    else:  # older fla: per-token gates, the same value at every token
        gates = g.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1).contiguous()
        out, _ = chunk_simple_gla(q, k, v, g=gates, scale=scale)
    return out


def dense(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        # [B, S, H, D] -> [B, H, S, D] and back
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
    return out.transpose(1, 2)


def fwd_and_fwd_bwd(fn: Callable[[], torch.Tensor], leaves,
                    stream: bool = True) -> tuple[float, float, tuple[float, float] | None]:
    """Forward and forward+backward ms (synced repeats: the host's launch time shows) and, with
    ``stream``, the forward+backward ``(GPU ms, host ms)`` per step of 20 steps queued back to
    back, as training runs them (GPU-bound when the host needs less time than the GPU)."""
    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        fn().backward(grad)

    grad = torch.randn_like(fn().detach())
    fw, fb = time_ms(fwd, max_reps=30), time_ms(fwd_bwd, max_reps=30)
    return fw, fb, time_stream_ms(fwd_bwd, 20) if stream else None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -- tables ----------------------------------------------------------------------------------------
def check_against_reference(heads: int, dim: int, g: torch.Tensor, config) -> list[str]:
    """bf16 outputs vs the float32 torch reference at 4k tokens (with documents for ours)."""
    shape = Shape(1, 4096, heads, dim)
    q, k, v = inputs(shape, seed=1, requires_grad=False)
    cu = torch.tensor([0, 1000, 1001, 3000, 4096], device="cuda")
    ref = linear_attention_reference(
        *(t.float() for t in (q, k, v)), log_decay=g, scale=dim**-0.5, cu_seqlens=cu,
        config=LinearReferenceConfig(chunk=128),
    )
    got = linear_attention_triton(q, k, v, log_decay=g, scale=dim**-0.5, cu_seqlens=cu, config=config)
    lines = [f"longctx vs float32 reference (4k tokens, documents): rel. error {rel_err(got, ref):.2e}"]
    if chunk_simple_gla is not None:
        ref1 = linear_attention_reference(*(t.float() for t in (q, k, v)), log_decay=g,
                                          scale=dim**-0.5, config=LinearReferenceConfig(chunk=128))
        lines.append(f"fla vs float32 reference (4k tokens): rel. error {rel_err(fla(q, k, v, g), ref1):.2e}")
    return lines


def kernel_table(seqs, batch, heads, dim, g, configs: dict[str, LinearTritonConfig]) -> list[str]:
    """Ours against fla's ``chunk_simple_gla`` per length; the ratios are fla's time over ours,
    synced and queued back to back ("stream", with the host ms to queue a step)."""
    rows = [
        ("| S | impl | fwd ms | fwd+bwd ms | fwd+bwd ms, stream (host) | Mtok/s fwd "
         "| Mtok/s fwd+bwd | vs fla fwd+bwd | vs fla, stream |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    g_host = on_host(g)
    for S in seqs:
        shape = Shape(batch, S, heads, dim)
        q, k, v = inputs(shape)
        tokens = batch * S
        fla_fb = fla_stream = None
        if chunk_simple_gla is not None:
            with torch.no_grad():
                err = rel_err(ours(q, k, v, g_host, next(iter(configs.values()))),
                              fla(q, k, v, g))
            fw, fla_fb, (fla_stream, host) = fwd_and_fwd_bwd(partial(fla, q, k, v, g), (q, k, v))
            rows.append(f"| {S} | fla chunk_simple_gla | {fw:.2f} | {fla_fb:.2f} | "
                        f"{fla_stream:.2f} ({host:.2f}) | {tokens / fw / 1e3:.1f} | "
                        f"{tokens / fla_fb / 1e3:.1f} | 1.00x | 1.00x |")
            print(f"S={S}: longctx vs fla rel. error {err:.2e}", flush=True)
        for name, config in configs.items():
            fw, fb, (st, host) = fwd_and_fwd_bwd(partial(ours, q, k, v, g_host, config), (q, k, v))
            vs = (f"{fla_fb / fb:.2f}x | {fla_stream / st:.2f}x" if fla_fb is not None
                  else "- | -")
            rows.append(f"| {S} | longctx {name} | {fw:.2f} | {fb:.2f} | {st:.2f} ({host:.2f}) | "
                        f"{tokens / fw / 1e3:.1f} | {tokens / fb / 1e3:.1f} | {vs} |")
        print(rows[-1], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def profile_table(seq, batch, heads, dim, g, config) -> list[str]:
    """CUDA time per kernel of one fwd+bwd at ``seq`` tokens, ours and fla's (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    g_host = on_host(g)
    q, k, v = inputs(Shape(batch, seq, heads, dim))
    impls = {"longctx": partial(ours, q, k, v, g_host, config)}
    if chunk_simple_gla is not None:
        impls["fla"] = partial(fla, q, k, v, g)
    rows = ["| impl | kernel | calls | CUDA ms per fwd+bwd |", "| --- | --- | --- | --- |"]
    for name, fn in impls.items():
        grad = torch.randn_like(fn().detach())
        fn().backward(grad)  # warm-up outside the trace
        torch.cuda.synchronize()
        reps = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                for t in (q, k, v):
                    t.grad = None
                fn().backward(grad)
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in events) / reps / 1e3
        for e in events[:12]:
            rows.append(f"| {name} | `{e.key[:60]}` | {e.count // reps} | "
                        f"{e.device_time_total / reps / 1e3:.3f} |")
        rows.append(f"| {name} | **all kernels** | | **{total:.3f}** |")
        print("\n".join(rows[-3:]), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def crossover_table(seqs, batch, heads, dim, g, config) -> list[str]:
    g_host = on_host(g)
    rows = [
        "| S | linear fwd+bwd ns/token | dense causal (SDPA flash) fwd+bwd ns/token | dense / linear |",
        "| --- | --- | --- | --- |",
    ]
    for S in seqs:
        q, k, v = inputs(Shape(batch, S, heads, dim))
        _, lin, _ = fwd_and_fwd_bwd(partial(ours, q, k, v, g_host, config), (q, k, v), stream=False)
        _, den, _ = fwd_and_fwd_bwd(partial(dense, q, k, v), (q, k, v), stream=False)
        per = 1e6 / (batch * S)  # ms -> ns per token
        rows.append(f"| {S} | {lin * per:.1f} | {den * per:.1f} | {den / lin:.2f} |")
        print(rows[-1], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def _progress(rank: int, message: str) -> None:
    """A line on stderr from the first rank, so a stuck phase shows where it stopped."""
    if rank == 0:
        print(f"[cp] {message}", file=sys.stderr, flush=True)


def cp_time(group, tokens: int, batch: int, heads: int, dim: int, chunk: int,
            profile: bool = False) -> dict:
    """Rank body (also called with ``group=None`` for one GPU): fwd+bwd ms of strategy 'linear'.

    Three timings with the same repeat count on every rank (``benchmarks/timing.py``):
    ``synced``, a barrier and a host sync around every step (the GPU starts each step idle, so
    host-side launch time shows); ``stream``, 20 steps queued back to back after one barrier (as
    in training), with the host ms to queue a step; ``graph``, the step captured in a CUDA graph
    and replayed (the GPU time once the host runs ahead; a string when the capture failed).
    ``profile``: the CUDA time per kernel of 5 back-to-back steps.
    """
    from longctx.kernels.linear import LinearTriton
    from longctx.parallel.strategies.linear import linear_attention

    rank = dist.get_rank(group) if group is not None else 0
    q, k, v = inputs(Shape(batch, tokens, heads, dim), seed=rank)
    g = retnet_log_decay(heads)  # on the CPU, as the model passes it (no read-back per call)
    kernel = LinearTriton(LinearTritonConfig(chunk=chunk))
    grad = torch.randn(batch, tokens, heads, dim, device="cuda", dtype=torch.bfloat16)

    def step():
        for t in (q, k, v):
            t.grad = None
        linear_attention(q, k, v, group, log_decay=g, kernel=kernel).backward(grad)

    def barrier():
        if group is not None:
            dist.barrier(group)

    for _ in range(2):  # warm-up: compilation, allocator, caches
        step()
    synced = time_synced_ms(step, 10, barrier)  # the same count on every rank
    _progress(rank, f"synced timing done: {synced:.2f} ms")
    stream, host = time_stream_ms(step, 20, barrier)  # host: ms the host needs to queue a step
    _progress(rank, "stream timing done")
    try:
        graph = time_graph_ms(step, 20, barrier)
    except Exception as exc:  # noqa: BLE001 -- reported in the table, not hidden
        graph = f"capture failed: {type(exc).__name__}: {str(exc)[:80]}"
    _progress(rank, "graph timing done")
    result = {"synced": synced, "stream": stream, "host": host, "graph": graph, "kernels": []}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        _progress(rank, "profile done")
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        result["kernels"] = [(e.key[:70], e.count // 5, e.device_time_total / 5 / 1e3)
                             for e in events[:14]]
    return result


def cp_table(tokens: int, batch: int, heads: int, dim: int, chunk: int) -> list[str]:
    from longctx.testing import SimulatedMesh

    world = torch.cuda.device_count()
    one = cp_time(None, tokens, batch, heads, dim, chunk, profile=True)
    with SimulatedMesh(world, backend="nccl") as mesh:
        per_rank = mesh.run(cp_time, tokens, batch, heads, dim, chunk, True)
    rows = [
        "| run | tokens per GPU | total tokens | timing | fwd+bwd ms (slowest rank) | Mtok/s total "
        "| efficiency | host ms to queue a step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    failed = [r["graph"] for r in (one, *per_rank) if isinstance(r["graph"], str)]
    for timing in ("synced", "stream", "graph"):
        if timing == "graph" and failed:
            rows.append(f"| graph timing not made | | | graph | {failed[0]} | | | |")
            continue
        t_one = one[timing]
        t_cp = max(r[timing] for r in per_rank)
        host_one = f"{one['host']:.2f}" if timing == "stream" else ""
        host_cp = f"{max(r['host'] for r in per_rank):.2f}" if timing == "stream" else ""
        rows += [
            f"| 1 GPU | {tokens} | {tokens} | {timing} | {t_one:.2f} | "
            f"{batch * tokens / t_one / 1e3:.1f} | 100% | {host_one} |",
            (f"| linear CP x{world} | {tokens} | {tokens * world} | {timing} | {t_cp:.2f} | "
             f"{batch * tokens * world / t_cp / 1e3:.1f} | {100 * t_one / t_cp:.0f}% "
             f"| {host_cp} |"),
        ]
    rows += ["", "CUDA time per kernel, one fwd+bwd (5 back-to-back steps profiled):", "",
             "| run | kernel | calls | CUDA ms |", "| --- | --- | --- | --- |"]
    for name, res in [("1 GPU", one), *((f"CP rank {r}", per_rank[r]) for r in (0, world - 1))]:
        rows += [f"| {name} | `{key}` | {calls} | {ms:.3f} |" for key, calls, ms in res["kernels"]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="*", default=[8192, 32768, 131072],
                        help="kernel table lengths (none: skip the table)")
    parser.add_argument("--crossover-seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--no-decay", action="store_true", help="lambda = 1 (plain linear attention)")
    parser.add_argument("--sweep", action="store_true", help="also time a few LinearTritonConfig variants")
    parser.add_argument("--profile", type=int, nargs="*", default=[],
                        help="per-kernel CUDA times of ours and fla at these lengths")
    parser.add_argument("--no-crossover", action="store_true", help="skip the linear-vs-dense table")
    parser.add_argument("--cp", action="store_true", help="CP over all visible GPUs (NCCL)")
    parser.add_argument("--cp-tokens", type=int, default=32768, help="tokens per GPU for --cp")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_linear.py needs a CUDA GPU")
    torch.cuda.set_device(0)
    gpu = torch.cuda.get_device_name(0)
    g = retnet_log_decay(args.heads, "cuda")
    if args.no_decay:
        g = None
    configs = {"default": LinearTritonConfig()}
    if args.sweep:
        configs |= {  # around the default: the state kernels' tiles, stages and warps, then
            # the parallel kernels'
            "state32x32": LinearTritonConfig(state_block_v=32),
            "state32x128": LinearTritonConfig(state_block_v=128),
            "state64": LinearTritonConfig(state_block_k=64),
            "state-stages3": LinearTritonConfig(state_num_stages=3),
            "state-stages5": LinearTritonConfig(state_num_stages=5),
            "state-w4": LinearTritonConfig(state_num_warps=4),
            "dq32": LinearTritonConfig(dq_block_k=32),
            "stages4": LinearTritonConfig(num_stages=4),
            "w4": LinearTritonConfig(num_warps=4),
        }
    header = [(f"# linear attention: {gpu}, torch {torch.__version__}, bf16, B={args.batch}, "
               f"H={args.heads}, D={args.head_dim}, decay={'none' if g is None else 'RetNet'}"), ""]
    if chunk_simple_gla is None:
        header.append(f"fla not importable ({_FLA_ERROR}); `pip install fla-core` for the baseline")
    t0 = time.time()
    g_check = g if g is not None else retnet_log_decay(args.heads, "cuda")
    checks = check_against_reference(args.heads, args.head_dim, g_check, configs["default"])
    print("\n".join(checks), flush=True)
    kernels = kernel_table(args.seqs, args.batch, args.heads, args.head_dim, g, configs)
    sections = [*header, *checks, "", "## kernels", *kernels]
    for seq in args.profile:
        sections += ["", f"## CUDA time per kernel, fwd+bwd at S={seq}",
                     *profile_table(seq, args.batch, args.heads, args.head_dim, g, configs["default"])]
    if not args.no_crossover:
        sections += ["", "## linear vs dense causal",
                     *crossover_table(args.crossover_seqs, args.batch, args.heads, args.head_dim, g,
                                      configs["default"])]
    if args.cp:
        sections += ["", f"## CP (strategy 'linear', {torch.cuda.device_count()} GPUs, NCCL)",
                     *cp_table(args.cp_tokens, args.batch, args.heads, args.head_dim, 64)]
    text = "\n".join(sections) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bench_linear_" + "".join(c if c.isalnum() else "_" for c in gpu.lower()).strip("_") + ".md"
    (args.out / name).write_text(text)
    print(text)
    print(f"wrote {args.out / name}; took {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
