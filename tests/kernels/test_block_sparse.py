"""Block-sparse masks: the :class:`BlockSparse` type against brute force (per batch row and head,
with causal / window / documents), its kernel forms (sorted lists, transposed lists), the host
summary behind ``any_allowed``, head selection for Ulysses, FlexAttention interop, the pattern
builders, the Triton block-sparse kernel in Triton's interpreter against the torch reference, and
the errors bad input gets.

CPU: the Triton kernel runs interpreted (``TRITON_INTERPRET=1`` set per test by the ``interpret``
fixture) with small blocks and shapes, float32 inputs against the float64 reference.
GPU (``-m gpu``): bfloat16 at 64/128 blocks against the float32 reference.
"""

from __future__ import annotations

import doctest
import os
import random
import subprocess
import sys

import pytest
import torch

import longctx.kernels.mask as mask_module
import longctx.kernels.sparse_patterns as patterns
from longctx.kernels.block_sparse_triton import BlockSparseTriton
from longctx.kernels.dispatch import select_kernel
from longctx.kernels.mask import BlockSparse, Mask, Positions
from longctx.kernels.reference import TorchReference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------------------------------------
# brute force (plain Python over a dense per-(batch, head) table)
# ---------------------------------------------------------------------------------------------
def _doc(cu, p):
    return max(d for d in range(len(cu) - 1) if cu[d] <= p)


def brute(table, qb, kb, q_pos, k_pos, *, causal=False, window=None, cu=None):
    """``[Bm][Hm][Sq][Sk]`` nested lists of bools; ``table[b][h][i][j]`` lists block (i, j)."""
    out = []
    for tb in table:
        per_h = []
        for th in tb:
            rows = []
            for q in q_pos:
                row = []
                for k in k_pos:
                    ok = q // qb < len(th) and k // kb < len(th[0]) and th[q // qb][k // kb]
                    if causal and k > q:
                        ok = False
                    if window is not None and (q - k >= window or (not causal and k - q >= window)):
                        ok = False
                    if cu is not None and _doc(cu, q) != _doc(cu, k):
                        ok = False
                    row.append(ok)
                rows.append(row)
            per_h.append(rows)
        out.append(per_h)
    return torch.tensor(out, dtype=torch.bool)


def _random_lists(g, Bm, Hm, nq, nk, width, p_full=0.3):
    """Random partial + full lists with padding past the counts, duplicates inside and across
    the two lists (the kernels' forms drop them)."""
    idx = torch.randint(0, nk, (Bm, Hm, nq, width), generator=g)
    num = torch.randint(0, width + 1, (Bm, Hm, nq), generator=g)
    fidx = torch.randint(0, nk, (Bm, Hm, nq, 2), generator=g)
    fnum = (torch.rand(Bm, Hm, nq, generator=g) < p_full).long() * 2
    return num.int(), idx.int(), fnum.int(), fidx.int()


def _dense(num, idx, nk):
    Bm, Hm, nq, _ = idx.shape
    t = [[[[False] * nk for _ in range(nq)] for _ in range(Hm)] for _ in range(Bm)]
    for b in range(Bm):
        for h in range(Hm):
            for i in range(nq):
                for e in range(int(num[b, h, i])):
                    t[b][h][i][int(idx[b, h, i, e])] = True
    return t


def _union(a, b):
    return [[[[x or y for x, y in zip(ra, rb)] for ra, rb in zip(ha, hb)]
             for ha, hb in zip(ba, bb)] for ba, bb in zip(a, b)]


# ---------------------------------------------------------------------------------------------
# the mask type
# ---------------------------------------------------------------------------------------------
CU = [0, 5, 5, 13, 30]


@pytest.mark.parametrize("Bm,Hm", [(1, 1), (1, 3), (2, 3)])
@pytest.mark.parametrize("qb,kb", [(4, 4), (3, 5)])
@pytest.mark.parametrize("conds", [{}, {"causal": True}, {"window": 6},
                                   {"causal": True, "window": 4, "cu": CU}])
