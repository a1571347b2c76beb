"""Linear attention context parallelism (strategy "linear") against the one-process reference.

One simulated mesh (real gloo processes) per world size for the whole module.  Every case runs
forward and backward of ``sum(out * dout) + sum_r sum(final * dfinal_r)`` (each rank adds its own
``dfinal_r`` on the replicated final state) and compares, in float64 to ~1e-12, the unsharded
``out``, ``dq``, ``dk``, ``dv``, the final state on every rank and ``d initial_state`` (rank 0; zero
elsewhere) with the recurrent reference on the whole sequence.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist

from longctx.kernels.linear import (
    LinearReferenceConfig,
    linear_attention_reference,
    retnet_log_decay,
)
from longctx.kernels.mask import Mask
from longctx.parallel.strategies.linear import (
    ShardDocs,
    carry_weights,
    linear_attention,
    shards_passing,
)
from longctx.testing import MeshError, SimulatedMesh, first_host_sync

WORLD_SIZES = [1, 2, 3, 4, 8]
TOL = 1e-12
DOC_KINDS = ("none", "crossing", "shard-edges", "spanning")


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda p: f"P{p}")
def mesh(request, meshes):
    return meshes.get(request.param)


@dataclass(frozen=True)
class LinearCPCase:
    """One CP check; inputs and documents are built from the seed, the same on every process."""

    world_size: int
    docs: str = "none"  # one of DOC_KINDS
    decay: bool = True
    initial_state: bool = True
    final_state: bool = True
    tokens_per_rank: int = 6
    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    dk: int = 8
    dv: int = 6
    dtype: str = "float64"
    kernel: str = "reference"
    device: str = "cpu"  # "cuda": rank r uses cuda:r (NCCL mesh)
    seed: int = 0

    @property
    def seq_len(self) -> int:
        return self.tokens_per_rank * self.world_size

    def log_decay(self) -> torch.Tensor | None:
        return retnet_log_decay(self.heads) * 4 if self.decay else None  # lambda down to ~0.88

    def cu_seqlens(self) -> torch.Tensor | None:
        S, n, P = self.seq_len, self.tokens_per_rank, self.world_size
        if self.docs == "none":
            return None
        if self.docs == "crossing":  # random boundaries inside shards, documents across ranks
            cuts = random.Random(self.seed).sample(range(1, S), k=min(S - 1, P + 1))
        elif self.docs == "shard-edges":  # documents starting exactly at shard starts, an empty one
            cuts = [0, 2, 2] + [r * n for r in range(1, P, 2)]
        elif self.docs == "spanning":  # one document over all middle shards, a 1-token document
            cuts = [n // 2, S - 1]
        else:
            raise ValueError(f"unknown docs kind {self.docs!r}; choose one of {DOC_KINDS}")
        return torch.tensor([0, *sorted(cuts), S])

    def make_inputs(self) -> dict[str, torch.Tensor]:
        """Whole-sequence tensors; ``dfinal [P, B, H, Dk, Dv]`` holds each rank's final-state grad."""
        g = torch.Generator().manual_seed(self.seed)
        dtype = getattr(torch, self.dtype)
        B, S, H, Hkv, Dk, Dv = self.batch, self.seq_len, self.heads, self.kv_heads, self.dk, self.dv

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

        return dict(
            q=randn(B, S, H, Dk), k=randn(B, S, Hkv, Dk), v=randn(B, S, Hkv, Dv),
            h0=randn(B, H, Dk, Dv),
            dout=randn(B, S, H, Dv), dfinal=randn(self.world_size, B, H, Dk, Dv),
        )


