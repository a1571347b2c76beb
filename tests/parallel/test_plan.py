"""Work plans of the context-parallel strategies: per-run kernel calls (zigzag), ring step counts
and needed sources; pure functions of positions and the mask."""

from __future__ import annotations

import doctest
import random

import pytest
import torch

import longctx.parallel.plan as plan_module
from longctx.kernels import BlockSparse, Mask, Positions, ReferenceConfig, Segment, TorchReference
from longctx.kernels.merge import merge_into
from longctx.parallel.layout import Layout
from longctx.parallel.plan import TileCall, needed_sources, plan_calls, ring_steps


def zigzag(P: int, c: int) -> list[Positions]:
    """Rank r holds chunks r and 2P-1-r of size c."""
    return [Positions((Segment(r * c, c), Segment((2 * P - 1 - r) * c, c))) for r in range(P)]


def contiguous(P: int, n: int) -> list[Positions]:
    return [Positions.contiguous(r * n, n) for r in range(P)]


def _pairs(calls: list[TileCall]) -> int:
    return sum((c.q_end - c.q_begin) * (c.k_end - c.k_begin) for c in calls)


def _covered(calls: list[TileCall], Sq: int, Sk: int) -> torch.Tensor:
    """int [Sq, Sk]: how many calls compute each local (query, key) pair."""
    cov = torch.zeros(Sq, Sk, dtype=torch.int64)
    for c in calls:
        assert 0 <= c.q_begin < c.q_end <= Sq and 0 <= c.k_begin < c.k_end <= Sk, c
        cov[c.q_begin : c.q_end, c.k_begin : c.k_end] += 1
    return cov


# ---------------------------------------------------------------------------------------------
# zigzag under causal: the exact calls of every ring step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("P", [2, 3, 4])
def test_zigzag_causal_calls_per_step(P, c):
    pos = zigzag(P, c)
    for r in range(P):
        assert pos[r].segments == Layout.parse("zigzag").positions(2 * P * c, P, r).segments
    mask = Mask(causal=True)
    for s in range(P):
        work = []
        for r in range(P):
            src = (r - s) % P
            calls = plan_calls(mask, pos[r], pos[src])
            work.append(_pairs(calls))
            if P - 1 in (r, src):  # the last rank's chunks P-1 and P touch: calls may merge
                continue
            if src == r:  # diagonal: chunk r vs chunk r, second chunk vs both, one call per pair
                expected = [TileCall(0, c, 0, c), TileCall(c, 2 * c, 0, c), TileCall(c, 2 * c, c, 2 * c)]
            elif src < r:  # both query chunks vs the first key chunk
                expected = [TileCall(0, c, 0, c), TileCall(c, 2 * c, 0, c)]
            else:  # the second query chunk vs both key chunks
                expected = [TileCall(c, 2 * c, 0, c), TileCall(c, 2 * c, c, 2 * c)]
            assert calls == expected, (P, c, s, r, src)
        if s > 0:
            assert work == [2 * c * c] * P, (s, work)  # balanced across ranks
        else:
            assert work == [3 * c * c] * P


@pytest.mark.parametrize("P", [2, 3, 4])
def test_zigzag_layout_positions_give_same_plan(P):
    c = 2
    layout = Layout.parse("zigzag")
    mine = zigzag(P, c)
    theirs = [layout.positions(2 * P * c, P, r) for r in range(P)]
    for r in range(P):
        for src in range(P):
            assert plan_calls(Mask(causal=True), mine[r], mine[src]) == plan_calls(
                Mask(causal=True), theirs[r], theirs[src]
            )


def test_all_runs_allowed_is_one_call_per_run_pair():
    pos = zigzag(3, 4)  # two runs per rank: every call must see single-run positions
    quarters = [TileCall(0, 4, 0, 4), TileCall(0, 4, 4, 8), TileCall(4, 8, 0, 4), TileCall(4, 8, 4, 8)]
    assert plan_calls(Mask(), pos[1], pos[0]) == quarters  # ranks 0, 1: chunks never touch
    assert plan_calls(Mask(window=100), pos[0], pos[0]) == quarters
    one = Positions.contiguous(0, 8)
    assert plan_calls(Mask(), one, one) == [TileCall(0, 8, 0, 8)]


