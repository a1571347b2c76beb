"""Linear attention kernels: the torch reference (chunked vs recurrent) and the Triton kernel.

CPU: the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set per test by the
``interpret`` fixture; the kernel reads it at each launch) with tiny chunks and shapes, float32
inputs against the float64 recurrent reference.  float16 is checked loosely in the interpreter;
bfloat16 only on the GPU (Triton 3.9's interpreter computes bfloat16 ``tl.dot`` wrongly).
GPU (``-m gpu``): real sizes in bfloat16 against the float32 reference on the GPU.
"""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from longctx.kernels.linear import (
    LinearArgs,
    LinearKernelFunction,
    LinearReference,
    LinearReferenceConfig,
    LinearTriton,
    LinearTritonConfig,
    available_linear_kernels,
    backward_with_exchange,
    forward_with_exchange,
    get_linear_kernel,
    linear_attention_reference,
    linear_attention_triton,
    retnet_log_decay,
    weighted_state_sum,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = LinearTritonConfig(chunk=16, block_k=16, block_v=16, dq_block_k=16, state_block_k=16,
                          state_block_v=16)
RECURRENT = LinearReferenceConfig(mode="recurrent")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _decay(heads: int, on: bool) -> torch.Tensor | None:
    # strong decays (lambda down to ~0.78) so that decay errors are visible in small sizes
    return retnet_log_decay(heads) * 8 if on else None


def _inputs(B, S, H, Hkv, Dk, Dv, dtype=torch.float32, device="cpu", seed=0, state=True):
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    q, k, v = randn(B, S, H, Dk), randn(B, S, Hkv, Dk), randn(B, S, Hkv, Dv)
    h0 = randn(B, H, Dk, Dv).float() if state else None
    dout, dfinal = randn(B, S, H, Dv), randn(B, H, Dk, Dv).float()
    return q, k, v, h0, dout, dfinal


def _run(fn, q, k, v, h0, dout, dfinal, dtype=None, **kw):
    """Forward + backward of ``sum(out * dout) + sum(final * dfinal)``; returns out, final, grads."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    init = h0.detach().to(dtype or h0.dtype).requires_grad_() if h0 is not None else None
    out, final = fn(*leaves, initial_state=init, return_final_state=True, **kw)
    loss = (out * dout.to(out.dtype)).sum() + (final * dfinal.to(final.dtype)).sum()
    loss.backward()
    grads = {n: t.grad for n, t in zip(("dq", "dk", "dv"), leaves)}
    if init is not None:
        grads["dh0"] = init.grad if init.grad is not None else torch.zeros_like(init)
    return {"out": out.detach(), "final": final.detach(), **grads}


def _assert_close(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        g, w = got[name], want[name]
        assert g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        err = (g.double() - w.double()).abs().max().item()
        assert err < atol, f"{name}: max error {err:.2e} >= {atol:.0e}"


DOCS45 = torch.tensor([0, 5, 16, 17, 32, 45])  # 1-token doc, boundaries on chunk edges 16 and 32

# (id, B, S, H, Hkv, Dk, Dv, decay, cu_seqlens, initial state)
CASES = [
    ("decay-state", 1, 37, 2, 2, 16, 16, True, None, True),
    ("nodecay-state", 1, 37, 2, 2, 16, 16, False, None, True),
    ("decay-nostate", 2, 21, 2, 2, 16, 16, True, None, False),
    ("docs-decay", 1, 45, 2, 1, 16, 16, True, DOCS45, True),
    ("docs-nodecay", 1, 45, 2, 2, 16, 16, False, DOCS45, True),
    ("docs-empty-first", 1, 30, 2, 2, 16, 16, True, torch.tensor([0, 0, 13, 30, 30]), True),
    ("gqa-odd-dims", 1, 19, 4, 2, 24, 8, True, torch.tensor([0, 7, 19]), True),
    ("one-token", 1, 1, 2, 2, 16, 16, True, None, True),
]


# -------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunked_reference_matches_recurrent(case, chunk):
    _, B, S, H, Hkv, Dk, Dv, decay, cu, state = case
    q, k, v, h0, dout, dfinal = _inputs(B, S, H, Hkv, Dk, Dv, torch.float64, state=state)
    kw = dict(log_decay=_decay(H, decay), cu_seqlens=cu)
    want = _run(linear_attention_reference, q, k, v, h0, dout, dfinal, torch.float64,
                config=RECURRENT, **kw)
    got = _run(linear_attention_reference, q, k, v, h0, dout, dfinal, torch.float64,
               config=LinearReferenceConfig(chunk=chunk), **kw)
    _assert_close(got, want, 1e-12)


def test_documents_are_independent():
    """A document's outputs depend on nothing before it, and equal a separate call on it alone."""
    q, k, v, *_ = _inputs(1, 45, 2, 2, 4, 4, torch.float64, state=False)
    g = _decay(2, True)
    out = linear_attention_reference(q, k, v, log_decay=g, cu_seqlens=DOCS45)
    for s, e in zip(DOCS45[:-1].tolist(), DOCS45[1:].tolist()):
        alone = linear_attention_reference(q[:, s:e], k[:, s:e], v[:, s:e], log_decay=g)
        torch.testing.assert_close(out[:, s:e], alone, atol=1e-13, rtol=0)


def test_reference_kernel_backward_matches_autograd():
    q, k, v, h0, dout, dfinal = _inputs(2, 23, 4, 2, 8, 4, torch.float64)
    args = LinearArgs.build(q, k, v, log_decay=_decay(4, True), cu_seqlens=torch.tensor([0, 9, 23]))
    kern = get_linear_kernel("reference")
    out, final = kern.forward(q, k, v, args, h0.double())
    dq, dk, dv, dh0 = kern.backward(dout.double(), dfinal.double(), q, k, v, args, h0.double())
    via_fn = _run(
        lambda q, k, v, initial_state, return_final_state: LinearKernelFunction.apply(
            q, k, v, initial_state, LinearReference(RECURRENT), args),
        q, k, v, h0, dout, dfinal, torch.float64,
    )
    _assert_close({"out": out, "final": final, "dq": dq, "dk": dk, "dv": dv, "dh0": dh0},
                  via_fn, 1e-12)


# ------------------------------------------------------------------------- Triton (interpreter)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_reference_interpreted(interpret, case):
    _, B, S, H, Hkv, Dk, Dv, decay, cu, state = case
    q, k, v, h0, dout, dfinal = _inputs(B, S, H, Hkv, Dk, Dv, state=state)
    kw = dict(log_decay=_decay(H, decay), cu_seqlens=cu, scale=0.3)
    want = _run(linear_attention_reference, q, k, v, h0, dout, dfinal, torch.float64,
                config=RECURRENT, **kw)
    got = _run(linear_attention_triton, q, k, v, h0, dout, dfinal, config=TINY, **kw)
    assert got["out"].dtype == torch.float32 and got["final"].dtype == torch.float32
    _assert_close(got, want, 2e-5)


def test_triton_larger_blocks_and_partial_head_blocks(interpret):
    """Blocks wider than the head dims (masked columns) and a chunk longer than the sequence."""
    q, k, v, h0, dout, dfinal = _inputs(1, 29, 2, 1, 20, 40, seed=3)
    kw = dict(log_decay=_decay(2, True), cu_seqlens=torch.tensor([0, 11, 29]))
    want = _run(linear_attention_reference, q, k, v, h0, dout, dfinal, torch.float64, **kw)
    got = _run(linear_attention_triton, q, k, v, h0, dout, dfinal,
               config=LinearTritonConfig(chunk=32, block_k=32, block_v=64), **kw)
    _assert_close(got, want, 2e-5)


def test_triton_gradient_through_final_state_only(interpret):
    q, k, v, h0, _, dfinal = _inputs(1, 20, 2, 2, 16, 16, seed=4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, h0)]
    _, final = linear_attention_triton(*leaves[:3], log_decay=_decay(2, True),
                                       initial_state=leaves[3], return_final_state=True,
                                       config=TINY)
    (final * dfinal).sum().backward()
    ref = [t.double().requires_grad_() for t in (q, k, v, h0)]
    _, r_final = linear_attention_reference(*ref[:3], log_decay=_decay(2, True),
                                            initial_state=ref[3], return_final_state=True)
    (r_final * dfinal.double()).sum().backward()
    assert ref[0].grad is None and not leaves[0].grad.any()  # q never reaches the state
    for a, b in zip(leaves[1:], ref[1:]):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=0)


