"""Local attention kernels side by side on one GPU: longctx's Triton kernel vs torch SDPA (flash and
cuDNN backends) and FlexAttention (torch.compile'd), bf16, B=1, H=16.

Measures forward and forward+backward TFLOP/s for causal attention at several sequence lengths and
head dims, plus sliding-window and packed-document masks against FlexAttention with the same mask
(TFLOP/s counted on the allowed pairs only).  FLOPs: ``4 * pairs * H * D`` forward with
``pairs = S^2 / 2`` for causal, and 2.5x that for the backward (forward+backward = 3.5x).
Timing: CUDA events around each call, warm-up first, median of repeats.

Usage (rerunnable; writes ``bench_kernels.{csv,md,png}`` to ``--out``)::

    python benchmarks/bench_kernels.py                      # the full issue-3 table
    python benchmarks/bench_kernels.py --seqs 32768 --head-dims 128 --no-masks
    python benchmarks/bench_kernels.py --sweep               # tile configs of the Triton kernel

Prints the table last.  Every Triton result is checked against SDPA (flash) before it is timed.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longctx.kernels.mask import Mask  # noqa: E402
from longctx.kernels.triton_flash import TritonFlash, TritonFlashConfig  # noqa: E402
from timing import time_ms  # noqa: E402  (benchmarks/timing.py, beside this script)

H = 16
WINDOW = 4096


# -- masks and FLOPs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    mask_name: str  # "causal", "window", "docs"
    S: int
    D: int


def doc_boundaries(S: int, seed: int = 0) -> torch.Tensor:
    """Packed documents of 512..16384 tokens (uniform), the last one cut at S: ``[0, ..., S]``."""
    g = torch.Generator().manual_seed(seed)
    ends, pos = [0], 0
    while pos < S:
        pos = min(S, pos + int(torch.randint(512, 16385, (1,), generator=g)))
        ends.append(pos)
    return torch.tensor(ends, dtype=torch.int64)


def allowed_pairs(case: Case) -> float:
    S = case.S
    if case.mask_name == "causal":
        return S * S / 2  # the usual convention
    if case.mask_name == "window":
        W = WINDOW
        return W * (W + 1) / 2 + (S - W) * W if S > W else S * (S + 1) / 2
    if case.mask_name == "docs":
        lengths = doc_boundaries(S).diff().double()
        return float((lengths * (lengths + 1) / 2).sum())
    raise ValueError(case.mask_name)


def longctx_mask(case: Case) -> Mask:
    if case.mask_name == "causal":
        return Mask(causal=True)
    if case.mask_name == "window":
        return Mask(causal=True, window=WINDOW)
    return Mask(causal=True, cu_seqlens=doc_boundaries(case.S))


# -- the contenders ------------------------------------------------------------------------------
def inputs(case: Case, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, case.S, H, case.D)  # [B, S, H, D]
    q, k, v, dout = (
        torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4)
    )
    return q, k, v, dout


def triton_fns(case: Case, q, k, v, dout, config: TritonFlashConfig = TritonFlashConfig()):
    kern, mask, scale = TritonFlash(config), longctx_mask(case), case.D**-0.5

    def fwd():
        return kern.forward(q, k, v, scale=scale, mask=mask)

    def fwd_bwd():
        out, lse = kern.forward(q, k, v, scale=scale, mask=mask)
        return kern.backward(dout, q, k, v, out, lse, scale=scale, mask=mask)

    return fwd, fwd_bwd


def sdpa_fns(case: Case, q, k, v, dout, backend):
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt, dt = (t.transpose(1, 2) for t in (q, k, v, dout))  # [B, H, S, D] views
    qg, kg, vg = (t.detach().requires_grad_() for t in (qt, kt, vt))

    def fwd():
        with sdpa_kernel(backend), torch.no_grad():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    def fwd_bwd():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
            return torch.autograd.grad(out, (qg, kg, vg), dt)

    return fwd, fwd_bwd


_FLEX = None


def flex_fns(case: Case, q, k, v, dout):
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Each case (shape, mask_mod) is a recompile; past dynamo's recompile limit flex_attention
    # silently runs unfused in eager mode (and materialises S x S scores).  Start every case from
    # a clean dynamo state so each one is compiled.
    torch._dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    if case.mask_name == "causal":
        def mask_mod(b, h, qi, ki):
            return qi >= ki
    elif case.mask_name == "window":
        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < WINDOW)
    else:
        cu = doc_boundaries(case.S)
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff()).cuda()

        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (doc[qi] == doc[ki])
    block_mask = create_block_mask(mask_mod, None, None, case.S, case.S, device="cuda",
                                   _compile=True)  # compiled: no S x S mask in memory
    qt, kt, vt, dt = (t.transpose(1, 2) for t in (q, k, v, dout))
    qg, kg, vg = (t.detach().requires_grad_() for t in (qt, kt, vt))
    scale = case.D**-0.5

    def fwd():
        with torch.no_grad():
            return _FLEX(qt, kt, vt, block_mask=block_mask, scale=scale)

    def fwd_bwd():
        out = _FLEX(qg, kg, vg, block_mask=block_mask, scale=scale)
        return torch.autograd.grad(out, (qg, kg, vg), dt)

    return fwd, fwd_bwd


def check_triton(case: Case, q, k, v, dout, fwd, fwd_bwd) -> str:
    """Relative error of the Triton out / dq / dk / dv against SDPA-flash (causal only) or the
    Triton kernel's own float32 run on a 4k slice (masks)."""
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    if case.mask_name != "causal":
        return ""
    from torch.nn.attention import SDPBackend

    ref_fwd, ref_fwd_bwd = sdpa_fns(case, q, k, v, dout, SDPBackend.FLASH_ATTENTION)
    out, _ = fwd()
    ref_out = ref_fwd().transpose(1, 2)
    grads = fwd_bwd()
    ref_grads = [g.transpose(1, 2) for g in ref_fwd_bwd()]
    errs = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
    if max(errs) > 2e-2 or any(math.isnan(e) for e in errs):
        raise RuntimeError(f"Triton kernel disagrees with SDPA-flash on {case}: {errs}")
    return "err vs flash: out %.1e dq %.1e dk %.1e dv %.1e" % tuple(errs)


