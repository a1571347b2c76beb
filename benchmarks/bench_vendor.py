"""The vendor kernel's two choices, measured on one GPU: cuDNN's own GQA against expanded K/V,
and the backward of a long causal call in one piece against query chunks (``CausalSplit``).

    python benchmarks/bench_vendor.py            # both tables
    python benchmarks/bench_vendor.py --gqa      # only the GQA table

bf16, B=1, causal, median ms of ``--repeats`` synced repeats after a warm-up.  Prints markdown.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from timing import time_synced_ms  # benchmarks/timing.py, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longctx.kernels.mask import Mask
from longctx.kernels.vendor import CausalSplit, VendorSDPA

_aten = torch.ops.aten
GQA_SHAPES = [(131072, 8, 2, 64), (32768, 4, 1, 128), (32768, 16, 4, 128), (8192, 32, 8, 128)]
SPLIT_SHAPES = [(32768, 4, 1, 128), (65536, 8, 2, 64), (131072, 8, 2, 64), (131072, 4, 1, 128),
                (262144, 8, 2, 64)]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median synced ms of ``fn`` after one warm-up call."""
    fn()
    return time_synced_ms(fn, repeats)


def randn_bhsd(heads: int, seq: int, dim: int) -> torch.Tensor:
    return torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16)


def gqa_row(S: int, H: int, Hkv: int, D: int, repeats: int) -> str:
    """cuDNN's SDPA ops with K/V of fewer heads, against K/V expanded to the query heads (and
    dK/dV summed back over each group in float32)."""
    q, dout = randn_bhsd(H, S, D), randn_bhsd(H, S, D)
    k, v = randn_bhsd(Hkv, S, D), randn_bhsd(Hkv, S, D)
    scale = D**-0.5
    seed = torch.zeros((), dtype=torch.long, device="cuda")

    def expand(x):  # [1, Hkv, S, D] -> [1, H, S, D], query head h reads kv head h // g
        return x.repeat_interleave(H // Hkv, dim=1)

    def fwd(k_, v_):
        res = _aten._scaled_dot_product_cudnn_attention(q, k_, v_, None, True, 0.0, True, False,
                                                        scale=scale)
        return res[0], res[1]

    def bwd(k_, v_, out, lse):
        return _aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k_, v_, out, lse, seed, seed, None, None, None, S, S, 0.0, True, scale=scale)

    def bwd_expanded(out, lse):
        grads = bwd(expand(k), expand(v), out, lse)
        # [1, H, S, D] -> [1, Hkv, g, S, D], summed over g
        return [g.unflatten(1, (Hkv, H // Hkv)).sum(2, dtype=torch.float32) for g in grads[1:3]]

    out, lse = fwd(k, v)
    own = median_ms(lambda: fwd(k, v), repeats), median_ms(lambda: bwd(k, v, out, lse), repeats)
    exp = (median_ms(lambda: fwd(expand(k), expand(v)), repeats),
           median_ms(lambda: bwd_expanded(out, lse), repeats))
    return (f"| {S} | {H}/{Hkv} | {D} | {own[0]:.2f} / {exp[0]:.2f} | "
            f"{own[1]:.2f} / {exp[1]:.2f} |")


def split_row(S: int, H: int, Hkv: int, D: int, chunks: list[int | None], repeats: int) -> str:
    """``VendorSDPA('cudnn')`` forward (one call) and backward, unsplit and by query chunks."""
    mask, scale = Mask(causal=True), D**-0.5
    # [B, H, S, D] -> [B, S, H, D] views, the layout the kernel contract takes
    q, dout = randn_bhsd(H, S, D).transpose(1, 2), randn_bhsd(H, S, D).transpose(1, 2)
    k, v = randn_bhsd(Hkv, S, D).transpose(1, 2), randn_bhsd(Hkv, S, D).transpose(1, 2)
    whole = VendorSDPA("cudnn", CausalSplit(min_queries=None))
    out, lse = whole.forward(q, k, v, scale=scale, mask=mask)
    fwd = median_ms(lambda: whole.forward(q, k, v, scale=scale, mask=mask), repeats)
    bwd = []
    for c in chunks:
        split = CausalSplit(min_queries=None) if c is None else CausalSplit(min_queries=1, chunk=c, max_head_dim=None)
        kern = VendorSDPA("cudnn", split)
        bwd.append(median_ms(partial(kern.backward, dout, q, k, v, out, lse, scale=scale,
                                     mask=mask, grad_dtype=torch.bfloat16), repeats))
    return f"| {S} | {H}/{Hkv} | {D} | {fwd:.2f} | " + " | ".join(f"{b:.2f}" for b in bwd) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gqa", action="store_true", help="only the GQA table")
    parser.add_argument("--split", action="store_true", help="only the causal-split table")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_vendor.py needs a CUDA GPU (cuDNN attention)")
    both = not (args.gqa or args.split)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN "
          f"{torch.backends.cudnn.version()}, bf16, B=1, causal, median of {args.repeats}\n")
    if both or args.gqa:
        print("| S | heads q/kv | D | fwd ms own / expanded | bwd ms own / expanded + sum |")
        print("| --- | --- | --- | --- | --- |")
        for shape in GQA_SHAPES:
            print(gqa_row(*shape, args.repeats), flush=True)
        print()
    if both or args.split:
        chunks = [None, 8192, 16384, 32768]
        names = " | ".join("one call" if c is None else f"{c // 1024}k chunks" for c in chunks)
        print(f"| S | heads q/kv | D | fwd ms | bwd ms: {names} |")
        print("| --- | --- | --- | --- | " + " | ".join("---" for _ in chunks) + " |")
        for shape in SPLIT_SHAPES:
            print(split_row(*shape, chunks, args.repeats), flush=True)


if __name__ == "__main__":
    main()
