"""Block-sparse attention on one GPU: the Triton block-sparse kernel against FlexAttention with the
same block mask (and FA4's block-sparse path where it runs), issue 24's cases.

    python benchmarks/bench_block_sparse.py                    # every case, table to results/
    python benchmarks/bench_block_sparse.py --cases moba-32k --repeats 3
    python benchmarks/bench_block_sparse.py --out results/bench_block_sparse_h200.md

bf16, B=1, H=16, D=128, causal element mask; median ms of ``--repeats`` synced repeats after a
warm-up, forward and forward+backward.  Effective TFLOP/s count the allowed (query, key) pairs
exactly: ``4 * pairs * D`` forward, 3.5x that forward+backward.  Per case also: the dense
causal Triton kernel at the same length (the per-pair throughput target: block-sparse >= 90% of
it) and ``kernel="auto"`` (never slower than the best kernel it can choose).

Cases (issue 24, item 6):

- ``moba-32k`` / ``moba-128k``: top-8 of 128-token blocks per query block and head (MoBA-like,
  own block always, random scores);
- ``window-sink-128k``: sliding window 4096 with 64 sink tokens, 64-token blocks;
- ``s2-128k``: per-head strided (S2-Attention) with a local band, 128-token blocks.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timing import time_synced_ms  # benchmarks/timing.py, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longctx.kernels import get_kernel  # noqa: E402
from longctx.kernels.block_sparse_triton import BlockSparseTriton  # noqa: E402
from longctx.kernels.mask import Mask  # noqa: E402
from longctx.kernels.sparse_patterns import (  # noqa: E402
    sliding_window_with_sinks,
    strided_per_head,
    topk_blocks,
)
from longctx.kernels.triton_flash import TritonFlash  # noqa: E402

H, D = 16, 128


def case_mask(name: str, device: str) -> tuple[int, Mask]:
    """``(S, mask)`` of a named case (lists built on ``device``)."""
    g = torch.Generator(device=device).manual_seed(0)
    if name.startswith("moba"):
        S = 32768 if name.endswith("32k") else 131072
        n = S // 128
        scores = torch.rand(1, H, n, n, generator=g, device=device)
        bs = topk_blocks(scores, 8, 128)
    elif name == "window-sink-128k":
        S = 131072
        bs = sliding_window_with_sinks(S, 4096, 64, block=64, device=device)
    elif name == "s2-128k":
        S = 131072
        bs = strided_per_head(S, H, stride=16, local_blocks=8, block=128, device=device)
    else:
        raise ValueError(f"unknown case {name!r}")
    return S, Mask(causal=True, block_sparse=bs)


def _causal_pairs(a: torch.Tensor, c: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Pairs ``k <= q`` for queries ``a .. a+m-1`` and keys ``c .. c+n-1`` (int64 tensors)."""

    def s(x):  # sum over y <= x of clamp(y, 0, n)
        x = x.clamp(min=0)
        lo = torch.minimum(x, torch.full_like(x, n))
        return lo * (lo + 1) // 2 + (x - lo) * n

    d = a - c + 1
    return s(d + m - 1) - s(d - 1)