def test_allowed_matches_brute_force(Bm, Hm, qb, kb, conds):
    g = torch.Generator().manual_seed(Bm * 100 + Hm * 10 + qb)
    S = 30
    nq, nk = -(-S // qb), -(-S // kb)
    num, idx, fnum, fidx = _random_lists(g, Bm, Hm, nq, nk, 4)
    bs = BlockSparse(num, idx, qb, kb, full_kv_num_blocks=fnum, full_kv_indices=fidx,
                     n_kv_blocks=nk)
    table = _union(_dense(num, idx, nk), _dense(fnum, fidx, nk))
    assert torch.equal(bs.to_table(), torch.tensor(table))
    cu = conds.get("cu")
    m = Mask(causal=conds.get("causal", False), window=conds.get("window"),
             cu_seqlens=None if cu is None else torch.tensor(cu)) & Mask(block_sparse=bs)
    qp = [3, 0, 29, 17, 8, 12, 25]
    kp = list(range(S))
    truth = brute(table, qb, kb, qp, kp, causal=m.causal, window=m.window, cu=cu)
    got = m.allowed(torch.tensor(qp), torch.tensor(kp))
    if Bm == Hm == 1:
        assert got.shape == (len(qp), S) and torch.equal(got, truth[0, 0])
    else:
        assert torch.equal(got, truth)
    # mapped to query heads (per kv head lists serve G query heads each)
    if Hm == 3:
        got6 = m.allowed(torch.tensor(qp), torch.tensor(kp), heads=6, kv_heads=3)
        assert torch.equal(got6, truth.repeat_interleave(2, dim=1))
        got3 = m.allowed(torch.tensor(qp), torch.tensor(kp), heads=3, kv_heads=1)
        assert torch.equal(got3, truth)
    # the conjunction with the element conditions
    plain = Mask(causal=m.causal, window=m.window, cu_seqlens=m.cu_seqlens)
    both = plain.allowed(torch.tensor(qp), torch.tensor(kp)) & Mask(block_sparse=bs).allowed(
        torch.tensor(qp), torch.tensor(kp))
    assert torch.equal(got, both)


def test_kernel_lists_sorted_deduplicated_and_transposed():
    g = torch.Generator().manual_seed(3)
    Bm, Hm, nq, nk = 2, 3, 7, 5
    num, idx, fnum, fidx = _random_lists(g, Bm, Hm, nq, nk, 6)
    bs = BlockSparse(num, idx, 4, 4, full_kv_num_blocks=fnum, full_kv_indices=fidx,
                     n_kv_blocks=nk)
    table = bs.to_table()
    cnt, kidx = bs.kernel_lists
    assert cnt.dtype == kidx.dtype == torch.int32
    for b in range(Bm):
        for h in range(Hm):
            for i in range(nq):
                row = kidx[b, h, i, : cnt[b, h, i]].tolist()
                assert row == sorted(set(row))
                assert row == torch.nonzero(table[b, h, i]).flatten().tolist()
    off, qidx = bs.transposed_lists
    assert off.shape == (Bm * Hm * nk + 1,) and off[0] == 0
    for b in range(Bm):
        for h in range(Hm):
            for j in range(nk):
                r = (b * Hm + h) * nk + j
                col = qidx[off[r]: off[r + 1]].tolist()
                assert col == torch.nonzero(table[b, h, :, j]).flatten().tolist()
    assert bs.kernel_lists is bs.kernel_lists  # cached on the mask object
    assert bs.transposed_lists is bs.transposed_lists


def test_unchecked_bad_entries_are_dropped_not_read():
    num = torch.tensor([[[3, 1]]], dtype=torch.int32)  # 3 > width 2
    idx = torch.tensor([[[[0, 9], [-1, 0]]]], dtype=torch.int32)  # 9 and -1 out of range
    bs = BlockSparse(num, idx, 4, 4, n_kv_blocks=2, check=False)
    assert bs.to_table().tolist() == [[[[True, False], [False, False]]]]
    cnt, kidx = bs.kernel_lists
    assert cnt.tolist() == [[[1, 0]]] and kidx[0, 0, 0, 0] == 0


def test_any_allowed_uses_the_host_summary_conservatively(monkeypatch):
    rng = random.Random(5)
    monkeypatch.setattr(mask_module, "_SUMMARY_MAX", 3)  # coarse: 3 x 3 groups of blocks
    for _ in range(40):
        S, b = 48, rng.choice([2, 4])
        n = S // b
        table = torch.rand(2, n, n, generator=torch.Generator().manual_seed(rng.randint(0, 999)))
        bs = BlockSparse.from_table(b, table < 0.08)
        assert bs.summary is not None and bs.summary.table.shape[0] <= 3
        m = Mask(causal=rng.random() < 0.5) & Mask(block_sparse=bs)
        q_lo, k_lo = rng.randint(0, S - 1), rng.randint(0, S - 1)
        q_hi, k_hi = rng.randint(q_lo, S - 1), rng.randint(k_lo, S - 1)
        q = Positions.contiguous(q_lo, q_hi - q_lo + 1)
        k = Positions.contiguous(k_lo, k_hi - k_lo + 1)
        truth = bool(m.allowed(q.materialize(), k.materialize()).any())
        if truth:
            assert m.any_allowed(q, k)
    monkeypatch.undo()
    # exact at full resolution: a diagonal table never pairs distinct blocks
    diag = Mask(block_sparse=BlockSparse.from_table(4, torch.eye(6, dtype=torch.bool)))
    assert not diag.any_allowed(Positions.contiguous(0, 4), Positions.contiguous(4, 20))
    # no summary (lists left on the device): block tests assume anything may be listed
    lists = diag.block_sparse
    blind = BlockSparse(lists.kv_num_blocks, lists.kv_indices, 4, 4, summarize=False)
    assert blind.summary is None
    assert Mask(block_sparse=blind).any_allowed(Positions.contiguous(0, 4),
                                                Positions.contiguous(4, 20))
    assert not (Mask(causal=True) & Mask(block_sparse=blind)).any_allowed(
        Positions.contiguous(0, 4), Positions.contiguous(4, 20))  # causal still decides
    summed = blind.with_summary()  # one host copy, then exact again
    assert summed.summary is not None and summed.with_summary() is summed
    assert not Mask(block_sparse=summed).any_allowed(Positions.contiguous(0, 4),
                                                     Positions.contiguous(4, 20))


def test_select_heads_for_ulysses():
    g = torch.Generator().manual_seed(1)
    per_q = BlockSparse.from_table(4, torch.rand(1, 8, 3, 3, generator=g) < 0.5)
    per_kv = BlockSparse.from_table(4, torch.rand(1, 2, 3, 3, generator=g) < 0.5)
    shared = BlockSparse.from_table(4, torch.rand(3, 3, generator=g) < 0.5)
    sel = per_q.select_heads(2, 4, heads=8, kv_heads=2)
    assert torch.equal(sel.to_table(), per_q.to_table()[:, 2:4])
    assert per_q.select_heads(2, 4, 8, 2) is sel  # cached: one object, one set of device lists
    assert torch.equal(per_kv.select_heads(4, 8, 8, 2).to_table(), per_kv.to_table()[:, 1:2])
    assert torch.equal(per_kv.select_heads(0, 2, 8, 2).to_table(), per_kv.to_table()[:, 0:1])
    assert shared.select_heads(2, 4, 8, 2) is shared
    assert per_q.select_heads(0, 8, 8, 2) is per_q
    m = Mask(causal=True, block_sparse=per_q)
    assert m.select_heads(2, 4, 8, 2).block_sparse is sel
    plain = Mask(causal=True)
    assert plain.select_heads(0, 1, 8) is plain
    with pytest.raises(ValueError, match="0 <= lo < hi <= heads"):
        per_q.select_heads(4, 2, 8)

    # a head range of a reference call equals that range of the whole call
    S, H, Hkv, D = 12, 8, 2, 4
    q = torch.randn(1, S, H, D, dtype=torch.float64)
    k, v = torch.randn(2, 1, S, Hkv, D, dtype=torch.float64)
    ref = TorchReference()
    for bs in (per_q, per_kv):
        whole, _ = ref.forward(q, k, v, scale=0.5, mask=Mask(causal=True, block_sparse=bs))
        part, _ = ref.forward(q[:, :, 4:8], k[:, :, 1:2], v[:, :, 1:2], scale=0.5,
                              mask=Mask(causal=True, block_sparse=bs.select_heads(4, 8, H, Hkv)))
        torch.testing.assert_close(part, whole[:, :, 4:8])


def test_flex_block_mask_round_trip_and_forward():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")

    def causal(b, h, q, k):
        return k <= q

    S, blk = 96, 32
    bm = flex.create_block_mask(causal, 1, 1, S, S, device="cpu", BLOCK_SIZE=blk)
    bs = BlockSparse.from_flex_block_mask(bm)
    assert (bs.q_block, bs.kv_block, bs.n_q_blocks, bs.n_kv_blocks) == (blk, blk, 3, 3)
    assert bs.to_table()[0, 0].tolist() == torch.ones(3, 3).tril().bool().tolist()
    pos = torch.arange(S)
    m = Mask(causal=True) & Mask(block_sparse=bs)
    assert torch.equal(m.allowed(pos, pos), Mask(causal=True).allowed(pos, pos))
    lists_only = bs.to_flex_block_mask(S)  # every listed block is full without conditions
    assert lists_only.kv_num_blocks.sum() == 0
    assert torch.equal(BlockSparse.from_flex_block_mask(lists_only).to_table(), bs.to_table())

    # per-head lists with causal + window + documents -> flex forward == our reference
    g = torch.Generator().manual_seed(0)
    H = 2
    table = torch.rand(1, H, 3, 3, generator=g) < 0.7
    table[0, 1, 1] = False  # a query block of head 1 sees nothing
    mask = Mask(causal=True, window=50, cu_seqlens=torch.tensor([0, 20, 70, 96])) & Mask(
        block_sparse=BlockSparse.from_table(blk, table))
    bmask = mask.to_flex_block_mask(S)
    back = BlockSparse.from_flex_block_mask(bmask)
    # the round trip keeps every listed block the conditions can reach, full ones flagged
    any_, full = mask.block_flags(blk, blk, S, S)
    assert torch.equal(back.to_table(), table & any_)
    assert torch.equal(BlockSparse(back.full_kv_num_blocks, back.full_kv_indices, blk, blk)
                       .to_table(), table & full)
    q, k, v = torch.randn(3, 1, H, S, 8, dtype=torch.float64, generator=g)
    out_f = flex.flex_attention(q, k, v, block_mask=bmask, scale=0.4)
    out_r, _ = TorchReference().forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        scale=0.4, mask=mask)
    torch.testing.assert_close(out_f.transpose(1, 2), out_r)


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------
def test_builder_doctests():
    failures, attempted = doctest.testmod(patterns, verbose=False)
    assert attempted > 5 and failures == 0