def test_triton_float16_interpreted(interpret):
    q, k, v, h0, dout, dfinal = _inputs(1, 24, 2, 2, 16, 16, torch.float16, seed=5)
    want = _run(linear_attention_reference, q, k, v, h0, dout, dfinal, torch.float64,
                log_decay=_decay(2, True))
    got = _run(linear_attention_triton, q, k, v, h0, dout, dfinal, log_decay=_decay(2, True),
               config=TINY)
    assert got["out"].dtype == torch.float16 and got["dq"].dtype == torch.float16
    assert got["final"].dtype == torch.float32 and got["dh0"].dtype == torch.float32
    _assert_close(got, want, 5e-2)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("Hkv", [2, 1], ids=["mha", "gqa"])
def test_backward_grad_dtype(interpret, impl, Hkv):
    """``grad_dtype`` gives dq/dk/dv in that dtype: the float32 grads rounded once (within one
    bfloat16 ulp: the interpreter may truncate where the GPU rounds to nearest)."""
    q, k, v, h0, dout, dfinal = _inputs(1, 24, 2, Hkv, 16, 16, torch.float32, seed=6)
    kernel = LinearTriton(TINY) if impl == "triton" else get_linear_kernel("reference")
    args = LinearArgs.build(q, k, v, log_decay=_decay(2, True))
    want = kernel.backward(dout, dfinal, q, k, v, args, h0)
    got = kernel.backward(dout, dfinal, q, k, v, args, h0, grad_dtype=torch.bfloat16)
    for g, w in zip(got[:3], want[:3]):
        assert w.dtype == torch.float32 and g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w.to(torch.bfloat16), atol=1e-6, rtol=2**-7)
    assert got[3].dtype == torch.float32
    torch.testing.assert_close(got[3], want[3])


