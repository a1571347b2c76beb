"""Context-parallel inference: prefill (star, ring) and decode over a sharded KV cache.

A float64 tiny model on simulated meshes of 1-4 gloo processes, against single-process
references: ``LlamaModel.forward`` recomputed over the whole sequence (exact attention), and a
full (unsharded) cache decoded under the same star pattern (:class:`StarPattern`).
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from longctx.inference import (
    GenerationConfig,
    LayerKV,
    PrefillConfig,
    SamplingConfig,
    ShardedKVCache,
    block_forward,
    check_prompt,
    extend,
    generate,
    rope_for,
    sample_next,
)
from longctx.models import LlamaModel, ModelConfig, SequenceContext
from longctx.parallel.strategies.star import Star, StarPattern

WORLD_SIZES = [1, 2, 3, 4]
CFG = ModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
    seq_length=64,
)
S = 12  # context tokens: splits over 1, 2, 3 and 4 ranks
B = 2
N_NEW = 5
TOL = 1e-10


def make_model(config: ModelConfig = CFG) -> LlamaModel:
    return LlamaModel(config, seed=0, dtype=torch.float64).requires_grad_(False)


def prompt(query_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(0, CFG.vocab_size, (B, S), generator=g)
    query = torch.randint(0, CFG.vocab_size, (B, query_len), generator=g)
    return context, (query if query_len else None)


# -- single-process references ----------------------------------------------------------------
def dense_attention(q, k, v, allowed):
    """Masked softmax: ``q [B, Sq, H, D]``, ``k/v [B, Sk, Hkv, D]``, ``allowed [Sq, Sk]``."""
    G = q.shape[2] // k.shape[2]
    ke, ve = (t.repeat_interleave(G, dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, ke) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, ve)


def star_allowed(total: int, context_len: int, world: int, anchor: int) -> torch.Tensor:
    """Star phase 1 on the context (StarPattern), phase 2 (causal to all) after it."""
    pos = torch.arange(total)
    q, k = pos[:, None], pos[None, :]
    phase1 = StarPattern(Star(anchor_len=anchor), context_len, world).allowed(pos, pos)
    return torch.where(q < context_len, phase1, k <= q)


def exact_logits(model, ids):
    """``LlamaModel.forward`` over the whole sequence: ``[B, S] -> [B, S, vocab]``."""
    return model.logits(model(ids, SequenceContext.single_device(ids.shape[1])))


def masked_logits(model, ids, allowed):
    """The model with ``dense_attention`` under ``allowed``, via ``block_forward``."""
    x = model.embedding(ids)
    rope = rope_for(model, torch.arange(ids.shape[1]), x.dtype)
    for block in model.layers:
        x = block_forward(block, x, rope, lambda q, k, v: dense_attention(q, k, v, allowed))
    return model.logits(model.norm(x))


def recompute_greedy(model, context, query, n, allowed_fn=None):
    """Greedy decoding that recomputes the whole sequence every step (no cache at all)."""
    ids = context if query is None else torch.cat([context, query], 1)
    logits, tokens = [], []
    for _ in range(n):
        full = exact_logits(model, ids) if allowed_fn is None else masked_logits(
            model, ids, allowed_fn(ids.shape[1])
        )
        logits.append(full[:, -1])
        tokens.append(full[:, -1].argmax(-1))
        ids = torch.cat([ids, tokens[-1][:, None]], 1)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def full_cache_star_greedy(model, context, query, n, world, anchor):
    """One process, one unsharded cache: prefill under the star pattern of ``world`` blocks
    (dense attention + StarPattern), then the package's phase 2 with ``group=None``."""
    Sc = context.shape[1]
    allowed = star_allowed(Sc, Sc, world, anchor)
    layers = []

    def attend(q, k, v):
        layers.append(LayerKV.from_kv(k, v, start=0, reserve=n + 3))
        return dense_attention(q, k, v, allowed)

    x = model.embedding(context)
    rope = rope_for(model, torch.arange(Sc), x.dtype)
    for block in model.layers:
        x = block_forward(block, x, rope, attend)
    hidden = model.norm(x)[:, -1]
    cache = ShardedKVCache(layers, rank=0, world_size=1, context_len=Sc, seq_len=Sc)
    if query is not None:
        hidden = extend(model, cache, query)[:, -1]
    logits, tokens = [], []
    for _ in range(n):
        logits.append(model.logits(hidden))
        tokens.append(logits[-1].argmax(-1))
        hidden = extend(model, cache, tokens[-1][:, None])[:, -1]
    return torch.stack(tokens, 1), torch.stack(logits, 1)


# -- rank bodies ------------------------------------------------------------------------------
def _generate_on_rank(group, context, query, prefill_cfg, gen_cfg):
    out = generate(
        make_model(), context, group, query_ids=query, prefill=prefill_cfg, generation=gen_cfg
    )
    return out.tokens, out.logits, [layer.length for layer in out.cache.layers], out.cache.seq_len


