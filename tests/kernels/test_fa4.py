"""FlashAttention-4 behind the kernel contract: the mask mapping, dispatch and the kernel.

CPU: the pure mapping (global positions + mask -> FA4's window/varlen arguments) against
``Mask.allowed`` by brute force, the dispatch decisions (the availability and architecture seams
``fa4.fa4_available`` / ``fa4.device_arch`` replaced, shapes on the meta device), the errors that
name the extra.  GPU (``-m gpu``, needs flash-attn-4 on an sm90/sm100 GPU): the kernel against
the float32 reference in bf16, forward and every gradient, and the CP strategies over it.
"""

from __future__ import annotations

import random
import sys

import pytest
import torch

import longctx
from longctx.kernels import fa4
from longctx.kernels.base import get_kernel
from longctx.kernels.dispatch import FA4Auto, select_kernel
from longctx.kernels.fa4 import FA4Call, FA4Split, FlashAttention4, plan_call
from longctx.kernels.mask import BlockSparse, Mask, Positions, Segment
from longctx.parallel.context import all_positions
from longctx.parallel.layout import Layout
from longctx.parallel.plan import plan_calls


def _check_mapping(mask: Mask, q_pos: Positions, k_pos: Positions) -> FA4Call | str:
    """The pairs FA4 computes with the planned arguments are exactly the mask's allowed pairs."""
    plan = plan_call(mask, q_pos, k_pos)
    if isinstance(plan, str):
        return plan
    want = mask.allowed(q_pos.materialize(), k_pos.materialize())
    got = plan.allowed(len(q_pos), len(k_pos))
    assert torch.equal(got, want), (mask, q_pos, k_pos, plan)
    calls = plan.parts if isinstance(plan, FA4Split) else (plan,)
    for call in calls:
        assert call.window_left is None or call.window_left >= 0, plan  # FA4: < 0 is "none"
        assert call.window_right is None or call.window_right >= 0, plan
        if call.varlen:  # the entries cover the call's rows and keys
            cu_q, cu_k = call.cu_seqlens()
            assert (cu_q[-1], cu_k[-1]) == (call.rows[1] - call.rows[0],
                                            call.cols[1] - call.cols[0]), plan
    assert all(a.rows[1] <= b.rows[0] for a, b in zip(calls, calls[1:])), plan  # disjoint rows
    return plan