# ------------------------------------------------------------------------------- state chaining
def _chained(fn, q, k, v, h0, cut, cu, log_decay, **kw):
    """Two calls on ``[:cut]`` and ``[cut:]`` with the state passed (documents split at ``cut``)."""
    cu1 = cu2 = None
    if cu is not None:
        inner = [int(c) for c in cu[1:-1]]
        cu1 = torch.tensor([0, *[c for c in inner if c < cut], cut])
        cu2 = torch.tensor([0, *[c - cut for c in inner if c > cut], q.shape[1] - cut])
    o1, s1 = fn(q[:, :cut], k[:, :cut], v[:, :cut], log_decay=log_decay, initial_state=h0,
                cu_seqlens=cu1, return_final_state=True, **kw)
    # a document boundary exactly at the cut: the second call starts fresh
    carry = None if cu is not None and cut in cu.tolist() else s1
    o2, s2 = fn(q[:, cut:], k[:, cut:], v[:, cut:], log_decay=log_decay, initial_state=carry,
                cu_seqlens=cu2, return_final_state=True, **kw)
    return torch.cat([o1, o2], 1), s2


CHAIN_CASES = [  # (id, cut, cu_seqlens, decay)
    ("decay-mid-chunk", 21, None, True),
    ("nodecay-chunk-edge", 16, None, False),
    ("doc-crosses-cut", 21, torch.tensor([0, 9, 30, 40]), True),
    ("doc-boundary-at-cut", 16, torch.tensor([0, 16, 40]), True),
]


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("case", CHAIN_CASES, ids=[c[0] for c in CHAIN_CASES])
def test_two_calls_with_state_equal_one_call(monkeypatch, impl, case):
    _, cut, cu, decay = case
    if impl == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        fn, kw, dtype, tol = linear_attention_triton, dict(config=TINY), torch.float32, 2e-5
    else:
        fn, kw, dtype, tol = linear_attention_reference, dict(config=RECURRENT), torch.float64, 1e-12
    q, k, v, h0, dout, dfinal = _inputs(1, 40, 2, 2, 16, 16, dtype, seed=6)
    h0 = h0.to(dtype)
    g = _decay(2, decay)

    def one(q, k, v, initial_state, return_final_state):
        return fn(q, k, v, log_decay=g, initial_state=initial_state, cu_seqlens=cu,
                  return_final_state=True, **kw)

    def two(q, k, v, initial_state, return_final_state):
        return _chained(fn, q, k, v, initial_state, cut, cu, g, **kw)

    _assert_close(_run(two, q, k, v, h0, dout, dfinal), _run(one, q, k, v, h0, dout, dfinal), tol)


