"""Training throughput of one model, side by side in one run: longctx's context parallelism
against torch's native context parallel (``torch.distributed.tensor.experimental.context_parallel``
over SDPA), same model, same weights, same data, same mesh, same FSDP2 / activation checkpointing.

Run under torchrun on one node (every mode is built, timed and freed in turn in the same
processes)::

    torchrun --standalone --nproc-per-node 4 benchmarks/bench_train.py \\
        --config configs/llama_1b_128k.yaml \\
        --modes longctx:ulysses longctx:zigzag torch:cudnn torch:flash --steps 4 --warmup 2

Modes:

- ``longctx:<strategy>``: the trainer as ``longctx train`` runs it, with ``parallel.strategy``
  set (``parallel.kernel`` from ``--kernel``, default ``auto``);
- ``torch:<backend>``: the same trainer, but every attention core is
  ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` on ``[B, H, S, D]`` inside
  torch's ``context_parallel`` (its ring attention, rotate method ``--torch-rotate``) with the SDPA
  backend ``cudnn`` or ``flash``. The batch is sharded by the trainer with the zigzag layout,
  which is exactly torch's head-tail load balancing (rank ``r`` holds chunks ``r`` and
  ``2P - 1 - r``); before timing, one attention call is compared with longctx's zigzag on the
  same shards, which would fail if the two disagreed on the layout.

Both run causal attention over the whole packed sequence (``cross_document_attention``: torch's
CP has no document masks), so the FLOPs are the same. Reported per mode: median step time over
``--steps`` steps after ``--warmup``, tokens/s (all GPUs), MFU (the trainer's count: model FLOPs
with causal attention, 989 TFLOP/s peak per H100/H200), peak memory per GPU, the first and last
loss (equal across modes up to bf16 rounding at the same step: same weights, same data).

``--profile`` adds one profiled step per mode after the timed ones: CUDA time per kernel category
(attention, GEMM, NCCL by collective, torch.compile's kernels, other) and the top kernels.

``--set KEY=VALUE`` overrides the config as in ``longctx train`` (e.g. ``model.seq_length=1048576``
for the longest-context run). Writes the table to ``--out`` (markdown) on rank 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import merge_intervals  # benchmarks/timing.py, beside this script

from longctx import Mask, attention, shard
from longctx.models.llama import Attention
from longctx.train.config import load_config
from longctx.train.trainer import Trainer


def _sdpa_core(backend):
    """An ``Attention.core`` replacement: torch SDPA on ``[B, H, S, D]`` (patched by torch's CP)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    choice = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def core(q, k, v, seq):
        del seq  # causal over the whole sequence; torch's CP knows the layout (head-tail)
        with sdpa_kernel(choice):
            # [B, S, H, D] -> [B, H, S, D] views; SDPA takes the strides
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                enable_gqa=q.shape[2] != k.shape[2],
            )
        return out.transpose(1, 2)  # [B, S, H, D]

    return core


@contextmanager
def torch_context_parallel(cp_mesh, backend: str, rotate: str):
    """Torch's CP dispatcher on ``cp_mesh`` with every ``Attention.core`` replaced by SDPA.

    The batch is already sharded (zigzag = head-tail), so the only buffer handed to
    ``context_parallel`` is a throwaway one, there so that it enables head-tail load balancing.
    """
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    set_rotate_method(rotate)
    world = cp_mesh.size()
    marker = torch.zeros(2 * world, device="cuda")
    original = Attention.__dict__["core"]
    Attention.core = staticmethod(_sdpa_core(backend))
    try:
        with context_parallel(cp_mesh, buffers=[marker], buffer_seq_dims=[0],
                              no_restore_buffers={marker}):
            yield
    finally:
        Attention.core = original


