"""MoBA and NSA layers: the math against naive dense implementations, context parallelism (ring
family and Ulysses, world sizes 1-4, documents crossing ranks) against the one-process layer in
float64, the bytes a rank receives, and the model config / training integration.

One simulated mesh of 4 gloo processes serves every world size (sub-groups of 2 and 3 ranks).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from longctx.kernels.mask import Mask
from longctx.models import LlamaModel, ModelConfig, SequenceContext
from longctx.models.config import num_params
from longctx.models.sparse.layers import MobaAttention, NSAAttention
from longctx.parallel.layout import Layout
from longctx.parallel.strategies.sparse_fetch import SparseCP, SparseSelection, selected_attention
from longctx.testing import SimulatedMesh

TOL = 1e-10
H, HKV, D, HIDDEN = 4, 2, 8, 32
MOBA = {"block_size": 16, "top_k": 3, "query_block": 8}
NSA = {"compress_block": 8, "compress_stride": 4, "select_block": 16, "top_n": 2, "window": 12,
       "query_block": 8}


def _config(kind: str) -> ModelConfig:
    return ModelConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=H,
                       num_query_groups=HKV, attention_kinds=(kind,), moba=MOBA, nsa=NSA)


def _layer(kind: str, seed: int = 0):
    layer = (MobaAttention if kind == "moba" else NSAAttention)(_config(kind), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return layer


def _inputs(S: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    q, k, v = r(1, S, H, D), r(1, S, HKV, D), r(1, S, HKV, D)
    gates = torch.sigmoid(r(1, S, H, 3))
    dout = r(1, S, H, D)
    return q, k, v, gates, dout


def _docs(S: int) -> torch.Tensor:
    return torch.tensor([0, 37, S // 2 + 5, S])  # documents that start mid-block, cross ranks


def _core(layer, q, k, v, gates, seq):
    parts = (q, k, v, gates) if isinstance(layer, NSAAttention) else (q, k, v)
    return layer.core(*parts, seq)


# -- naive references -----------------------------------------------------------------------------
def _allowed_base(S: int, cu) -> torch.Tensor:
    pos = torch.arange(S)
    ok = pos[None, :] <= pos[:, None]
    if cu is not None:
        doc = torch.searchsorted(cu, pos, right=True) - 1
        ok &= doc[:, None] == doc[None, :]
    return ok  # [S, S]


def _dense(q, k, v, allowed):
    """``allowed [H, S, Sk]`` bool; rows with nothing allowed give 0."""
    G = q.shape[2] // k.shape[2]
    kh, vh = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kh) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vh), s


def _candidates(S, block, qb, cu):
    """[nq, nblk]: earlier blocks holding tokens of the document of the query block's start."""
    nblk = -(-S // block)
    first = torch.arange(0, S, qb)
    if cu is None:
        start = torch.zeros_like(first)
    else:
        start = cu[torch.searchsorted(cu, first, right=True) - 1]
    j = torch.arange(nblk)
    return (j[None] < (first // block)[:, None]) & (j[None] >= (start // block)[:, None])


def _pick(scores, cand, n):
    """scores [Hs, nq, nblk] -> bool [Hs, nq, nblk] of the n best candidates."""
    s = scores.masked_fill(~cand, float("-inf"))
    top = s.topk(min(n, s.shape[-1]), -1)
    pick = torch.zeros_like(s, dtype=torch.bool)
    pick.scatter_(-1, top.indices, torch.isfinite(top.values))
    return pick


def naive_moba(q, k, v, cu):
    S = q.shape[1]
    bs, qb, top = MOBA["block_size"], MOBA["query_block"], MOBA["top_k"]
    with torch.no_grad():
        kmean = k[0].view(S // bs, bs, HKV, D).mean(1)  # [nblk, Hkv, D]
        kmean = kmean.repeat_interleave(H // HKV, 1)  # [nblk, H, D]
        qfirst = q[0, ::qb]  # [nq, H, D]: the block's first query chooses
        scores = torch.einsum("qhd,nhd->hqn", qfirst, kmean)
        pick = _pick(scores, _candidates(S, bs, qb, cu), top - 1)  # [H, nq, nblk]
        own = torch.arange(0, S, qb) // bs
        pick[:, torch.arange(S // qb), own] = True
        tok = pick[:, torch.arange(S) // qb][:, :, torch.arange(S) // bs]  # [H, S, S]
    out, _ = _dense(q, k, v, tok & _allowed_base(S, cu))
    return out


def naive_nsa(layer, q, k, v, gates, cu):
    S = q.shape[1]
    l, d = NSA["compress_block"], NSA["compress_stride"]
    ls, qb, n, w = NSA["select_block"], NSA["query_block"], NSA["top_n"], NSA["window"]
    ncmp = (S - l) // d + 1
    pos = torch.arange(S)
    doc = torch.zeros_like(pos) if cu is None else torch.searchsorted(cu, pos, right=True) - 1

    def compress(x, comp):
        rows = []
        for i in range(ncmp):
            span = pos[i * d : i * d + l]
            keep = (doc[span] == doc[i * d + l - 1]).to(x.dtype)[:, None, None]  # [l, 1, 1]
            blk = (x[0, span] + comp.pe[:, None, :]) * keep  # [l, Hkv, D]
            hidden = comp.w_in(blk.transpose(0, 1).flatten(1))  # [Hkv, l*D] -> [Hkv, hidden]
            rows.append(comp.w_out(torch.nn.functional.silu(hidden)))
        return torch.stack(rows)[None]  # [1, ncmp, Hkv, D]

    kc, vc = compress(k, layer.compress_k), compress(v, layer.compress_v)
    ends = (l - 1) + torch.arange(ncmp) * d
    vis = (ends[None, :] <= pos[:, None]) & (doc[ends][None, :] == doc[:, None])  # [S, ncmp]
    out_c, s_c = _dense(q, kc, vc, vis.expand(H, S, ncmp))
    with torch.no_grad():
        p = torch.softmax(s_c, -1).nan_to_num(0.0)[0]  # [H, S, ncmp]
        p = p[:, ::qb].reshape(HKV, H // HKV, S // qb, ncmp).sum(1)  # first queries only
        i, j = torch.arange(ncmp), torch.arange(S // ls)
        overlap = (i[:, None] * d < (j[None] + 1) * ls) & (i[:, None] * d + l > j[None] * ls)
        pick = _pick(p @ overlap.double(), _candidates(S, ls, qb, cu), n)
        pick[:, torch.arange(S // qb), torch.arange(0, S, qb) // ls] = True
        pick = pick.repeat_interleave(H // HKV, 0)
        tok = pick[:, torch.arange(S) // qb][:, :, torch.arange(S) // ls]
    out_s, _ = _dense(q, k, v, tok & _allowed_base(S, cu))
    win = _allowed_base(S, cu) & (pos[:, None] - pos[None, :] < w)
    out_w, _ = _dense(q, k, v, win.expand(H, S, S))
    return gates[..., 0:1] * out_c + gates[..., 1:2] * out_s + gates[..., 2:3] * out_w


@pytest.mark.parametrize("kind", ["moba", "nsa"])
@pytest.mark.parametrize("docs", [False, True])
def test_layer_matches_naive_dense(kind, docs):
    S = 96
    cu = _docs(S) if docs else None
    layer = _layer(kind)
    q, k, v, gates, dout = _inputs(S)
    inputs = (q, k, v, gates) if kind == "nsa" else (q, k, v)
    leaves = [t.clone().requires_grad_() for t in inputs]
    seq = SequenceContext.single_device(S, cu_seqlens=cu, kernel="reference")
    out = layer.core(*leaves, seq)
    out.backward(dout)
    grads = [t.grad for t in leaves]
    grads += [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    layer.zero_grad()
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    ref = naive_moba(*ref_leaves, cu) if kind == "moba" else naive_nsa(layer, *ref_leaves, cu)
    ref.backward(dout)
    ref_grads = [t.grad for t in ref_leaves]
    ref_grads += [p.grad for p in layer.parameters() if p.grad is not None]
    assert (out - ref).abs().max() < TOL
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() < TOL
    assert out.abs().sum() > 0 and all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["moba", "nsa"])
def test_layer_is_causal(kind):
    """Changing the inputs after position t changes no output at or before t, also inside a
    query block (the selection is made by the block's first query)."""
    S, t = 96, 50  # query block 48..55
    layer = _layer(kind)
    seq = SequenceContext.single_device(S, kernel="reference")
    inputs = list(_inputs(S)[:4] if kind == "nsa" else _inputs(S)[:3])
    out = layer.core(*inputs, seq)
    changed = [x.clone() for x in inputs]
    for x in changed:
        x[:, t + 1 :] = torch.randn_like(x[:, t + 1 :]) * 3
    out2 = layer.core(*changed, seq)
    assert (out2[:, : t + 1] - out[:, : t + 1]).abs().max() < TOL
    assert (out2[:, t + 1 :] - out[:, t + 1 :]).abs().max() > 1e-3


def test_moba_selection_is_sparse_and_respects_documents():
    """Each query block lists its own block plus at most top_k - 1 earlier ones of its document."""
    from longctx.models.sparse.config import MobaConfig
    from longctx.models.sparse.layers import moba_select

    S, cu = 96, _docs(96)
    q, k, *_ = _inputs(S)
    cfg = MobaConfig(**MOBA)
    means = k.view(1, S // 16, 16, HKV, D).mean(2)
    sel = moba_select(q, means, torch.arange(S), cfg, Mask(causal=True, cu_seqlens=cu))
    assert sel.kv_indices.shape == (1, H, S // 8, 3)
    first = torch.arange(0, S, 8)
    own = first // 16
    assert torch.equal(sel.kv_indices[..., 0], own.expand(1, H, -1).int())
    doc_start = cu[torch.searchsorted(cu, first, right=True) - 1] // 16
    for slot in (1, 2):
        used = sel.kv_num_blocks > slot
        idx = sel.kv_indices[..., slot].long()
        assert bool(((idx < own) & (idx >= doc_start))[used].all())
    assert int(sel.kv_num_blocks[..., 0].max()) == 1  # block 0 has no earlier block


def test_kernel_tiles_split_the_selection_blocks():
    """Lists of 16-token blocks run as 8-token kernel tiles: the same result."""
    S = 64
    q, k, v, _, _ = _inputs(S)
    cp = SparseCP.build(S)
    gen = torch.Generator().manual_seed(3)
    own = (torch.arange(0, S, 8) // 16).view(1, 1, -1, 1).expand(1, H, -1, 1)
    other = torch.randint(0, 4, (1, H, S // 8, 1), generator=gen)
    sel = SparseSelection(16, 8, torch.full((1, H, S // 8), 2), torch.cat([own, other], -1))
    mask = Mask(causal=True, cu_seqlens=torch.tensor([0, 21, S]))
    a = selected_attention(q, k, v, cp, sel, mask, scale=0.3)
    b = selected_attention(q, k, v, cp, sel, mask, scale=0.3, kv_block=8)
    assert (a - b).abs().max() < TOL and a.abs().sum() > 0


# -- context parallelism --------------------------------------------------------------------------
_GROUPS: dict[int, object] = {}


def _subgroup(group, world: int):
    """A group of the first ``world`` ranks (made once per process, on every rank)."""
    if not _GROUPS:
        for n in (1, 2, 3):
            _GROUPS[n] = dist.new_group(list(range(n)))
        _GROUPS[group.size()] = group
    return _GROUPS[world]


def _cp_rank(group, kind, world, strategy, layout, S, docs):
    sub = _subgroup(group, world)
    rank = group.rank()
    if rank >= world:
        return None
    cu = _docs(S) if docs else None
    layer = _layer(kind)
    layer.stats = []
    lay = Layout.parse(layout)
    q, k, v, gates, dout = (lay.shard(t, world, rank) for t in _inputs(S))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gates)]
    seq = SequenceContext(
        position_ids=lay.positions(S, world, rank).materialize(),
        mask=Mask(causal=True, cu_seqlens=cu), cp_group=sub if world > 1 else None,
        strategy=strategy, layout=layout, kernel="reference",
    )
    out = _core(layer, *leaves, seq)
    out.backward(dout)
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    params = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), grads, params, [s.method for s in layer.stats]


@pytest.fixture(scope="module")
def mesh():
    with SimulatedMesh(4) as m:
        yield m


CASES = [  # kind, strategy, layout, world sizes
    ("moba", "ring", "contiguous", (1, 2, 3, 4)),
    ("moba", "zigzag", "zigzag", (2, 3, 4)),
    ("moba", "ulysses", "zigzag", (2, 4)),
    ("moba", "striped", "striped:16", (2,)),
    ("nsa", "ring", "contiguous", (2, 3, 4)),
    ("nsa", "zigzag", "zigzag", (2, 4)),
    ("nsa", "ulysses", "contiguous", (2,)),
]


@pytest.mark.parametrize("kind,strategy,layout,worlds", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_cp_matches_one_process(mesh, kind, strategy, layout, worlds):
    for world in worlds:
        S = 64 * world  # zigzag chunks of 32 tokens: whole blocks of 16
        q, k, v, gates, dout = _inputs(S)
        layer = _layer(kind)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, gates)]
        cu = _docs(S)
        out = _core(layer, *leaves, SequenceContext.single_device(S, cu_seqlens=cu,
                                                                  kernel="reference"))
        out.backward(dout)
        ref_grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
        ref_params = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        results = mesh.run(_cp_rank, kind, world, strategy, layout, S, True)[:world]
        lay = Layout.parse(layout)
        for rank, (o, grads, _params, methods) in enumerate(results):
            assert (o - lay.shard(out.detach(), world, rank)).abs().max() < TOL, (world, rank)
            for g, r in zip(grads, ref_grads):
                assert (g - lay.shard(r, world, rank)).abs().max() < TOL, (world, rank)
            if world > 1 and strategy != "ulysses":
                assert methods and set(methods) <= {"fetch", "ring"}
        for name, ref in ref_params.items():
            total = sum(p[name] for _, _, p, _ in results)
            assert (total - ref).abs().max() < TOL, (world, name)


def _fetch_rank(group, block, pick_all):
    """Every query block of every rank selects its own block and global block 0 (rank 0's),
    or every block (``pick_all``)."""
    P, rank = group.size(), group.rank()
    S = 4 * block * P
    cp = SparseCP.build(S, group, "contiguous")
    q, k, v, _, _ = (Layout.parse("contiguous").shard(t, P, rank) for t in _inputs(S))
    nq = S // P // block
    nblk = S // block
    own = (cp.positions_on(rank, q.device)[::block] // block).view(1, 1, nq, 1)
    if pick_all:
        idx = torch.arange(nblk).expand(1, H, nq, nblk)
        num = torch.full((1, H, nq), nblk)
    else:
        idx = torch.cat([torch.zeros(1, H, nq, 1, dtype=torch.long), own.expand(1, H, nq, 1)], -1)
        num = torch.full((1, H, nq), 2)
    sel = SparseSelection(block, block, num, idx)
    stats: list = []
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = selected_attention(q, k, v, cp, sel, Mask(causal=True), scale=0.3, stats=stats)
    out.sum().backward()
    return stats[0], out.detach(), k.grad


def test_fetch_moves_only_the_selected_blocks(mesh):
    block, P = 8, 4
    token_bytes = 1 * HKV * D * 2 * 8  # batch 1, k and v, float64
    for pick_all in (False, True):
        results = mesh.run(_fetch_rank, block, pick_all)
        for rank, (stats, _, _) in enumerate(results):
            if pick_all:  # every block: the exchange would move as much as the ring
                assert stats.method == "ring"
                assert stats.bytes_received == (P - 1) * 4 * block * token_bytes
            else:
                assert stats.method == "fetch"
                want = 0 if rank == 0 else block * token_bytes  # block 0 lives on rank 0
                assert stats.payload_bytes == want
                assert stats.bytes_received == (P - 1) * block * token_bytes  # padded slots
                assert stats.bytes_received < stats.gather_bytes
    # block 0's keys got gradients from every rank's queries: rank 0's dk there is the sum
    _, _, dk0 = mesh.run(_fetch_rank, block, False)[0]
    assert dk0[:, :block].abs().sum() > 0


# -- the model ------------------------------------------------------------------------------------
def test_config_and_model_mix_sparse_dense_and_linear_layers():
    cfg = ModelConfig.from_dict({
        "num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
        "vocab_size": 64, "seq_length": 64,
        "attention_kinds": ["moba", "nsa", "linear", "softmax"], "moba": MOBA, "nsa": NSA,
    })
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    model = LlamaModel(cfg, seed=0)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 64, (1, 64))
    hidden = model(ids, SequenceContext.single_device(64, cu_seqlens=torch.tensor([0, 20, 64])))
    hidden.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == ["output.weight"]  # the output projection is applied by the trainer
    with pytest.raises(ValueError, match="unknown MobaConfig key"):
        ModelConfig(num_layers=1, attention_kinds=("moba",), moba={"blocks": 4})
    with pytest.raises(ValueError, match="must divide block_size"):
        ModelConfig(num_layers=1, attention_kinds=("moba",), moba={"block_size": 12,
                                                                   "query_block": 8})


def _refuse(group):
    layer = _layer("moba")
    q, k, v, *_ = (Layout.parse("contiguous").shard(t, 4, group.rank()) for t in _inputs(72))
    seq = SequenceContext(position_ids=torch.arange(18), mask=Mask(causal=True),
                          cp_group=group, strategy="ring", layout="contiguous")
    try:
        layer.core(q, k, v, seq)
    except ValueError as e:
        return str(e)
    return None


def test_layer_refuses_blocks_that_straddle_shards(mesh):
    for msg in mesh.run(_refuse):
        assert msg is not None and "must tile every rank's contiguous runs" in msg


# -- GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["moba", "nsa"])
def test_gpu_bf16_layer_close_to_float32(kind):
    """The layer on the GPU (block-sparse Triton kernel where it applies) in bf16 against the
    same layer in float32 on the GPU: forward and input gradients within bf16 error. Every
    earlier block is selected, so rounding cannot change the selection."""
    S = 1024
    params = ({"block_size": 128, "top_k": 8, "query_block": 64} if kind == "moba" else
              {"compress_block": 32, "compress_stride": 16, "select_block": 64, "top_n": 16,
               "window": 128, "query_block": 64})
    cfg = ModelConfig(num_layers=1, hidden_size=4 * 64, num_attention_heads=4,
                      num_query_groups=2, attention_kinds=(kind,), **{kind: params})
    cls = MobaAttention if kind == "moba" else NSAAttention
    torch.manual_seed(0)
    base = cls(cfg, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    inputs = [torch.randn(1, S, h, 64, generator=gen, device="cuda") for h in (4, 2, 2)]
    if kind == "nsa":
        inputs.append(torch.sigmoid(torch.randn(1, S, 4, 3, generator=gen, device="cuda")))
    seq = SequenceContext.single_device(S, cu_seqlens=torch.tensor([0, 300, S]), device="cuda")
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        layer = base.to(dtype)
        leaves = [x.to(dtype).requires_grad_() for x in inputs]
        out = layer.core(*leaves, seq)
        out.float().square().sum().backward()
        results.append([out.float()] + [x.grad.float() for x in leaves])
    for ref, got in zip(*results):
        assert float((got - ref).abs().max() / ref.abs().max()) < 5e-2
