"""Triton flash attention, vendor SDPA backend and dispatcher against the torch reference.

CPU: the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set per test by the
``interpret`` fixture: the kernel reads it at launch, so it never leaks into other modules) with
tiny tiles and shapes; float32 inputs, compared with the float64 reference.
GPU (``-m gpu``): real sizes in bfloat16, compared with the float32 reference on the GPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from longctx.kernels.base import available_kernels, get_kernel
from longctx.kernels.dispatch import AutoKernel, select_kernel
from longctx.kernels.mask import BlockSparse, Mask, Positions
from longctx.kernels.reference import TorchReference
from longctx.kernels.triton_flash import TileConfig, TritonFlash, TritonFlashConfig
from longctx.kernels.vendor import CausalSplit, VendorSDPA, vendor_mask_mode

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = TritonFlashConfig(
    fwd=TileConfig(16, 16), bwd_kv=TileConfig(16, 16), bwd_q=TileConfig(16, 16)
)
TINY_RECT = TritonFlashConfig(  # rectangular tiles: query and key tiling differ per kernel
    fwd=TileConfig(32, 16), bwd_kv=TileConfig(16, 32), bwd_q=TileConfig(16, 32),
    deterministic=True,
)
DOCS = torch.tensor([0, 10, 30, 31, 47, 90])  # a one-token document included


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _pos(spec):
    if spec is None or isinstance(spec, Positions):
        return spec
    kind, *args = spec
    if kind == "c":
        return Positions.contiguous(*args)
    if kind == "s":
        return Positions.strided(*args)
    if kind == "i":  # sorted random subset of [0, n)
        n, length, seed = args
        g = torch.Generator().manual_seed(seed)
        return Positions.from_index(torch.randperm(n, generator=g)[:length].sort().values)
    if kind == "zigzag":  # two chunks, like zigzag ring layouts
        (a, b), length = args
        return Positions.cat([Positions.contiguous(a, length), Positions.contiguous(b, length)])
    raise ValueError(spec)


# (id, B, Sq, Sk, H, Hkv, mask, q_pos, k_pos, config)
CASES = [
    ("full", 2, 37, 45, 4, 2, Mask(), None, None, TINY),
    ("causal", 1, 37, 37, 4, 4, Mask(causal=True), None, None, TINY),
    ("causal-rect-det", 1, 45, 45, 4, 2, Mask(causal=True), None, None, TINY_RECT),
    ("causal-ring-offset", 1, 33, 64, 2, 1, Mask(causal=True), ("c", 64, 33), ("c", 0, 64), TINY),
    ("causal-diag-offset", 1, 41, 41, 2, 2, Mask(causal=True), ("c", 40, 41), ("c", 40, 41), TINY),
    ("causal-partial-empty", 1, 35, 30, 2, 1, Mask(causal=True), ("c", 0, 35), ("c", 9, 30), TINY),
    ("window-causal", 1, 50, 50, 2, 1, Mask(causal=True, window=7), None, None, TINY),
    ("window-2sided", 1, 45, 53, 2, 2, Mask(window=9), ("c", 20, 45), ("c", 0, 53), TINY),
    ("window-ring", 1, 33, 40, 2, 2, Mask(causal=True, window=20), ("c", 40, 33), ("c", 0, 40),
     TINY_RECT),
    ("docs-causal", 1, 90, 90, 2, 1, Mask(causal=True, cu_seqlens=DOCS), None, None, TINY),
    ("docs-full", 1, 47, 60, 2, 2, Mask(cu_seqlens=DOCS), ("c", 30, 47), ("c", 25, 60), TINY_RECT),
    ("docs-window", 1, 60, 70, 2, 1, Mask(causal=True, window=12, cu_seqlens=DOCS),
     ("c", 30, 60), ("c", 0, 70), TINY),
    ("striped-causal", 1, 20, 22, 2, 1, Mask(causal=True), ("s", 1, 20, 3), ("s", 0, 22, 3), TINY),
    ("zigzag-causal", 1, 32, 32, 2, 2, Mask(causal=True), ("zigzag", (0, 48), 16),
     ("zigzag", (0, 48), 16), TINY),
    ("index-causal-docs-window", 1, 40, 45, 2, 1,
     Mask(causal=True, window=25, cu_seqlens=DOCS), ("i", 90, 40, 1), ("i", 90, 45, 2), TINY),
    ("index-full-rect", 2, 33, 29, 2, 2, Mask(), ("i", 90, 33, 3), ("i", 90, 29, 4), TINY_RECT),
]


def _inputs(B, Sq, Sk, H, Hkv, D, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g, device=device, dtype=dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, Sk, Hkv, D, generator=g, device=device, dtype=dtype)
    dout = torch.randn(B, Sq, H, D, generator=g, device=device, dtype=dtype)
    return q, k, v, dout


def _assert_lse(lse, ref, atol):
    assert not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "empty rows differ"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(lse[finite], ref[finite].to(lse.dtype), atol=atol, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_interpreted(interpret, case):
    _, B, Sq, Sk, H, Hkv, mask, q_spec, k_spec, config = case
    q_pos, k_pos = _pos(q_spec), _pos(k_spec)
    q, k, v, dout = _inputs(B, Sq, Sk, H, Hkv, 16, torch.float32)
    scale = 0.3
    kern, ref = TritonFlash(config), TorchReference()
    pos = dict(mask=mask, q_pos=q_pos, k_pos=k_pos)

    out, lse = kern.forward(q, k, v, scale=scale, **pos)
    r_out, r_lse = ref.forward(q.double(), k.double(), v.double(), scale=scale, **pos)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Sq)
    torch.testing.assert_close(out, r_out.float(), atol=2e-5, rtol=0)
    _assert_lse(lse, r_lse, 2e-5)

    # backward from the reference's (global) out/lse, as a ring step does
    grads = kern.backward(dout, q, k, v, r_out.float(), r_lse.float(), scale=scale, **pos)
    r_grads = ref.backward(
        dout.double(), q.double(), k.double(), v.double(), r_out, r_lse, scale=scale, **pos
    )
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r.float(), atol=5e-5, rtol=0, msg=name)


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_backward_grad_dtype(interpret, kernel):
    """``grad_dtype`` gives the gradients in that dtype: the default float32 ones, rounded."""
    q, k, v, dout = _inputs(1, 24, 24, 4, 2, 16, torch.float32, seed=5)
    kern = TritonFlash(TINY) if kernel == "triton" else get_kernel(kernel)
    mask = Mask(causal=True)
    out, lse = kern.forward(q, k, v, scale=0.25, mask=mask)
    default = kern.backward(dout, q, k, v, out, lse, scale=0.25, mask=mask)
    assert all(g.dtype == torch.float32 for g in default)
    for dtype in (torch.float16, torch.float32):
        got = kern.backward(dout, q, k, v, out, lse, scale=0.25, mask=mask, grad_dtype=dtype)
        for g, want in zip(got, default):
            assert g.dtype == dtype
            torch.testing.assert_close(g, want.to(dtype), rtol=0, atol=0)


def test_empty_rows_are_zero_without_nan(interpret):
    """Every key after every query under causal: out 0, lse -inf, zero gradients."""
    q, k, v, dout = _inputs(1, 20, 24, 2, 1, 16, torch.float32)
    pos = dict(mask=Mask(causal=True), q_pos=Positions.contiguous(0, 20),
               k_pos=Positions.contiguous(100, 24))
    kern = TritonFlash(TINY)
    out, lse = kern.forward(q, k, v, scale=0.25, **pos)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    for g in kern.backward(dout, q, k, v, out, lse, scale=0.25, **pos):
        assert torch.equal(g, torch.zeros_like(g))


def test_tiles_without_allowed_pairs_are_skipped(interpret):
    """NaN in key tiles that no query may see: a visited tile would spread NaN into out/dq."""
    q, k, v, dout = _inputs(1, 32, 80, 2, 2, 16, torch.float32)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[:, 32:] = float("nan")  # key tiles 2..4 (positions 32..79) are after every query
    v_poisoned[:, 32:] = float("nan")
    mask = Mask(causal=True)
    for config in (TINY, TINY_RECT):
        for k_pos in (Positions.contiguous(0, 80), Positions.from_index(torch.arange(80))):
            kern = TritonFlash(config)
            out, lse = kern.forward(q, k_poisoned, v_poisoned, scale=0.3, mask=mask, k_pos=k_pos)
            r_out, _ = TorchReference().forward(q, k[:, :32], v[:, :32], scale=0.3, mask=mask)
            torch.testing.assert_close(out, r_out, atol=2e-5, rtol=0)
            dq, dk, dv = kern.backward(dout, q, k_poisoned, v_poisoned, out, lse, scale=0.3,
                                       mask=mask, k_pos=k_pos)
            assert torch.isfinite(dq).all()
            assert torch.equal(dk[:, 32:], torch.zeros_like(dk[:, 32:]))
            assert torch.equal(dv[:, 32:], torch.zeros_like(dv[:, 32:]))


def test_deterministic_backward_is_bitwise_reproducible(interpret):
    q, k, v, dout = _inputs(1, 40, 40, 4, 2, 16, torch.float32)
    kern = TritonFlash(TritonFlashConfig(**{**TINY.__dict__, "deterministic": True}))
    out, lse = kern.forward(q, k, v, scale=0.3, mask=Mask(causal=True))
    a = kern.backward(dout, q, k, v, out, lse, scale=0.3, mask=Mask(causal=True))
    b = kern.backward(dout, q, k, v, out, lse, scale=0.3, mask=Mask(causal=True))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_half_precision_head_dim_64(interpret):
    q, k, v, dout = _inputs(1, 24, 24, 2, 1, 64, torch.float16)
    mask = Mask(causal=True)
    kern = TritonFlash(TINY)
    out, lse = kern.forward(q, k, v, scale=0.125, mask=mask)
    r_out, r_lse = TorchReference().forward(q.double(), k.double(), v.double(), scale=0.125,
                                           mask=mask)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), r_out, atol=2e-3, rtol=0)
    _assert_lse(lse, r_lse, 1e-3)
    dq, dk, dv = kern.backward(dout, q, k, v, out, lse, scale=0.125, mask=mask)
    r = TorchReference().backward(dout.double(), q.double(), k.double(), v.double(),
                                  r_out, r_lse, scale=0.125, mask=mask)
    for g, rg in zip((dq, dk, dv), r):
        torch.testing.assert_close(g.double(), rg, atol=2e-2, rtol=0)


# -- errors --------------------------------------------------------------------------------------
def test_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _ = _inputs(1, 8, 8, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        TritonFlash().forward(q, k, v, scale=0.25, mask=Mask())


@pytest.mark.parametrize(
    "dtype, D, mask, match",
    [
        (torch.float32, 48, Mask(), "head_dim 48"),
        (torch.float64, 16, Mask(), "float64"),
        (torch.float32, 16, Mask(block_sparse=BlockSparse.from_table(4, torch.ones(2, 2, dtype=torch.bool))),
         "block-sparse"),
    ],
)
def test_unsupported_inputs_raise_clearly(interpret, dtype, D, mask, match):
    q, k, v, _ = _inputs(1, 8, 8, 2, 2, D, dtype)
    with pytest.raises(ValueError, match=match):
        TritonFlash().forward(q, k, v, scale=0.25, mask=mask)


def test_config_validates():
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(48, 64)
    with pytest.raises(ValueError, match="num_warps"):
        TileConfig(64, 64, num_warps=3)
    with pytest.raises(ValueError, match="not deterministic"):
        TritonFlashConfig(dq_atomic=True, deterministic=True)


# -- vendor mask mapping and dispatch (no GPU needed) -------------------------------------------
@pytest.mark.parametrize(
    "mask, q_pos, k_pos, mode",
    [
        (Mask(), ("i", 50, 10, 0), ("c", 3, 7), "full"),
        (Mask(causal=True), ("c", 0, 64), ("c", 0, 64), "causal"),
        (Mask(causal=True), ("c", 64, 64), ("c", 0, 64), "full"),
        (Mask(causal=True), ("c", 0, 64), ("c", 64, 64), "empty"),
        (Mask(causal=True), ("c", 0, 64), ("c", 0, 32), None),  # not the same run
        (Mask(causal=True), ("s", 0, 8, 2), ("s", 0, 8, 2), None),  # striped diagonal
        (Mask(causal=True, window=4), ("c", 0, 8), ("c", 0, 8), None),
        (Mask(cu_seqlens=torch.tensor([0, 8])), ("c", 0, 8), ("c", 0, 8), None),
    ],
)
def test_vendor_mask_mode(mask, q_pos, k_pos, mode):
    assert vendor_mask_mode(mask, _pos(q_pos), _pos(k_pos)) == mode


def test_dispatch_on_cpu_picks_reference_and_explains():
    q = torch.randn(1, 16, 2, 64)
    kernel, why = select_kernel(q, Mask(causal=True), explain=True)
    assert kernel.name == "reference" and "cpu" in why
    with pytest.raises(ValueError, match="sdpa.*CUDA"):
        select_kernel(q, Mask(causal=True), prefer="sdpa")
    with pytest.raises(ValueError, match="prefer must be one of"):
        select_kernel(q, Mask(), prefer="nope")


def test_registered_names():
    assert {"triton", "sdpa", "auto", "reference"} <= set(available_kernels())
    assert isinstance(get_kernel("triton"), TritonFlash)
    assert isinstance(get_kernel("sdpa"), VendorSDPA)
    assert isinstance(get_kernel("auto"), AutoKernel)


def test_auto_kernel_runs_reference_on_cpu():
    q, k, v, _ = _inputs(1, 12, 12, 2, 1, 16, torch.float64)
    auto = AutoKernel()
    out, _ = auto.forward(q, k, v, scale=0.25, mask=Mask(causal=True))
    assert auto.last_choice.startswith("reference")
    r_out, _ = TorchReference().forward(q, k, v, scale=0.25, mask=Mask(causal=True))
    torch.testing.assert_close(out, r_out)


# -- GPU: real sizes in bf16 ---------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_CASES = [
    # (id, B, Sq, Sk, H, Hkv, D, mask, q_pos, k_pos)
    ("causal-d128", 1, 4096, 4096, 8, 8, 128, Mask(causal=True), None, None),
    ("causal-gqa-d64-odd", 2, 3001, 3001, 8, 2, 64, Mask(causal=True), None, None),
    ("full-d128-rect", 1, 1500, 2500, 4, 4, 128, Mask(), None, None),
    ("ring-offset-d128", 1, 2048, 2048, 4, 2, 128, Mask(causal=True), ("c", 2048, 2048),
     ("c", 0, 2048)),
    ("window-d128", 1, 4096, 4096, 4, 4, 128, Mask(causal=True, window=1000), None, None),
    ("docs-d64", 1, 4000, 4000, 4, 1, 64,
     Mask(causal=True, cu_seqlens=torch.tensor([0, 700, 701, 2500, 4000])), None, None),
    ("index-striped-d128", 1, 1024, 1024, 4, 4, 128, Mask(causal=True), ("i", 4096, 1024, 5),
     ("s", 1, 1024, 4)),
    ("causal-d256", 1, 2048, 2048, 4, 4, 256, Mask(causal=True), None, None),
]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
@pytest.mark.parametrize(
    "config",
    [TritonFlashConfig(), TritonFlashConfig(dq_atomic=True), TritonFlashConfig(deterministic=True)],
    ids=["default", "atomic-dq", "deterministic"],
)
def test_gpu_matches_reference_bf16(monkeypatch, case, config):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, B, Sq, Sk, H, Hkv, D, mask, q_spec, k_spec = case
    q_pos, k_pos = _pos(q_spec), _pos(k_spec)
    q, k, v, dout = _inputs(B, Sq, Sk, H, Hkv, D, torch.bfloat16, device="cuda", seed=1)
    scale = D**-0.5
    pos = dict(mask=mask, q_pos=q_pos, k_pos=k_pos)
    kern = TritonFlash(config)
    out, lse = kern.forward(q, k, v, scale=scale, **pos)
    ref = TorchReference()
    f32 = [t.float() for t in (q, k, v, dout)]
    r_out, r_lse = ref.forward(*f32[:3], scale=scale, **pos)
    assert _rel(out, r_out) < 1e-2
    _assert_lse(lse, r_lse, 2e-2)
    grads = kern.backward(dout, q, k, v, out, lse, scale=scale, **pos)
    r_grads = ref.backward(f32[3], *f32[:3], r_out, r_lse, scale=scale, **pos)
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert torch.isfinite(g).all(), name
        assert _rel(g, r) < 2e-2, (name, _rel(g, r))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize(
    "Sq, Sk, mask, q_spec, k_spec",
    [
        (2048, 2048, Mask(causal=True), None, None),
        (1000, 1000, Mask(), None, None),
        (1024, 2048, Mask(causal=True), ("c", 2048, 1024), ("c", 0, 2048)),  # full ring block
        (1024, 1024, Mask(causal=True), ("c", 0, 1024), ("c", 1024, 1024)),  # empty ring block
    ],
)
@pytest.mark.parametrize("kv_heads", [8, 2], ids=["mha", "gqa"])
def test_gpu_vendor_matches_reference(backend, Sq, Sk, mask, q_spec, k_spec, kv_heads):
    q_pos, k_pos = _pos(q_spec), _pos(k_spec)
    q, k, v, dout = _inputs(1, Sq, Sk, 8, kv_heads, 128, torch.bfloat16, device="cuda", seed=2)
    pos = dict(mask=mask, q_pos=q_pos, k_pos=k_pos)
    kern = VendorSDPA(backend)
    out, lse = kern.forward(q, k, v, scale=0.1, **pos)
    f32 = [t.float() for t in (q, k, v, dout)]
    r_out, r_lse = TorchReference().forward(*f32[:3], scale=0.1, **pos)
    assert lse.shape == (1, 8, Sq) and lse.dtype == torch.float32
    _assert_lse(lse, r_lse, 2e-2)  # natural log, -inf rows
    assert _rel(out, r_out) < 1e-2 or r_out.abs().max() == 0
    grads = kern.backward(dout, q, k, v, r_out.to(q.dtype), r_lse, scale=0.1, **pos)
    r_grads = TorchReference().backward(f32[3], *f32[:3], r_out, r_lse, scale=0.1, **pos)
    for g, r in zip(grads, r_grads):
        assert g.dtype == torch.float32
        if r.abs().max() == 0:
            assert torch.equal(g, torch.zeros_like(g))
        else:
            assert _rel(g, r) < 2e-2
    # the kernel's own bf16 gradients (one call covering every key, as Ulysses asks)
    native = kern.backward(
        dout, q, k, v, r_out.to(q.dtype), r_lse, scale=0.1, grad_dtype=torch.bfloat16, **pos
    )
    for g, g32 in zip(native, grads):
        assert g.dtype == torch.bfloat16 and g.shape == g32.shape
        torch.testing.assert_close(g, g32.to(torch.bfloat16), rtol=1e-2, atol=1e-2)


def test_causal_split_spans_and_errors():
    import doctest

    for test in doctest.DocTestFinder().find(CausalSplit):  # the docstring's example
        assert doctest.DocTestRunner().run(test).failed == 0
    split = CausalSplit(min_queries=1000, chunk=300)
    assert split.spans(999) == [(0, 999)]  # below min_queries: one call
    assert split.spans(1000) == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    assert CausalSplit(min_queries=None).spans(10**7) == [(0, 10**7)]
    assert split.spans(1000, head_dim=128) == [(0, 1000)]  # wider than max_head_dim=64
    assert len(replace(split, max_head_dim=None).spans(1000, head_dim=256)) == 4
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        CausalSplit(chunk=0)
    with pytest.raises(ValueError, match="min_queries must be >= 1 or None"):
        CausalSplit(min_queries=0)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize("kv_heads", [8, 2], ids=["mha", "gqa"])
def test_gpu_vendor_causal_split_backward_matches_reference(backend, kv_heads):
    """The backward of a causal call run by query chunks (uneven last chunk) gives the reference
    gradients and those of the unsplit backward."""
    S = 1100
    q, k, v, dout = _inputs(1, S, S, 8, kv_heads, 128, torch.bfloat16, device="cuda", seed=3)
    pos = dict(mask=Mask(causal=True))
    split = VendorSDPA(backend, CausalSplit(min_queries=512, chunk=384, max_head_dim=None))
    whole = VendorSDPA(backend, CausalSplit(min_queries=None))
    assert len(split.split.spans(S, q.shape[-1])) == 3
    out, lse = split.forward(q, k, v, scale=0.1, **pos)
    f32 = [t.float() for t in (q, k, v, dout)]
    r_out, r_lse = TorchReference().forward(*f32[:3], scale=0.1, **pos)
    r_grads = TorchReference().backward(f32[3], *f32[:3], r_out, r_lse, scale=0.1, **pos)
    w_grads = whole.backward(dout, q, k, v, out, lse, scale=0.1, **pos)
    for grad_dtype in (None, torch.bfloat16):
        grads = split.backward(dout, q, k, v, out, lse, scale=0.1, grad_dtype=grad_dtype, **pos)
        for name, g, r, w in zip(("dq", "dk", "dv"), grads, r_grads, w_grads):
            assert g.dtype == (grad_dtype or torch.float32) and g.shape == r.shape, name
            assert _rel(g, r) < 2e-2, (name, _rel(g, r))
            torch.testing.assert_close(g.float(), w, rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.gpu
def test_gpu_dispatch_explains_choice():
    q = torch.randn(1, 256, 4, 128, device="cuda", dtype=torch.bfloat16)
    kernel, why = select_kernel(q, Mask(causal=True), explain=True)
    assert kernel.name == "sdpa", why
    kernel, why = select_kernel(q, Mask(causal=True, window=64), explain=True)
    assert kernel.name == "triton" and "vendor" in why
    kernel, why = select_kernel(q, Mask(causal=True), kv_heads=2, explain=True)
    assert kernel.name == "sdpa", why  # GQA: cuDNN's own, FA2 through expanded K/V
    bs = BlockSparse.from_table(128, torch.ones(2, 2, dtype=torch.bool)).to("cuda")
    kernel, why = select_kernel(q, Mask(block_sparse=bs), explain=True)
    assert kernel.name == "block_sparse" and "block-sparse" in why