# ---------------------------------------------------------------------------------- bad inputs
def _small(D=16, Dv=None, dtype=torch.float32, S=8, H=2, Hkv=2):
    q = torch.randn(1, S, H, D).to(dtype)
    k = torch.randn(1, S, Hkv, D).to(dtype)
    v = torch.randn(1, S, Hkv, Dv or D).to(dtype)
    return q, k, v


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(log_decay=torch.zeros(3)), r"log_decay must be a float tensor of shape \[heads\] = \[2\]"),
        (dict(log_decay=torch.tensor([-0.1, 0.2])), r"finite and <= 0"),
        (dict(log_decay=torch.zeros(2, requires_grad=True)), r"detach\(\).*register_buffer"),
        (dict(log_decay=torch.zeros(2, dtype=torch.int64)), r"float tensor of shape"),
        (dict(initial_state=torch.zeros(1, 2, 16, 8)), r"\[batch, heads, dk, dv\] = \[1, 2, 16, 16\]"),
        (dict(initial_state=torch.zeros(2, 16, 16)), r"must have shape \[batch, heads, dk, dv\]"),
        (dict(initial_state=torch.zeros(1, 2, 16, 16, device="meta")), r"initial_state is on meta"),
        (dict(cu_seqlens=torch.tensor([0, 5, 7])), r"ends at 7 but the sequence has 8 tokens"),
        (dict(cu_seqlens=torch.tensor([0, 6, 5, 8])), r"non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0.0, 8.0])), r"1-D integer tensor"),
        (dict(scale=0.0), r"scale must be finite and > 0"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_arguments(interpret, impl, kwargs, match):
    fn = linear_attention_reference if impl == "reference" else linear_attention_triton
    with pytest.raises(ValueError, match=match):
        fn(*_small(), **kwargs)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: _small()[:2] + (torch.randn(1, 8, 16),), r"\[batch, seq, heads, head_dim\] \(4-D\)"),
        (lambda: _small(H=3, Hkv=2), r"3 heads, which is not a multiple of the 2 kv heads"),
        (lambda: (*_small()[:2], torch.randn(1, 8, 2, 16).double()), r"share a dtype"),
        (lambda: (_small()[0], torch.randn(1, 8, 2, 8), _small()[2]), r"q has head_dim 16 but k has head_dim 8"),
        (lambda: (*_small()[:2], torch.randn(1, 7, 2, 16)), r"same batch and sequence sizes"),
        (lambda: _small(dtype=torch.int32), r"use one of float16, bfloat16"),
    ],
)
def test_bad_tensors(make, match):
    with pytest.raises(ValueError, match=match):
        linear_attention_reference(*make())


@pytest.mark.parametrize("D,Dv,name", [(272, 16, "Dk=272"), (16, 320, "Dv=320")])
def test_triton_head_dim_limit(interpret, D, Dv, name):
    with pytest.raises(ValueError, match=rf"{name} is over the Triton kernel's limit of 256.*"
                                         r"kernel='reference'"):
        linear_attention_triton(*_small(D, Dv))


def test_triton_refuses_cpu_without_interpreter_and_float64(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1.*kernel='reference'"):
            linear_attention_triton(*_small())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"float64.*kernel='reference'"):
        linear_attention_triton(*_small(dtype=torch.float64))