def allowed_pairs(mask: Mask, S: int) -> int:
    """(query, key) pairs the causal block-sparse mask allows, over all heads (exact)."""
    bs = mask.block_sparse
    cnt, idx = bs.kernel_lists
    _, Hm, nq, width = idx.shape
    used = torch.arange(width, device=idx.device) < cnt.unsqueeze(-1)
    a = (torch.arange(nq, device=idx.device) * bs.q_block).view(1, 1, nq, 1).expand_as(idx)
    c = idx.long() * bs.kv_block
    pairs = _causal_pairs(a.long(), c, bs.q_block, bs.kv_block)
    total = int(torch.where(used, pairs, 0).sum())
    return total * (H // Hm)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    return time_synced_ms(fn, repeats)


def our_times(kernel, q, k, v, dout, mask, repeats):
    scale = D**-0.5

    def fwd():
        return kernel.forward(q, k, v, scale=scale, mask=mask)

    def both():
        out, lse = kernel.forward(q, k, v, scale=scale, mask=mask)
        return kernel.backward(dout, q, k, v, out, lse, scale=scale, mask=mask,
                               grad_dtype=q.dtype)

    return median_ms(fwd, repeats), median_ms(both, repeats), fwd()[0]


def flex_times(q, k, v, dout, mask, S, repeats):
    from torch.nn.attention.flex_attention import flex_attention

    bm = mask.to_flex_block_mask(S, heads=H, exact_mask_mod=False)
    flex = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt, dt = (t.transpose(1, 2).contiguous() for t in (q, k, v, dout))  # [B, H, S, D]
    qg, kg, vg = (t.detach().requires_grad_() for t in (qt, kt, vt))

    def fwd():
        with torch.no_grad():
            return flex(qt, kt, vt, block_mask=bm, scale=D**-0.5)

    def both():
        out = flex(qg, kg, vg, block_mask=bm, scale=D**-0.5)
        out.backward(dt)

    return median_ms(fwd, repeats), median_ms(both, repeats), fwd().transpose(1, 2)


def fa4_times(q, k, v, dout, mask, S, repeats):
    """FA4's block-sparse path (flash_attn.cute), when installed and it accepts these lists."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import flash_attn_func

    bm = mask.to_flex_block_mask(S, heads=H, exact_mask_mod=False)
    sparse = BlockSparseTensorsTorch(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                     bm.full_kv_indices)

    def fwd():
        return flash_attn_func(q, k, v, causal=True, block_sparse_tensors=sparse)

    t_fwd = median_ms(fwd, repeats)
    try:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def both():
            out = flash_attn_func(qg, kg, vg, causal=True, block_sparse_tensors=sparse)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(dout)

        t_both = median_ms(both, repeats)
    except Exception as exc:  # noqa: BLE001 - a forward-only path is still worth a row
        print(f"  fa4 backward: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        t_both = float("nan")
    out = fwd()
    return t_fwd, t_both, out[0] if isinstance(out, tuple) else out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def run_case(name: str, repeats: int) -> list[str]:
    S, mask = case_mask(name, "cuda")
    pairs = allowed_pairs(mask, S)
    dense_pairs = H * S * (S + 1) // 2
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, dout = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    fl = 4.0 * D * 1e-9  # GFLOP per pair forward, / ms -> TFLOP/s
    rows = []

    def row(label, t_fwd, t_both, n_pairs, err=""):
        tf = n_pairs * fl / t_fwd if t_fwd == t_fwd else float("nan")
        tb = 3.5 * n_pairs * fl / t_both if t_both == t_both else float("nan")
        rows.append(f"| {name} | {label} | {t_fwd:.2f} | {t_both:.2f} | {tf:.0f} | {tb:.0f} | "
                    f"{err} |")

    t0 = time.time()
    ours_f, ours_b, ours_out = our_times(BlockSparseTriton(), q, k, v, dout, mask, repeats)
    row("triton block_sparse", ours_f, ours_b, pairs)
    try:
        fl_f, fl_b, fl_out = flex_times(q, k, v, dout, mask, S, repeats)
        row("flex (same block mask)", fl_f, fl_b, pairs, f"{rel_err(ours_out, fl_out):.1e}")
        rows.append(f"| {name} | speedup vs flex | | | | | fwd {fl_f / ours_f:.2f}x, "
                    f"fwd+bwd {fl_b / ours_b:.2f}x |")
    except Exception as exc:  # noqa: BLE001
        rows.append(f"| {name} | flex | n/a | n/a | | | {type(exc).__name__}: {str(exc)[:80]} |")
    try:
        fa_f, fa_b, fa_out = fa4_times(q, k, v, dout, mask, S, repeats)
        row("fa4 block-sparse", fa_f, fa_b, pairs, f"{rel_err(ours_out, fa_out):.1e}")
    except Exception as exc:  # noqa: BLE001
        rows.append(f"| {name} | fa4 block-sparse | n/a | n/a | | | "
                    f"{type(exc).__name__}: {str(exc)[:80]} |")
    dense_f, dense_b, _ = our_times(TritonFlash(), q, k, v, dout, Mask(causal=True), repeats)
    row("triton dense causal", dense_f, dense_b, dense_pairs)
    per_pair = (pairs / ours_b) / (dense_pairs / dense_b)
    rows.append(f"| {name} | per-pair vs dense causal | | | | | fwd+bwd {per_pair:.0%} |")
    auto = get_kernel("auto")
    au_f, au_b, _ = our_times(auto, q, k, v, dout, mask, repeats)
    row(f"auto ({auto.last_choice.split(':')[0]})", au_f, au_b, pairs)
    density = pairs / dense_pairs
    rows.append(f"| {name} | S={S}, allowed {density:.2%} of causal | | | | | "
                f"{time.time() - t0:.0f} s |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cases = ["moba-32k", "moba-128k", "window-sink-128k", "s2-128k"]
    parser.add_argument("--cases", nargs="+", default=cases, choices=cases)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "bench_block_sparse.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_block_sparse needs a CUDA GPU")
    lines = [
        f"# block-sparse attention, {torch.cuda.get_device_name()}, torch {torch.__version__}",
        "",
        f"bf16, B=1, H={H}, D={D}, causal; median of {args.repeats} synced repeats; TFLOP/s on "
        "the allowed pairs (4*pairs*D fwd, x3.5 fwd+bwd); err: relative L2 of the output "
        "against ours",
        "",
        "| case | kernel | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)
    for name in args.cases:
        rows = run_case(name, args.repeats)
        print("\n".join(rows), flush=True)
        lines += rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