def _case_step(group, case: LinearCPCase, decay_on_host: bool = False):
    """This rank's leaves ``{q, k, v[, h0]}`` and ``step()``: CP linear attention forward and
    backward over its contiguous shards (gradients accumulate), returning ``(out, final)``.
    ``decay_on_host``: pass the decay on the CPU, as the models do (no read-back per call)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    assert world == case.world_size
    device = torch.device(f"cuda:{rank}") if case.device == "cuda" else torch.device("cpu")
    x = {name: t.to(device) for name, t in case.make_inputs().items()}
    n = case.tokens_per_rank
    local = slice(rank * n, (rank + 1) * n)  # contiguous layout
    leaves = {name: x[name][:, local].clone().requires_grad_() for name in ("q", "k", "v")}
    if case.initial_state:
        leaves["h0"] = x["h0"].clone().requires_grad_()
    log_decay = None
    if case.decay:
        log_decay = case.log_decay() if decay_on_host else case.log_decay().to(device)

    def step():
        interpret = case.kernel == "triton" and case.device == "cpu"
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors: the kernel runs in the interpreter
        try:
            result = linear_attention(
                leaves["q"], leaves["k"], leaves["v"], group, log_decay=log_decay,
                cu_seqlens=case.cu_seqlens(), initial_state=leaves.get("h0"), kernel=case.kernel,
                return_final_state=case.final_state,
            )
            out, final = result if case.final_state else (result, None)
            loss = (out * x["dout"][:, local].to(out.dtype)).sum()
            if final is not None:
                loss = loss + (final * x["dfinal"][rank].to(final.dtype)).sum()
            loss.backward()
        finally:
            if interpret:
                os.environ.pop("TRITON_INTERPRET", None)
        return out, final

    return leaves, step


def _run_on_rank(group, case: LinearCPCase) -> dict[str, torch.Tensor]:
    """Rank body: shard, run CP linear attention forward and backward, return shards and grads."""
    leaves, step = _case_step(group, case)
    out, final = step()
    got = {"out": out.detach(), **{f"d{name}": t.grad for name, t in leaves.items()}}
    if final is not None:
        got["final"] = final.detach()
    return {name: t.cpu() for name, t in got.items()}


def _host_sync_on_rank(group, case: LinearCPCase) -> str | None:
    """Rank body (CUDA): ``first_host_sync`` of the case's step, the decay on the host."""
    return first_host_sync(_case_step(group, case, decay_on_host=True)[1])


def _reference(case: LinearCPCase) -> dict[str, torch.Tensor]:
    x = {name: t.to(torch.float64) for name, t in case.make_inputs().items()}
    q, k, v = (x[name].clone().requires_grad_() for name in ("q", "k", "v"))
    h0 = x["h0"].clone().requires_grad_() if case.initial_state else None
    out, final = linear_attention_reference(
        q, k, v, log_decay=case.log_decay(), cu_seqlens=case.cu_seqlens(), initial_state=h0,
        return_final_state=True,
        config=LinearReferenceConfig(mode="recurrent" if case.seq_len <= 256 else "chunked"),
    )
    loss = (out * x["dout"]).sum()
    if case.final_state:
        loss = loss + (final * x["dfinal"].sum(0)).sum()  # the ranks' final-state grads add up
    loss.backward()
    want = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "final": final.detach()}
    if h0 is not None:
        want["dh0"] = h0.grad if h0.grad is not None else torch.zeros_like(h0)
    return want


def _error(got: torch.Tensor, want: torch.Tensor, metric: str) -> float:
    diff = got.double() - want
    if metric == "rel_l2":
        return float(diff.norm() / want.norm().clamp_min(1e-300))
    return float(diff.abs().max())


def _errors(case: LinearCPCase, shards: list[dict], metric: str = "max_abs") -> dict[str, float]:
    want = _reference(case)
    err = {}
    for name in ("out", "dq", "dk", "dv"):
        got = torch.cat([s[name] for s in shards], 1)
        assert got.shape == want[name].shape, name
        err[name] = _error(got, want[name], metric)
    if case.final_state:  # replicated on every rank
        err["final"] = max(_error(s["final"], want["final"], metric) for s in shards)
    if case.initial_state:  # the gradient lands on rank 0, zeros elsewhere
        err["dh0"] = _error(shards[0]["dh0"], want["dh0"], metric)
        err["dh0_elsewhere"] = max([float(s["dh0"].abs().max()) for s in shards[1:]], default=0.0)
    return err


def _check(mesh, case: LinearCPCase, tol: float = TOL) -> None:
    case = replace(case, world_size=mesh.world_size)
    errors = _errors(case, mesh.run(_run_on_rank, case))
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"{case}: errors above {tol}: {bad}"


# ------------------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("decay", [True, False], ids=["decay", "nodecay"])
@pytest.mark.parametrize("docs", DOC_KINDS)
def test_linear_cp_matches_reference(mesh, docs, decay):
    _check(mesh, LinearCPCase(mesh.world_size, docs=docs, decay=decay))


@pytest.mark.parametrize("initial_state,final_state", [(False, False), (False, True), (True, False)])
def test_linear_cp_without_states(mesh, initial_state, final_state):
    case = LinearCPCase(mesh.world_size, docs="crossing", initial_state=initial_state,
                        final_state=final_state, heads=2, kv_heads=1, seed=1)
    _check(mesh, case)