def zigzag_probe(trainer: Trainer, seq: int = 8192):
    """Random zigzag shards ``q, k, v [1, seq / P, H, D]`` (the model's head counts) and longctx's
    causal zigzag attention of them (computed before torch's CP patches anything)."""
    cfg = trainer.config.model
    world, rank = trainer.dims.cp, trainer.cp_rank
    g = torch.Generator(device="cuda").manual_seed(0)
    H, G, D = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    q, k, v = (torch.randn(1, seq, h, D, device="cuda", dtype=torch.bfloat16, generator=g)
               for h in (H, G, G))
    q, k, v = (shard(t, "zigzag", world, rank) for t in (q, k, v))
    ours = attention(q, k, v, trainer.cp_group, strategy="zigzag", layout="zigzag",
                     mask=Mask(causal=True), kernel="auto")
    return (q, k, v), ours


def max_error_over_ranks(a: torch.Tensor, b: torch.Tensor) -> float:
    err = (a.float() - b.float()).abs().max()
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return float(err)


# kernel-name fragments (lower case) that put a CUDA kernel in a category of the --profile table;
# the first match wins, the rest is "other" (norms, RoPE, casts, the loss, the optimizer, ...)
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "sdpa", "attn", "cudnn")),
    ("nccl", ("nccl",)),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")),
    ("torch.compile", ("triton_",)),
)


def _category(name: str) -> str:
    low = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(f in low for f in fragments):
            if category == "nccl":  # ncclDevKernel_AllGather_RING_LL(...) -> nccl AllGather
                parts = name.split("(")[0].split("_")
                return f"nccl {parts[1]}" if len(parts) > 1 else "nccl"
            return category
    return "other"


def profile_step(trainer: Trainer, top: int = 12) -> list[str]:
    """One training step under torch's profiler on this rank: CUDA time per kernel category, the
    time the GPU computes (compute kernels' union, NCCL excluded) against the step's wall time,
    and the top kernels.  Markdown rows."""
    from torch.profiler import ProfilerActivity, profile

    batches = trainer.next_micro_batches()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        m = trainer.train_step(batches)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_cat: dict[str, float] = {}
    for e in kernels:
        cat = _category(e.name)
        per_cat[cat] = per_cat.get(cat, 0.0) + (e.time_range.end - e.time_range.start) / 1e3
    compute = [(e.time_range.start, e.time_range.end) for e in kernels
               if not e.name.lower().startswith("nccl")]
    wall_ms = m.seconds * 1e3
    rows = [(f"step wall {wall_ms:.0f} ms; GPU computing (union of non-NCCL kernels) "
             f"{sum(b - a for a, b in merge_intervals(compute)) / 1e3:.0f} ms"), "",
            "| category | CUDA ms | of the step |", "| --- | --- | --- |"]
    rows += [f"| {cat} | {ms:.1f} | {100 * ms / wall_ms:.1f}% |"
             for cat, ms in sorted(per_cat.items(), key=lambda kv: -kv[1])]
    rows += ["", "| kernel | category | calls | CUDA ms |", "| --- | --- | --- | --- |"]
    averages = sorted(prof.key_averages(), key=lambda a: -a.device_time_total)
    rows += [f"| `{a.key[:80]}` | {_category(a.key)} | {a.count} | {a.device_time_total / 1e3:.1f} |"
             for a in averages[:top] if a.device_time_total > 0]
    return rows


