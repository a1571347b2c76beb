"""Masks on global positions: element-level ``allowed`` against a brute-force double loop,
conservative block-level tests (``any_allowed`` / ``interval_may_attend``), ``Positions`` and
``BlockSparse`` helpers, and validation errors."""

from __future__ import annotations

import doctest
import itertools
import random

import pytest
import torch

import longctx.kernels.mask as mask_module
from longctx.kernels.mask import BlockSparse, Mask, Positions, Segment


# ---------------------------------------------------------------------------------------------
# brute-force reference (plain Python, independent of the library's tensor code)
# ---------------------------------------------------------------------------------------------
def _doc_of(cu: list[int], p: int) -> int:
    """Index of the document containing global position ``p`` (cu[d] <= p < cu[d+1])."""
    for d in range(len(cu) - 1):
        if cu[d] <= p < cu[d + 1]:
            return d
    raise AssertionError(f"position {p} outside cu_seqlens {cu}")


def brute_pair(
    q: int,
    k: int,
    *,
    causal: bool = False,
    window: int | None = None,
    cu: list[int] | None = None,
    block: tuple[int, int, list[list[bool]]] | None = None,
) -> bool:
    if causal and not k <= q:
        return False
    if window is not None:
        if causal:
            if not q - k < window:
                return False
        elif not abs(q - k) < window:
            return False
    if cu is not None and _doc_of(cu, q) != _doc_of(cu, k):
        return False
    if block is not None:
        qb, kb, table = block
        if q // qb >= len(table) or k // kb >= len(table[0]) or not table[q // qb][k // kb]:
            return False
    return True


def brute_matrix(q_pos: list[int], k_pos: list[int], **kw) -> torch.Tensor:
    return torch.tensor(
        [[brute_pair(q, k, **kw) for k in k_pos] for q in q_pos], dtype=torch.bool
    ).view(len(q_pos), len(k_pos))


def brute_kwargs(mask: Mask) -> dict:
    """The brute-force description of a library mask (only read from its public fields)."""
    kw: dict = {"causal": mask.causal, "window": mask.window}
    if mask.cu_seqlens is not None:
        kw["cu"] = [int(x) for x in mask.cu_seqlens.tolist()]
    if mask.block_sparse is not None:
        bs = mask.block_sparse
        assert not bs.per_head  # per-head masks are checked in tests/test_block_sparse.py
        kw["block"] = (bs.q_block, bs.kv_block, bs.to_table()[0, 0].tolist())
    return kw


def _pos_list(p: Positions) -> list[int]:
    return [int(x) for x in p.materialize().tolist()]


# ---------------------------------------------------------------------------------------------
# Segment / Positions
# ---------------------------------------------------------------------------------------------
def test_segment_last_and_validation():
    assert Segment(3, 4, 2).last == 9
    assert Segment(5, 1).last == 5
    for bad in [(-1, 2, 1), (0, -1, 1), (0, 2, 0)]:
        with pytest.raises(ValueError, match="start >= 0, length >= 0 and stride >= 1"):
            Segment(*bad)


POSITION_CASES = {
    "contiguous": (Positions.contiguous(5, 4), [5, 6, 7, 8]),
    "strided": (Positions.strided(1, 5, 3), [1, 4, 7, 10, 13]),
    "multi_segment": (
        Positions((Segment(0, 3), Segment(20, 2), Segment(7, 3, 4))),
        [0, 1, 2, 20, 21, 7, 11, 15],
    ),
    "with_empty_segment": (
        Positions((Segment(4, 2), Segment(9, 0), Segment(30, 1))),
        [4, 5, 30],
    ),
    "index": (Positions.from_index(torch.tensor([9, 2, 2, 40, 0])), [9, 2, 2, 40, 0]),
    "empty_segments": (Positions(), []),
    "empty_index": (Positions.from_index(torch.empty(0, dtype=torch.int64)), []),
}