def test_linear_cp_triton_kernel_interpreted(mesh):
    """The same CP math over the Triton kernel (interpreter, float32; one 16-token chunk a rank)."""
    case = LinearCPCase(mesh.world_size, docs="crossing", tokens_per_rank=16, batch=1, heads=2,
                        kv_heads=2, dk=16, dv=16, dtype="float32", kernel="triton", seed=2)
    _check(mesh, case, tol=1e-4)


def _chained_on_rank(group, case: LinearCPCase) -> dict[str, torch.Tensor]:
    """Rank body: two CP calls on two halves of a sequence (each sharded over all ranks), the
    replicated final state of the first passed as the initial state of the second."""
    rank = dist.get_rank(group)
    x = case.make_inputs()
    half, n = case.seq_len // 2, case.tokens_per_rank // 2
    h0 = x["h0"].clone().requires_grad_()
    leaves, loss, state = {}, 0.0, h0
    for part in range(2):
        local = slice(part * half + rank * n, part * half + (rank + 1) * n)
        q, k, v = (x[name][:, local].clone().requires_grad_() for name in ("q", "k", "v"))
        out, state = linear_attention(q, k, v, group, log_decay=case.log_decay(),
                                      initial_state=state, return_final_state=True)
        loss = loss + (out * x["dout"][:, local]).sum()
        leaves[part] = (q, k, v)
    (loss + (state * x["dfinal"][rank]).sum()).backward()
    return {
        name: torch.cat([leaves[p][i].grad for p in range(2)], 1)
        for i, name in enumerate(("dq", "dk", "dv"))
    } | {"dh0": h0.grad}


def test_chained_cp_calls_equal_one_sequence(mesh):
    """State conventions compose: final (replicated, grads summed) -> initial (rank 0 owns it)."""
    case = LinearCPCase(mesh.world_size, tokens_per_rank=8, seed=3)
    shards = mesh.run(_chained_on_rank, case)
    want = _reference(case)
    n = case.tokens_per_rank // 2
    for name in ("dq", "dk", "dv"):
        # rank r holds local tokens [r*n, (r+1)*n) of each half
        got = torch.cat([s[name][:, :n] for s in shards] + [s[name][:, n:] for s in shards], 1)
        assert float((got - want[name]).abs().max()) < TOL, name
    assert float((shards[0]["dh0"] - want["dh0"]).abs().max()) < TOL
    assert all(not s["dh0"].any() for s in shards[1:])


# ---------------------------------------------------------------------------------- pure helpers
def test_shard_docs_and_carry_weights():
    cu = torch.tensor([0, 5, 16, 20, 24])  # P = 4, n = 6: shards [0,6) [6,12) [12,18) [18,24)
    docs = [ShardDocs.build(cu, 24, 4, r) for r in range(4)]
    assert [(d.head, d.passes) for d in docs] == [(0, False), (6, True), (4, False), (2, False)]
    assert [d.local_cu.tolist() for d in docs] == [[0, 5, 6], [0, 6], [0, 4, 6], [0, 2, 6]]
    assert list(shards_passing(cu, 24, 4)) == [d.passes for d in docs]
    g = torch.tensor([-0.5])
    W = carry_weights(shards_passing(cu, 24, 4), 6, g, heads=1)  # [P + 1, P, H]
    expected = torch.zeros(5, 4, 1, dtype=torch.float64)
    expected[1, 0] = 1  # rank 1 starts where rank 0 ends
    expected[2, 1], expected[2, 0] = 1, torch.exp(g * 6)  # rank 1 passes rank 0's state on, decayed
    expected[3, 2] = 1  # a document starts in rank 2: nothing older gets through
    expected[4, 3] = 1
    torch.testing.assert_close(W, expected)


@pytest.mark.parametrize("seed", range(5))
def test_carry_weights_match_their_definition(seed):
    rng = random.Random(seed)
    P, n = rng.randint(1, 9), rng.randint(1, 5)
    S = P * n
    cu = torch.tensor([0, *sorted(rng.sample(range(0, S + 1), k=rng.randint(0, 4))), S])
    passes = shards_passing(cu, S, P)
    assert list(passes) == [ShardDocs.build(cu, S, P, r).passes for r in range(P)]
    g = torch.tensor([-0.3, 0.0])
    W = carry_weights(passes, n, g, heads=2)
    for r in range(P + 1):
        for j in range(P):
            through = range(j + 1, r)  # prod_{j<i<r} A_i, A_i = lambda^n if shard i passes
            want = torch.exp(g * n * len(through)) if j < r and all(passes[i] for i in through) else 0 * g
            torch.testing.assert_close(W[r, j], want.double(), msg=f"W[{r}, {j}]")


