"""Models: config checks, RoPE, and the model under CP / TP / FSDP equal to one process, float64.

The parallel runs use simulated meshes (real gloo processes, started once per module). Every
rank builds the same model from the same seed, runs forward and backward of
``sum(hidden * w_h) + sum(logits * w_l)`` on its shard (``w_h``, ``w_l`` fixed random weights,
sharded like the tokens), and returns its hidden states and full parameter gradients (summed
over dp x cp, gathered over tp / FSDP shards); the test unshards the hidden states and compares
everything with the single-process model on the whole batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longctx.kernels.mask import Mask
from longctx.models import LlamaModel, ModelConfig, SequenceContext, apply_rope, rope_cos_sin
from longctx.models.config import flops_per_token, matmul_flops_per_token, num_params
from longctx.models.parallelize import ParallelConfig
from longctx.parallel.layout import Layout
from longctx.testing import SimulatedMesh

TOL = 1e-10
DTYPE = torch.float64
CFG = ModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
    seq_length=32, ffn_hidden_size=48,
)
BATCH = 2
CU_SEQLENS = torch.tensor([0, 5, 19, 32])


# -- config ---------------------------------------------------------------------------------------
def test_config_derives_megatron_defaults():
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=10)
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size) == (8, 8, 192)
    assert cfg.replace(hidden_size=128).kv_channels == 16  # derived fields are derived again
    assert cfg.replace(hidden_size=128, kv_channels=8).kv_channels == 8
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(hidden_size=48, num_attention_heads=6, num_query_groups=4),
            r"num_query_groups in \[1, 2, 3, 6\]",
        ),
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size=30 is not divisible"),
        (dict(num_layers=0), r"num_layers must be >= 1"),
        (dict(num_layers=2.0), r"num_layers must be an int"),
        (dict(untie_embeddings_and_output_weights=1), "must be true or false"),
        (dict(norm_epsilon=0.0), "norm_epsilon must be > 0"),
        (dict(hidden_size=12, num_attention_heads=4), "must be even for rotary"),
        (dict(num_layers=2, attention_kinds=("softmax",)), "has 1 entries but num_layers=2"),
        (dict(num_layers=1, attention_kinds=("mamba",)), r"unknown kinds \['mamba'\]"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown ModelConfig key\(s\) \['hiden_size'\]; allowed"):
        ModelConfig.from_dict({"hiden_size": 32})
    cfg = ModelConfig.from_dict({"num_layers": 2, "attention_kinds": ["softmax", "softmax"]})
    assert cfg.attention_kinds == ("softmax", "softmax")


def test_linear_layers_flops_and_core_match_the_reference():
    """A linear layer: SiLU features, RetNet decays, documents reset the state; FLOPs count the
    recurrent form (4 H D^2 per token), softmax layers 2 S H D (causal)."""
    from longctx.kernels.linear import linear_attention_reference, retnet_log_decay
    from longctx.models.config import attention_flops_per_token
    from longctx.models.llama import LinearAttention

    cfg = CFG.replace(attention_kinds=("linear", "softmax"))
    H, D, S = cfg.num_attention_heads, cfg.kv_channels, cfg.seq_length
    assert attention_flops_per_token(cfg, S) == 4 * H * D * D + 2 * S * H * D
    model = LlamaModel(cfg, seed=0, dtype=DTYPE)
    layer = model.layers[0].attention
    assert isinstance(layer, LinearAttention) and model.layers[0].kind == "linear"
    assert type(model.layers[1].attention).__name__ == "Attention"
    x = torch.randn(2, S, cfg.hidden_size, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    seq = SequenceContext.single_device(S, cu_seqlens=CU_SEQLENS)
    q, k, v = layer.qkv(x, rope=None)
    want = linear_attention_reference(
        F.silu(layer.wq(x)).view_as(q), F.silu(layer.wk(x)).view_as(k), layer.wv(x).view_as(v),
        log_decay=retnet_log_decay(H), cu_seqlens=CU_SEQLENS,
    )
    torch.testing.assert_close(layer.core(q, k, v, seq), want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="linear attention layers are causal"):
        layer.core(q, k, v, SequenceContext.single_device(S, window=4))


def test_param_and_flop_counts():
    for untie in (True, False):
        cfg = CFG.replace(untie_embeddings_and_output_weights=untie)
        model = LlamaModel(cfg)
        assert num_params(cfg) == sum(p.numel() for p in model.parameters())
        non_embedding = num_params(cfg, include_embedding=False)
        # dense matmul FLOPs are 2 per weight (norm weights are not matmuls)
        norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
        assert matmul_flops_per_token(cfg) == 2 * (non_embedding - norms)
    S, L, H, D = 32, CFG.num_layers, CFG.num_attention_heads, CFG.kv_channels
    attn = 4 * S * H * D * L
    assert flops_per_token(CFG, S, training=False) == matmul_flops_per_token(CFG) + attn / 2
    assert flops_per_token(CFG, S, causal=False) == 3 * (matmul_flops_per_token(CFG) + attn)


def test_parallel_config_errors():
    with pytest.raises(ValueError, match=r"activation_checkpointing='half'; choose one of"):
        ParallelConfig(activation_checkpointing="half")
    with pytest.raises(ValueError, match="set fsdp=true"):
        ParallelConfig(param_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"param_dtype='bf8'; choose one of"):
        ParallelConfig(fsdp=True, param_dtype="bf8")
    assert ParallelConfig(fsdp=True, param_dtype="bf16").param_dtype is torch.bfloat16
    with pytest.raises(ValueError, match=r"unknown ParallelConfig key\(s\) \['tp'\]"):
        ParallelConfig.from_dict({"tp": 2})


# -- RoPE -----------------------------------------------------------------------------------------
def test_rope_scores_depend_only_on_position_difference():
    g = torch.Generator().manual_seed(0)
    D = 16
    q = torch.randn(1, 1, 1, D, generator=g, dtype=DTYPE)
    k = torch.randn(1, 1, 1, D, generator=g, dtype=DTYPE)

    def score(m: int, n: int) -> float:
        cos, sin = rope_cos_sin(torch.tensor([m, n]), D, 10000.0, DTYPE)
        qm = apply_rope(q, cos[:1], sin[:1])
        kn = apply_rope(k, cos[1:], sin[1:])
        return float((qm * kn).sum())

    for delta in (0, 1, 7, 100):
        ref = score(delta, 0)
        for shift in (3, 1000, 1_000_000):
            assert abs(score(shift + delta, shift) - ref) < 1e-9 * (1 + abs(ref))
    assert abs(score(5, 0) - score(0, 0)) > 1e-3  # and they do depend on the difference
    # a rotation: norms are kept
    cos, sin = rope_cos_sin(torch.arange(4) * 1000, D, 10000.0, DTYPE)
    x = torch.randn(2, 4, 3, D, generator=g, dtype=DTYPE)
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_documents_restart_rope_positions():
    seq = SequenceContext.single_device(8, cu_seqlens=torch.tensor([0, 3, 8]))
    assert seq.rope_position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]


# -- single-process reference -------------------------------------------------------------------
def _inputs(cfg: ModelConfig = CFG, batch: int = BATCH, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    S = cfg.seq_length
    ids = torch.randint(0, cfg.vocab_size, (batch, S), generator=g)
    w_h = torch.randn(batch, S, cfg.hidden_size, generator=g, dtype=DTYPE)
    w_l = torch.randn(batch, S, cfg.vocab_size, generator=g, dtype=DTYPE)
    return ids, w_h, w_l


def _mask(masked: str) -> Mask:
    return Mask(causal=True, cu_seqlens=CU_SEQLENS if masked == "documents" else None)


def _reference(cfg: ModelConfig, masked: str):
    ids, w_h, w_l = _inputs(cfg)
    model = LlamaModel(cfg, seed=0, dtype=DTYPE)
    seq = SequenceContext(position_ids=torch.arange(cfg.seq_length), mask=_mask(masked))
    hidden = model(ids, seq)
    loss = (hidden * w_h).sum() + (model.logits(hidden) * w_l).sum()
    loss.backward()
    return hidden.detach(), {n: p.grad for n, p in model.named_parameters()}


_REFERENCE_CACHE: dict = {}


def reference(cfg: ModelConfig, masked: str):
    key = (repr(cfg), masked)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = _reference(cfg, masked)
    return _REFERENCE_CACHE[key]


def test_single_device_forward_is_causal_and_deterministic():
    ids, _, _ = _inputs()
    model = LlamaModel(CFG, seed=0, dtype=DTYPE)
    seq = SequenceContext.single_device(CFG.seq_length)
    h1 = model(ids, seq)
    ids2 = ids.clone()
    ids2[:, 20:] = (ids2[:, 20:] + 1) % CFG.vocab_size  # change the future
    h2 = model(ids2, seq)
    assert torch.equal(h1[:, :20], h2[:, :20]) and not torch.equal(h1[:, 20:], h2[:, 20:])
    again = LlamaModel(CFG, seed=0, dtype=DTYPE)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    other = LlamaModel(CFG, seed=1, dtype=DTYPE)
    assert not torch.equal(model.layers[0].attention.wq.weight, other.layers[0].attention.wq.weight)
    # Megatron's scaled init of the output layers
    std = CFG.init_method_std
    big = LlamaModel(CFG.replace(hidden_size=256, num_layers=8), seed=0)
    w2 = big.layers[0].feed_forward.w2.weight
    assert abs(float(w2.detach().std()) - std / math.sqrt(16)) < 0.1 * std / 4
    assert abs(float(big.layers[0].attention.wq.weight.detach().std()) - std) < 0.05 * std


def test_clip_grad_norm_matches_torch_on_one_process():
    from longctx.models.parallelize import clip_grad_norm_

    ids, w_h, _ = _inputs()
    models = [LlamaModel(CFG, seed=0, dtype=DTYPE) for _ in range(2)]
    for m in models:
        (m(ids, SequenceContext.single_device(CFG.seq_length)) * w_h).sum().backward()
    for norm_type in (2.0, float("inf")):
        ours = clip_grad_norm_(models[0], 0.5, norm_type)
        theirs = torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.5, norm_type)
        assert abs(float(ours) - float(theirs)) < 1e-5 * float(theirs)
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            if a.grad is not None:
                assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("mode,core_calls", [("none", 2), ("selective", 2), ("full", 4)])
def test_selective_checkpointing_never_reruns_attention(monkeypatch, mode, core_calls):
    """2 layers: the attention core runs once per layer, twice under full checkpointing."""
    from longctx.models import attention
    from longctx.models.parallelize import _apply_ac

    calls = []
    real = attention.cp_attention
    monkeypatch.setattr(attention, "cp_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, w_h, _ = _inputs()
    ref = LlamaModel(CFG, seed=0, dtype=DTYPE)
    model = LlamaModel(CFG, seed=0, dtype=DTYPE)
    for i, block in enumerate(model.layers):
        model.layers[i] = _apply_ac(block, mode)
    seq = SequenceContext.single_device(CFG.seq_length)
    (model(ids, seq) * w_h).sum().backward()
    assert len(calls) == core_calls
    (ref(ids, seq) * w_h).sum().backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert (a.grad is None) == (b.grad is None)
        assert a.grad is None or torch.equal(a.grad, b.grad)


def test_tied_output_uses_embedding():
    cfg = CFG.replace(untie_embeddings_and_output_weights=False)
    model = LlamaModel(cfg, seed=0, dtype=DTYPE)
    assert model.output is None and model.output_weight is model.embedding.weight
    hidden = torch.randn(3, cfg.hidden_size, dtype=DTYPE)
    assert torch.equal(model.logits(hidden), hidden @ model.embedding.weight.T)


def test_bad_context_length_is_refused():
    model = LlamaModel(CFG, seed=0)
    with pytest.raises(ValueError, match="SequenceContext has 8 positions but input_ids holds 16"):
        model(torch.zeros(1, 16, dtype=torch.long), SequenceContext.single_device(8))


# -- parallel runs ------------------------------------------------------------------------------
def _run_parallel(group, cfg, dims, pconfig, strategy, layout, masked, meta_init=False):
    """Rank body: forward/backward on this rank's shard; returns hidden and full gradients."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from longctx.models.llama import _canonical_name
    from longctx.models.parallelize import clip_grad_norm_, parallelize_model, reduce_gradients
    from longctx.parallel.mesh import build_mesh

    pmesh = build_mesh(dims, "cpu")
    dp_rank, cp_rank, _ = pmesh.mesh.get_coordinate()  # (dp, cp, tp) of this rank
    model = LlamaModel(cfg, seed=0, dtype=DTYPE, device="meta" if meta_init else None)
    if pconfig is not None:
        model = parallelize_model(model, pmesh, pconfig)
    if meta_init:  # torchtitan's flow: parallelize on meta, allocate shards, then initialise
        model.to_empty(device="cpu")
        model.init_weights(seed=0)

    ids, w_h, w_l = _inputs(cfg)
    n_rows = BATCH // dims.dp  # dp splits the batch
    rows = slice(dp_rank * n_rows, (dp_rank + 1) * n_rows)
    lay = Layout.parse(layout)
    shard = lambda t: lay.shard(t[rows], dims.cp, cp_rank)
    seq = SequenceContext(
        position_ids=lay.positions(cfg.seq_length, dims.cp, cp_rank).materialize(),
        mask=_mask(masked),
        cp_group=pmesh.hybrid_groups() if strategy == "hybrid" else pmesh.group("cp"),
        strategy=strategy,
        layout=layout,
    )
    hidden = model(shard(ids), seq)
    # the trainer's path: the loss uses model.logits() after forward, outside FSDP's forward
    loss = (hidden * shard(w_h)).sum() + (model.logits(hidden) * shard(w_l)).sum()
    loss.backward()
    reduce_gradients(model, pmesh)  # a no-op under FSDP
    norm = clip_grad_norm_(model, max_norm=1e30)  # global norm; clips nothing
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[_canonical_name(name)] = g.detach().clone()
    dist.barrier()
    return (dp_rank, cp_rank), hidden.detach(), grads, float(norm)