# -- the mapping, against brute force --------------------------------------------------------------
def _random_case(rng: random.Random):
    S = rng.randint(1, 70)
    docs = None
    if rng.random() < 0.5:
        cuts = sorted(rng.sample(range(1, S), min(S - 1, rng.randint(0, 7)))) if S > 1 else []
        docs = torch.tensor([0, *cuts, S] + ([S] if rng.random() < 0.2 else []))
    mask = Mask(causal=rng.random() < 0.7, window=rng.choice([None, None, 1, 2, 3, 7, 16]),
                cu_seqlens=docs)

    def run():
        stride = rng.choice([1, 1, 1, 2, 3, 4])
        n = rng.randint(0, 24)
        start = rng.randint(0, S - 1)
        n = min(n, (S - 1 - start) // stride + 1)
        return Positions.strided(start, n, stride)

    q_pos = run()
    k_pos = q_pos if rng.random() < 0.3 else run()
    return mask, q_pos, k_pos


def test_mapping_matches_mask_on_random_positions():
    rng = random.Random(0)
    mapped = varlen = cropped = split = 0
    for _ in range(1500):
        mask, q_pos, k_pos = _random_case(rng)
        plan = _check_mapping(mask, q_pos, k_pos)
        if isinstance(plan, str):
            continue
        mapped += 1
        if isinstance(plan, FA4Split):
            split += 1
            continue
        varlen += plan.varlen
        cropped += not plan.varlen and not plan.empty and (
            plan.rows != (0, len(q_pos)) or plan.cols != (0, len(k_pos)))
    # the sample exercises every form: most cases map, many of them varlen, cropped or split
    assert mapped > 1000 and varlen > 100 and cropped > 150 and split > 5, (
        mapped, varlen, cropped, split)


# the CP layouts' calls: every (query shard, key shard) pair of a ring, all-gathered keys, Ulysses
def _docs(S: int, *cuts: int) -> torch.Tensor:
    return torch.tensor(sorted({0, S, *(c for c in cuts if c < S)}))


MASKS = {
    "causal": lambda S, n: Mask(causal=True),
    "window": lambda S, n: Mask(causal=True, window=n + n // 2),
    "short-window": lambda S, n: Mask(causal=True, window=3),
    "window-bidir": lambda S, n: Mask(window=n // 2 + 1),
    "documents": lambda S, n: Mask(causal=True, cu_seqlens=_docs(S, 3, n + 1, 2 * n)),
    "docs-window": lambda S, n: Mask(causal=True, window=5, cu_seqlens=_docs(S, n + 2)),
    "docs-only": lambda S, n: Mask(cu_seqlens=_docs(S, 5, n + 3)),
}


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_mapping_on_every_cp_call(layout, world, mask_name):
    """Each call a strategy makes maps exactly -- or FA4 refuses the diagonal calls already, which
    is what a strategy checks before it starts (so kernel='fa4' never fails mid-ring)."""
    n = 8
    S = n * 2 * world if layout == "zigzag" else n * world
    mask = MASKS[mask_name](S, n)
    positions = all_positions(Layout.parse(layout), S, world)
    q = torch.empty(1, n, 2, 64, dtype=torch.bfloat16, device="meta")
    pairs = [(q_pos, k_pos) for q_pos in positions for k_pos in positions]
    pairs.append((Positions.contiguous(0, S), Positions.contiguous(0, S)))  # Ulysses
    if layout == "contiguous":  # all-gather: a shard against every key
        pairs += [(p, Positions.cat(list(positions))) for p in positions]
    calls = [
        (q_pos.slice(c.q_begin, c.q_end), k_pos.slice(c.k_begin, c.k_end), q_pos is k_pos)
        for q_pos, k_pos in pairs
        for c in plan_calls(mask, q_pos, k_pos)
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fa4, "fa4_available", lambda: True)
        mp.setattr(fa4, "device_arch", lambda device: 9)
        diagonal_ok = all(
            FlashAttention4.unsupported_reason(q, mask, qp, kp) is None
            for qp, kp, diag in calls if diag
        )
        for qp, kp, _ in calls:
            plan = _check_mapping(mask, qp, kp)
            if diagonal_ok:
                assert not isinstance(plan, str), (qp, kp, plan)
    # striped documents are the one case refused up front; everything else runs
    assert diagonal_ok == (not (layout == "striped" and world > 1 and mask_name.startswith("doc")
                                and mask_name != "docs-only"))


def test_mapping_forms():
    """The documented forms: FA4's causal, a cropped window step, striped offsets, documents."""
    diag = Positions.contiguous(1024, 4096)
    p = _check_mapping(Mask(causal=True), diag, diag)
    assert p.causal and not p.varlen and (p.rows, p.cols) == ((0, 4096), (0, 4096))
    p = _check_mapping(Mask(causal=True, window=256), diag, diag)
    assert (p.window_left, p.window_right) == (255, 0)
    p = _check_mapping(Mask(causal=True), Positions.contiguous(64, 32), Positions.contiguous(0, 32))
    assert (p.window_left, p.window_right, p.rows, p.cols) == (None, None, (0, 32), (0, 32))
    assert _check_mapping(Mask(causal=True), Positions.contiguous(0, 32),
                          Positions.contiguous(32, 32)).empty
    # the ring step of a window onto the previous shard: cropped, key j >= query i
    p = _check_mapping(Mask(causal=True, window=100), Positions.contiguous(512, 512),
                       Positions.contiguous(0, 512))
    assert (p.rows, p.cols, p.window_left, p.window_right) == ((0, 99), (413, 512), 0, None)
    # striped, keys of a later rank: FA4's causal on queries 1.. and keys ..-1
    p = _check_mapping(Mask(causal=True), Positions.strided(1, 16, 4), Positions.strided(3, 16, 4))
    assert p.causal and (p.rows, p.cols) == ((1, 16), (0, 15))
    # documents on the diagonal: one varlen entry per document, FA4's causal in each
    cu = torch.tensor([0, 10, 30, 31, 64])
    p = _check_mapping(Mask(causal=True, cu_seqlens=cu), Positions.contiguous(0, 64),
                       Positions.contiguous(0, 64))
    assert p.causal and p.seqlens == ((10, 10), (20, 20), (1, 1), (33, 33))
    # documents, keys of the previous shard: only the document across the boundary remains
    p = _check_mapping(Mask(causal=True, cu_seqlens=cu), Positions.contiguous(32, 32),
                       Positions.contiguous(0, 32))
    assert not p.varlen and (p.rows, p.cols, p.window_right) == ((0, 32), (31, 32), None)


@pytest.mark.parametrize(
    "mask, q_pos, k_pos, reason",
    [
        (Mask(causal=True), Positions.from_index(torch.arange(8)), Positions.contiguous(0, 8),
         "index positions"),
        (Mask(causal=True), Positions((Segment(0, 4), Segment(8, 4))), Positions.contiguous(0, 8),
         "several runs"),
        (Mask(block_sparse=BlockSparse.from_table(4, torch.ones(2, 2, dtype=torch.bool))),
         Positions.contiguous(0, 8), Positions.contiguous(0, 8), "block-sparse"),
        (Mask(causal=True), Positions.strided(0, 8, 2), Positions.contiguous(4, 8),
         "different strides"),
        (Mask(window=2, cu_seqlens=torch.tensor([0, 6, 11, 13])), Positions.contiguous(4, 5),
         Positions.contiguous(2, 8), "different FA4 windows"),
    ],
)
def test_mapping_refusals(mask, q_pos, k_pos, reason):
    assert reason in _check_mapping(mask, q_pos, k_pos)


def test_split_at_the_key_run():
    """A zigzag rank's two adjacent chunks against the first: a diagonal part and a part whose
    queries follow every key (one FA4 call each, on disjoint rows)."""
    mask = Mask(causal=True, cu_seqlens=torch.tensor([0, 3, 9, 16]))
    p = _check_mapping(mask, Positions.contiguous(0, 16), Positions.contiguous(0, 8))
    assert isinstance(p, FA4Split) and [c.rows for c in p.parts] == [(0, 8), (8, 9)]
    assert p.parts[0].causal and p.parts[1].cols == (3, 8) and p.parts[1].window_right is None


def test_different_strides_that_decide_nothing_still_map():
    q_pos, k_pos = Positions.strided(100, 8, 2), Positions.strided(0, 10, 3)  # keys before queries
    assert not _check_mapping(Mask(causal=True), q_pos, k_pos).empty
    assert _check_mapping(Mask(causal=True), k_pos, q_pos).empty


# -- dispatch (no GPU: meta tensors, the seams replaced) -------------------------------------------
@pytest.fixture
def fa4_on_hopper(monkeypatch):
    monkeypatch.setattr(fa4, "fa4_available", lambda: True)
    monkeypatch.setattr(fa4, "device_arch", lambda device: 9)


def _q(S=32768, H=16, D=128, dtype=torch.bfloat16):
    return torch.empty(1, S, H, D, dtype=dtype, device="meta")


@pytest.mark.parametrize(
    "mask, S, D, kv_heads",
    [
        (Mask(causal=True), 32768, 128, None),
        (Mask(causal=True), 131072, 64, None),
        (Mask(causal=True), 32768, 128, 8),  # GQA 32/8 below (H=32)
        (Mask(causal=True, window=4096), 131072, 128, None),
        (Mask(causal=True, cu_seqlens=torch.tensor([0, 512, 17000, 131072])), 131072, 128, None),
    ],
)
def test_auto_picks_fa4_on_the_measured_cases(fa4_on_hopper, mask, S, D, kv_heads):
    q = _q(S, 32 if kv_heads else 16, D)
    kernel, why = select_kernel(q, mask, kv_heads=kv_heads, explain=True)
    assert kernel.name == "fa4" and why.startswith("fa4:") and "issue 23" in why, why


@pytest.mark.parametrize(
    "q, mask, q_pos, k_pos, why_not",
    [
        (_q(4096), Mask(causal=True), None, None, "from 32768 queries"),
        (_q(dtype=torch.float16), Mask(causal=True), None, None, "bfloat16"),
        (_q(D=96), Mask(causal=True), None, None, "head dims"),
        (_q(), Mask(), None, None, "not causal"),
        (_q(dtype=torch.float32), Mask(causal=True), None, None, "float16/bfloat16"),
        (_q(D=100), Mask(causal=True), None, None, "head_dim 100"),
        (_q(), Mask(causal=True), Positions.from_index(torch.arange(32768)), None, "index"),
        (_q(), Mask(causal=True, cu_seqlens=torch.tensor([0, 40000, 131072])),
         Positions.strided(1, 32768, 4), Positions.strided(1, 32768, 4), "strided"),
    ],
)
def test_auto_passes_fa4_over_outside_the_measurements(fa4_on_hopper, q, mask, q_pos, k_pos,
                                                         why_not):
    k_pos = k_pos or Positions.contiguous(0, q.shape[1])
    kernel, why = select_kernel(q, mask, q_pos, k_pos, explain=True)
    assert kernel.name != "fa4", why
    from longctx.kernels import dispatch

    call = dispatch.Call(q, mask, q_pos or Positions.contiguous(0, q.shape[1]), k_pos, None, False)
    reason = dispatch._fa4_cannot(call) or dispatch._fa4_passed_over(call)
    assert why_not in reason, reason


def test_auto_skips_fa4_on_other_gpus_and_without_the_package(monkeypatch):
    monkeypatch.setattr(fa4, "fa4_available", lambda: True)
    monkeypatch.setattr(fa4, "device_arch", lambda device: 8)
    assert "sm90" in FlashAttention4.unsupported_reason(_q(), Mask(causal=True))
    assert select_kernel(_q(), Mask(causal=True)).name != "fa4"
    monkeypatch.setattr(fa4, "fa4_available", lambda: False)
    monkeypatch.setattr(fa4, "device_arch", lambda device: 9)
    assert "not installed" in FlashAttention4.unsupported_reason(_q(), Mask(causal=True))
    assert select_kernel(_q(), Mask(causal=True)).name != "fa4"


def test_prefer_fa4(fa4_on_hopper):
    kernel, why = select_kernel(_q(1024), Mask(), prefer="fa4", explain=True)  # outside auto's set
    assert isinstance(kernel, FlashAttention4) and "requested" in why
    with pytest.raises(ValueError, match="fa4.*block-sparse"):
        bs = BlockSparse.from_table(128, torch.ones(8, 8, dtype=torch.bool))
        select_kernel(_q(1024), Mask(block_sparse=bs), prefer="fa4")


def test_fa4_auto_envelope_is_data():
    wide = FA4Auto(min_queries=1, head_dims=(64, 96, 128))
    assert wide.passed_over(torch.bfloat16, 96, 8, causal=True, kind="window") is None
    assert "not causal" in wide.passed_over(torch.bfloat16, 96, 8, causal=False, kind="full")


def test_missing_package_errors_name_the_extra(monkeypatch):
    monkeypatch.setattr(fa4, "fa4_available", lambda: False)
    with pytest.raises(ImportError, match=r'pip install "longctx\[fa4\]"'):
        get_kernel("fa4")
    with pytest.raises(ValueError, match=r'fa4.*pip install "longctx\[fa4\]"'):
        select_kernel(torch.randn(1, 8, 2, 64), Mask(causal=True), prefer="fa4")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ImportError, match=r"longctx\[fa4\]"):
        longctx.attention(q, q, q, mask=Mask(causal=True), kernel="fa4")


def test_import_longctx_does_not_import_flash_attn():
    assert "longctx.kernels.fa4" in sys.modules
    assert "flash_attn" not in sys.modules and "flash_attn.cute" not in sys.modules


# -- the kernel's plumbing on CPU, FA4 replaced by its math in torch -------------------------------
class FakeFA4:
    """FA4's two entry points in float64 torch: its mask rule (:meth:`FA4Call.allowed`), its
    shapes (varlen: ``[total, H, D]``, LSE ``[H, total]``) and its backward from a given
    ``out``/``lse``; checks the arguments the kernel passes."""

    def __init__(self):
        self.calls: list[dict] = []

    def _allowed(self, nq, nk, kw):
        assert kw.pop("causal") is False  # the kernel always states the band
        wl, wr = kw.pop("window_size_left"), kw.pop("window_size_right")
        assert (wl is None or wl >= 0) and (wr is None or wr >= 0)
        self.calls.append(dict(kw, window=(wl, wr), shape=(nq, nk)))
        if kw.get("cu_seqlens_q") is None:
            return FA4Call(wl, wr, (0, nq), (0, nk)).allowed(nq, nk)
        cq, ck = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()
        assert kw["cu_seqlens_q"].dtype == torch.int32 and (cq[-1], ck[-1]) == (nq, nk)
        entries = tuple((cq[i + 1] - cq[i], ck[i + 1] - ck[i]) for i in range(len(cq) - 1))
        assert (kw["max_seqlen_q"], kw["max_seqlen_k"]) == (max(e[0] for e in entries),
                                                              max(e[1] for e in entries))
        return FA4Call(wl, wr, (0, nq), (0, nk), entries).allowed(nq, nk)

    @staticmethod
    def _probs(q, k, ok, scale, lse=None):
        """``q [B, Sq, H, D]``, ``k [B, Sk, Hkv, D]`` -> probabilities ``[B, H, Sq, Sk]``, lse."""
        k = k.double().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) * scale
        s = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(s, -1) if lse is None else lse.double()
        p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
        return p.masked_fill(~ok, 0.0), lse

    def _flash_attn_fwd(self, q, k, v, *, softmax_scale, return_lse, **kw):
        assert return_lse and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        varlen = q.dim() == 3
        q4, k4, v4 = (t.unsqueeze(0) if varlen else t for t in (q, k, v))
        p, lse = self._probs(q4, k4, self._allowed(q4.shape[1], k4.shape[1], kw), softmax_scale)
        vx = v4.double().repeat_interleave(q4.shape[2] // v4.shape[2], dim=2)
        out = torch.einsum("bhqk,bkhd->bqhd", p, vx).to(q.dtype)
        lse = lse.float()
        res = (out[0], lse[0]) if varlen else (out, lse)
        return (*res, None, None, None)  # FA4's 5-tuple

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, *, softmax_scale, **kw):
        varlen = q.dim() == 3
        q4, k4, v4, o4, do4 = (t.unsqueeze(0) if varlen else t for t in (q, k, v, out, dout))
        lse = lse.unsqueeze(0) if varlen else lse
        g = q4.shape[2] // k4.shape[2]
        p, _ = self._probs(q4, k4, self._allowed(q4.shape[1], k4.shape[1], kw), softmax_scale,
                           lse)
        kx, vx = (t.double().repeat_interleave(g, dim=2) for t in (k4, v4))
        do, o = do4.double(), o4.double()
        dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
        dp = torch.einsum("bqhd,bkhd->bhqk", do, vx)
        ds = p * (dp - (do * o).sum(-1).transpose(1, 2)[..., None]) * softmax_scale
        dq = torch.einsum("bhqk,bkhd->bqhd", ds, kx)
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, q4.double())
        B, Sk, Hkv, D = k4.shape
        dk, dv = (t.view(B, Sk, Hkv, g, D).sum(3) for t in (dk, dv))  # GQA: sum each group
        grads = [t.to(q.dtype) for t in (dq, dk, dv)]
        return tuple(t[0] for t in grads) if varlen else tuple(grads)


