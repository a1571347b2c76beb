"""The torch reference kernel against a naive float64 attention (full score matrix, expanded K/V,
autograd), the LSE merge, dtypes, and the input checks of the local kernel contract."""

from __future__ import annotations

import doctest
import zlib

import pytest
import torch

import longctx.kernels.merge as merge_module
import longctx.kernels.reference as reference_module
from longctx.kernels import (
    AttentionKernel,
    BlockSparse,
    Mask,
    Positions,
    ReferenceConfig,
    Segment,
    TorchReference,
    available_kernels,
    check_qkv,
    get_kernel,
    merge_into,
    merge_partials,
)

ATOL = 1e-12
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# naive float64 attention
# ---------------------------------------------------------------------------------------------
def naive_attention(q, k, v, dout, *, scale, allowed):
    """Full ``[Sq, Sk]`` scores, K/V expanded per query head, gradients by autograd.

    Rows with no allowed key give out 0 and lse -inf, and no NaN in any gradient.
    Returns ``out, lse, dq, dk, dv`` (float64).
    """
    q, k, v = (t.detach().to(torch.float64).clone().requires_grad_(True) for t in (q, k, v))
    G = q.shape[2] // k.shape[2]
    ke, ve = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, ke) * scale
    s = s.masked_fill(~allowed, NEG_INF)
    lse = torch.logsumexp(s.detach(), dim=-1)  # [B, H, Sq]
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den == 0, torch.ones_like(den), den)
    out = torch.einsum("bhqk,bkhd->bqhd", p, ve)
    (out * dout.to(torch.float64)).sum().backward()
    return out.detach(), lse, q.grad, k.grad, v.grad


def _inputs(B, Sq, Sk, H, Hkv, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Sk, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Sk, Hkv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, Sq, H, D, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v, dout))


def _close(actual, expected, atol=ATOL, what=""):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), rtol=0, atol=atol, msg=what
    )


# ---------------------------------------------------------------------------------------------
# cases: (mask, q positions, k positions)
# ---------------------------------------------------------------------------------------------
S = 13  # odd length
CU = torch.tensor([0, 4, 4, 9, 13])  # zero-length second document
BS = BlockSparse.from_indices(4, torch.tensor([[0, -1], [-1, -1], [2, 0], [3, 1]]))  # block 1 empty
BS_TABLE = BlockSparse.from_table(
    3, torch.tensor([[(i + 2 * j) % 3 != 1 for j in range(5)] for i in range(5)])
)
ALL = Positions.contiguous(0, S)