@pytest.mark.parametrize("name", list(POSITION_CASES))
def test_positions_materialize_len_bounds_max(name):
    pos, expected = POSITION_CASES[name]
    m = pos.materialize()
    assert m.dtype == torch.int64 and m.dim() == 1
    assert m.tolist() == expected
    assert len(pos) == len(expected)
    bounds = list(pos.bounds())
    if pos.index is not None:
        assert bounds == ([(min(expected), max(expected))] if expected else [])
    else:
        assert bounds == [(s.start, s.last) for s in pos.segments if s.length > 0]
    # bounds are a hull of every run: each position lies inside some run's bounds
    for p in expected:
        assert any(lo <= p <= hi for lo, hi in bounds)
    assert pos.max() == (max(expected) if expected else -1)


@pytest.mark.parametrize("name", list(POSITION_CASES))
def test_positions_slice_matches_materialize(name):
    pos, expected = POSITION_CASES[name]
    n = len(expected)
    for begin in range(n + 2):
        for end in range(begin, n + 3):
            sl = pos.slice(begin, end)
            assert sl.materialize().tolist() == expected[begin:end], (begin, end)
            assert len(sl) == len(expected[begin:end])
            # the segment form is kept when it can be
            assert (sl.index is None) == (pos.index is None)


def test_positions_slice_keeps_strided_segments():
    pos = Positions((Segment(0, 4), Segment(100, 5, 3)))
    sl = pos.slice(2, 7)
    assert sl.segments == (Segment(2, 2, 1), Segment(100, 3, 3))
    assert sl.materialize().tolist() == [2, 3, 100, 103, 106]


def test_positions_cat():
    a = Positions.contiguous(0, 3)
    b = Positions.strided(10, 2, 5)
    c = Positions.from_index(torch.tensor([7, 1]))
    ab = Positions.cat([a, b])
    assert ab.index is None  # stays in segment form
    assert ab.segments == (Segment(0, 3), Segment(10, 2, 5))
    assert ab.materialize().tolist() == [0, 1, 2, 10, 15]
    abc = Positions.cat([a, b, c])
    assert abc.index is not None
    assert abc.materialize().tolist() == [0, 1, 2, 10, 15, 7, 1]
    assert len(abc) == 7


def test_positions_local_runs():
    pos = Positions((Segment(0, 3), Segment(20, 2, 2), Segment(50, 4)))
    runs = pos.local_runs()
    assert [(b, e) for b, e, _ in runs] == [(0, 3), (3, 5), (5, 9)]
    full = pos.materialize()
    for b, e, p in runs:
        assert len(p.segments) == 1
        assert p.materialize().tolist() == full[b:e].tolist()
    idx = Positions.from_index(torch.tensor([3, 1, 2]))
    runs = idx.local_runs()
    assert len(runs) == 1 and runs[0][:2] == (0, 3) and runs[0][2] is idx