def check_parallel(
    mesh, dims, pconfig, strategy, layout, masked, cfg=CFG, tol=TOL, grad_scale=1.0, **kw
):
    """Run on every rank; hidden states and all gradients must match one process within tol."""
    results = mesh.run(_run_parallel, cfg, dims, pconfig, strategy, layout, masked, **kw)
    ref_hidden, ref_grads = reference(cfg, masked)
    by_coord = {}  # (dp, cp) -> hidden; tp ranks must agree
    for coord, hidden, _, _ in results:
        if coord in by_coord:
            assert torch.equal(by_coord[coord], hidden), "tp ranks disagree on the hidden states"
        by_coord[coord] = hidden
    lay = Layout.parse(layout)
    rows = [lay.unshard([by_coord[(d, c)] for c in range(dims.cp)]) for d in range(dims.dp)]
    errors = {"hidden": float((torch.cat(rows) - ref_hidden).abs().max())}
    ref_norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in ref_grads.values()])))
    for _, _, grads, norm in results:
        errors["grad norm"] = max(errors.get("grad norm", 0.0), abs(norm * grad_scale - ref_norm))
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            err = float((g * grad_scale - ref_grads[name]).abs().max())
            errors[name] = max(errors.get(name, 0.0), err)
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"errors above {tol}: {bad}"
    return errors