def test_calls_see_single_run_positions():
    for P in (2, 3, 4):
        pos = zigzag(P, 3)
        for r in range(P):
            for src in range(P):
                for c in plan_calls(Mask(causal=True), pos[r], pos[src]):
                    assert len(pos[r].slice(c.q_begin, c.q_end).segments) == 1
                    assert len(pos[src].slice(c.k_begin, c.k_end).segments) == 1


def test_plan_calls_empty_when_nothing_allowed():
    a, b = Positions.contiguous(0, 8), Positions.contiguous(8, 8)
    assert plan_calls(Mask(causal=True), a, b) == []
    assert plan_calls(Mask(causal=True, window=3), Positions.contiguous(20, 4), a) == []
    assert plan_calls(Mask(cu_seqlens=torch.tensor([0, 8, 16])), a, b) == []
    empty_bs = Mask(block_sparse=BlockSparse.from_table(4, torch.zeros(4, 4, dtype=torch.bool)))
    assert plan_calls(empty_bs, a, a) == []
    pos = zigzag(3, 3)  # rank 0: 0..2, 15..17; rank 2: 6..8, 9..11
    assert plan_calls(Mask(causal=True, window=2), pos[0], pos[2]) == []
    assert plan_calls(Mask(causal=True, window=5), pos[0], pos[2]) == [TileCall(3, 6, 3, 6)]
    assert plan_calls(Mask(causal=True), Positions((Segment(3, 0),)), a) == []
    assert plan_calls(Mask(), a, Positions.from_index(torch.empty(0, dtype=torch.int64))) == []


@pytest.mark.parametrize("mask", [Mask(causal=True), Mask()], ids=["causal", "full"])
@pytest.mark.parametrize("side", ["q", "k"])
def test_plan_calls_empty_shard_gives_no_calls(mask, side):
    # regression: Positions() has no runs, so the "every run pair allowed" test was vacuously
    # true and a zero-size whole call came back
    a = Positions.contiguous(0, 8)
    q, k = (Positions(), a) if side == "q" else (a, Positions())
    assert not mask.any_allowed(q, k)
    assert plan_calls(mask, q, k) == []


def test_plan_calls_merges_runs_that_continue_each_other():
    # query runs 10..11, 0..1, 12..13; key runs 0..3 and 10..13, causal: one call per pair
    q = Positions((Segment(10, 2), Segment(0, 2), Segment(12, 2)))
    k = Positions((Segment(0, 4), Segment(10, 4)))
    assert plan_calls(Mask(causal=True), q, k) == [
        TileCall(0, 2, 0, 4), TileCall(0, 2, 4, 8), TileCall(2, 4, 0, 4),
        TileCall(4, 6, 0, 4), TileCall(4, 6, 4, 8),
    ]
    # query runs 10..11 and 12..13 continue each other locally and globally: merged
    q2 = Positions((Segment(10, 2), Segment(12, 2), Segment(0, 2)))
    k2 = Positions((Segment(0, 4),))
    assert plan_calls(Mask(causal=True), q2, k2) == [TileCall(0, 4, 0, 4), TileCall(4, 6, 0, 4)]
    # key runs 0..1 and 2..3 continue each other: one call for the query run
    k3 = Positions((Segment(0, 2), Segment(2, 2), Segment(30, 2)))
    assert plan_calls(Mask(causal=True), Positions.contiguous(4, 2), k3) == [TileCall(0, 2, 0, 4)]