CPU_CASES = [
    # (id, B, H, Hkv, mask, q_pos, k_pos)
    ("causal-gqa", 2, 4, 2, Mask(causal=True), Positions.contiguous(0, 40),
     Positions.contiguous(0, 40)),
    ("full-rect", 1, 2, 2, Mask(), Positions.contiguous(0, 24), Positions.contiguous(0, 30)),
    ("window-previous", 1, 4, 1, Mask(causal=True, window=9), Positions.contiguous(32, 32),
     Positions.contiguous(0, 32)),
    ("striped-later", 2, 2, 2, Mask(causal=True), Positions.strided(0, 16, 4),
     Positions.strided(3, 16, 4)),
    ("docs-b2", 2, 4, 2, Mask(causal=True, window=6, cu_seqlens=torch.tensor([0, 7, 8, 30, 48])),
     Positions.contiguous(0, 48), Positions.contiguous(0, 48)),
    ("docs-split", 2, 2, 1, Mask(causal=True, cu_seqlens=torch.tensor([0, 3, 20, 32])),
     Positions.contiguous(0, 32), Positions.contiguous(0, 16)),
    ("docs-previous", 1, 2, 2, Mask(causal=True, cu_seqlens=torch.tensor([0, 5, 40, 64])),
     Positions.contiguous(32, 32), Positions.contiguous(0, 32)),
    ("empty", 1, 2, 2, Mask(causal=True), Positions.contiguous(0, 8), Positions.contiguous(8, 8)),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_kernel_plumbing_with_fa4_math(monkeypatch, fa4_on_hopper, case):
    """Slicing, flattening, LSE layouts, split calls and gradient sums around FA4, against the
    reference; FA4 itself replaced by :class:`FakeFA4` (the GPU tests run the real one)."""
    from longctx.kernels.reference import TorchReference

    fake = FakeFA4()
    monkeypatch.setattr(fa4, "_interface", lambda: fake)
    _, B, H, Hkv, mask, q_pos, k_pos = case
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    Sq, Sk, D = len(q_pos), len(k_pos), 16
    q, k, v, dout = rnd(B, Sq, H, D), rnd(B, Sk, Hkv, D), rnd(B, Sk, Hkv, D), rnd(B, Sq, H, D)
    kw = dict(scale=0.3, mask=mask, q_pos=q_pos, k_pos=k_pos)
    kern = FlashAttention4()
    out, lse = kern.forward(q, k, v, **kw)
    grads = kern.backward(dout, q, k, v, out, lse, **kw)
    ref = TorchReference()
    r_out, r_lse = ref.forward(*(t.double() for t in (q, k, v)), **kw)
    r_grads = ref.backward(*(t.double() for t in (dout, q, k, v)), r_out, r_lse, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (B, H, Sq)
    assert lse.dtype == torch.float32 and lse.is_contiguous()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))
    torch.testing.assert_close(lse.double(), r_lse, atol=1e-5, rtol=0, equal_nan=False)
    torch.testing.assert_close(out.double(), r_out, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, r_grads):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)
    assert (len(fake.calls) > 0) == (case[0] != "empty")
    native = kern.backward(dout, q, k, v, out, lse, **kw, grad_dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in native)