def _perm(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


CASES = {
    "full": (Mask(), ALL, ALL),
    "causal": (Mask(causal=True), ALL, ALL),
    "causal_window": (Mask(causal=True, window=4), ALL, ALL),
    "bidir_window": (Mask(window=3), ALL, ALL),
    "documents": (Mask(cu_seqlens=CU), ALL, ALL),
    "documents_causal": (Mask(cu_seqlens=CU, causal=True), ALL, ALL),
    "block_sparse_indices": (Mask(block_sparse=BS), ALL, ALL),
    "block_sparse_table_causal_window": (
        Mask(block_sparse=BS_TABLE) & Mask(causal=True) & Mask(window=5),
        ALL,
        ALL,
    ),
    "all_combined": (
        Mask(causal=True, window=6) & Mask(cu_seqlens=CU) & Mask(block_sparse=BS),
        ALL,
        ALL,
    ),
    # a ring step: local queries 20..29 against a remote key shard 0..19
    "ring_step_causal": (
        Mask(causal=True),
        Positions.contiguous(20, 10),
        Positions.contiguous(0, 20),
    ),
    "ring_step_window": (
        Mask(causal=True, window=8),
        Positions.contiguous(20, 10),
        Positions.contiguous(0, 20),
    ),
    "keys_in_future": (
        Mask(causal=True),
        Positions.contiguous(0, 10),
        Positions.contiguous(10, 20),
    ),
    "some_rows_empty": (Mask(causal=True), Positions.contiguous(0, 9), Positions.contiguous(5, 11)),
    "strided": (Mask(causal=True), Positions.strided(1, 7, 2), Positions.strided(0, 9, 2)),
    "zigzag": (
        Mask(causal=True),
        Positions((Segment(3, 3), Segment(12, 3))),  # P=3, c=3, rank 1
        Positions((Segment(0, 3), Segment(15, 3))),  # rank 0's keys
    ),
    "index_docs_causal": (
        Mask(cu_seqlens=CU, causal=True),
        Positions.from_index(_perm(S, 1)),
        Positions.from_index(_perm(S, 2)[:11]),
    ),
}
HEADS = {"gqa_4_2": (4, 2), "mqa_4_1": (4, 1), "mha_2_2": (2, 2)}
CONFIGS = {"default": ReferenceConfig(), "odd_5x3": ReferenceConfig(block_q=5, block_k=3)}


def _allowed(mask, q_pos, k_pos):
    return mask.allowed(q_pos.materialize(), k_pos.materialize())


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_naive(case, heads, config):
    mask, q_pos, k_pos = CASES[case]
    H, Hkv = HEADS[heads]
    kern = TorchReference(CONFIGS[config])
    scale = 0.37
    seed = zlib.crc32(case.encode()) % 1000
    q, k, v, dout = _inputs(2, len(q_pos), len(k_pos), H, Hkv, 6, seed=seed)
    ok = _allowed(mask, q_pos, k_pos)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = naive_attention(
        q, k, v, dout, scale=scale, allowed=ok
    )

    out, lse = kern.forward(q, k, v, scale=scale, mask=mask, q_pos=q_pos, k_pos=k_pos)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert lse.shape == (2, H, len(q_pos))
    _close(out, ref_out, what="out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    _close(torch.where(finite, lse, 0.0), torch.where(finite, ref_lse, 0.0), what="lse")

    empty_rows = ~ok.any(-1)  # [Sq]
    if case in ("keys_in_future", "some_rows_empty", "block_sparse_indices", "all_combined"):
        assert empty_rows.any()  # the case really exercises rows with no allowed key
    if empty_rows.any():
        assert (out[:, empty_rows] == 0).all()
        assert torch.isneginf(lse[:, :, empty_rows]).all()

    dq, dk, dv = kern.backward(
        dout, q, k, v, out, lse, scale=scale, mask=mask, q_pos=q_pos, k_pos=k_pos
    )
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for name, got, ref in (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        assert got.dtype == torch.float64
        assert torch.isfinite(got).all(), f"{name} not finite"
        _close(got, ref, what=name)
    if empty_rows.any():
        assert (dq[:, empty_rows] == 0).all()


def test_fully_masked_call_gives_zeros_and_no_nan():
    mask, q_pos, k_pos = CASES["keys_in_future"]
    q, k, v, dout = _inputs(1, len(q_pos), len(k_pos), 4, 2, 8)
    kern = TorchReference(ReferenceConfig(block_q=4, block_k=7))
    out, lse = kern.forward(q, k, v, scale=0.5, mask=mask, q_pos=q_pos, k_pos=k_pos)
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = kern.backward(dout, q, k, v, out, lse, scale=0.5, mask=mask, q_pos=q_pos, k_pos=k_pos)
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()


def test_zero_length_keys():
    q, _, _, dout = _inputs(1, 5, 3, 2, 1, 4)
    k = v = torch.zeros(1, 0, 1, 4, dtype=torch.float64)
    kern = TorchReference()
    out, lse = kern.forward(q, k, v, scale=1.0, mask=Mask(causal=True))
    assert out.shape == q.shape and (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = kern.backward(dout, q, k, v, out, lse, scale=1.0, mask=Mask(causal=True))
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


def test_default_positions_are_contiguous_from_zero():
    q, k, v, _ = _inputs(1, 7, 7, 2, 2, 4)
    kern = TorchReference(ReferenceConfig(2, 3))
    a = kern.forward(q, k, v, scale=0.3, mask=Mask(causal=True))
    b = kern.forward(
        q,
        k,
        v,
        scale=0.3,
        mask=Mask(causal=True),
        q_pos=Positions.contiguous(0, 7),
        k_pos=Positions.contiguous(0, 7),
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # shifting both by the same offset changes nothing for a relative mask ...
    c = kern.forward(
        q,
        k,
        v,
        scale=0.3,
        mask=Mask(causal=True),
        q_pos=Positions.contiguous(40, 7),
        k_pos=Positions.contiguous(40, 7),
    )
    _close(c[0], a[0])
    # ... while shifting only the keys does
    d = kern.forward(
        q,
        k,
        v,
        scale=0.3,
        mask=Mask(causal=True),
        q_pos=Positions.contiguous(0, 7),
        k_pos=Positions.contiguous(3, 7),
    )
    assert not torch.allclose(d[0], a[0])


def test_positions_length_mismatch():
    q, k, v, _ = _inputs(1, 6, 6, 2, 2, 4)
    with pytest.raises(ValueError, match="positions cover 5 queries"):
        TorchReference().forward(q, k, v, scale=1.0, q_pos=Positions.contiguous(0, 5))
    with pytest.raises(ValueError, match="k has 6"):
        TorchReference().forward(q, k, v, scale=1.0, k_pos=Positions.contiguous(0, 7))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 9, 6, generator=g, dtype=torch.float64).transpose(1, 2)  # [B, S, H, D]
    k = torch.randn(2, 2, 9, 6, generator=g, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(2, 2, 9, 6, generator=g, dtype=torch.float64).transpose(1, 2)
    dout = torch.randn(2, 4, 9, 6, generator=g, dtype=torch.float64).transpose(1, 2)
    assert not q.is_contiguous()
    mask = Mask(causal=True, window=4)
    ok = _allowed(mask, ALL.slice(0, 9), ALL.slice(0, 9))
    ref = naive_attention(q, k, v, dout, scale=0.4, allowed=ok)
    kern = TorchReference(ReferenceConfig(4, 2))
    out, lse = kern.forward(q, k, v, scale=0.4, mask=mask)
    _close(out, ref[0], what="out")
    grads = kern.backward(dout, q, k, v, out, lse, scale=0.4, mask=mask)
    for name, got, r in zip(("dq", "dk", "dv"), grads, ref[2:]):
        _close(got, r, what=name)


# ---------------------------------------------------------------------------------------------
# backward from a global (merged) out / lse: the ring usage
# ---------------------------------------------------------------------------------------------
SPLIT_CASES = [
    "causal",
    "bidir_window",
    "documents_causal",
    "block_sparse_indices",
    "all_combined",
    "ring_step_window",
    "some_rows_empty",
    "strided",
    "zigzag",
    "index_docs_causal",
    "keys_in_future",
]


@pytest.mark.parametrize("split", ["half", "first1", "last1"])
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_backward_from_merged_out_lse(case, split):
    mask, q_pos, k_pos = CASES[case]
    Sk = len(k_pos)
    cut = {"half": Sk // 2, "first1": 1, "last1": Sk - 1}[split]
    q, k, v, dout = _inputs(2, len(q_pos), Sk, 4, 2, 5, seed=11)
    kern = TorchReference(ReferenceConfig(block_q=5, block_k=3))
    kw = {"scale": 0.29, "mask": mask, "q_pos": q_pos}
    parts = [(0, cut), (cut, Sk)]
    partial = [
        kern.forward(q, k[:, a:b], v[:, a:b], k_pos=k_pos.slice(a, b), **kw) for a, b in parts
    ]
    out, lse = merge_partials(*partial[0], *partial[1])

    full_out, full_lse = kern.forward(q, k, v, k_pos=k_pos, **kw)
    _close(out, full_out, what="merged out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(full_lse))
    fin = torch.isfinite(full_lse)
    _close(torch.where(fin, lse, 0.0), torch.where(fin, full_lse, 0.0), what="merged lse")

    grads = [
        kern.backward(dout, q, k[:, a:b], v[:, a:b], out, lse, k_pos=k_pos.slice(a, b), **kw)
        for a, b in parts
    ]
    dq = grads[0][0] + grads[1][0]
    dk = torch.cat([grads[0][1], grads[1][1]], dim=1)
    dv = torch.cat([grads[0][2], grads[1][2]], dim=1)
    fdq, fdk, fdv = kern.backward(dout, q, k, v, full_out, full_lse, k_pos=k_pos, **kw)
    ok = _allowed(mask, q_pos, k_pos)
    _, _, ndq, ndk, ndv = naive_attention(q, k, v, dout, scale=0.29, allowed=ok)
    for name, got, full, naive in (
        ("dq", dq, fdq, ndq),
        ("dk", dk, fdk, ndk),
        ("dv", dv, fdv, ndv),
    ):
        _close(got, full, what=f"{name} vs full backward")
        _close(got, naive, what=f"{name} vs naive")


# ---------------------------------------------------------------------------------------------
# merge_partials / merge_into
# ---------------------------------------------------------------------------------------------
def _partial(B, S, H, D, seed, p_inf=0.3):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    lse = torch.randn(B, H, S, generator=g, dtype=torch.float64) * 3
    lse = torch.where(torch.rand(B, H, S, generator=g, dtype=torch.float64) < p_inf, NEG_INF, lse)
    out = torch.where(torch.isneginf(lse).transpose(1, 2).unsqueeze(-1), 0.0, out)
    return out, lse


def test_merge_both_neg_inf():
    out_a = torch.randn(2, 3, 2, 4)  # garbage values behind -inf are ignored
    out_b = torch.randn(2, 3, 2, 4)
    lse_a = torch.full((2, 2, 3), NEG_INF)
    lse_b = torch.full((2, 2, 3), NEG_INF)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert (out == 0).all() and torch.isneginf(lse).all()
    assert not torch.isnan(out).any()


def test_merge_one_side_neg_inf_is_identity():
    out_a, lse_a = _partial(2, 5, 3, 4, seed=1, p_inf=0.0)
    out_b = torch.randn_like(out_a)
    lse_b = torch.full_like(lse_a, NEG_INF)
    for out, lse in (
        merge_partials(out_a, lse_a, out_b, lse_b),
        merge_partials(out_b, lse_b, out_a, lse_a),
    ):
        _close(out, out_a)
        _close(lse, lse_a)


def test_merge_formula():
    out_a, lse_a = _partial(2, 6, 3, 4, seed=2, p_inf=0.0)
    out_b, lse_b = _partial(2, 6, 3, 4, seed=3, p_inf=0.0)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    expected_lse = torch.log(torch.exp(lse_a) + torch.exp(lse_b))
    wa = torch.exp(lse_a - expected_lse).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(lse_b - expected_lse).transpose(1, 2).unsqueeze(-1)
    _close(lse, expected_lse)
    _close(out, out_a * wa + out_b * wb)


def test_merge_large_lse_is_stable():
    out_a, _ = _partial(1, 4, 2, 3, seed=4, p_inf=0.0)
    out_b, _ = _partial(1, 4, 2, 3, seed=5, p_inf=0.0)
    lse_a = torch.full((1, 2, 4), 1000.0, dtype=torch.float64)
    lse_b = torch.full((1, 2, 4), 1000.0, dtype=torch.float64)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    _close(lse, lse_a + torch.log(torch.tensor(2.0, dtype=torch.float64)))
    _close(out, (out_a + out_b) / 2)


def test_merge_commutative_and_associative():
    a, b, c = (_partial(2, 16, 3, 4, seed=s) for s in (10, 11, 12))
    ab = merge_partials(*a, *b)
    ba = merge_partials(*b, *a)
    _close(ab[0], ba[0])
    assert torch.equal(torch.isneginf(ab[1]), torch.isneginf(ba[1]))
    _close(torch.nan_to_num(ab[1], neginf=0.0), torch.nan_to_num(ba[1], neginf=0.0))
    left = merge_partials(*ab, *c)
    right = merge_partials(*a, *merge_partials(*b, *c))
    _close(left[0], right[0])
    assert torch.equal(torch.isneginf(left[1]), torch.isneginf(right[1]))
    _close(torch.nan_to_num(left[1], neginf=0.0), torch.nan_to_num(right[1], neginf=0.0))
    assert not torch.isnan(left[0]).any() and not torch.isnan(left[1]).any()


def test_merge_dtype_follows_lse_a():
    out_a = torch.randn(1, 3, 2, 4, dtype=torch.bfloat16)
    out_b = torch.randn(1, 3, 2, 4, dtype=torch.bfloat16)
    lse_a = torch.randn(1, 2, 3)
    lse_b = torch.randn(1, 2, 3, dtype=torch.float64)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


def test_merge_into_writes_into_slices():
    B, S_, H, D = 2, 10, 3, 4
    acc_out = torch.zeros(B, S_, H, D, dtype=torch.float64)
    acc_lse = torch.full((B, H, S_), NEG_INF, dtype=torch.float64)
    first = _partial(B, 4, H, D, seed=20)
    second = _partial(B, 4, H, D, seed=21)
    merge_into(acc_out[:, 3:7], acc_lse[:, :, 3:7], *first)
    _close(acc_out[:, 3:7], first[0])
    assert torch.equal(torch.isneginf(acc_lse[:, :, 3:7]), torch.isneginf(first[1]))
    merge_into(acc_out[:, 3:7], acc_lse[:, :, 3:7], *second)
    exp_out, exp_lse = merge_partials(*first, *second)
    _close(acc_out[:, 3:7], exp_out)
    _close(torch.nan_to_num(acc_lse[:, :, 3:7], neginf=0.0), torch.nan_to_num(exp_lse, neginf=0.0))
    # nothing outside the slices changed
    assert (acc_out[:, :3] == 0).all() and (acc_out[:, 7:] == 0).all()
    assert torch.isneginf(acc_lse[:, :, :3]).all() and torch.isneginf(acc_lse[:, :, 7:]).all()


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,atol",
    [(torch.float32, 2e-5), (torch.bfloat16, 6e-2), (torch.float16, 8e-3)],
    ids=["fp32", "bf16", "fp16"],
)
def test_low_precision_dtypes(dtype, atol):
    mask, q_pos, k_pos = CASES["some_rows_empty"]
    q, k, v, dout = _inputs(1, len(q_pos), len(k_pos), 4, 2, 8, dtype=dtype, seed=3)
    kern = TorchReference(ReferenceConfig(4, 3))
    out, lse = kern.forward(q, k, v, scale=0.35, mask=mask, q_pos=q_pos, k_pos=k_pos)
    assert out.dtype == dtype
    assert lse.dtype == torch.float32
    grads = kern.backward(dout, q, k, v, out, lse, scale=0.35, mask=mask, q_pos=q_pos, k_pos=k_pos)
    for g in grads:
        assert g.dtype == torch.float32
        assert torch.isfinite(g).all()
    ok = _allowed(mask, q_pos, k_pos)
    ref = naive_attention(q, k, v, dout, scale=0.35, allowed=ok)
    _close(out, ref[0], atol=atol, what="out")
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(lse), fin)
    _close(torch.where(fin, lse.double(), 0.0), torch.where(fin, ref[1], 0.0), atol=atol)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref[2:]):
        _close(g, r, atol=4 * atol, what=name)


def test_float64_stays_float64():
    q, k, v, dout = _inputs(1, 5, 5, 2, 1, 4)
    kern = TorchReference()
    out, lse = kern.forward(q, k, v, scale=0.5, mask=Mask(causal=True))
    assert out.dtype == lse.dtype == torch.float64
    grads = kern.backward(dout, q, k, v, out, lse, scale=0.5, mask=Mask(causal=True))
    assert all(g.dtype == torch.float64 for g in grads)


# ---------------------------------------------------------------------------------------------
# input checks and the registry
# ---------------------------------------------------------------------------------------------
def _qkv(H=4, Hkv=2, D=8, dtype=torch.float32):
    return (
        torch.zeros(1, 3, H, D, dtype=dtype),
        torch.zeros(1, 3, Hkv, D, dtype=dtype),
        torch.zeros(1, 3, Hkv, D, dtype=dtype),
    )


def test_check_qkv_accepts_valid():
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        check_qkv(*_qkv(dtype=dt))
    check_qkv(*_qkv(H=6, Hkv=3))


def test_check_qkv_not_4d():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads, head_dim\] \(4-D\)"):
        check_qkv(q[0], k, v)
    with pytest.raises(ValueError, match=r"v must be .*4-D"):
        check_qkv(q, k, v.unsqueeze(0))


def test_check_qkv_int_dtype():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="use one of float16, bfloat16, float32, float64"):
        check_qkv(q.long(), k.long(), v.long())


def test_check_qkv_mixed_dtypes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"share a dtype.*cast them with \.to\(q\.dtype\)"):
        check_qkv(q, k.double(), v)


def test_check_qkv_mismatched_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="must be on one device") as e:
        check_qkv(q, k.to("meta"), v)
    assert "meta" in str(e.value) and "cpu" in str(e.value)