def test_positions_validation_errors():
    with pytest.raises(ValueError, match="either segments or an index tensor"):
        Positions((Segment(0, 2),), index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        Positions(index=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        Positions(index=torch.zeros(2, 2, dtype=torch.int64))
    # from_index casts to int64
    assert Positions.from_index(torch.tensor([1, 2], dtype=torch.int32)).index.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# BlockSparse
# ---------------------------------------------------------------------------------------------
def test_block_sparse_from_indices_with_padding():
    idx = torch.tensor([[0, -1, -1], [1, 0, -1], [-1, -1, -1], [3, 1, 2]])
    bs = BlockSparse.from_indices(4, idx)
    expected = torch.tensor(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
            [0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert bs.q_block == bs.kv_block == 4
    assert bs.to_table().dtype == torch.bool
    assert torch.equal(bs.to_table()[0, 0], expected)
    assert bs.kv_num_blocks.tolist() == [[[1, 2, 0, 3]]]


def test_block_sparse_from_indices_rectangular_and_other_negative_pads():
    idx = torch.tensor([[5, -2], [-7, 0]], dtype=torch.int32)
    bs = BlockSparse.from_indices(2, idx, num_kv_blocks=6)
    table = bs.to_table()[0, 0]
    assert table.shape == (2, 6)
    assert table[0].tolist() == [False] * 5 + [True]
    assert table[1].tolist() == [True] + [False] * 5
    empty = BlockSparse.from_indices(3, torch.empty(4, 0, dtype=torch.int64))
    assert empty.to_table().shape == (1, 1, 4, 4) and not empty.to_table().any()


def test_block_sparse_errors():
    with pytest.raises(ValueError, match="num_kv_blocks"):
        BlockSparse.from_indices(4, torch.tensor([[0, 2], [1, -1]]))  # default: 2 key blocks
    with pytest.raises(ValueError, match=r"\[n_q_blocks, max_nnz\]"):
        BlockSparse.from_indices(4, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="q_block must be an int >= 1"):
        BlockSparse.from_table(0, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="from_indices"):
        BlockSparse(torch.ones(2, dtype=torch.int32), torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="bool tensor"):
        BlockSparse.from_table(2, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        BlockSparse.from_table(2, torch.ones(2, 2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# Mask.allowed against the double loop
# ---------------------------------------------------------------------------------------------
S = 24
CU = torch.tensor([0, 5, 5, 11, 12, 12, 24])  # zero-length documents at 5 and 12
BS_INDICES = torch.tensor(
    [[0, -1, -1], [1, 0, -1], [-1, -1, -1], [3, 1, -1], [4, 2, 0], [5, -1, -1]]
)
BS = BlockSparse.from_indices(4, BS_INDICES)  # 6 blocks of 4 = 24 tokens
BS_TABLE = BlockSparse.from_table(
    3, torch.tensor([[(i * 7 + j * 3) % 4 != 0 for j in range(8)] for i in range(8)])
)

MASKS = {
    "full": Mask(),
    "causal": Mask(causal=True),
    "window_causal_1": Mask(causal=True, window=1),
    "window_causal_5": Mask(causal=True, window=5),
    "window_bidir_1": Mask(window=1),
    "window_bidir_4": Mask(window=4),
    "window_huge": Mask(window=1000),
    "documents": Mask(cu_seqlens=CU),
    "documents_causal": Mask(cu_seqlens=CU, causal=True),
    "block_sparse_indices": Mask(block_sparse=BS),
    "block_sparse_table": Mask(block_sparse=BS_TABLE),
    "and_causal_window": Mask(causal=True) & Mask(window=3),
    "and_window_min": Mask(window=7) & Mask(window=3, causal=True),
    "and_docs_window": Mask(cu_seqlens=CU) & Mask(window=4),
    "and_all": Mask(causal=True, window=6) & Mask(cu_seqlens=CU) & Mask(block_sparse=BS),
    "and_bs_window": Mask(block_sparse=BS_TABLE) & Mask(window=5),
}

POSITIONS = {
    "contiguous": (Positions.contiguous(0, S), Positions.contiguous(0, S)),
    "q_after_k": (Positions.contiguous(12, 12), Positions.contiguous(0, 12)),
    "q_before_k": (Positions.contiguous(0, 12), Positions.contiguous(12, 12)),
    "strided": (Positions.strided(1, 8, 3), Positions.strided(0, 12, 2)),
    "zigzag": (
        Positions((Segment(3, 3), Segment(18, 3))),
        Positions((Segment(0, 3), Segment(21, 3))),
    ),
    "index": (
        Positions.from_index(torch.tensor([23, 0, 7, 11, 12, 5, 4, 16])),
        Positions.from_index(torch.tensor([3, 5, 12, 11, 22, 0, 19, 9, 10])),
    ),
    "mixed": (Positions.from_index(torch.tensor([10, 2, 17])), Positions.strided(2, 6, 4)),
}


@pytest.mark.parametrize("pos_name", list(POSITIONS))
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_allowed_matches_brute_force(mask_name, pos_name):
    mask = MASKS[mask_name]
    q_pos, k_pos = POSITIONS[pos_name]
    qp, kp = _pos_list(q_pos), _pos_list(k_pos)
    got = mask.allowed(q_pos.materialize(), k_pos.materialize())
    assert got.dtype == torch.bool and got.shape == (len(qp), len(kp))
    assert torch.equal(got, brute_matrix(qp, kp, **brute_kwargs(mask)))


def test_allowed_explicit_small_cases():
    ar = torch.arange(5)
    assert Mask().allowed(ar, ar).all()
    assert torch.equal(Mask(causal=True).allowed(ar, ar), torch.ones(5, 5, dtype=torch.bool).tril())
    win = Mask(window=2).allowed(ar, ar)
    assert torch.equal(win, (ar[:, None] - ar[None, :]).abs() < 2)
    cw = Mask(causal=True, window=2).allowed(ar, ar)
    assert cw.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    docs = Mask(cu_seqlens=torch.tensor([0, 2, 2, 5])).allowed(ar, ar)
    assert docs.int().tolist() == [
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1],
    ]


def test_document_ids_with_empty_documents():
    m = Mask(cu_seqlens=CU)
    pos = torch.arange(S)
    expected = torch.tensor([_doc_of(CU.tolist(), p) for p in range(S)])
    assert torch.equal(m.document_ids(pos), expected)
    # empty documents 1 and 4 hold no token
    assert 1 not in expected.tolist() and 4 not in expected.tolist()


# ---------------------------------------------------------------------------------------------
# combining masks with &
# ---------------------------------------------------------------------------------------------
def test_and_fields():
    m = Mask(causal=True) & Mask(window=5)
    assert m.causal and m.window == 5
    assert (Mask(window=5) & Mask(window=3)).window == 3
    assert (Mask(window=3) & Mask(window=5)).window == 3
    assert (Mask(window=3) & Mask()).window == 3
    assert (Mask() & Mask(window=4, causal=True)).causal
    d = Mask(cu_seqlens=CU) & Mask(block_sparse=BS)
    assert torch.equal(d.cu_seqlens, CU) and d.block_sparse is BS
    d2 = Mask(block_sparse=BS) & Mask(cu_seqlens=CU)
    assert torch.equal(d2.cu_seqlens, CU) and d2.block_sparse is BS
    assert (Mask() & Mask()).is_full
    assert not (Mask() & Mask(causal=True)).is_full


def test_and_errors():
    with pytest.raises(ValueError, match="merge the cu_seqlens"):
        Mask(cu_seqlens=CU) & Mask(cu_seqlens=torch.tensor([0, 24]))
    with pytest.raises(ValueError, match="same block sizes"):  # blocks of 4 vs 3
        Mask(block_sparse=BS) & Mask(block_sparse=BS_TABLE)
    per_head = BlockSparse.from_table(4, torch.ones(3, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="3 and 2 head lists"):
        per_head & BlockSparse.from_table(4, torch.ones(2, 6, 6, dtype=torch.bool))


def test_and_of_two_block_sparse_masks_is_the_intersection():
    """Per head and query block, the key blocks both list (a head dim of 1 broadcasts); with
    the other conditions it is the conjunction of all of them, pair by pair."""
    from longctx.kernels.sparse_patterns import random_blocks, sliding_window_with_sinks

    gen = torch.Generator().manual_seed(0)
    picked = random_blocks(24, 3, block=4, heads=3, generator=gen)  # [1, 3, 6, 6]
    local = sliding_window_with_sinks(24, window=8, sinks=4, block=4)  # one list for all heads
    both = Mask(causal=True, block_sparse=picked) & Mask(block_sparse=local)
    assert both.block_sparse.shape == (1, 3, 6, 6)
    assert both.block_sparse.summary is not None  # both lists were on the CPU, summarized
    pos = torch.arange(24)
    for h in range(3):
        alone = [Mask(causal=True, block_sparse=picked), Mask(block_sparse=local)]
        want = torch.ones(24, 24, dtype=torch.bool)
        for m in alone:
            want &= m.select_heads(h, h + 1, 3).allowed(pos, pos)
        got = both.select_heads(h, h + 1, 3).allowed(pos, pos)
        assert torch.equal(got, want), h
    assert (local & local).to_table().equal(local.to_table())


_COMBINABLE = [
    Mask(),
    Mask(causal=True),
    Mask(window=2),
    Mask(window=6),
    Mask(causal=True, window=3),
    Mask(causal=True, window=9),
    Mask(cu_seqlens=CU),
    Mask(block_sparse=BS_TABLE),
    Mask(causal=True, block_sparse=BlockSparse.from_table(
        3, torch.tensor([[(i + 2 * j) % 3 != 1 for j in range(8)] for i in range(8)])
    )),
    Mask(cu_seqlens=CU, window=5),
]


@pytest.mark.parametrize("i,j", list(itertools.product(range(len(_COMBINABLE)), repeat=2)))
def test_and_is_elementwise_conjunction(i, j):
    a, b = _COMBINABLE[i], _COMBINABLE[j]
    if a.cu_seqlens is not None and b.cu_seqlens is not None:
        with pytest.raises(ValueError):
            a & b
        return
    qp = torch.tensor([0, 3, 4, 5, 9, 11, 12, 17, 23])
    kp = torch.arange(S)
    both = (a & b).allowed(qp, kp)
    assert torch.equal(both, a.allowed(qp, kp) & b.allowed(qp, kp))


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [0, -3])
def test_bad_window(window):
    with pytest.raises(ValueError, match=r"window must be >= 1"):
        Mask(window=window)


@pytest.mark.parametrize(
    "cu,match",
    [
        (torch.tensor([1, 4, 8]), "start at 0"),
        (torch.tensor([0, 5, 3, 8]), "non-decreasing"),
        (torch.tensor([0.0, 4.0, 8.0]), "integer tensor"),
        (torch.tensor([0]), "at least"),
        (torch.tensor([[0, 4, 8]]), "1-D"),
    ],
    ids=["not_zero", "decreasing", "float", "too_short", "two_d"],
)
def test_bad_cu_seqlens(cu, match):
    with pytest.raises(ValueError, match=match):
        Mask(cu_seqlens=cu)


def test_cu_seqlens_normalised_to_int64_cpu():
    m = Mask(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))
    assert m.cu_seqlens.dtype == torch.int64 and m.cu_seqlens.device.type == "cpu"


def test_validate_length_mismatch():
    m = Mask(cu_seqlens=torch.tensor([0, 4, 10]))
    m.validate(10)  # fine
    with pytest.raises(ValueError, match="last boundary must equal the global length") as e:
        m.validate(12)
    assert "10" in str(e.value) and "12" in str(e.value)
    assert "padding document" in str(e.value)


def test_validate_block_sparse_too_small():
    m = Mask(block_sparse=BlockSparse.from_table(4, torch.ones(3, 3, dtype=torch.bool)))
    m.validate(12)
    m.validate(9)
    with pytest.raises(ValueError, match="cover 3 query blocks of 4 tokens, fewer than the 4") as e:
        m.validate(13)
    assert "build the lists for 4 query blocks" in str(e.value)
    wide = Mask(block_sparse=BlockSparse.from_table(4, torch.ones(4, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="cover 2 key blocks"):
        wide.validate(16)
    Mask(causal=True, window=3).validate(5)  # nothing to check


# ---------------------------------------------------------------------------------------------
# block-level tests: conservative, and exact where the math allows
# ---------------------------------------------------------------------------------------------
def _random_cu(rng: random.Random, n: int) -> list[int]:
    cuts = sorted(rng.randint(0, n) for _ in range(rng.randint(0, 5)))
    return [0, *cuts, n]  # repeated cuts = zero-length documents


def _random_mask(rng: random.Random, n: int) -> Mask:
    kinds = rng.sample(["causal", "window", "docs", "bs"], rng.randint(1, 4))
    m = Mask()
    if "causal" in kinds:
        m = m & Mask(causal=True)
    if "window" in kinds:
        m = m & Mask(window=rng.randint(1, n), causal=rng.random() < 0.5)
    if "docs" in kinds:
        m = m & Mask(cu_seqlens=torch.tensor(_random_cu(rng, n)))
    if "bs" in kinds:
        b = rng.randint(1, 6)
        nb = -(-n // b)
        density = rng.choice([0.0, 0.1, 0.3, 0.7])
        table = torch.tensor([[rng.random() < density for _ in range(nb)] for _ in range(nb)])
        m = m & Mask(block_sparse=BlockSparse.from_table(b, table.view(nb, nb)))
    return m


def _random_positions(rng: random.Random, n: int, form: str) -> Positions:
    if form == "segment":
        start = rng.randint(0, n - 1)
        return Positions.contiguous(start, rng.randint(0, n - start))
    if form == "strided":
        stride = rng.randint(2, 5)
        start = rng.randint(0, n - 1)
        return Positions.strided(start, rng.randint(0, (n - 1 - start) // stride + 1), stride)
    if form == "index":
        k = rng.randint(0, n)
        return Positions.from_index(torch.tensor(rng.sample(range(n), k), dtype=torch.int64))
    assert form == "multi"
    segs = []
    for _ in range(rng.randint(1, 4)):
        stride = rng.randint(1, 3)
        start = rng.randint(0, n - 1)
        segs.append(Segment(start, rng.randint(0, min(4, (n - 1 - start) // stride + 1)), stride))
    return Positions(tuple(segs))


FORMS = ["segment", "strided", "index", "multi"]


@pytest.mark.parametrize("q_form,k_form", list(itertools.product(FORMS, FORMS)))
def test_any_allowed_is_conservative(q_form, k_form):
    rng = random.Random(f"{q_form}-{k_form}")
    n_true = n_false = 0
    for _ in range(150):
        n = rng.randint(6, 30)
        mask = _random_mask(rng, n)
        q, k = _random_positions(rng, n, q_form), _random_positions(rng, n, k_form)
        qp, kp = _pos_list(q), _pos_list(k)
        truth = brute_matrix(qp, kp, **brute_kwargs(mask))
        # element level agrees with brute force on every random case too
        assert torch.equal(mask.allowed(q.materialize(), k.materialize()), truth)
        got = mask.any_allowed(q, k)
        assert isinstance(got, bool)
        if bool(truth.any()):
            assert got, f"any_allowed False but pairs allowed: {mask} q={qp} k={kp}"
        n_true += bool(truth.any())
        n_false += not bool(truth.any())
        # every run pair is conservative as well
        for qlo, qhi in q.bounds():
            for klo, khi in k.bounds():
                sub = brute_matrix(
                    [p for p in qp if qlo <= p <= qhi],
                    [p for p in kp if klo <= p <= khi],
                    **brute_kwargs(mask),
                )
                if bool(sub.any()):
                    assert mask.interval_may_attend(qlo, qhi, klo, khi)
    assert n_true > 0 and n_false > 0  # the random cases exercise both outcomes


def _single_condition_masks(rng: random.Random, n: int) -> list[Mask]:
    b = rng.randint(1, 5)
    nb = -(-n // b)
    table = torch.tensor([[rng.random() < 0.3 for _ in range(nb)] for _ in range(nb)])
    return [
        Mask(causal=True),
        Mask(window=rng.randint(1, n)),
        Mask(window=rng.randint(1, n), causal=True),
        Mask(cu_seqlens=torch.tensor(_random_cu(rng, n))),
        Mask(block_sparse=BlockSparse.from_table(b, table.view(nb, nb))),
        Mask(),
    ]


def test_interval_may_attend_exact_for_single_conditions():
    """On contiguous intervals one condition alone is decided exactly, not just conservatively."""
    rng = random.Random(1234)
    for _ in range(150):
        n = rng.randint(4, 24)
        q_lo = rng.randint(0, n - 1)
        q_hi = rng.randint(q_lo, n - 1)
        k_lo = rng.randint(0, n - 1)
        k_hi = rng.randint(k_lo, n - 1)
        for mask in _single_condition_masks(rng, n):
            truth = brute_matrix(
                list(range(q_lo, q_hi + 1)), list(range(k_lo, k_hi + 1)), **brute_kwargs(mask)
            ).any()
            assert mask.interval_may_attend(q_lo, q_hi, k_lo, k_hi) == bool(truth), (
                mask,
                (q_lo, q_hi),
                (k_lo, k_hi),
            )
            assert mask.any_allowed(
                Positions.contiguous(q_lo, q_hi - q_lo + 1),
                Positions.contiguous(k_lo, k_hi - k_lo + 1),
            ) == bool(truth)


def test_any_allowed_clearly_empty_cases():
    q, k = Positions.contiguous(0, 8), Positions.contiguous(8, 8)
    assert not Mask(causal=True).any_allowed(q, k)  # every key after every query
    assert Mask(causal=True).any_allowed(k, q)
    # window far away (both directions when bidirectional)
    far_q, far_k = Positions.contiguous(100, 10), Positions.contiguous(0, 10)
    assert not Mask(window=50).any_allowed(far_q, far_k)
    assert not Mask(window=50).any_allowed(far_k, far_q)
    assert not Mask(window=50, causal=True).any_allowed(far_q, far_k)
    assert not Mask(window=91).any_allowed(far_q, far_k)  # closest pair is 100 - 9 = 91 apart
    assert Mask(window=92).any_allowed(far_q, far_k)
    assert not Mask(window=91, causal=True).any_allowed(far_q, far_k)
    assert Mask(window=92, causal=True).any_allowed(far_q, far_k)
    # disjoint documents
    docs = Mask(cu_seqlens=torch.tensor([0, 8, 8, 16]))
    assert not docs.any_allowed(q, k)
    assert not docs.any_allowed(k, q)
    assert docs.any_allowed(Positions.contiguous(7, 2), Positions.contiguous(0, 1))
    # block-sparse with an empty table / empty row
    empty = Mask(block_sparse=BlockSparse.from_table(4, torch.zeros(4, 4, dtype=torch.bool)))
    assert not empty.any_allowed(q, k)
    assert not empty.any_allowed(q, q)
    only_diag = Mask(block_sparse=BlockSparse.from_table(4, torch.eye(4, dtype=torch.bool)))
    assert not only_diag.any_allowed(Positions.contiguous(0, 4), Positions.contiguous(4, 12))
    assert only_diag.any_allowed(Positions.contiguous(0, 4), Positions.contiguous(3, 12))
    # empty shards
    assert not Mask().any_allowed(Positions(), k)
    assert not Mask().any_allowed(q, Positions.from_index(torch.empty(0, dtype=torch.int64)))
    assert not Mask(causal=True).any_allowed(Positions(), k)
    assert Mask().any_allowed(q, k)
    # strided and index forms
    assert not Mask(causal=True).any_allowed(Positions.strided(0, 4, 2), Positions.strided(7, 4, 3))
    assert not Mask(causal=True).any_allowed(
        Positions.from_index(torch.tensor([3, 0, 5])), Positions.from_index(torch.tensor([9, 6]))
    )
    # multi-segment: every pair of runs is empty (zigzag, rank 0 vs rank 1's second chunk)
    zz0 = Positions((Segment(0, 4), Segment(4, 0)))
    assert not Mask(causal=True).any_allowed(zz0, Positions((Segment(8, 4), Segment(12, 4))))


def test_any_allowed_many_runs_uses_hull_and_stays_conservative():
    # 70 x 70 run pairs > the per-run limit: the hulls are used
    q = Positions(tuple(Segment(100 + 2 * i, 1) for i in range(70)))
    k = Positions(tuple(Segment(2 * i, 1) for i in range(70)))
    assert Mask(causal=True).any_allowed(q, k)
    assert Mask(causal=True).any_allowed(k, q)  # hull overlaps (k=138 >= q=0 .. )
    far = Positions(tuple(Segment(1000 + i, 1) for i in range(70)))
    assert not Mask(causal=True).any_allowed(k, far)
    assert not Mask(window=10).any_allowed(far, k)
    rng = random.Random(7)
    for _ in range(5):
        n = 200
        q = Positions(tuple(Segment(rng.randint(0, n - 1), 1) for _ in range(80)))
        k = Positions(tuple(Segment(rng.randint(0, n - 1), 1) for _ in range(80)))
        m = _random_mask(rng, n)
        truth = m.allowed(q.materialize(), k.materialize()).any()
        if bool(truth):
            assert m.any_allowed(q, k)


def test_module_doctest():
    failures, _ = doctest.testmod(mask_module, verbose=False)
    assert failures == 0