def test_plan_calls_skip_run_pairs_without_allowed_keys():
    q = Positions((Segment(0, 2), Segment(40, 2)))
    k = Positions((Segment(0, 2), Segment(20, 2), Segment(41, 2)))
    m = Mask(cu_seqlens=torch.tensor([0, 10, 30, 50]))
    # q run 0 (doc 0) -> k run 0; q run 1 (doc 2) -> k run 2 only
    assert plan_calls(m, q, k) == [TileCall(0, 2, 0, 2), TileCall(2, 4, 4, 6)]
    # a query run allowed against key runs 0 and 2 but not 1: two calls, no hull over the gap
    q4 = Positions((Segment(1, 1),))
    k4 = Positions((Segment(0, 2), Segment(20, 2), Segment(2, 2)))
    assert plan_calls(Mask(window=3), q4, k4) == [TileCall(0, 1, 0, 2), TileCall(0, 1, 4, 6)]


def test_plan_calls_many_runs_falls_back_to_whole():
    q = Positions(tuple(Segment(2 * i, 2) for i in range(10)))  # 0..19 in 10 runs
    k = Positions(tuple(Segment(100 + 2 * i, 2) for i in range(10)))  # 100 run pairs
    assert plan_calls(Mask(causal=True), q, k) == []
    assert plan_calls(Mask(causal=True), k, q) == [TileCall(0, 20, 0, 20)]


LAYOUTS = ["contiguous", "zigzag", "striped", "striped:2", "striped:3"]