def test_config_and_kernel_name_errors():
    with pytest.raises(ValueError, match=r"chunk must be a power of two >= 16, got 24"):
        LinearTritonConfig(chunk=24)
    with pytest.raises(ValueError, match=r"state_block_v must be a power of two >= 16, got 8"):
        LinearTritonConfig(state_block_v=8)
    with pytest.raises(ValueError, match=r"state_num_warps must be 1, 2, 4, 8 or 16, got 3"):
        LinearTritonConfig(state_num_warps=3)
    with pytest.raises(ValueError, match=r"state_num_stages must be >= 1, got 0"):
        LinearTritonConfig(state_num_stages=0)
    with pytest.raises(ValueError, match=r"segment must be a multiple of chunk=64, got 96"):
        LinearTritonConfig(segment=96)
    with pytest.raises(ValueError, match=r"mode must be 'chunked' or 'recurrent'"):
        LinearReferenceConfig(mode="parallel")
    with pytest.raises(ValueError, match=r"unknown linear attention kernel 'fast'; available"):
        get_linear_kernel("fast")
    assert isinstance(get_linear_kernel("triton"), LinearTriton)


def test_linear_modules_import_base_only():
    """Imports point one way (no cycle): ``base`` imports none of its siblings; ``reference``,
    ``triton`` and ``exchange`` import ``base`` and not one another (function-level imports too)."""
    import longctx.kernels.linear as package

    folder = Path(package.__file__).parent
    names = ("base", "reference", "triton", "exchange")

    def siblings(node: ast.AST) -> set[str]:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:  # from . import x
                return {a.name for a in node.names} & set(names)
            return {node.module.split(".")[0]} & set(names)
        targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        prefix = "longctx.kernels.linear."
        return {t[len(prefix):].split(".")[0] for t in targets if t.startswith(prefix)}

    imported = {
        name: set().union(*map(siblings, ast.walk(ast.parse((folder / f"{name}.py").read_text()))))
        for name in names
    }
    assert imported == {"base": set(), "reference": {"base"}, "triton": {"base"},
                        "exchange": {"base"}}
    assert available_linear_kernels() == ["reference", "triton"]  # each module registered its own


# ------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cu", [None, [0, 1000, 1001, 3000, 4096]], ids=["one-doc", "docs"])
@pytest.mark.parametrize("decay", [True, False], ids=["decay", "nodecay"])
@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 128), (8, 2, 64)], ids=["mha-128", "gqa-64"])
def test_gpu_matches_reference_bf16(monkeypatch, cu, decay, H, Hkv, D):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cu = torch.tensor(cu) if cu is not None else None
    q, k, v, h0, dout, dfinal = _inputs(2, 4096, H, Hkv, D, D, torch.bfloat16, "cuda", seed=1)
    g = retnet_log_decay(H, "cuda") if decay else None
    want = _run(linear_attention_reference, q, k, v, h0, dout, dfinal, torch.float32,
                log_decay=g, cu_seqlens=cu)
    got = _run(linear_attention_triton, q, k, v, h0, dout, dfinal, log_decay=g, cu_seqlens=cu)
    assert got["out"].dtype == torch.bfloat16
    for name in want:
        assert _rel(got[name], want[name]) < 2e-2, (name, _rel(got[name], want[name]))


# ------------------------------------------------ a state that arrives mid-call (CP's exchange)
def _exchange_run(kern, q, k, v, args, h0, entering, dout, dfinal, pending=False):
    """forward/backward_with_exchange with recording callbacks: (out, final, got_final,
    d_entering, dq, dk, dv, dh0).  ``pending``: the callbacks return their result as a pending
    one (a callable), as context parallelism's all-gathers do."""
    seen = {}

    def fwd(final):
        seen["final"] = final.clone()
        return (lambda: entering) if pending else entering

    def bwd(d_entering):
        seen["d_entering"] = d_entering.clone()
        return (lambda: dfinal) if pending else dfinal

    out, final, returned = forward_with_exchange(kern, q, k, v, args, h0, fwd)
    assert returned is entering
    grads = backward_with_exchange(kern, dout, q, k, v, args, h0, entering, bwd,
                                   grad_dtype=torch.float32)
    return out, final, seen["final"], seen["d_entering"], *grads