# ------------------------------------------------------------------------------------ bad inputs
def _qkv(s=8, h=4, hkv=2, d=8, dtype=torch.float64):
    return torch.randn(1, s, h, d).to(dtype), torch.randn(1, s, hkv, d).to(dtype), torch.randn(1, s, hkv, d).to(dtype)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layout="zigzag"), r"runs on the contiguous layout.*layout='contiguous'"),
        (dict(layout="striped:2"), r"contiguous layout.*got layout 'striped:2'"),
        (dict(cu_seqlens=torch.tensor([0, 3, 6])), r"ends at 6 but the 1 shards of 8 tokens make 8"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 8])), r"non-decreasing"),
        (dict(log_decay=torch.zeros(2)), r"log_decay must be a float tensor of shape \[heads\] = \[4\]"),
        (dict(log_decay=torch.ones(4)), r"finite and <= 0"),
        (dict(initial_state=torch.zeros(1, 2, 8, 8)), r"\[batch, heads, dk, dv\] = \[1, 4, 8, 8\]"),
        (dict(mask=Mask(causal=True, window=4)), r"only be causal with documents.*softmax strategy"),
        (dict(mask=Mask()), r"causal linear attention"),
        (dict(mask=Mask(causal=True, cu_seqlens=torch.tensor([0, 8])),
              cu_seqlens=torch.tensor([0, 8])), r"not both"),
        (dict(kernel="flash"), r"unknown linear attention kernel 'flash'"),
        (dict(kernel="triton"), r"kernel='reference'"),  # float64 (or CPU without the interpreter)
        (dict(scale=-1.0), r"scale must be finite and > 0"),
    ],
)
def test_bad_input_single_process(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_attention(*_qkv(), **kwargs)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: _qkv(h=3, hkv=2), r"not a multiple of the 2 kv heads"),
        (lambda: _qkv(dtype=torch.int64), r"use one of float16, bfloat16"),
        (lambda: (_qkv()[0], *_qkv(dtype=torch.float32)[1:]), r"share a dtype"),
        (lambda: (_qkv()[0], _qkv()[1].to("meta"), _qkv()[2]), r"must be on one device"),
    ],
)
def test_bad_tensors_single_process(make, match):
    with pytest.raises(ValueError, match=match):
        linear_attention(*make())


def test_mask_form_equals_cu_seqlens_form():
    q, k, v = _qkv(s=10)
    cu = torch.tensor([0, 4, 10])
    a = linear_attention(q, k, v, cu_seqlens=cu, log_decay=retnet_log_decay(4))
    b = linear_attention(q, k, v, mask=Mask(causal=True, cu_seqlens=cu), log_decay=retnet_log_decay(4))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def _local_cu_seqlens(group):
    """Rank body: a common mistake, cu_seqlens of the local shard instead of the global sequence."""
    q, k, v = _qkv(s=6)
    linear_attention(q, k, v, group, cu_seqlens=torch.tensor([0, 2, 6]))


def test_local_cu_seqlens_is_refused_on_every_rank(mesh):
    P = mesh.world_size
    if P == 1:
        pytest.skip("one shard: local and global boundaries coincide")
    with pytest.raises(MeshError) as info:
        mesh.run(_local_cu_seqlens)
    msg = str(info.value)
    assert f"failed on {P} rank(s)" in msg
    assert f"the {P} shards of 6 tokens make {6 * P}" in msg and "global (unsharded)" in msg


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_nccl_bf16_triton_matches_reference():
    """The same body over NCCL with the compiled kernel: bf16 CP vs the float64 reference."""
    case = LinearCPCase(2, docs="crossing", tokens_per_rank=2048, batch=1, heads=4, kv_heads=2,
                        dk=64, dv=64, dtype="bfloat16", kernel="triton", device="cuda")
    with SimulatedMesh(2, backend="nccl") as nccl_mesh:
        errors = _errors(case, nccl_mesh.run(_run_on_rank, case), metric="rel_l2")
    errors.pop("dh0_elsewhere")
    assert max(errors.values()) < 2e-2, errors


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("docs", ["none", "crossing"])
def test_gpu_step_never_waits_for_the_gpu(docs):
    """A CP forward+backward with the decay on the host (as the models pass it) makes no host
    sync, so the host queues the next layer while the GPU works."""
    case = LinearCPCase(2, docs=docs, tokens_per_rank=2048, batch=1, heads=4, kv_heads=2,
                        dk=64, dv=64, dtype="bfloat16", kernel="triton", device="cuda",
                        initial_state=True, final_state=True)
    with SimulatedMesh(2, backend="nccl") as nccl_mesh:
        assert nccl_mesh.run(_host_sync_on_rank, case) == [None, None]