@pytest.fixture(scope="module")
def mesh2():
    with SimulatedMesh(2) as m:
        yield m


@pytest.fixture(scope="module")
def mesh4():
    with SimulatedMesh(4) as m:
        yield m


CP_CASES = [
    ("ring", "contiguous", "causal"),
    ("zigzag", "zigzag", "documents"),
    ("striped", "striped", "causal"),
    ("ring", "striped", "documents"),
    ("allgather", "zigzag", "causal"),
    ("ulysses", "zigzag", "documents"),
]


@pytest.mark.parametrize("strategy,layout,masked", CP_CASES, ids=["-".join(c) for c in CP_CASES])
def test_cp2_equals_one_process(mesh2, strategy, layout, masked):
    from longctx.parallel.mesh import ParallelDims

    check_parallel(mesh2, ParallelDims(cp=2), None, strategy, layout, masked)


@pytest.mark.parametrize("strategy,layout,masked", CP_CASES, ids=["-".join(c) for c in CP_CASES])
def test_cp4_equals_one_process(mesh4, strategy, layout, masked):
    from longctx.parallel.mesh import ParallelDims

    check_parallel(mesh4, ParallelDims(cp=4), None, strategy, layout, masked)


# -- TP, FSDP2, activation checkpointing, compile (4 ranks) ---------------------------------------
P4_CASES = {
    # name: (dims, ParallelConfig, extra)
    "tp2xcp2": (dict(cp=2, tp=2), ParallelConfig(), {}),
    "tp2xcp2-selective-ac": (
        dict(cp=2, tp=2), ParallelConfig(activation_checkpointing="selective"), {}
    ),
    "tp2xdp2-full-ac": (dict(dp=2, tp=2), ParallelConfig(activation_checkpointing="full"), {}),
    "fsdp-dp2xcp2": (dict(dp=2, cp=2), ParallelConfig(fsdp=True), {}),
    "fsdp-cp4-full-ac": (
        dict(cp=4), ParallelConfig(fsdp=True, activation_checkpointing="full"), {}
    ),
    "fsdp-tp2xcp2-selective-ac": (
        dict(cp=2, tp=2), ParallelConfig(fsdp=True, activation_checkpointing="selective"), {}
    ),
    "fsdp-tp2xcp2-tied": (
        dict(cp=2, tp=2), ParallelConfig(fsdp=True), {"tied": True},
    ),
    "fsdp-tp2xcp2-meta-init": (dict(cp=2, tp=2), ParallelConfig(fsdp=True), {"meta_init": True}),
    "tp2xcp2-meta-init": (dict(cp=2, tp=2), ParallelConfig(), {"meta_init": True}),
    "fsdp-dp2xcp2-mean": (dict(dp=2, cp=2), ParallelConfig(fsdp=True, grad_reduction="mean"),
                          {"grad_scale": 4.0}),
}