# -- GPU: the kernel itself ------------------------------------------------------------------------
def _fa4_runs() -> bool:
    return (torch.cuda.is_available() and fa4.fa4_available()
            and fa4.device_arch(torch.device("cuda")) in (9, 10))


needs_fa4 = pytest.mark.skipif(not _fa4_runs(), reason="needs flash-attn-4 on an sm90/sm100 GPU")

DOCS = torch.tensor([0, 700, 701, 2500, 3000, 4096])
GPU_CASES = [
    # (id, B, H, Hkv, D, mask, (q start, n, stride), (k start, n, stride))
    ("full", 1, 8, 8, 128, Mask(), (0, 2048, 1), (0, 3000, 1)),
    ("causal", 1, 8, 8, 128, Mask(causal=True), (0, 4096, 1), (0, 4096, 1)),
    ("causal-gqa-d64-b2", 2, 8, 2, 64, Mask(causal=True), (0, 3001, 1), (0, 3001, 1)),
    ("causal-previous-shard", 1, 8, 2, 128, Mask(causal=True), (2048, 2048, 1), (0, 2048, 1)),
    ("causal-next-shard", 1, 8, 2, 128, Mask(causal=True), (0, 2048, 1), (2048, 2048, 1)),
    ("causal-overlap", 1, 8, 8, 128, Mask(causal=True), (1000, 2048, 1), (0, 4096, 1)),
    ("striped-later", 1, 8, 2, 128, Mask(causal=True), (0, 1024, 4), (3, 1024, 4)),
    ("striped-earlier", 1, 8, 2, 64, Mask(causal=True), (2, 1024, 4), (1, 1024, 4)),
    ("window", 1, 8, 8, 128, Mask(causal=True, window=1000), (0, 4096, 1), (0, 4096, 1)),
    ("window-previous-shard", 1, 8, 2, 128, Mask(causal=True, window=1000), (2048, 2048, 1),
     (0, 2048, 1)),
    ("window-bidir", 1, 8, 8, 64, Mask(window=300), (0, 2048, 1), (0, 2048, 1)),
    ("docs", 1, 8, 2, 128, Mask(causal=True, cu_seqlens=DOCS), (0, 4096, 1), (0, 4096, 1)),
    ("docs-b2-window", 2, 8, 8, 64, Mask(causal=True, window=400, cu_seqlens=DOCS),
     (0, 4096, 1), (0, 4096, 1)),
    ("docs-previous-shard", 1, 8, 2, 128, Mask(causal=True, cu_seqlens=DOCS), (2048, 2048, 1),
     (0, 2048, 1)),
    ("docs-window-previous", 1, 8, 8, 128, Mask(causal=True, window=600, cu_seqlens=DOCS),
     (2048, 2048, 1), (0, 2048, 1)),
]