def _random_mask(rng: random.Random, S: int) -> Mask:
    m = Mask()
    if rng.random() < 0.6:
        m = m & Mask(causal=True)
    if rng.random() < 0.5:
        m = m & Mask(window=rng.randint(1, S), causal=rng.random() < 0.5)
    if rng.random() < 0.4:
        cuts = sorted(rng.randint(0, S) for _ in range(rng.randint(1, 4)))
        m = m & Mask(cu_seqlens=torch.tensor([0, *cuts, S]))
    if rng.random() < 0.3:
        b = rng.choice([2, 3, 5])
        nb = -(-S // b)
        t = torch.rand(nb, nb, generator=torch.Generator().manual_seed(rng.randint(0, 10**6)))
        m = m & Mask(block_sparse=BlockSparse.from_table(b, t < rng.choice([0.1, 0.4])))
    return m


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_plan_calls_cover_every_allowed_pair_once(layout, P):
    lay = Layout.parse(layout)
    S = lay.required_multiple(P) * 2
    pos = [lay.positions(S, P, r) for r in range(P)]
    rng = random.Random(f"{layout}-{P}")
    for _ in range(12):
        mask = _random_mask(rng, S)
        for r in range(P):
            for src in range(P):
                calls = plan_calls(mask, pos[r], pos[src])
                cov = _covered(calls, len(pos[r]), len(pos[src]))
                ok = mask.allowed(pos[r].materialize(), pos[src].materialize())
                assert (cov[ok] == 1).all(), (mask, r, src, calls)  # every allowed pair, once
                assert (cov <= 1).all()  # no pair is computed twice (would double-count keys)
                assert (calls == []) == (not mask.any_allowed(pos[r], pos[src]))


@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("mask_name", ["causal", "window", "documents", "combo"])
def test_executing_the_plan_matches_full_attention(P, mask_name):
    """Run the planned calls of every ring step with the reference kernel and merge them: the
    result equals each rank's queries attending to the whole sequence."""
    c = 3
    S = 2 * P * c
    mask = {
        "causal": Mask(causal=True),
        "window": Mask(causal=True, window=4),
        "documents": Mask(cu_seqlens=torch.tensor([0, 5, 5, S - 4, S])),
        "combo": Mask(causal=True, window=7) & Mask(cu_seqlens=torch.tensor([0, 7, S])),
    }[mask_name]
    pos = zigzag(P, c)
    g = torch.Generator().manual_seed(P)
    q = torch.randn(1, S, 4, 5, generator=g, dtype=torch.float64)
    k = torch.randn(1, S, 2, 5, generator=g, dtype=torch.float64)
    v = torch.randn(1, S, 2, 5, generator=g, dtype=torch.float64)
    kern = TorchReference(ReferenceConfig(block_q=2, block_k=5))
    full_out, full_lse = kern.forward(q, k, v, scale=0.4, mask=mask)
    for r in range(P):
        idx = pos[r].materialize()
        acc_out = torch.zeros(1, 2 * c, 4, 5, dtype=torch.float64)
        acc_lse = torch.full((1, 4, 2 * c), float("-inf"), dtype=torch.float64)
        for s in range(ring_steps(mask, pos)):
            src = (r - s) % P
            kidx = pos[src].materialize()
            for call in plan_calls(mask, pos[r], pos[src]):
                qs, ks = slice(call.q_begin, call.q_end), slice(call.k_begin, call.k_end)
                o, lse = kern.forward(
                    q[:, idx[qs]],
                    k[:, kidx[ks]],
                    v[:, kidx[ks]],
                    scale=0.4,
                    mask=mask,
                    q_pos=pos[r].slice(call.q_begin, call.q_end),
                    k_pos=pos[src].slice(call.k_begin, call.k_end),
                )
                merge_into(acc_out[:, qs], acc_lse[:, :, qs], o, lse)
        torch.testing.assert_close(acc_out, full_out[:, idx], rtol=0, atol=1e-12)
        torch.testing.assert_close(acc_lse, full_lse[:, :, idx], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# ring_steps / needed_sources
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
def test_ring_steps_causal_contiguous_is_world(P):
    assert ring_steps(Mask(causal=True), contiguous(P, 6)) == P


@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
def test_ring_steps_full_is_world(P):
    assert ring_steps(Mask(), contiguous(P, 6)) == P
    assert ring_steps(Mask(), zigzag(P, 3)) == P


@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
def test_ring_steps_causal_zigzag_is_world(P):
    assert ring_steps(Mask(causal=True), zigzag(P, 3)) == P


@pytest.mark.parametrize("window", [2, 5, 8])
@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_ring_steps_sliding_window_shorter_than_shard(P, window):
    n = 8  # shard length; window <= shard
    assert ring_steps(Mask(causal=True, window=window), contiguous(P, n)) == 2
    assert ring_steps(Mask(causal=True) & Mask(window=window), contiguous(P, n)) == 2


@pytest.mark.parametrize("P", [2, 3, 4])
def test_ring_steps_window_edge_cases(P):
    n = 8
    # window 1: a token only sees itself, no remote keys at all
    assert ring_steps(Mask(causal=True, window=1), contiguous(P, n)) == 1
    # window n + 2 reaches two shards back
    assert ring_steps(Mask(causal=True, window=n + 2), contiguous(P, n)) == min(3, P)
    # bidirectional: rank r needs rank r + 1, which arrives at the last step
    assert ring_steps(Mask(window=2), contiguous(P, n)) == P
    assert ring_steps(Mask(window=1), contiguous(P, n)) == 1


@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
def test_ring_steps_documents_within_ranks(P):
    n = 6
    # one or more documents per rank, none crossing a rank boundary (with an empty one too)
    cuts = []
    for r in range(P):
        cuts += [r * n + 2, r * n + 2, (r + 1) * n]
    cu = torch.tensor([0, *cuts])
    assert ring_steps(Mask(cu_seqlens=cu), contiguous(P, n)) == 1
    assert ring_steps(Mask(cu_seqlens=cu, causal=True), contiguous(P, n)) == 1
    if P >= 2:  # a document crossing the first boundary needs one remote step
        cross = torch.tensor([0, n - 1, n + 1, *[r * n for r in range(2, P + 1)]])
        assert ring_steps(Mask(cu_seqlens=cross, causal=True), contiguous(P, n)) == 2


@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
def test_needed_sources(P):
    pos = contiguous(P, 5)
    for r in range(P):
        assert needed_sources(Mask(causal=True), pos, r) == list(range(r + 1))
        assert needed_sources(Mask(), pos, r) == list(range(P))
        assert needed_sources(Mask(causal=True, window=3), pos, r) == sorted({max(r - 1, 0), r})
        assert needed_sources(Mask(window=3), pos, r) == [
            s for s in (r - 1, r, r + 1) if 0 <= s < P
        ]
        assert needed_sources(Mask(causal=True), zigzag(P, 2), r) == list(range(P))


def test_module_doctest():
    failures, _ = doctest.testmod(plan_module, verbose=False)
    assert failures == 0
