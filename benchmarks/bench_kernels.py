"""Local attention kernels side by side on one GPU: longctx's Triton kernel vs torch SDPA (flash and
cuDNN backends) and FlexAttention (torch.compile'd), bf16, B=1, H=16.

Measures forward and forward+backward TFLOP/s for causal attention at several sequence lengths and
head dims, plus sliding-window and packed-document masks against FlexAttention with the same mask
(TFLOP/s counted on the allowed pairs only).  FLOPs: ``4 * pairs * H * D`` forward with
``pairs = S^2 / 2`` for causal, and 2.5x that for the backward (forward+backward = 3.5x).
Timing: CUDA events around each call, warm-up first, median of repeats.

With ``--issue23`` the table is issue 23's: FlashAttention-4 called directly
(``flash_attn.cute.flash_attn_func`` / ``flash_attn_varlen_func``: ``fa4-direct``) against
longctx's ``fa4`` kernel and ``auto`` (both through ``longctx.attention``, forward + autograd
backward, as a model runs them), cuDNN, the Triton kernel and FlexAttention, on causal 32k/128k
(D 128/64, MHA 16/16 and GQA 32/8), a 4096 window and packed documents (512-16k) at 128k.
Without flash-attn-4 installed its rows are skipped with a note; the rest still runs.

Usage (rerunnable; writes ``bench_kernels.{csv,md,png}`` to ``--out``, with ``--issue23``
``bench_kernels_issue23.*``)::

    python benchmarks/bench_kernels.py                      # the full issue-3 table
    python benchmarks/bench_kernels.py --seqs 32768 --head-dims 128 --no-masks
    python benchmarks/bench_kernels.py --issue23             # FA4 vs longctx fa4/auto (issue 23)
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

from timing import time_ms  # noqa: E402  (benchmarks/timing.py, beside this script)

from longctx.kernels.mask import Mask  # noqa: E402
from longctx.kernels.triton_flash import TritonFlash, TritonFlashConfig  # noqa: E402

H = 16
WINDOW = 4096


# -- masks and FLOPs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    mask_name: str  # "causal", "window", "docs"
    S: int
    D: int
    H: int = H  # query heads
    Hkv: int = H  # key/value heads (GQA when fewer)

    @property
    def heads(self) -> str:
        return f"{self.H}/{self.Hkv}"


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
    q_shape, kv_shape = (1, case.S, case.H, case.D), (1, case.S, case.Hkv, case.D)  # [B, S, H, D]
    q, k, v, dout = (
        torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
        for shape in (q_shape, kv_shape, kv_shape, q_shape)
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

    gqa = {"enable_gqa": True} if case.Hkv != case.H else {}

    def fwd():
        with sdpa_kernel(backend), torch.no_grad():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **gqa)

    def fwd_bwd():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, **gqa)
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
    gqa = {"enable_gqa": True} if case.Hkv != case.H else {}

    def fwd():
        with torch.no_grad():
            return _FLEX(qt, kt, vt, block_mask=block_mask, scale=scale, **gqa)

    def fwd_bwd():
        out = _FLEX(qg, kg, vg, block_mask=block_mask, scale=scale, **gqa)
        return torch.autograd.grad(out, (qg, kg, vg), dt)

    return fwd, fwd_bwd


def fa4_importable() -> str | None:
    """None when ``flash_attn.cute`` imports, else why not (its rows are then skipped)."""
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA/DSL library that fails to load
        return f"{type(exc).__name__}: {exc}"
    return None


def fa4_direct_fns(case: Case, q, k, v, dout):
    """FlashAttention-4 called directly, as its README shows (autograd for the backward)."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    scale = case.D**-0.5
    if case.mask_name == "docs":
        cu_host = doc_boundaries(case.S)
        cu = cu_host.to(device="cuda", dtype=torch.int32)
        longest = int(cu_host.diff().max())

        def call(q_, k_, v_):  # [1, S, H, D] -> packed [S, H, D]
            return flash_attn_varlen_func(
                q_[0], k_[0], v_[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                max_seqlen_k=longest, softmax_scale=scale, causal=True,
            )[0]

        dt = dout[0]
    else:
        window = (WINDOW - 1, 0) if case.mask_name == "window" else (None, None)

        def call(q_, k_, v_):
            return flash_attn_func(q_, k_, v_, softmax_scale=scale, causal=True,
                                   window_size=window)[0]

        dt = dout

    def fwd():
        with torch.no_grad():
            return call(q, k, v)

    def fwd_bwd():
        return torch.autograd.grad(call(qg, kg, vg), (qg, kg, vg), dt)

    return fwd, fwd_bwd


def longctx_fns(case: Case, q, k, v, dout, kernel: str):
    """``longctx.attention`` on one GPU with ``kernel`` (forward; forward + autograd backward,
    gradients in bf16 as a model gets them)."""
    import longctx

    mask = longctx_mask(case)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            return longctx.attention(q, k, v, mask=mask, kernel=kernel)

    def fwd_bwd():
        out = longctx.attention(qg, kg, vg, mask=mask, kernel=kernel)
        return torch.autograd.grad(out, (qg, kg, vg), dout)

    return fwd, fwd_bwd


def auto_choice(case: Case, q) -> str:
    from longctx.kernels.dispatch import select_kernel

    return select_kernel(q, longctx_mask(case), kv_heads=case.Hkv, explain=True)[1]


def issue23_cases(args) -> list[Case]:
    """Issue 23's rows: causal at each length x head dim x (MHA 16/16, GQA 32/8), then a 4096
    window and packed documents at ``--mask-seq``."""
    cases = [Case("causal", S, D, h, hkv) for S in args.seqs for D in args.head_dims
             for h, hkv in ((16, 16), (32, 8))]
    if args.masks:
        cases += [Case("window", args.mask_seq, 128), Case("docs", args.mask_seq, 128)]
    return cases


def check_fa4(contenders: dict) -> str:
    """Relative error of longctx's fa4 and auto outputs against FA4 called directly."""
    ref = contenders["fa4-direct"][0]().float()
    errs = []
    for name in ("longctx-fa4", "auto"):
        out = contenders[name][0]().float().reshape(ref.shape)
        err = ((out - ref).norm() / ref.norm()).item()
        if not err < 2e-2:
            raise RuntimeError(f"{name} disagrees with FA4 direct: rel err {err:.2e}")
        errs.append(f"{name} {err:.1e}")
    return "out err vs fa4-direct: " + ", ".join(errs)


def check_triton(case: Case, q, k, v, dout, fwd, fwd_bwd) -> str:
    """Relative error of the Triton out / dq / dk / dv against SDPA-flash (causal only) or the
    Triton kernel's own float32 run on a 4k slice (masks)."""
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    if case.mask_name != "causal" or case.Hkv != case.H:  # SDPA-flash takes no GQA
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
    e_out, e_dq, e_dk, e_dv = errs
    return f"err vs flash: out {e_out:.1e} dq {e_dq:.1e} dk {e_dk:.1e} dv {e_dv:.1e}"


# -- runs ----------------------------------------------------------------------------------------
def tflops(case: Case, ms: float, mode: str) -> float:
    flops = 4 * allowed_pairs(case) * case.H * case.D * (1.0 if mode == "fwd" else 3.5)
    return flops / (ms * 1e-3) / 1e12


def run_table(args) -> list[dict]:
    from torch.nn.attention import SDPBackend

    # most important first (a run cut short still has them): 32k, then the mask rows, then the rest
    if args.issue23:
        cases = issue23_cases(args)
    else:
        cases = [Case("causal", S, D) for D in args.head_dims for S in args.seqs]
        if args.masks:
            cases += [Case("window", args.mask_seq, 128), Case("causal", args.mask_seq, 128),
                      Case("docs", args.mask_seq, 128)]
    order = {32768: 0, args.mask_seq: 1}
    cases = sorted(dict.fromkeys(cases), key=lambda c: (c.D != 128, order.get(c.S, 2), c.S))
    fa4_missing = fa4_importable() if args.issue23 else "not asked for (--issue23)"
    if args.issue23 and fa4_missing:
        print(f"[note] FlashAttention-4 rows skipped: flash_attn.cute does not import "
              f"({fa4_missing}); pip install \"longctx[fa4]\"", flush=True)
    rows = []
    for case in cases:
        q, k, v, dout = inputs(case)
        contenders: dict[str, tuple] = {"triton": triton_fns(case, q, k, v, dout)}
        if args.issue23:
            if not fa4_missing:
                contenders["fa4-direct"] = fa4_direct_fns(case, q, k, v, dout)
                contenders["longctx-fa4"] = longctx_fns(case, q, k, v, dout, "fa4")
            contenders["auto"] = longctx_fns(case, q, k, v, dout, "auto")
            print(f"[auto] {case}: {auto_choice(case, q)}", flush=True)
        if case.mask_name == "causal" and "sdpa" in args.kernels:
            if not args.issue23:
                contenders["sdpa-flash"] = sdpa_fns(case, q, k, v, dout,
                                                    SDPBackend.FLASH_ATTENTION)
            contenders["sdpa-cudnn"] = sdpa_fns(case, q, k, v, dout, SDPBackend.CUDNN_ATTENTION)
        if "flex" in args.kernels:
            contenders["flex"] = None  # built lazily (compiles)
        note = check_triton(case, q, k, v, dout, *contenders["triton"])
        if note:
            print(f"[check] {case}: {note}", flush=True)
        if "fa4-direct" in contenders:
            print(f"[check] {case}: {check_fa4(contenders)}", flush=True)
        for name in list(contenders):
            t0 = time.time()
            try:
                fns = contenders[name] or flex_fns(case, q, k, v, dout)
                for mode, fn in zip(("fwd", "fwd+bwd"), fns):
                    ms = time_ms(fn, budget_s=args.budget)
                    rows.append(dict(kernel=name, mask=case.mask_name, S=case.S, D=case.D,
                                     heads=case.heads, mode=mode, ms=round(ms, 4),
                                     tflops=round(tflops(case, ms, mode), 1)))
                    print(f"{name:11s} {case.mask_name:6s} S={case.S:6d} D={case.D:3d} "
                          f"H={case.heads:5s} {mode:7s} {ms:9.3f} ms "
                          f"{rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
            except Exception as exc:  # a contender that fails is reported, the table goes on
                print(f"{name:11s} {case} FAILED: {type(exc).__name__}: {str(exc)[:300]}",
                      flush=True)
            print(f"  ({name} took {time.time() - t0:.1f}s wall)", flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()
        write_csv(rows, Path(args.out) / f"{args.stem}.csv")  # partial results survive a timeout
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
        w = csv.DictWriter(f, fieldnames=["kernel", "mask", "S", "D", "heads", "mode", "ms",
                                          "tflops"], restval="16/16")
        w.writeheader()
        w.writerows(rows)


def write_reports(rows: list[dict], out_dir: Path, stem: str, header: str) -> str:
    write_csv(rows, out_dir / f"{stem}.csv")

    # one line per (mask, S, D, heads, mode): TFLOP/s of each kernel and the ratios
    keys = sorted({(r["mask"], r["S"], r["D"], r.get("heads", "16/16"), r["mode"]) for r in rows},
                  key=lambda k: (k[0] != "causal", k[0], -k[2], k[1], k[3], k[4]))
    kernels = [k for k in ("fa4-direct", "longctx-fa4", "auto", "triton", "sdpa-flash",
                           "sdpa-cudnn", "flex")
               if any(r["kernel"] == k for r in rows)]
    by = {(r["kernel"], r["mask"], r["S"], r["D"], r.get("heads", "16/16"), r["mode"]):
          r["tflops"] for r in rows}
    ratios = [("triton", "sdpa-flash"), ("triton", "sdpa-cudnn"), ("triton", "flex")]
    if any(k in kernels for k in ("fa4-direct", "auto")):  # issue 23's targets
        ratios = [("auto", "fa4-direct"), ("longctx-fa4", "fa4-direct"), ("auto", "sdpa-cudnn"),
                  ("auto", "triton")]
    lines = [header, "",
             "| mask | S | D | heads | mode | " + " | ".join(kernels) + " | "
             + " | ".join(f"{a} / {b}" for a, b in ratios) + " | triton / triton-causal |",
             "|" + "---|" * (5 + len(kernels) + len(ratios) + 1)]

    def ratio(key, name, other, mask=None):
        t = by.get((name,) + key)
        o = by.get((other,) + key) if mask is None else by.get((other, mask) + key[1:])
        return f"{t / o:.2f}" if t and o else "-"

    for key in keys:
        vals = [by.get((k,) + key) for k in kernels]
        lines.append(
            f"| {key[0]} | {key[1] // 1024}k | {key[2]} | {key[3]} | {key[4]} | "
            + " | ".join(f"{v:.1f}" if v else "-" for v in vals) + " | "
            + " | ".join(ratio(key, a, b) for a, b in ratios)
            + (f" | {ratio(key, 'triton', 'triton', 'causal')} |" if key[0] != "causal"
               else " | - |")
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
            groups = [k for k in keys if k[4] == mode]
            width = 0.8 / max(1, len(kernels))
            for i, kern in enumerate(kernels):
                ys = [by.get((kern,) + g, 0) or 0 for g in groups]
                ax.bar([j + i * width for j in range(len(groups))], ys, width, label=kern)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
            ax.set_xticklabels([f"{g[0]}\n{g[1] // 1024}k d{g[2]} h{g[3]}" for g in groups],
                               fontsize=8)
            ax.set_title(f"{mode} (bf16, B=1)")
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
    p.add_argument("--seqs", default=None,
                   help="comma-separated sequence lengths (default 8192,32768,131072; "
                        "with --issue23: 32768,131072)")
    p.add_argument("--head-dims", default="128,64")
    p.add_argument("--kernels", default="triton,sdpa,flex", help="subset of triton,sdpa,flex")
    p.add_argument("--no-masks", dest="masks", action="store_false",
                   help="skip the sliding-window / documents rows")
    p.add_argument("--mask-seq", type=int, default=131072)
    p.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    p.add_argument("--sweep", action="store_true", help="time Triton tile configs instead")
    p.add_argument("--issue23", action="store_true",
                   help="issue 23's table: FA4 direct vs longctx fa4/auto (MHA and GQA 32/8)")
    p.add_argument("--variant", action="append", default=[],
                   help="with --sweep: also time this copy of triton_flash.py (an experiment)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    args.seqs = args.seqs or ("32768,131072" if args.issue23 else "8192,32768,131072")
    args.seqs = [int(s) for s in args.seqs.split(",")]
    args.head_dims = [int(d) for d in args.head_dims.split(",")]
    args.stem = "bench_kernels_issue23" if args.issue23 else "bench_kernels"
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")

    dev = torch.cuda.get_device_name()
    import triton

    header = (f"# bench_kernels on {dev}: torch {torch.__version__}, triton {triton.__version__}, "
              f"cuDNN {torch.backends.cudnn.version()}, bf16, B=1, H={H} unless stated")
    if args.issue23:
        from longctx.kernels.fa4 import fa4_version

        header += f", flash-attn-4 {fa4_version() or 'not installed'}"
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
        table = write_reports(run_table(args), Path(args.out), args.stem, header)
    print(f"\n(total {time.time() - t0:.0f}s)\n")
    print(table)


if __name__ == "__main__":
    main()