def _exchange_definition(q, k, v, args, h0, entering, dout, dfinal):
    """The same results from the float64 recurrent reference run from ``h0 + entering``."""
    ref = LinearReference(RECURRENT)
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    args = LinearArgs(args.scale, None if args.log_decay is None else args.log_decay.double(),
                      args.cu_seqlens)
    zero = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=torch.float64)
    h0 = zero if h0 is None else h0.double()
    both = h0 + (zero if entering is None else entering.double())
    out = ref.forward(q, k, v, args, both)[0]
    final = ref.forward(q, k, v, args, h0)[1]
    d_entering = ref.backward(dout, None, q, k, v, args, both)[3]
    dq, dk, dv, dh0 = ref.backward(dout, None if dfinal is None else dfinal.double(), q, k, v,
                                   args, both)
    return out, final, final, d_entering, dq, dk, dv, dh0


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("cu", [None, [0, 5, 20, 40], [0, 0, 17, 40], [0, 33, 40]],
                         ids=["one-doc", "doc-in-chunk-0", "doc-at-0", "doc-late"])
@pytest.mark.parametrize("decay", [True, False], ids=["decay", "nodecay"])
@pytest.mark.parametrize("with_h0,with_entering,with_dfinal",
                         [(False, True, True), (True, False, True), (True, True, False)],
                         ids=["entering", "h0", "h0+entering"])
def test_exchange_matches_definition(interpret, impl, cu, decay, with_h0, with_entering,
                                     with_dfinal):
    """``forward_with_exchange`` / ``backward_with_exchange`` (the Triton kernel's fused form and
    the generic one) equal plain calls from ``initial_state + entering``: the output, the final
    state handed to the exchange (from ``initial_state`` only), the entering state's gradient
    handed back, and every gradient (float32 against the float64 recurrence)."""
    kern = LinearTriton(TINY) if impl == "triton" else LinearReference()
    _check_exchange(kern, cu, decay, with_h0, with_entering, with_dfinal)


@pytest.mark.parametrize("cu", [None, [0, 5, 20, 40], [0, 0, 17, 40], [0, 16, 40], [0, 33, 40]],
                         ids=["one-doc", "doc-in-chunk-0", "doc-at-0", "doc-at-segment",
                              "doc-late"])
@pytest.mark.parametrize("segment", [16, 32], ids=["1-chunk-segments", "2-chunk-segments"])
@pytest.mark.parametrize("with_h0,with_entering,with_dfinal",
                         [(True, True, True), (False, True, False)], ids=["all-states", "entering"])
def test_exchange_over_segments(interpret, cu, segment, with_h0, with_entering, with_dfinal):
    """The Triton kernel's exchange path over segments of 16 and 32 tokens (16-token chunks; 40
    tokens, so the last segment is partial): the parallel sums per segment, their scan (the
    final state handed to the exchange, the entering state's gradient handed back), and the
    state walks of every segment from its chained start (the output and every gradient)."""
    _check_exchange(LinearTriton(replace(TINY, segment=segment)), cu, True, with_h0,
                    with_entering, with_dfinal)