def _table(bs):
    return bs.to_table().tolist()


@pytest.mark.parametrize("window,sinks,block", [(5, 3, 2), (8, 0, 4), (1, 4, 4), (40, 2, 4)])
def test_sliding_window_with_sinks_brute(window, sinks, block):
    S = 30
    bs = patterns.sliding_window_with_sinks(S, window, sinks, block)
    n = -(-S // block)
    for i in range(n):
        qs = range(i * block, min((i + 1) * block, S))
        for j in range(n):
            ks = range(j * block, min((j + 1) * block, S))
            want = j <= i and any(k < sinks or 0 <= q - k < window for q in qs for k in ks)
            assert _table(bs)[0][0][i][j] == want, (i, j)


def test_strided_per_head_heads_cover_every_earlier_block():
    n, stride, local = 9, 3, 2
    bs = patterns.strided_per_head(n * 4, heads=6, stride=stride, local_blocks=local, block=4)
    t = bs.to_table()[0]  # [heads, n, n]
    for h in range(6):
        for i in range(n):
            for j in range(n):
                want = j <= i and (i - j < local or (j + h) % stride == 0)
                assert bool(t[h, i, j]) == want, (h, i, j)
    assert torch.equal(t[:stride].any(0), torch.ones(n, n).tril().bool())  # heads cover all
    assert not torch.equal(t[0], t[1])  # the pattern differs by head


def test_star_anchor_local_brute():
    bs = patterns.star_anchor_local(40, chunk=8, block=4)
    for i in range(10):
        for j in range(10):
            assert _table(bs)[0][0][i][j] == (j < 2 or j // 2 == i // 2), (i, j)
    with pytest.raises(ValueError, match="multiple of block"):
        patterns.star_anchor_local(40, chunk=6, block=4)


@pytest.mark.parametrize("qb,kb", [(4, 4), (8, 4)])
def test_topk_blocks_selection(qb, kb):
    g = torch.Generator().manual_seed(2)
    B, H, nq, k = 2, 3, 6, 3
    nk = nq * qb // kb
    scores = torch.randn(B, H, nq, nk, generator=g)
    bs = patterns.topk_blocks(scores, k, qb, kb)
    t = bs.to_table()
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                own = (i * qb + qb - 1) // kb
                eligible = list(range(own + 1))
                chosen = torch.nonzero(t[b, h, i]).flatten().tolist()
                assert own in chosen and all(j <= own for j in chosen)
                assert len(chosen) == min(k, len(eligible))
                rest = sorted((j for j in eligible if j != own), key=lambda j: -scores[b, h, i, j])
                assert sorted(chosen) == sorted([own] + rest[: k - 1])
    free = patterns.topk_blocks(scores, k, qb, kb, causal=False, include_own=False)
    assert (free.kv_num_blocks == k).all()
    top = scores.topk(k, -1).indices.sort(-1).values
    assert torch.equal(free.kv_indices.long(), top)


def test_random_blocks_counts():
    bs = patterns.random_blocks(64, 4, block=8, batch=2, heads=3,
                                generator=torch.Generator().manual_seed(0))
    assert bs.shape == (2, 3, 8, 8)
    assert bs.kv_num_blocks.tolist()[0][0] == [1, 2, 3, 4, 4, 4, 4, 4]
    t = bs.to_table()
    assert torch.equal(t & ~torch.ones(8, 8).tril().bool(), torch.zeros_like(t))  # causal
    assert t.diagonal(dim1=-2, dim2=-1).all()  # own block always


# ---------------------------------------------------------------------------------------------
# the Triton kernel (interpreted) against the reference
# ---------------------------------------------------------------------------------------------
def _inputs(B, Sq, Sk, H, Hkv, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, s, h, D, generator=g, device=device, dtype=dtype)
            for s, h in ((Sq, H), (Sk, Hkv), (Sk, Hkv), (Sq, H))]


def _table_case(Bm, Hm, n_q, n_k, density, seed, empty_row=1):
    t = torch.rand(Bm, Hm, n_q, n_k, generator=torch.Generator().manual_seed(seed)) < density
    t[0, -1, empty_row] = False  # a query block that lists nothing
    return t


DOCS = torch.tensor([0, 21, 50, 51, 128])
# (id, B, H, Hkv, S, qb, kb, lists [Bm, Hm], conditions, q shard (start, len), k shard)
CASES = [
    ("shared-causal", 1, 2, 1, 128, 32, 32, (1, 1), dict(causal=True), None, None),
    ("per-qhead-gqa", 2, 4, 2, 96, 16, 16, (1, 4), dict(causal=True), None, None),
    ("per-kvhead-batch", 2, 4, 2, 96, 16, 32, (2, 2), dict(), None, None),
    ("window-docs-rect", 1, 2, 2, 128, 32, 16, (1, 2), dict(causal=True, window=40,
                                                            cu_seqlens=DOCS), None, None),
    ("ring-offsets", 1, 4, 1, 128, 16, 16, (1, 4), dict(causal=True), (64, 64), (0, 64)),
    ("ring-diag-tail", 1, 2, 2, 120, 16, 32, (1, 2), dict(causal=True), (64, 56), (64, 56)),
    ("block64", 1, 2, 1, 128, 64, 64, (1, 2), dict(causal=True), None, None),
    ("block128-64-tail", 1, 2, 2, 150, 128, 64, (1, 1), dict(causal=True), None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_reference_interpreted(interpret, case):
    name, B, H, Hkv, S, qb, kb, (Bm, Hm), conds, q_shard, k_shard = case
    nq, nk = -(-S // qb), -(-S // kb)
    q_start, Sq = q_shard or (0, S)
    table = _table_case(Bm, Hm, nq, nk, 0.45, seed=len(name), empty_row=q_start // qb + 1)
    mask = Mask(**conds) & Mask(block_sparse=BlockSparse.from_table(qb, table, kv_block=kb))
    k_start, Sk = k_shard or (0, S)
    pos = dict(mask=mask, q_pos=Positions.contiguous(q_start, Sq),
               k_pos=Positions.contiguous(k_start, Sk))
    q, k, v, dout = _inputs(B, Sq, Sk, H, Hkv, 16, seed=S + qb)
    kern, ref = BlockSparseTriton(), TorchReference()
    out, lse = kern.forward(q, k, v, scale=0.3, **pos)
    r_out, r_lse = ref.forward(q.double(), k.double(), v.double(), scale=0.3, **pos)
    assert out.shape == q.shape and lse.shape == (B, H, Sq) and lse.dtype == torch.float32
    torch.testing.assert_close(out, r_out.float(), atol=2e-5, rtol=0)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))
    finite = torch.isfinite(r_lse)
    torch.testing.assert_close(lse[finite], r_lse[finite].float(), atol=2e-5, rtol=0)
    empty = torch.isneginf(r_lse)  # [B, H, Sq]
    if name in ("shared-causal", "per-qhead-gqa", "ring-offsets"):
        assert empty.any()  # the case exercises rows with no allowed key
    assert (out.transpose(1, 2)[empty] == 0).all()

    grads = kern.backward(dout, q, k, v, r_out.float(), r_lse.float(), scale=0.3, **pos)
    r_grads = ref.backward(dout.double(), q.double(), k.double(), v.double(), r_out, r_lse,
                           scale=0.3, **pos)
    for gname, got, want in zip(("dq", "dk", "dv"), grads, r_grads):
        assert got.dtype == torch.float32 and got.shape == want.shape, gname
        assert not torch.isnan(got).any(), gname
        torch.testing.assert_close(got, want.float(), atol=5e-5, rtol=1e-4, msg=gname)


def test_triton_skips_unlisted_blocks_interpreted(interpret):
    """Garbage (NaN) in keys that no list reaches never shows up: those blocks are not read."""
    S, b = 64, 16
    table = torch.zeros(4, 4, dtype=torch.bool)
    table[:, 0] = True
    table[3, 3] = True
    mask = Mask(causal=True, block_sparse=BlockSparse.from_table(b, table))
    q, k, v, dout = _inputs(1, S, S, 2, 1, 16)
    k[:, 16:48] = float("nan")
    v[:, 16:48] = float("nan")
    kern = BlockSparseTriton()
    out, lse = kern.forward(q, k, v, scale=0.3, mask=mask)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    dq, dk, dv = kern.backward(dout, q, k, v, out, lse, scale=0.3, mask=mask)
    assert not torch.isnan(dq).any()
    assert (dk[:, 16:48] == 0).all() and (dv[:, 16:48] == 0).all()


def test_dispatch_routes_block_sparse(interpret):
    q = torch.randn(1, 64, 2, 16)
    mask = Mask(block_sparse=BlockSparse.from_table(16, torch.ones(4, 4, dtype=torch.bool)))
    kernel, why = select_kernel(q, mask, explain=True)
    assert kernel.name == "reference" and "cpu" in why  # automatic choice: GPUs only
    assert select_kernel(q, mask, prefer="block_sparse").name == "block_sparse"
    kernel, why = select_kernel(q, Mask(causal=True), explain=True)
    assert kernel.name == "reference"
    with pytest.raises(ValueError, match="no block-sparse lists"):
        select_kernel(q, Mask(causal=True), prefer="block_sparse")


# ---------------------------------------------------------------------------------------------
# errors that say what to change
# ---------------------------------------------------------------------------------------------
def test_list_errors():
    num = torch.tensor([[[1, 3]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"counts must be in \[0, 2\].*widen the index list"):
        BlockSparse(num, idx, 4, 4)
    with pytest.raises(ValueError, match="lists key block 5 but there are 2 key blocks"):
        BlockSparse(torch.tensor([[[1, 1]]]), torch.tensor([[[[5], [0]]]]), 4, 4)
    with pytest.raises(ValueError, match="same first three sizes"):
        BlockSparse(torch.tensor([[[1, 1]]]), torch.tensor([[[[0]]]]), 4, 4)
    with pytest.raises(ValueError, match="integer tensors"):
        BlockSparse(torch.tensor([[[1.0]]]), torch.tensor([[[[0.0]]]]), 4, 4)
    with pytest.raises(ValueError, match="both full_kv_num_blocks and full_kv_indices"):
        BlockSparse(torch.tensor([[[1]]]), torch.tensor([[[[0]]]]), 4, 4,
                    full_kv_num_blocks=torch.tensor([[[0]]]))
    with pytest.raises(ValueError, match="pass num_kv_blocks="):
        BlockSparse.from_indices(4, torch.tensor([[0, 3], [1, -1]]))


def test_call_errors(interpret):
    q, k, v, _ = _inputs(2, 64, 64, 4, 2, 16)
    bs3 = BlockSparse.from_table(16, torch.ones(1, 3, 4, 4, dtype=torch.bool))
    for kern in (BlockSparseTriton(), TorchReference()):
        with pytest.raises(ValueError, match="lists have 3 heads.*give the lists 1, 4 or 2"):
            kern.forward(q, k, v, scale=0.3, mask=Mask(block_sparse=bs3))
        bs_b3 = BlockSparse.from_table(16, torch.ones(3, 1, 4, 4, dtype=torch.bool))
        with pytest.raises(ValueError, match="batch 3 but q has batch 2"):
            kern.forward(q, k, v, scale=0.3, mask=Mask(block_sparse=bs_b3))
        meta = BlockSparse(torch.ones(1, 1, 4, device="meta", dtype=torch.int32),
                           torch.zeros(1, 1, 4, 1, device="meta", dtype=torch.int32), 16, 16)
        with pytest.raises(ValueError, match=r"on meta but q is on cpu.*mask.to\(q.device\)"):
            kern.forward(q, k, v, scale=0.3, mask=Mask(block_sparse=meta))
    kern = BlockSparseTriton()
    ok = Mask(block_sparse=BlockSparse.from_table(16, torch.ones(8, 8, dtype=torch.bool)))
    with pytest.raises(ValueError, match="starts at global position 8, not a multiple of the "
                                         "block size 16"):
        kern.forward(q, k, v, scale=0.3, mask=ok, q_pos=Positions.contiguous(8, 64))
    with pytest.raises(ValueError, match="not a multiple of the block size 16.*divide the shard"):
        kern.forward(q[:, :40], k, v, scale=0.3, mask=ok, q_pos=Positions.contiguous(0, 40))
    with pytest.raises(ValueError, match="lists cover 8 key blocks of 16"):
        kern.forward(q, k, v, scale=0.3, mask=ok, k_pos=Positions.contiguous(96, 64))
    with pytest.raises(ValueError, match="not one contiguous run"):
        kern.forward(q, k, v, scale=0.3, mask=ok, q_pos=Positions.strided(0, 64, 2))
    odd = Mask(block_sparse=BlockSparse.from_table(24, torch.ones(3, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"q_block in \(16, 32, 64, 128\)"):
        kern.forward(q, k, v, scale=0.3, mask=odd)
    # the last block of the sequence may be partial
    tail = Mask(block_sparse=BlockSparse.from_table(16, torch.ones(3, 3, dtype=torch.bool)))
    out, _ = kern.forward(q[:, :40], k[:, :40], v[:, :40], scale=0.3, mask=tail)
    assert out.shape == (2, 40, 4, 16)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("lists", ["shared", "per_head"])
def test_gpu_matches_reference(block, lists):
    B, S, H, Hkv, D = 1, 2048, 8, 2, 128
    n = S // block
    bs = patterns.random_blocks(S, 5, block, heads=H if lists == "per_head" else 1,
                                generator=torch.Generator().manual_seed(block), device="cuda")
    mask = Mask(causal=True, block_sparse=bs)
    q, k, v, dout = _inputs(B, S, S, H, Hkv, D, torch.bfloat16, device="cuda")
    kern, ref = BlockSparseTriton(), TorchReference()
    out, lse = kern.forward(q, k, v, scale=D ** -0.5, mask=mask)
    r_out, r_lse = ref.forward(q.float(), k.float(), v.float(), scale=D ** -0.5, mask=mask)
    assert n > 0
    torch.testing.assert_close(out.float(), r_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, r_lse, atol=1e-2, rtol=1e-3)
    grads = kern.backward(dout, q, k, v, out, lse, scale=D ** -0.5, mask=mask)
    r_grads = ref.backward(dout.float(), q.float(), k.float(), v.float(), r_out, r_lse,
                           scale=D ** -0.5, mask=mask)
    for got, want in zip(grads, r_grads):
        err = (got - want).norm() / want.norm()
        assert err < 2e-2, err


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import longctx.kernels.block_sparse_triton as bst

for kern in (bst._fwd_kernel, bst._bwd_q_kernel, bst._bwd_kv_kernel):
    names = kern.arg_names
    sig = {n: "i32" for n in names}
    const = dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=128, CAUSAL=True, HAS_WINDOW=True,
                 HAS_DOCS=True, IEEE=False)
    if "SUB_M" in names:
        const["SUB_M"] = bst._bwd_kv_sub_m(128, 128, 128)
    for n in names:
        if n.startswith("desc_"):
            big = n in ("desc_k", "desc_v", "desc_dk", "desc_dv", "desc_o")
            rows = 128 if big else const.get("SUB_M", 128)
            dt = "fp32" if n in ("desc_dq", "desc_dk", "desc_dv") else "bf16"
            sig[n] = f"tensordesc<{dt}[1,{rows},128]>"
        elif n in ("Lse", "Delta"):
            sig[n] = "*fp32"
        elif n in ("PART", "FULL", "RANGES", "PART_Q", "FULL_Q", "QD", "KD"):
            sig[n] = "*i32"
        elif n in ("qk_scale", "scale"):
            sig[n] = "fp32"
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(fn=kern, signature=sig,
                    constexprs={(names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=8, num_stages=2))
    assert compiled.asm["cubin"], kern.fn.__name__
print("compiled")
"""


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter does not type-check like the compiler: compile the three kernels for
    sm_90 (to a cubin; no GPU needed) at 128 x 128 blocks, head dim 128, bf16, with every mask
    condition.  In a fresh process: interpreted launches leave Triton's language patched."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", _COMPILE_SM90], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