def run_mode(mode: str, args, overrides: list[str]) -> dict:
    kind, _, choice = mode.partition(":")
    extra = [
        "data.packing.cross_document_attention=true", "checkpoint.enabled=false",
        "eval.num_samples=0", f"train.steps={args.warmup + args.steps}",
        f"logging.log_interval={10**6}", "logging.tensorboard=false",
        f"schedule.warmup_steps={args.warmup + args.steps}",
    ]
    if kind == "longctx":
        extra += [f"parallel.strategy={choice}", f"parallel.kernel={args.kernel}"]
    elif kind == "torch":
        extra += ["parallel.strategy=zigzag", "parallel.layout=zigzag"]
    else:
        raise SystemExit(f"mode {mode!r}: use longctx:<strategy> or torch:<cudnn|flash>")
    config = load_config(args.config, [*extra, *overrides])
    trainer = Trainer(config, quiet=True)
    result = {"mode": mode, "error": None}
    try:
        with ExitStack() as stack:
            if kind == "torch":
                if trainer.dims.tp != 1 or trainer.dims.dp != 1:
                    raise SystemExit("torch modes: run with dp = tp = 1 (cp = every GPU)")
                (q, k, v), ours = zigzag_probe(trainer)
                stack.enter_context(
                    torch_context_parallel(trainer.pmesh.mesh["cp"], choice, args.torch_rotate)
                )
                result["layout_err"] = max_error_over_ranks(ours, Attention.core(q, k, v, None))
            times, losses = [], []
            for i in range(args.warmup + args.steps):
                if i == args.warmup:
                    torch.cuda.reset_peak_memory_stats()
                m = trainer.train_step(trainer.next_micro_batches())
                losses.append(m.loss)
                if i >= args.warmup:
                    times.append(m.seconds)
                if trainer.env.is_main:
                    print(f"  [{mode}] step {i + 1}: {m.seconds:.2f} s, loss {m.loss:.4f}",
                          flush=True)
            if args.profile:
                result["profile"] = profile_step(trainer)
        step_s = statistics.median(times) if times else float("nan")
        tok_s = trainer.tokens_per_step / step_s
        result |= {
            "step_s": step_s, "tok_s": tok_s,
            "mfu": trainer.flops_per_token * tok_s / (trainer.env.world_size * trainer.peak_flops),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "first_loss": losses[0], "last_loss": losses[-1],
            "seq": config.model.seq_length, "cp": trainer.dims.cp,
            "ac": config.parallel.activation_checkpointing,
        }
    except Exception as e:  # noqa: BLE001 - reported in the table (same on every rank)
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    finally:
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/llama_1b_128k.yaml")
    parser.add_argument("--modes", nargs="+",
                        default=["longctx:ulysses", "longctx:zigzag", "torch:cudnn", "torch:flash"])
    parser.add_argument("--kernel", default="auto", help="longctx modes: parallel.kernel")
    parser.add_argument("--torch-rotate", default="allgather", choices=["allgather", "alltoall"])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed steps, one more step under torch's profiler per "
                             "mode: CUDA time per kernel category and the top kernels (rank 0)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_train.md"))
    args = parser.parse_args()
    overrides = [o for group in args.overrides for o in group]
    if "LOCAL_RANK" not in os.environ or not torch.cuda.is_available():
        raise SystemExit("run under torchrun on GPUs: torchrun --standalone --nproc-per-node N "
                         "benchmarks/bench_train.py ...")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    t0 = time.time()
    results = []
    for mode in args.modes:
        results.append(run_mode(mode, args, overrides))
        dist.barrier()
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        rows = [
            (f"device: {torch.cuda.get_device_name()} x{world}, torch {torch.__version__}; "
             f"config {args.config} {' '.join(overrides)}; median of {args.steps} steps after "
             f"{args.warmup}; torch rotate {args.torch_rotate}"),
            "",
            ("| mode | seq | cp | AC | step s | tokens/s | MFU | peak GiB/GPU | loss first -> last "
             "| check vs longctx zigzag |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in results:
            if r["error"]:
                rows.append(f"| {r['mode']} | | | | {r['error']} | | | | | |")
                continue
            check = f"max abs {r['layout_err']:.3g}" if "layout_err" in r else ""
            rows.append(
                f"| {r['mode']} | {r['seq']} | {r['cp']} | {r['ac']} | {r['step_s']:.2f} | "
                f"{r['tok_s'] / 1e3:.1f}k | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | "
                f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} | {check} |"
            )
        for r in results:
            if r.get("profile"):
                rows += ["", f"### profile of one step, {r['mode']}, rank 0", "", *r["profile"]]
        rows.append(f"\n(took {time.time() - t0:.0f}s)")
        text = "\n".join(rows) + "\n"
        print(text, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