def test_check_qkv_heads_not_divisible():
    with pytest.raises(ValueError, match="num_heads must be divisible by num_kv_heads") as e:
        check_qkv(*_qkv(H=4, Hkv=3))
    assert "4 heads" in str(e.value) and "3 kv heads" in str(e.value)


def test_check_qkv_head_dim_mismatch():
    q, _, _ = _qkv(D=8)
    _, k, v = _qkv(D=4)
    with pytest.raises(ValueError, match="head_dim 8 but k has head_dim 4"):
        check_qkv(q, k, v)


def test_check_qkv_other_mismatches():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="same shape"):
        check_qkv(q, k, v[:, :2])
    with pytest.raises(ValueError, match="batch"):
        check_qkv(q, torch.cat([k, k]), torch.cat([v, v]))


def test_kernel_entry_points_check_inputs():
    q, k, v = _qkv(H=4, Hkv=3)
    kern = TorchReference()
    with pytest.raises(ValueError, match="divisible"):
        kern.forward(q, k, v, scale=1.0)
    with pytest.raises(ValueError, match="divisible"):
        kern.backward(q, q, k, v, q, torch.zeros(1, 4, 3), scale=1.0)


def test_reference_config_validation():
    with pytest.raises(ValueError, match="block sizes must be >= 1"):
        TorchReference(ReferenceConfig(block_q=0))
    with pytest.raises(ValueError, match="block sizes must be >= 1"):
        TorchReference(ReferenceConfig(block_k=0))


def test_get_kernel():
    assert "reference" in available_kernels()
    kern = get_kernel("reference")
    assert isinstance(kern, TorchReference) and isinstance(kern, AttentionKernel)
    mine = TorchReference(ReferenceConfig(2, 2))
    assert get_kernel(mine) is mine
    with pytest.raises(ValueError, match=r"unknown kernel 'nope'; available: \[.*'reference'.*\]"):
        get_kernel("nope")
    with pytest.raises(TypeError, match="forward/backward"):
        get_kernel(42)


@pytest.mark.parametrize("module", [merge_module, reference_module], ids=["merge", "reference"])
def test_module_doctests(module):
    failures, _ = doctest.testmod(module, verbose=False)
    assert failures == 0