def _error_on_rank(group, context, query, prefill_cfg):
    try:
        generate(make_model(), context, group, query_ids=query, prefill=prefill_cfg,
                 generation=GenerationConfig(max_new_tokens=1))
    except ValueError as e:
        return str(e)
    return None


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda p: f"P{p}")
def mesh(request, meshes):
    return meshes.get(request.param)


def _query_rank(results):
    tokens, logits, lengths, seq_len = results[-1]
    for other in results:
        assert torch.equal(other[0], tokens)  # every rank returns the same tokens
    return tokens, logits, lengths, seq_len


# -- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_groups", [2, 4])
def test_block_forward_matches_llama_forward(kv_groups):
    model = make_model(CFG.replace(num_query_groups=kv_groups))
    ids, _ = prompt(0)
    seq = SequenceContext.single_device(S)
    x = model.embedding(ids)
    rope = rope_for(model, seq.position_ids, x.dtype)
    for block in model.layers:
        x = block_forward(block, x, rope, lambda q, k, v, b=block: b.attention.core(q, k, v, seq))
    assert torch.equal(model.norm(x), model(ids, seq))


@pytest.mark.parametrize("query_len", [0, 3])
def test_ring_prefill_and_decode_match_full_recompute(mesh, query_len):
    P = mesh.world_size
    context, query = prompt(query_len)
    gen = GenerationConfig(max_new_tokens=N_NEW, return_logits=True)
    results = mesh.run(_generate_on_rank, context, query, PrefillConfig(mode="ring"), gen)
    tokens, logits, lengths, seq_len = _query_rank(results)
    want_tokens, want_logits = recompute_greedy(make_model(), context, query, N_NEW)
    assert (logits - want_logits).abs().max() < TOL
    assert torch.equal(tokens, want_tokens)
    # the query rank cached the query and every generated token but the last one
    assert seq_len == S + query_len + N_NEW - 1
    assert lengths == [S // P + query_len + N_NEW - 1] * CFG.num_layers
    for r in range(P - 1):
        assert results[r][2] == [S // P] * CFG.num_layers


@pytest.mark.parametrize("anchor", [1, 3])
def test_star_sharded_cache_matches_full_cache(mesh, anchor):
    P, query_len = mesh.world_size, 2
    context, query = prompt(query_len, seed=1)
    gen = GenerationConfig(max_new_tokens=N_NEW, return_logits=True)
    star = PrefillConfig(mode="star", anchor_len=anchor)
    results = mesh.run(_generate_on_rank, context, query, star, gen)
    tokens, logits, _, _ = _query_rank(results)
    for r in range(P - 1):  # each rank caches its own block only: no copy of the anchor
        assert results[r][2] == [S // P] * CFG.num_layers
    model = make_model()
    full_tokens, full_logits = full_cache_star_greedy(model, context, query, N_NEW, P, anchor)
    assert (logits - full_logits).abs().max() < TOL
    assert torch.equal(tokens, full_tokens)
    # and the full cache agrees with recomputing everything under the same pattern
    def pattern(total):
        return star_allowed(total, S, P, anchor)

    re_tokens, re_logits = recompute_greedy(model, context, query, N_NEW, pattern)
    assert (full_logits - re_logits).abs().max() < TOL
    assert torch.equal(full_tokens, re_tokens)


def test_star_is_exact_when_the_context_fits_one_block(mesh):
    """P = 1 (any anchor) or P = 2 with the anchor covering rank 0's block: full attention.

    With more ranks a block misses the blocks between the anchor and itself: star differs."""
    P = mesh.world_size
    context, query = prompt(2, seed=2)
    gen = GenerationConfig(max_new_tokens=N_NEW, return_logits=True)
    star = PrefillConfig(mode="star", anchor_len=3 if P == 1 else S // P)
    tokens, logits, _, _ = _query_rank(mesh.run(_generate_on_rank, context, query, star, gen))
    want_tokens, want_logits = recompute_greedy(make_model(), context, query, N_NEW)
    err = (logits - want_logits).abs().max()
    if P <= 2:
        assert err < 1e-12
        assert torch.equal(tokens, want_tokens)
    else:
        assert err > 1e-6


def test_sampling_is_the_same_on_every_world_size(mesh):
    context, query = prompt(3, seed=3)
    gen = GenerationConfig(
        max_new_tokens=6, sampling=SamplingConfig(temperature=1.0, top_k=16, seed=11)
    )
    ring = PrefillConfig(mode="ring")
    tokens, _, _, _ = _query_rank(mesh.run(_generate_on_rank, context, query, ring, gen))
    single = generate(make_model(), context, query_ids=query, prefill=ring, generation=gen)
    assert torch.equal(tokens, single.tokens)


def test_sampling_is_deterministic_per_seed():
    model, (context, query) = make_model(), prompt(3, seed=3)

    def sampled(seed, top_k=16):
        cfg = GenerationConfig(
            max_new_tokens=8, return_logits=True,
            sampling=SamplingConfig(temperature=1.0, top_k=top_k, seed=seed),
        )
        return generate(model, context, query_ids=query, prefill=PrefillConfig("star", 4),
                        generation=cfg)

    a, b, c = sampled(5), sampled(5), sampled(6)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    kth = torch.topk(a.logits, 16, dim=-1).values[..., -1]  # [B, N]
    assert bool((a.logits.gather(-1, a.tokens[..., None])[..., 0] >= kth).all())
    greedy = generate(model, context, query_ids=query, prefill=PrefillConfig("star", 4),
                      generation=GenerationConfig(max_new_tokens=8))
    assert torch.equal(sampled(5, top_k=1).tokens, greedy.tokens)


def test_sample_next_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64)).expand(20000, 3)
    cfg = SamplingConfig(temperature=1.0, seed=0)
    counts = torch.bincount(sample_next(logits, cfg, cfg.generator()), minlength=3) / 20000
    assert torch.allclose(counts, torch.tensor([0.1, 0.6, 0.3]), atol=0.015)


def test_eos_stops_and_pads_finished_rows():
    model, (context, _) = make_model(), prompt(0, seed=4)
    free = generate(model, context, generation=GenerationConfig(max_new_tokens=6))
    eos = int(free.tokens[0, 1])
    out = generate(model, context, generation=GenerationConfig(max_new_tokens=6, eos_token_id=eos))
    first_eos = [int((row == eos).nonzero()[0]) for row in free.tokens if (row == eos).any()]
    assert out.tokens.shape[1] <= 6
    assert torch.equal(out.tokens[0, :2], free.tokens[0, :2])
    assert bool((out.tokens[0, 1:] == eos).all())
    if len(first_eos) == B:  # every row finished: generation stopped at the last one
        assert out.tokens.shape[1] == max(first_eos) + 1


def test_batch_rows_are_independent():
    model, (context, query) = make_model(), prompt(2, seed=5)
    gen = GenerationConfig(max_new_tokens=4, return_logits=True)
    both = generate(model, context, query_ids=query, generation=gen)
    one = generate(model, context[1:], query_ids=query[1:], generation=gen)
    assert (both.logits[1:] - one.logits).abs().max() < 1e-12
    assert torch.equal(both.tokens[1:], one.tokens)


@pytest.mark.parametrize(
    "make_call,match",
    [
        (lambda m, c: generate(m, c, prefill=PrefillConfig(anchor_len=S + 1)),
         r"anchor_len=13 is longer than a block: .* blocks of 12 tokens per rank"
         r".*anchor_len <= 12"),
        (lambda m, c: generate(m, c, query_ids=torch.zeros(B, S + 1, dtype=torch.long)),
         r"query segment has 13 tokens but the last shard holds 12 .*shorten it to <= 12"),
        (lambda m, c: generate(m, c.float()), r"context_ids must be integer token ids"),
        (lambda m, c: generate(m, c, query_ids=torch.zeros(1, 2, dtype=torch.long)),
         r"query_ids must be integer token ids \[batch=2, query_len\]"),
        (lambda m, c: PrefillConfig(mode="zigzag"), r"choose 'star' or 'ring'"),
        (lambda m, c: SamplingConfig(temperature=-1.0), r"use 0 for greedy decoding"),
        (lambda m, c: SamplingConfig(top_k=0), r"top_k=0; use an int >= 1"),
        (lambda m, c: GenerationConfig(max_new_tokens=-1), r"max_new_tokens=-1"),
        (lambda m, c: check_prompt(13, 0, 4),
         r"context has 13 tokens, which does not split into 4 .*trim it to 12 tokens"),
    ],
)
def test_bad_input_says_what_to_change(make_call, match):
    with pytest.raises(ValueError, match=match):
        make_call(make_model(), prompt(0)[0])


def test_hybrid_linear_models_are_refused_not_mis_served():
    model = make_model()
    model.config = model.config.replace(
        attention_kinds=("linear",) + ("softmax",) * (model.config.num_layers - 1)
    )
    with pytest.raises(NotImplementedError, match=r"layers \[0\] are linear attention"):
        generate(model, prompt(0)[0])


def test_bad_input_on_a_mesh(mesh):
    P = mesh.world_size
    if P == 1:
        pytest.skip("every length splits over one rank")
    context, _ = prompt(0)
    odd = torch.cat([context, context[:, :1]], 1)  # 13 tokens
    errors = mesh.run(_error_on_rank, odd, None, PrefillConfig())
    assert all(f"context has 13 tokens, which does not split into {P}" in e for e in errors)
    errors = mesh.run(_error_on_rank, context, None, PrefillConfig(anchor_len=S // P + 1))
    assert all(f"longer than a block: the context is split into blocks of {S // P}" in e
               for e in errors)
    query = torch.zeros(B, S // P + 1, dtype=torch.long)
    errors = mesh.run(_error_on_rank, context, query, PrefillConfig())
    assert all(f"but the last shard holds {S // P}" in e for e in errors)


@pytest.mark.parametrize(
    "name", ["", ".cache", ".decode", ".generate", ".layers", ".prefill", ".sampling"]
)
def test_docstring_examples(name):
    module = importlib.import_module(f"longctx.inference{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
