"""Trainable sparse attention layers (issue 25) on one GPU, side by side in one run.

Three tables (each optional):

- ``--nsa``: NSA forward+backward at ``--nsa-seqs`` (default 32k, 128k) with 64 query heads over
  4 kv heads, D=128, blocks of 64 (compression: mean-pooled-size blocks, ``compress_block =
  compress_stride = 64`` as fla's), 16 selected blocks, window 512. Rows: our NSA core (all
  three branches and the gates), our window branch alone (:func:`longctx.attention` with a
  window mask, ``kernel=auto``), their difference (compressed + selected + gates), fla's
  ``parallel_nsa`` with ``window_size=0`` (compressed + selected; fla-core 0.6.0: its window
  branch calls the ``flash-attn`` package), and dense causal attention on the best kernel.
  Target: ours (compressed + selected) at least 1.2x fla.
- ``--moba``: MoBA (block 512, top-8, own block included) forward+backward at ``--moba-seqs``
  (default 128k), H=16, D=128, gating included, against dense causal on the best kernel.
  Target: at least 5x faster.
- ``--train``: ``--train-steps`` training steps of the ~1B model of ``--train-config`` (default
  configs/llama_1b_moba.yaml) and of the same model with dense layers, at ``--train-seq`` tokens
  on one GPU (bf16 weights, selective recomputation around the attention cores, AdamW, random
  tokens): tokens/s (median step after the first) and the loss of every step.

Every table first checks the layer in bf16 against itself in float32 at 4k tokens (max
relative error, printed). Run::

    python benchmarks/bench_sparse_layers.py --nsa --moba --train --out benchmarks/results

Writes ``bench_sparse_layers_<date>.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import time_ms

import longctx
from longctx.kernels.mask import Mask
from longctx.models import LlamaModel, ModelConfig, SequenceContext
from longctx.models.sparse.layers import MobaAttention, NSAAttention


def _inputs(S, H, Hkv, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dtype)
    q, k, v = r(1, S, H, D), r(1, S, Hkv, D), r(1, S, Hkv, D)
    gates = torch.sigmoid(r(1, S, H, 3))
    return [t.requires_grad_() for t in (q, k, v, gates)]


def _fwd_bwd(fn, leaves):
    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
    return step


def _layer(kind: str, H: int, Hkv: int, D: int, params: dict, dtype):
    cfg = ModelConfig(num_layers=1, hidden_size=H * D, num_attention_heads=H,
                      num_query_groups=Hkv, attention_kinds=(kind,), **{kind: params})
    cls = NSAAttention if kind == "nsa" else MobaAttention
    return cls(cfg, device="cuda", dtype=dtype)


def _check_bf16(kind, H, Hkv, D, params) -> float:
    """Max error of the core in bf16 against float32 at 4k tokens, relative to the output's max."""
    S = 4096
    torch.manual_seed(0)
    layer32 = _layer(kind, H, Hkv, D, params, torch.float32)
    inputs32 = [t.detach() for t in _inputs(S, H, Hkv, D, torch.float32)]
    seq = SequenceContext.single_device(S, device="cuda")
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        layer = copy.deepcopy(layer32).to(dtype)
        q, k, v, g = (t.to(dtype) for t in inputs32)
        with torch.no_grad():
            outs.append(layer.core(q, k, v, g, seq) if kind == "nsa" else layer.core(q, k, v, seq))
    ref, got = outs[0].float(), outs[1].float()
    return float((got - ref).abs().max() / ref.abs().max())


NSA_SHAPE = (64, 4, 128)  # query heads, kv heads, head dim
NSA_PARAMS = {"compress_block": 64, "compress_stride": 64, "select_block": 64, "top_n": 16,
              "window": 512, "query_block": 64}
MOBA_SHAPE = (16, 16, 128)
MOBA_PARAMS = {"block_size": 512, "top_k": 8, "query_block": 128}


def _nsa_row(S: int, parallel_nsa) -> str:
    H, Hkv, D = NSA_SHAPE
    layer = _layer("nsa", H, Hkv, D, NSA_PARAMS, torch.bfloat16)
    q, k, v, g = _inputs(S, H, Hkv, D, torch.bfloat16)
    seq = SequenceContext.single_device(S, device="cuda")
    ours = time_ms(_fwd_bwd(lambda: layer.core(q, k, v, g, seq), [q, k, v, g]))
    window = Mask(causal=True, window=NSA_PARAMS["window"])
    win = time_ms(_fwd_bwd(lambda: longctx.attention(q, k, v, mask=window), [q, k, v]))
    causal = Mask(causal=True)
    dense = time_ms(_fwd_bwd(lambda: longctx.attention(q, k, v, mask=causal), [q, k, v]))
    fla_ms = float("nan")
    if parallel_nsa is not None:
        g_cmp, g_slc = (g[..., i].detach().requires_grad_() for i in (0, 1))
        g_swa = torch.zeros_like(g_cmp)
        fla_ms = time_ms(_fwd_bwd(
            lambda: parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, block_counts=16, block_size=64,
                                 window_size=0), [q, k, v, g_cmp, g_slc]))
    cs = ours - win
    return (f"| {S} | {ours:.2f} | {win:.2f} | {cs:.2f} | {fla_ms:.2f} | {dense:.2f} | "
            f"{fla_ms / cs:.2f}x | {dense / ours:.2f}x |")