def _check_exchange(kern, cu, decay, with_h0, with_entering, with_dfinal):
    q, k, v, h0, dout, dfinal = _inputs(2, 40, 4, 2, 16, 16, seed=5)
    g = retnet_log_decay(4) if decay else None
    args = LinearArgs.build(q, k, v, log_decay=g,
                            cu_seqlens=torch.tensor(cu) if cu is not None else None)
    entering = torch.randn(h0.shape, generator=torch.Generator().manual_seed(6))
    case = (q, k, v, args, h0 if with_h0 else None, entering if with_entering else None, dout,
            dfinal if with_dfinal else None)
    got = _exchange_run(kern, *case, pending=with_h0 and with_entering)
    want = _exchange_definition(*case)
    names = ["out", "final", "final given to exchange", "d_entering", "dq", "dk", "dv", "dh0"]
    for name, a, b in zip(names, got, want):
        if name == "dh0" and not with_h0:
            assert a is None
            continue
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, gpu])])
def test_weighted_state_sum_matches_its_definition(monkeypatch, device):
    """CP's combine of gathered states (the Triton kernel: interpreted on the CPU, compiled on
    the GPU) against the definition, for the weight views the strategy passes (rows ``r`` and
    ``P`` of ``W [P + 1, P, H]``, strided; one column), and the torch path for float64."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(11)
    P, B, H, D = 3, 2, 4, 16
    weights = torch.rand(P + 1, P, H, generator=gen).to(device)
    states = torch.randn(P + 1, B, H, D, D, generator=gen).to(device)

    def definition(w, x):
        return torch.einsum("...jh,jbhkv->...bhkv", w.double(), x.double())

    # forward: entering and final rows of P states; backward: a column over P or P + 1 grads
    for w, x in ((weights[1::P - 1], states[:P]), (weights[:, 1], states),
                 (weights[:-1, 2], states[:P])):
        torch.testing.assert_close(weighted_state_sum(w, x).double(), definition(w, x),
                                   rtol=1e-5, atol=1e-5)
    w64, x64 = weights.double()[1::P - 1], states[:P].double()
    torch.testing.assert_close(weighted_state_sum(w64, x64), definition(w64, x64))
    with pytest.raises(ValueError, match=r"weights must end in \[P, H\] = \[3, 4\]"):
        weighted_state_sum(weights[..., :2], states[:P])


def test_exchange_takes_a_non_contiguous_dout(interpret):
    """``out.sum().backward()`` hands CP an expanded (stride-0) dout: read, never refused."""
    q, k, v, h0, _, dfinal = _inputs(1, 24, 2, 2, 16, 16, seed=7)
    args = LinearArgs.build(q, k, v, log_decay=retnet_log_decay(2))
    dout = torch.ones(1, 1, 1, 1).expand(1, 24, 2, 16)
    got = _exchange_run(LinearTriton(TINY), q, k, v, args, None, h0, dout, dfinal)
    want = _exchange_definition(q, k, v, args, None, h0, dout.contiguous(), dfinal)
    for a, b in zip(got[3:7], want[3:7]):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_exchange_refuses_a_wrong_state(interpret, impl):
    kern = LinearTriton(TINY) if impl == "triton" else LinearReference()
    q, k, v, h0, dout, _ = _inputs(1, 8, 2, 2, 16, 16)
    args = LinearArgs.build(q, k, v)
    with pytest.raises(ValueError, match=r"entering state must have shape \[batch, heads"):
        _exchange_run(kern, q, k, v, args, None, h0[:, :1], dout, None)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cu", [None, [0, 3000, 4096]], ids=["one-doc", "docs"])
def test_gpu_exchange_matches_reference(monkeypatch, dtype, cu):
    """The fused exchange at a CP shard's size against the float32 torch reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, h0, dout, dfinal = _inputs(2, 4096, 4, 4, 128, 128, dtype, "cuda", seed=3)
    entering = torch.randn(h0.shape, device="cuda", generator=torch.Generator("cuda")
                           .manual_seed(4)) / 64  # a shard's state, scaled to the bf16 range
    args = LinearArgs.build(q, k, v, log_decay=retnet_log_decay(4, "cuda"),
                            cu_seqlens=torch.tensor(cu) if cu is not None else None)
    got = _exchange_run(LinearTriton(), q, k, v, args, h0, entering, dout, dfinal)
    f32 = (t.float() for t in (q, k, v))
    want = _exchange_run(LinearReference(), *f32, args, h0.float(), entering, dout.float(),
                         dfinal)
    tol = 2e-2 if dtype != torch.float32 else 1e-3
    names = ["out", "final", "final given to exchange", "d_entering", "dq", "dk", "dv", "dh0"]
    for name, a, b in zip(names, got, want):
        assert _rel(a, b) < tol, (name, _rel(a, b))