@pytest.mark.parametrize("name", list(P4_CASES))
def test_parallelized_model_equals_one_process(mesh4, name):
    from longctx.parallel.mesh import ParallelDims

    dims, pconfig, extra = P4_CASES[name]
    extra = dict(extra)
    cfg = CFG.replace(untie_embeddings_and_output_weights=not extra.pop("tied", False))
    check_parallel(
        mesh4, ParallelDims(**dims), pconfig, "ring", "zigzag", "documents", cfg=cfg, **extra
    )


# -- hybrid linear/softmax models ------------------------------------------------------------------
HYBRID = CFG.replace(attention_kinds=("linear", "softmax"))
HYBRID_CASES = [
    ("ulysses", "contiguous", "documents"),
    ("ring", "contiguous", "causal"),
    ("allgather", "contiguous", "documents"),
]


@pytest.mark.parametrize("strategy,layout,masked", HYBRID_CASES,
                         ids=["-".join(c) for c in HYBRID_CASES])
def test_hybrid_linear_softmax_cp4_equals_one_process(mesh4, strategy, layout, masked):
    from longctx.parallel.mesh import ParallelDims

    check_parallel(mesh4, ParallelDims(cp=4), None, strategy, layout, masked, cfg=HYBRID)


def test_hybrid_linear_softmax_cp2_equals_one_process(mesh2):
    from longctx.parallel.mesh import ParallelDims

    check_parallel(mesh2, ParallelDims(cp=2), None, "ulysses", "contiguous", "documents",
                   cfg=HYBRID)