def nsa_table(seqs, lines):
    H, Hkv, D = NSA_SHAPE
    err = _check_bf16("nsa", H, Hkv, D, NSA_PARAMS)
    lines += [
        ("## NSA forward+backward (H=64 over 4 kv heads, D=128, block 64, top 16, window 512, "
         "bf16)"), "",
        f"bf16 vs float32 at 4k: max rel error {err:.2e}", "",
        ("| tokens | ours (3 branches) ms | our window ms | ours cmp+slc ms | fla cmp+slc ms "
         "| dense causal ms | fla / ours | dense / ours |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    try:
        from fla.ops.nsa import parallel_nsa
    except ImportError as e:
        parallel_nsa = None
        lines.append(f"(fla not importable: {e})")
    for S in seqs:
        lines.append(_nsa_row(S, parallel_nsa))
        torch.cuda.empty_cache()
    lines.append("")


def _moba_row(S: int) -> str:
    H, Hkv, D = MOBA_SHAPE
    layer = _layer("moba", H, Hkv, D, MOBA_PARAMS, torch.bfloat16)
    q, k, v, _ = _inputs(S, H, Hkv, D, torch.bfloat16)
    seq = SequenceContext.single_device(S, device="cuda")
    moba = time_ms(_fwd_bwd(lambda: layer.core(q, k, v, seq), [q, k, v]))
    causal = Mask(causal=True)
    dense = time_ms(_fwd_bwd(lambda: longctx.attention(q, k, v, mask=causal), [q, k, v]))
    return f"| {S} | {moba:.2f} | {dense:.2f} | {dense / moba:.2f}x |"


def moba_table(seqs, lines):
    H, Hkv, D = MOBA_SHAPE
    err = _check_bf16("moba", H, Hkv, D, MOBA_PARAMS)
    lines += [
        ("## MoBA forward+backward (H=16, D=128, block 512, top-8 with the own block, gating "
         "included, bf16)"), "",
        f"bf16 vs float32 at 4k: max rel error {err:.2e}", "",
        "| tokens | MoBA ms | dense causal ms | dense / MoBA |", "|---|---|---|---|",
    ]
    for S in seqs:
        lines.append(_moba_row(S))
        torch.cuda.empty_cache()
    lines.append("")


def _train(cfg: ModelConfig, S: int, steps: int) -> tuple[list[float], list[float]]:
    from longctx.train.loss import chunked_cross_entropy

    torch.manual_seed(0)
    model = LlamaModel(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    for block in model.layers:
        block.recompute_around_attention = True
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator(device="cuda").manual_seed(1)
    seq = SequenceContext.single_device(S, device="cuda")
    times, losses = [], []
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (1, S + 1), generator=g, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hidden = model(ids[:, :-1], seq)
        loss = chunked_cross_entropy(hidden[0], model.output_weight, ids[0, 1:], chunk_size=4096) / S
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    del model, opt
    torch.cuda.empty_cache()
    return times, losses


def train_table(config_path: Path, S: int, steps: int, lines):
    import yaml

    model_cfg = yaml.safe_load(config_path.read_text())["model"]
    sparse = ModelConfig.from_dict({**model_cfg, "seq_length": S})
    dense = sparse.replace(attention_kinds=None)
    lines += [f"## Training steps of {config_path.name} vs its dense model, {S} tokens, one GPU",
              "", "| model | tokens/s (median step after the first) | losses |", "|---|---|---|"]
    for name, cfg in (("sparse", sparse), ("dense", dense)):
        times, losses = _train(cfg, S, steps)
        tps = S / statistics.median(times[1:]) if len(times) > 1 else S / times[0]
        lines.append(f"| {name} | {tps:,.0f} | {', '.join(f'{x:.3f}' for x in losses)} |")
    lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsa", action="store_true")
    parser.add_argument("--moba", action="store_true")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--nsa-seqs", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--moba-seqs", type=int, nargs="+", default=[131072])
    parser.add_argument("--train-config", type=Path,
                        default=Path(__file__).resolve().parents[1] / "configs/llama_1b_moba.yaml")
    parser.add_argument("--train-seq", type=int, default=131072)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse_layers needs a CUDA GPU")
    now = datetime.datetime.now(datetime.timezone.utc)
    title = (f"# bench_sparse_layers on {torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}, {now:%Y-%m-%d %H:%M} UTC")
    lines = [title, "", "command: " + " ".join(sys.argv), ""]
    if args.nsa:
        nsa_table(args.nsa_seqs, lines)
    if args.moba:
        moba_table(args.moba_seqs, lines)
    if args.train:
        train_table(args.train_config, args.train_seq, args.train_steps, lines)
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_sparse_layers_{datetime.date.today():%Y%m%d}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