# -- runs ----------------------------------------------------------------------------------------
def tflops(case: Case, ms: float, mode: str) -> float:
    flops = 4 * allowed_pairs(case) * H * case.D * (1.0 if mode == "fwd" else 3.5)
    return flops / (ms * 1e-3) / 1e12


def run_table(args) -> list[dict]:
    from torch.nn.attention import SDPBackend

    # most important first (a run cut short still has them): 32k, then the mask rows, then the rest
    cases = [Case("causal", S, D) for D in args.head_dims for S in args.seqs]
    if args.masks:
        cases += [Case("window", args.mask_seq, 128), Case("causal", args.mask_seq, 128),
                  Case("docs", args.mask_seq, 128)]
    order = {32768: 0, args.mask_seq: 1}
    cases = sorted(dict.fromkeys(cases), key=lambda c: (c.D != 128, order.get(c.S, 2), c.S))
    rows = []
    for case in cases:
        q, k, v, dout = inputs(case)
        contenders: dict[str, tuple] = {"triton": triton_fns(case, q, k, v, dout)}
        if case.mask_name == "causal" and "sdpa" in args.kernels:
            contenders["sdpa-flash"] = sdpa_fns(case, q, k, v, dout, SDPBackend.FLASH_ATTENTION)
            contenders["sdpa-cudnn"] = sdpa_fns(case, q, k, v, dout, SDPBackend.CUDNN_ATTENTION)
        if "flex" in args.kernels:
            contenders["flex"] = None  # built lazily (compiles)
        note = check_triton(case, q, k, v, dout, *contenders["triton"])
        if note:
            print(f"[check] {case}: {note}", flush=True)
        for name in list(contenders):
            t0 = time.time()
            try:
                fns = contenders[name] or flex_fns(case, q, k, v, dout)
                for mode, fn in zip(("fwd", "fwd+bwd"), fns):
                    ms = time_ms(fn, budget_s=args.budget)
                    rows.append(dict(kernel=name, mask=case.mask_name, S=case.S, D=case.D,
                                     mode=mode, ms=round(ms, 4),
                                     tflops=round(tflops(case, ms, mode), 1)))
                    print(f"{name:11s} {case.mask_name:6s} S={case.S:6d} D={case.D:3d} {mode:7s} "
                          f"{ms:9.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
            except Exception as exc:  # a contender that fails is reported, the table goes on
                print(f"{name:11s} {case} FAILED: {type(exc).__name__}: {str(exc)[:300]}",
                      flush=True)
            print(f"  ({name} took {time.time() - t0:.1f}s wall)", flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()
        write_csv(rows, Path(args.out) / "bench_kernels.csv")  # partial results survive a timeout
    return rows


# sweep entries: (part, config kwargs); tiles as (block_m, block_n, num_warps, num_stages)
SWEEP: dict[int, list[tuple[str, dict]]] = {
    128: [
        ("fwd", dict(fwd=(128, 64, 8, 3))),
        ("fwd", dict(fwd=(128, 64, 8, 4))),
        ("bwd", dict(bwd_kv=(64, 128, 8, 3), bwd_q=(128, 32, 8, 3), dq_atomic=False)),
        ("bwd", dict(bwd_kv=(64, 128, 8, 2), bwd_q=(128, 32, 8, 3), dq_atomic=False)),
        ("bwd", dict(bwd_kv=(32, 128, 8, 3), bwd_q=(128, 32, 8, 3), dq_atomic=False)),
        ("bwd", dict(bwd_kv=(64, 128, 8, 3), bwd_q=(128, 64, 8, 3), dq_atomic=False)),
        ("bwd", dict(bwd_kv=(64, 128, 8, 3), bwd_q=(128, 32, 8, 4), dq_atomic=False)),
        ("bwd", dict(bwd_kv=(64, 128, 8, 3), bwd_q=(64, 64, 4, 3), dq_atomic=False)),
        ("bwd", dict(bwd_kv=(64, 128, 8, 3), dq_atomic=True)),
    ],
    64: [
        ("fwd", dict(fwd=(128, 64, 4, 3))),
        ("fwd", dict(fwd=(128, 64, 4, 4))),
        ("fwd", dict(fwd=(64, 64, 4, 3))),
        ("bwd", dict(bwd_kv=(64, 128, 8, 3), dq_atomic=True)),
        ("bwd", dict(bwd_kv=(64, 128, 8, 4), dq_atomic=True)),
        ("bwd", dict(bwd_kv=(128, 128, 8, 2), dq_atomic=True)),
        ("bwd", dict(bwd_kv=(64, 128, 8, 3), bwd_q=(128, 64, 8, 3), dq_atomic=False)),
        ("bwd", dict(bwd_kv=(64, 128, 8, 3), bwd_q=(128, 32, 8, 3), dq_atomic=False)),
    ],
}


def _load_variant(path: str):
    """A copy of triton_flash.py (an experiment) loaded as its own module."""
    import importlib.util

    name = f"longctx.kernels._variant_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_sweep(args) -> list[dict]:
    """Time tile configs of the Triton kernel (forward; backward with either dQ strategy) on
    causal attention, for this kernel and any ``--variant`` copies; the fastest become the
    defaults in triton_flash.py."""
    import longctx.kernels.triton_flash as main_module

    modules = [("main", main_module)] + [(Path(p).stem, _load_variant(p)) for p in args.variant]
    rows = []
    for D in args.head_dims:
        for S in args.seqs:
            case = Case("causal", S, D)
            q, k, v, dout = inputs(case)
            scale, mask = D**-0.5, Mask(causal=True)
            out, lse = TritonFlash().forward(q, k, v, scale=scale, mask=mask)
            for mod_name, mod in modules:
                for part, kwargs in SWEEP.get(D, []):
                    if part == "fwd" and mod_name != "main":
                        continue
                    cfg = mod.TritonFlashConfig(**{
                        key: mod.TileConfig(*val) if isinstance(val, tuple) else val
                        for key, val in kwargs.items()
                    })
                    kern = mod.TritonFlash(cfg)
                    if part == "fwd":
                        fn = partial(kern.forward, q, k, v, scale=scale, mask=mask)
                    else:
                        fn = partial(kern.backward, dout, q, k, v, out, lse, scale=scale,
                                     mask=mask)
                    label = f"{mod_name}: " + " ".join(
                        f"{key}={'x'.join(map(str, val)) if isinstance(val, tuple) else val}"
                        for key, val in kwargs.items())
                    try:
                        ms = time_ms(fn, budget_s=args.budget)
                    except Exception as exc:
                        print(f"sweep D={D} S={S} {part} {label}: FAILED {type(exc).__name__}: "
                              f"{str(exc)[:300]}", flush=True)
                        continue
                    flops = 4 * allowed_pairs(case) * H * D * (1.0 if part == "fwd" else 2.5)
                    tf = flops / (ms * 1e-3) / 1e12
                    rows.append(dict(kernel=f"triton-{part}", mask="causal", S=S, D=D,
                                     mode=label, ms=round(ms, 4), tflops=round(tf, 1)))
                    print(f"sweep D={D} S={S} {part:3s} {ms:8.3f} ms {tf:6.1f} TFLOP/s  {label}",
                          flush=True)
            del q, k, v, dout, out, lse
            torch.cuda.empty_cache()
    return rows


# -- reporting -----------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kernel", "mask", "S", "D", "mode", "ms", "tflops"])
        w.writeheader()
        w.writerows(rows)


def write_reports(rows: list[dict], out_dir: Path, stem: str, header: str) -> str:
    write_csv(rows, out_dir / f"{stem}.csv")

    # one line per (mask, S, D, mode): TFLOP/s of each kernel and triton's ratio to the others
    keys = sorted({(r["mask"], r["S"], r["D"], r["mode"]) for r in rows},
                  key=lambda k: (k[0] != "causal", k[0], -k[2], k[1], k[3]))
    kernels = [k for k in ("triton", "sdpa-flash", "sdpa-cudnn", "flex")
               if any(r["kernel"] == k for r in rows)]
    by = {(r["kernel"], r["mask"], r["S"], r["D"], r["mode"]): r["tflops"] for r in rows}
    lines = [header, "",
             "| mask | S | D | mode | " + " | ".join(kernels)
             + " | triton / flash | triton / cudnn | triton / flex | triton / triton-causal |",
             "|" + "---|" * (4 + len(kernels) + 4)]
    def ratio(key, other, mask=None):
        t = by.get(("triton",) + key)
        o = by.get((other,) + key) if mask is None else by.get((other, mask) + key[1:])
        return f"{t / o:.2f}" if t and o else "-"

    for key in keys:
        vals = [by.get((k,) + key) for k in kernels]
        lines.append(
            f"| {key[0]} | {key[1] // 1024}k | {key[2]} | {key[3]} | "
            + " | ".join(f"{v:.1f}" if v else "-" for v in vals)
            + f" | {ratio(key, 'sdpa-flash')} | {ratio(key, 'sdpa-cudnn')} | {ratio(key, 'flex')}"
            + (f" | {ratio(key, 'triton', 'causal')} |" if key[0] != "causal" else " | - |")
        )
    table = "\n".join(lines) + "\n"
    (out_dir / f"{stem}.md").write_text(table)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        modes = ["fwd", "fwd+bwd"]
        fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
        for ax, mode in zip(axes, modes):
            groups = [k for k in keys if k[3] == mode]
            width = 0.8 / max(1, len(kernels))
            for i, kern in enumerate(kernels):
                ys = [by.get((kern,) + g, 0) or 0 for g in groups]
                ax.bar([j + i * width for j in range(len(groups))], ys, width, label=kern)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
            ax.set_xticklabels([f"{g[0]}\n{g[1] // 1024}k d{g[2]}" for g in groups], fontsize=8)
            ax.set_title(f"{mode} (bf16, B=1, H={H})")
            ax.set_ylabel("TFLOP/s (allowed pairs)")
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend()
        fig.suptitle(header.lstrip("# "), fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}.png", dpi=110)
    except Exception as exc:  # the table matters more than the plot
        print(f"(plot skipped: {exc})")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", default="8192,32768,131072", help="comma-separated sequence lengths")
    p.add_argument("--head-dims", default="128,64")
    p.add_argument("--kernels", default="triton,sdpa,flex", help="subset of triton,sdpa,flex")
    p.add_argument("--no-masks", dest="masks", action="store_false",
                   help="skip the sliding-window / documents rows")
    p.add_argument("--mask-seq", type=int, default=131072)
    p.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    p.add_argument("--sweep", action="store_true", help="time Triton tile configs instead")
    p.add_argument("--variant", action="append", default=[],
                   help="with --sweep: also time this copy of triton_flash.py (an experiment)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    args.seqs = [int(s) for s in args.seqs.split(",")]
    args.head_dims = [int(d) for d in args.head_dims.split(",")]
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")

    dev = torch.cuda.get_device_name()
    import triton

    header = (f"# bench_kernels on {dev}: torch {torch.__version__}, triton {triton.__version__}, "
              f"cuDNN {torch.backends.cudnn.version()}, bf16, B=1, H={H}")
    cmd = "python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:])
    t0 = time.time()
    header += f"\n\ncommand: `{cmd}`"
    if args.sweep:
        rows = run_sweep(args)
        table = "\n".join(
            [header, "", "| part | S | D | ms | TFLOP/s | config |", "|---|---|---|---|---|---|"]
            + [f"| {r['kernel']} | {r['S']} | {r['D']} | {r['ms']} | {r['tflops']} | {r['mode']} |"
               for r in rows]) + "\n"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_kernels_sweep.md").write_text(table)
    else:
        table = write_reports(run_table(args), Path(args.out), "bench_kernels", header)
    print(f"\n(total {time.time() - t0:.0f}s)\n")
    print(table)


if __name__ == "__main__":
    main()