def _rel(a, b):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    return float((a[finite] - b[finite]).norm() / b[finite].norm().clamp_min(1e-12))


def _grads(kernel, q, k, v, dout, mask, q_pos, k_pos, scale):
    out, lse = kernel.forward(q, k, v, scale=scale, mask=mask, q_pos=q_pos, k_pos=k_pos)
    grads = kernel.backward(dout, q, k, v, out, lse, scale=scale, mask=mask, q_pos=q_pos,
                            k_pos=k_pos)
    return (out, lse, *grads)


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_fa4_matches_reference_bf16(case):
    from longctx.kernels.reference import TorchReference
    from longctx.kernels.vendor import VendorSDPA

    _, B, H, Hkv, D, mask, (qs, nq, sq), (ks, nk, sk) = case
    q_pos, k_pos = Positions.strided(qs, nq, sq), Positions.strided(ks, nk, sk)
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v, dout = rnd(B, nq, H, D), rnd(B, nk, Hkv, D), rnd(B, nk, Hkv, D), rnd(B, nq, H, D)
    scale = D**-0.5
    ref = _grads(TorchReference(), *(t.float() for t in (q, k, v, dout)), mask, q_pos, k_pos,
                 scale)
    got = _grads(FlashAttention4(), q, k, v, dout, mask, q_pos, k_pos, scale)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1]))  # empty rows agree
    assert not any(torch.isnan(t).any() for t in got)
    # yardstick: cuDNN's own bf16 error on the causal diagonal of the same size
    n = min(nq, nk)
    diag = Positions.contiguous(0, n)
    yard_in = (q[:, :n], k[:, :n], v[:, :n], dout[:, :n])
    yard_ref = _grads(TorchReference(), *(t.float() for t in yard_in), Mask(causal=True), diag,
                      diag, scale)
    yard = _grads(VendorSDPA("cudnn"), *yard_in, Mask(causal=True), diag, diag, scale)
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        err, own = _rel(got[i], ref[i]), _rel(yard[i], yard_ref[i])
        assert err <= 2 * own + 1e-3, (name, err, own)


