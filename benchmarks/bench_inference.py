"""Context-parallel inference on N GPUs: star vs ring prefill, decode speed, star's accuracy.

Side by side in one run on all visible GPUs (one process each, NCCL), with a Llama model from
this project (``--checkpoint``: a ``longctx train`` checkpoint; otherwise random weights from
``--config``'s model section, which the output says):

1. **prefill time** of a ``B x S`` context (``--contexts``, default 256k and 1M tokens) split
   contiguously over the GPUs: ring (exact) and star (each block sees the anchor and itself), the
   slowest rank's wall time, the star speed-up over ring and the peak memory per GPU;
2. **decode tokens/s** after each prefill: ``--new-tokens`` greedy steps (after two untimed
   ones) over the sharded KV cache (phase 2: q broadcast, partial attention per GPU, LSE merge on the last GPU);
3. **star vs full attention** on held-out text (``--text``, else held-out synthetic passkey /
   MQAR documents): the context (``--accuracy-contexts``) is prefilled both ways, then
   ``--accuracy-tokens`` continuation tokens are read teacher-forced as phase 2; reported: the
   logit error of star against full (ring: exact up to bf16 rounding), next-token agreement
   (argmax equal), and both next-token accuracies against the text.

    python benchmarks/bench_inference.py                                  # random weights, 1B shape
    python benchmarks/bench_inference.py --checkpoint runs/llama_1b_128k/checkpoints \\
        --accuracy-contexts 32768 131072 --text heldout.jsonl
    python benchmarks/bench_inference.py --smoke       # tiny model, 2 CPU processes (gloo)
    python benchmarks/bench_inference.py --cpu --world-size 4 --checkpoint runs/tiny/checkpoints \
        --contexts 960 --accuracy-contexts 960 --accuracy-tokens 64 --anchors block 16
                                                       # star's accuracy on the trained tiny model

Prints markdown tables and writes them to ``benchmarks/results/bench_inference.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import yaml

from longctx.inference import PrefillConfig, extend, prefill
from longctx.models import LlamaModel, ModelConfig
from longctx.parallel.comm import GatherComm
from longctx.parallel.layout import shard
from longctx.testing import SimulatedMesh

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DECODE_WARMUP = 2  # untimed decode steps after each prefill
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class BenchOptions:
    """Everything a rank needs (picklable; sent to every process)."""

    model: dict  # ModelConfig fields
    checkpoint: str | None
    tokenizer: dict  # TokenizerConfig fields
    text: str | None
    device: str  # "cuda" or "cpu"
    dtype: str
    kernel: str
    batch: int
    contexts: tuple[int, ...]
    anchors: tuple[str, ...]  # "block" or a token count
    repeats: int
    new_tokens: int
    accuracy_contexts: tuple[int, ...]
    accuracy_tokens: int
    accuracy_samples: int
    warmup_tokens_per_rank: int
    seed: int


# -- model, data ----------------------------------------------------------------------------------
def load_model(opts: BenchOptions, device: torch.device) -> tuple[LlamaModel, str]:
    """The model in the benchmark dtype, and a line saying where its weights come from."""
    cfg = ModelConfig.from_dict(opts.model)
    model = LlamaModel(cfg, seed=opts.seed, device=device, dtype=torch.float32)
    if opts.checkpoint is None:
        what = "RANDOM WEIGHTS (no --checkpoint): accuracy rows say nothing of a trained model"
    else:
        import torch.distributed.checkpoint as dcp

        from longctx.train.checkpoint import Checkpointer

        path = Checkpointer.resolve(opts.checkpoint)
        state = {"app": {"model": model.state_dict()}}  # keys as the trainer saves them
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
        model.load_state_dict(state["app"]["model"])
        step = Checkpointer.read_meta(path).get("step", "?")
        what = f"checkpoint {path} (step {step})"
    model = model.to(DTYPES[opts.dtype]).eval().requires_grad_(False)
    return model, what


def heldout_ids(opts: BenchOptions, n_tokens: int) -> torch.Tensor:
    """``[1, n_tokens]`` token ids of held-out text (``--text``, else synthetic documents)."""
    from longctx.data.tokenizer import TokenizerConfig, load_tokenizer

    tok = load_tokenizer(TokenizerConfig.from_dict(opts.tokenizer))
    ids: list[int] = []
    if opts.text is not None:
        path = pathlib.Path(opts.text)
        lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        for line in lines:
            text = json.loads(line)["text"] if path.suffix == ".jsonl" else line
            ids += tok.encode(text) + [tok.eos_id]
            if len(ids) >= n_tokens:
                break
    else:
        from longctx.data.synthetic import SyntheticConfig, generate_samples

        seed = 10_007  # not a training seed: held out
        while len(ids) < n_tokens:
            size = max(1024, min(n_tokens - len(ids), 65536))
            docs = generate_samples(SyntheticConfig(
                task="mixed", num_samples=4, min_length=size // 2, max_length=size, seed=seed,
            ))
            for d in docs:
                ids += tok.encode(d.text) + [tok.eos_id]
            seed += 1
    if len(ids) < n_tokens:
        raise ValueError(f"--text {opts.text} holds {len(ids)} tokens; need {n_tokens}")
    return torch.tensor(ids[:n_tokens], dtype=torch.int64)[None]


def prefill_configs(opts: BenchOptions) -> list[tuple[str, PrefillConfig]]:
    out = [("ring", PrefillConfig(mode="ring", kernel=opts.kernel))]
    for a in opts.anchors:
        anchor = None if a == "block" else int(a)
        out.append((f"star (anchor {a})", PrefillConfig("star", anchor, kernel=opts.kernel)))
    return out


# -- timing helpers -------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def greedy_decode(model, state, group, comm: GatherComm, n: int, kernel: str) -> None:
    """``n`` greedy steps after a prefill (the token is chosen on the query rank, broadcast)."""
    cache, hidden = state.cache, state.last_hidden
    B, device = cache.batch_size, cache.layers[0].k.device
    for _ in range(n):
        token = torch.empty(B, dtype=torch.int64, device=device)
        if cache.is_query_rank:
            with torch.inference_mode():
                token.copy_(model.logits(hidden).argmax(-1))
        token = comm.broadcast(token, cache.query_rank)
        out = extend(model, cache, token[:, None], group, kernel=kernel)
        hidden = out[:, -1] if out is not None else None


def timed_prefill(model, ids, group, comm, config, reserve, device):
    """(seconds, state) of one prefill, ranks started together."""
    local = shard(ids, "contiguous", comm.world_size, comm.rank).to(device)
    if group is not None:
        dist.barrier(group)
    _sync(device)
    start = time.perf_counter()
    state = prefill(model, local, group, config=config, reserve=reserve)
    _sync(device)
    return time.perf_counter() - start, state


# -- the rank body --------------------------------------------------------------------------------
def run_on_rank(group, opts: BenchOptions) -> dict:
    comm = GatherComm(group)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if opts.device == "cuda" else "cpu")
    model, weights = load_model(opts, device)
    P, vocab = comm.world_size, model.config.vocab_size
    say = (lambda *a: print(*a, flush=True)) if comm.rank == 0 else (lambda *a: None)
    configs = prefill_configs(opts)

    # warm-up: kernels compiled, communicators created
    anchors = [int(a) for a in opts.anchors if a != "block"]
    warm_len = max([opts.warmup_tokens_per_rank, *anchors])
    warm = torch.randint(0, vocab, (opts.batch, P * warm_len))
    for _, cfg in configs:
        _, state = timed_prefill(model, warm, group, comm, cfg, 2, device)
        greedy_decode(model, state, group, comm, 2, opts.kernel)
    del state
    _free(device)

    speed = []
    for S in opts.contexts:
        ids = torch.randint(0, vocab, (opts.batch, S), generator=torch.Generator().manual_seed(S))
        for name, cfg in configs:
            times = []
            for _ in range(opts.repeats):
                state = None
                _free(device)
                seconds, state = timed_prefill(
                    model, ids, group, comm, cfg, opts.new_tokens + DECODE_WARMUP, device
                )
                times.append(seconds)
            mem = _peak_gib(device)
            # untimed steps first: kernels specialised on this cache length compile here
            greedy_decode(model, state, group, comm, DECODE_WARMUP, opts.kernel)
            if group is not None:
                dist.barrier(group)
            _sync(device)
            start = time.perf_counter()
            greedy_decode(model, state, group, comm, opts.new_tokens, opts.kernel)
            _sync(device)
            decode_s = time.perf_counter() - start
            speed.append(dict(
                context=S, prefill=name, seconds=statistics.median(times), mem_gib=mem,
                decode_s=decode_s, cache_gib=state.cache.nbytes() / 2**30,
            ))
            say(f"  [rank 0] S={S} {name}: prefill {speed[-1]['seconds']:.2f}s, "
                f"decode {opts.new_tokens / decode_s:.1f} tok/s")
            del state

    accuracy = []
    T = opts.accuracy_tokens
    for S in opts.accuracy_contexts:
        N = opts.accuracy_samples
        ids = heldout_ids(opts, N * (S + T)).view(N, S + T)  # N held-out windows, one batch
        context, cont = ids[:, :S], ids[:, S:].to(device)
        logits = {}
        for name, cfg in configs:
            _free(device)
            _, state = timed_prefill(model, context, group, comm, cfg, T, device)
            hidden = extend(model, state.cache, cont, group, kernel=opts.kernel)  # [N, T, h]
            if state.cache.is_query_rank:
                with torch.inference_mode():
                    # the last context token predicts cont[0]; cont[i] predicts cont[i + 1]
                    h = torch.cat([state.last_hidden[:, None], hidden[:, :-1]], dim=1)
                    logits[name] = model.logits(h).float().cpu()  # [N, T, vocab]
            del state, hidden
        if comm.rank == P - 1:
            truth = cont.cpu()
            full = logits["ring"]
            for name, got in logits.items():
                if name == "ring":
                    continue
                diff = (got - full).abs()
                accuracy.append(dict(
                    context=S, tokens=T, samples=N, prefill=name,
                    max_err=float(diff.max()), mean_err=float(diff.mean()),
                    rel_l2=float((got - full).norm() / full.norm()),
                    agree=float((got.argmax(-1) == full.argmax(-1)).float().mean()),
                    acc_full=float((full.argmax(-1) == truth).float().mean()),
                    acc_star=float((got.argmax(-1) == truth).float().mean()),
                ))
        say(f"  [rank 0] accuracy at S={S} done")
    return {"speed": speed, "accuracy": accuracy, "weights": weights}


# -- report ---------------------------------------------------------------------------------------
def report(opts: BenchOptions, per_rank: list[dict], device_name: str, seconds: float) -> str:
    P = len(per_rank)
    cfg = ModelConfig.from_dict(opts.model)
    lines = [
        f"device: {device_name} x{P}, torch {torch.__version__}, {opts.dtype}, B={opts.batch}, "
        f"kernel={opts.kernel}",
        f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads "
        f"{cfg.num_attention_heads}/{cfg.num_query_groups} (q/kv), head dim {cfg.kv_channels}, "
        f"vocab {cfg.vocab_size}; weights: {per_rank[0]['weights']}",
        "",
        "Prefill: slowest rank's wall time (median of --repeats); decode: greedy steps after it.",
        "",
        "| context | prefill | prefill s | speed-up vs ring | peak GiB/GPU "
        "| KV cache GiB (query GPU) | decode tok/s | decode ms/token |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = len(per_rank[0]["speed"])
    ring_s = {}
    for i in range(rows):
        recs = [r["speed"][i] for r in per_rank]
        rec = recs[0]
        prefill_s = max(r["seconds"] for r in recs)
        decode_s = max(r["decode_s"] for r in recs)
        mem = max(r["mem_gib"] for r in recs)
        if rec["prefill"] == "ring":
            ring_s[rec["context"]] = prefill_s
        ring = ring_s.get(rec["context"])
        up = f"{ring / prefill_s:.2f}x" if ring else ""
        mem_text = "-" if math.isnan(mem) else f"{mem:.1f}"
        tok_s = opts.new_tokens * opts.batch / decode_s
        lines.append(
            f"| {rec['context']} | {rec['prefill']} | {prefill_s:.2f} | {up} | {mem_text} | "
            f"{recs[-1]['cache_gib']:.2f} | {tok_s:.1f} | {1e3 * decode_s / opts.new_tokens:.1f} |"
        )
    acc = per_rank[-1]["accuracy"]
    if acc:
        text = opts.text or "held-out synthetic documents (passkey + MQAR, byte text)"
        lines += [
            "",
            f"Star vs full attention (ring prefill) on {text}: logits of {opts.accuracy_tokens} "
            f"continuation tokens read teacher-forced after the context, {opts.accuracy_samples} "
            "held-out windows (one batch).",
            "",
            "| context | prefill | max abs logit err | mean abs logit err | rel L2 | next-token "
            "agreement | next-token acc (full) | next-token acc (star) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for a in acc:
            lines.append(
                f"| {a['context']} | {a['prefill']} | {a['max_err']:.3g} | {a['mean_err']:.3g} | "
                f"{a['rel_l2']:.3g} | {100 * a['agree']:.1f}% | {100 * a['acc_full']:.1f}% | "
                f"{100 * a['acc_star']:.1f}% |"
            )
    lines.append(f"\n(took {seconds:.0f}s)")
    return "\n".join(lines)


# -- CLI ------------------------------------------------------------------------------------------
def _model_and_tokenizer(args) -> tuple[dict, dict]:
    """ModelConfig fields and tokenizer fields: from the checkpoint's run config, else --config."""
    tokenizer: dict = {}
    if args.checkpoint is not None:
        from longctx.train.checkpoint import Checkpointer

        meta = Checkpointer.read_meta(Checkpointer.resolve(args.checkpoint))
        run = meta.get("config")
        if run is None:
            raise SystemExit(
                f"{args.checkpoint} has no run config in its longctx_meta.json; pass --config "
                "with the model section it was trained with"
            )
    else:
        run = yaml.safe_load(pathlib.Path(args.config).read_text())
    model = dict(run["model"])
    tokenizer = dict((run.get("data") or {}).get("tokenizer") or {})
    if args.tokenizer is not None:
        tokenizer = {"path": args.tokenizer}
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "llama_1b_128k.yaml"),
                        help="a run config whose model: section gives the shape (random weights)")
    parser.add_argument("--checkpoint", default=None, help="a longctx train checkpoint (folder)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")
    parser.add_argument("--text", default=None, help="held-out text: .jsonl ('text') or .txt")
    parser.add_argument("--contexts", type=int, nargs="+", default=[262144, 1048576])
    parser.add_argument("--anchors", nargs="+", default=["block"],
                        help="star anchor lengths: 'block' (= S/P, the paper's) or token counts")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--accuracy-contexts", type=int, nargs="*", default=[32768, 131072])
    parser.add_argument("--accuracy-tokens", type=int, default=512)
    parser.add_argument("--accuracy-samples", type=int, default=4,
                        help="held-out windows per accuracy context (one batch)")
    parser.add_argument("--kernel", default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--world-size", type=int, default=None, help="default: every GPU")
    parser.add_argument("--out", default=str(RESULTS / "bench_inference.md"))
    parser.add_argument("--cpu", action="store_true",
                        help="CPU processes over gloo (reference kernel): for small trained models")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model on 2 CPU processes (gloo): checks the script, no timing")
    args = parser.parse_args()

    model, tokenizer = _model_and_tokenizer(args)
    opts = BenchOptions(
        model=model, checkpoint=args.checkpoint, tokenizer=tokenizer, text=args.text,
        device="cuda", dtype=args.dtype, kernel=args.kernel, batch=args.batch,
        contexts=tuple(args.contexts), anchors=tuple(args.anchors), repeats=args.repeats,
        new_tokens=args.new_tokens, accuracy_contexts=tuple(args.accuracy_contexts),
        accuracy_tokens=args.accuracy_tokens, accuracy_samples=args.accuracy_samples,
        warmup_tokens_per_rank=2048, seed=0,
    )
    if args.cpu:
        opts = replace(opts, device="cpu", dtype="fp32", kernel="reference",
                       warmup_tokens_per_rank=16)
    if args.smoke:
        tiny = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    vocab_size=259, seq_length=4096)
        opts = replace(
            opts, model=tiny if args.checkpoint is None else opts.model, device="cpu",
            dtype="fp32", kernel="reference", contexts=(480, 960), new_tokens=4,
            accuracy_contexts=(960,), accuracy_tokens=64, accuracy_samples=2,
            warmup_tokens_per_rank=16,
        )
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run on GPUs, or pass --smoke for a CPU check")
    world = args.world_size or (2 if opts.device == "cpu" else torch.cuda.device_count())
    anchors = [int(a) for a in opts.anchors if a != "block"]
    for S in (*opts.contexts, *opts.accuracy_contexts):
        if S % world:
            raise SystemExit(f"context {S} does not split over {world} ranks; pick multiples")
        if anchors and max(anchors) > S // world:
            raise SystemExit(
                f"--anchors {max(anchors)} is longer than a block of context {S} on {world} "
                f"ranks ({S // world} tokens); use anchors <= {S // world}"
            )
    if opts.accuracy_contexts and opts.accuracy_tokens > min(opts.accuracy_contexts) // world:
        raise SystemExit(
            f"--accuracy-tokens {opts.accuracy_tokens} exceed a block of the shortest accuracy "
            f"context ({min(opts.accuracy_contexts) // world} tokens per rank): the continuation "
            "is a query segment on the last rank"
        )
    device_name = torch.cuda.get_device_name(0) if opts.device == "cuda" else "CPU (gloo)"
    print(f"bench_inference: {world} x {device_name}, contexts {list(opts.contexts)}, "
          f"accuracy contexts {list(opts.accuracy_contexts)}", flush=True)
    start = time.time()
    backend = "nccl" if opts.device == "cuda" else "gloo"
    with SimulatedMesh(world, backend=backend, timeout=4 * 3600) as mesh:
        per_rank = mesh.run(run_on_rank, opts)
    text = report(opts, per_rank, device_name, time.time() - start)
    print(text, flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