def test_hybrid_linear_softmax_under_tp_and_fsdp(mesh4):
    """TP splits the linear layers' heads: each rank must use its heads' decays."""
    from longctx.parallel.mesh import ParallelDims

    check_parallel(mesh4, ParallelDims(cp=2, tp=2), ParallelConfig(fsdp=True), "ring",
                   "contiguous", "documents", cfg=HYBRID)


def test_hybrid_ulysses_x_ring(mesh4):
    from longctx.parallel.mesh import ParallelDims

    check_parallel(mesh4, ParallelDims(cp=4, ulysses=2), None, "hybrid", "zigzag", "documents")


def test_fsdp_mixed_precision_float32_params(mesh4):
    """float64 master weights computed in float32: close to the float64 reference."""
    from longctx.parallel.mesh import ParallelDims

    pconfig = ParallelConfig(fsdp=True, param_dtype="float32", reduce_dtype="float64")
    errors = check_parallel(
        mesh4, ParallelDims(dp=2, cp=2), pconfig, "zigzag", "zigzag", "causal", tol=1e-4
    )
    assert errors["hidden"] > 1e-12  # the forward really ran in float32


def test_compiled_blocks_under_tp_and_cp(mesh4):
    from longctx.parallel.mesh import ParallelDims

    pconfig = ParallelConfig(compile=True, compile_backend="aot_eager",
                             activation_checkpointing="selective")
    check_parallel(mesh4, ParallelDims(cp=2, tp=2), pconfig, "ring", "zigzag", "documents")


def test_parallel_sizes_are_checked():
    from longctx.models.parallelize import validate_parallel_dims
    from longctx.parallel.mesh import ParallelDims

    with pytest.raises(ValueError, match=r"tp=4 must divide ModelConfig.num_query_groups=2"):
        validate_parallel_dims(CFG, ParallelDims(tp=4))
    with pytest.raises(ValueError, match=r"tp=2 must divide ModelConfig.ffn_hidden_size=51"):
        validate_parallel_dims(CFG.replace(ffn_hidden_size=51), ParallelDims(tp=2))
    with pytest.raises(ValueError, match=r"Ulysses degree 4 must divide the local head count"):
        validate_parallel_dims(CFG, ParallelDims(cp=4, tp=2, ulysses=4))
    validate_parallel_dims(CFG, ParallelDims(dp=2, cp=4, tp=2, ulysses=2))