STRATEGIES = ["ring", "zigzag", "striped", "allgather", "ulysses"]


@pytest.fixture(scope="module")
def one_gpu_group():
    from longctx.testing import SimulatedMesh

    with SimulatedMesh(1, backend="nccl") as mesh:
        yield mesh


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("mask", ["causal", "window", "documents", "full"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gpu_cp_strategies_over_fa4(one_gpu_group, strategy, mask):
    from longctx.testing import CPCase, errors_against_reference, run_cp_case_on_rank

    layout = {"zigzag": "zigzag", "striped": "striped"}.get(strategy, "contiguous")
    cases = {
        kernel: CPCase(strategy, layout, mask, world_size=1, batch=1, tokens_per_rank=2048,
                       heads=8, kv_heads=2, head_dim=128, dtype="bfloat16", kernel=kernel,
                       device="cuda")
        for kernel in ("fa4", "triton")
    }
    errs = {
        kernel: errors_against_reference(
            case, one_gpu_group.run(run_cp_case_on_rank, case), "rel_l2")
        for kernel, case in cases.items()
    }
    for name in ("out", "dq", "dk", "dv"):
        assert errs["fa4"][name] <= 2 * errs["triton"][name] + 1e-3, (name, errs)
    assert errs["fa4"]["lse"] < 1e-3, errs
