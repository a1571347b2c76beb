"""Compare a context-parallel attention run and all its gradients against the one-process reference.

A :class:`CPCase` names everything about one check (strategy, layout, mask, world size, shapes,
dtype, kernel) and builds its inputs and mask deterministically from a seed, so that every rank
and the checking process agree without shipping tensors around.  :func:`check_cp_case` runs the
case on a :class:`~longctx.testing.mesh.SimulatedMesh`, gathers the shards, and returns the errors
of ``out``, ``lse``, ``dq``, ``dk`` and ``dv`` against :class:`~longctx.kernels.TorchReference` on
the whole sequence in float64.

Example::

    with SimulatedMesh(4) as mesh:
        errors = check_cp_case(mesh, CPCase("zigzag", "zigzag", "causal", world_size=4))
        assert max(errors.values()) < 1e-10
"""

from __future__ import annotations

import functools
import random
import traceback
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.mask import BlockSparse, Mask
from ..kernels.reference import TorchReference
from ..parallel.api import attention
from ..parallel.context import HybridGroups
from ..parallel.layout import Layout
from ..parallel.mesh import ParallelDims, build_mesh

__all__ = [
    "MASK_KINDS",
    "CPCase",
    "run_cp_case_on_rank",
    "first_host_sync",
    "host_sync_in_step",
    "reference_grads",
    "tensor_error",
    "errors_against_reference",
    "check_cp_case",
]

MASK_KINDS = (
    "full", "causal", "window", "window_bidir", "documents", "block_sparse", "block_sparse_heads",
)


@dataclass(frozen=True)
class CPCase:
    strategy: str
    layout: str
    mask: str  # one of MASK_KINDS
    world_size: int
    batch: int = 2
    tokens_per_rank: int = 12
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    dtype: str = "float64"
    kernel: str = "reference"
    device: str = "cpu"  # "cuda": rank r uses cuda:r
    seed: int = 0
    ulysses: int = 1  # strategy "hybrid": the ulysses degree (ring = world_size / ulysses)

    @property
    def seq_len(self) -> int:
        return self.tokens_per_rank * self.world_size

    def make_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Full-sequence ``q [B,S,H,D]``, ``k``/``v [B,S,H_kv,D]`` and ``dout``, on the CPU."""
        g = torch.Generator().manual_seed(self.seed)
        dtype = getattr(torch, self.dtype)
        B, S, H, Hkv, D = self.batch, self.seq_len, self.heads, self.kv_heads, self.head_dim

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

        return randn(B, S, H, D), randn(B, S, Hkv, D), randn(B, S, Hkv, D), randn(B, S, H, D)

    def make_mask(self) -> Mask:
        S, per_rank = self.seq_len, self.tokens_per_rank
        rng = random.Random(self.seed)
        if self.mask == "full":
            return Mask()
        if self.mask == "causal":
            return Mask(causal=True)
        if self.mask == "window":  # spans a shard and a half: talks to 2 earlier ranks
            return Mask(causal=True, window=per_rank + per_rank // 2)
        if self.mask == "window_bidir":
            return Mask(window=per_rank // 2 + 1)
        if self.mask == "documents":  # boundaries inside shards, documents crossing ranks
            cuts = sorted(rng.sample(range(1, S), k=min(S - 1, self.world_size + 2)))
            return Mask(causal=True, cu_seqlens=torch.tensor([0, *cuts, S]))
        if self.mask == "block_sparse":  # random blocks; some query blocks see nothing at all
            block = 4
            n = -(-S // block)
            table = torch.rand(n, n, generator=torch.Generator().manual_seed(self.seed)) < 0.4
            table[0] = False
            return Mask(causal=True, block_sparse=BlockSparse.from_table(block, table))
        if self.mask == "block_sparse_heads":  # lists per batch row and query head, empty rows
            block = 4
            n = -(-S // block)
            g = torch.Generator().manual_seed(self.seed + 1)
            table = torch.rand(self.batch, self.heads, n, n, generator=g) < 0.35  # [B, H, n, n]
            table[:, 0, 1] = False  # head 0 has a query block that sees nothing
            return Mask(causal=True, block_sparse=BlockSparse.from_table(block, table))
        raise ValueError(f"unknown mask kind {self.mask!r}; choose one of {MASK_KINDS}")


def _device(case: CPCase, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if case.device == "cuda" else torch.device("cpu")


@functools.cache
def _hybrid_groups(world_size: int, ulysses: int, device_type: str) -> HybridGroups:
    """Built once per worker process and shape (creating groups is a collective)."""
    return build_mesh(ParallelDims(cp=world_size, ulysses=ulysses), device_type).hybrid_groups()


def _case_step(group, case: CPCase):
    """This rank's shards ``(q, k, v)`` (leaves) and ``step()``: CP attention forward and
    backward over them (gradients accumulate), returning ``(out, lse)``."""
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    if world != case.world_size:
        raise ValueError(f"case is for {case.world_size} ranks, the group has {world}")
    layout = Layout.parse(case.layout)
    device = _device(case, rank)
    q, k, v, dout = (layout.shard(t, world, rank).to(device) for t in case.make_inputs())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if case.strategy == "hybrid":
        group = _hybrid_groups(world, case.ulysses, device.type)
    mask = case.make_mask()

    def step() -> tuple[Tensor, Tensor]:
        out, lse = attention(
            q, k, v, group, strategy=case.strategy, layout=layout, mask=mask,
            kernel=case.kernel, return_lse=True,
        )
        out.backward(dout)
        return out, lse

    return (q, k, v), step


def run_cp_case_on_rank(group, case: CPCase) -> dict[str, Tensor]:
    """Rank body: shard the case's inputs, run CP attention forward and backward, return shards.

    ``group=None`` runs the case in this process alone (``case.world_size`` must be 1).
    """
    (q, k, v), step = _case_step(group, case)
    out, lse = step()
    return {
        "out": out.detach().cpu(),
        "lse": lse.detach().cpu(),
        "dq": q.grad.cpu(),
        "dk": k.grad.cpu(),
        "dv": v.grad.cpu(),
    }


def first_host_sync(step) -> str | None:
    """Run ``step()`` once to warm up (memoised plans, autotuning), then again under
    ``torch.cuda.set_sync_debug_mode("error")``: the error of the first operation that made the
    host wait for the GPU, or None if none did.

    A step that syncs the host stalls the launch queue every layer, so the GPU idles while the
    host catches up (e.g. indexing a CUDA tensor with a Python list copies the index to the
    device and waits for every kernel queued before it).
    """
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as e:
        # the deepest frame in longctx says where (the message itself does not)
        ours = [f for f in traceback.extract_tb(e.__traceback__) if "longctx" in f.filename]
        where = f" at {ours[-1].filename}:{ours[-1].lineno} ({ours[-1].name})" if ours else ""
        return str(e).splitlines()[0] + where
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return None


def host_sync_in_step(group, case: CPCase) -> str | None:
    """Rank body (CUDA): :func:`first_host_sync` of the case's forward and backward."""
    return first_host_sync(_case_step(group, case)[1])


def reference_grads(case: CPCase) -> dict[str, Tensor]:
    """The whole-sequence result in float64 from the torch reference, from the same inputs."""
    q, k, v, dout = (t.to(torch.float64) for t in case.make_inputs())
    mask, kernel = case.make_mask(), TorchReference()
    scale = case.head_dim**-0.5
    out, lse = kernel.forward(q, k, v, scale=scale, mask=mask)
    dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, scale=scale, mask=mask)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def tensor_error(got: Tensor, want: Tensor, metric: str = "max_abs") -> float:
    """``max_abs`` or ``rel_l2`` (||got - want|| / ||want||) error over the finite entries.

    Infinite when the ``-inf`` entries (empty rows of ``lse``) disagree or ``got`` has a NaN.
    """
    got, want = got.to(torch.float64), want.to(torch.float64)
    if torch.isnan(got).any():
        return float("inf")
    inf_want = torch.isneginf(want)
    if not torch.equal(torch.isneginf(got), inf_want):
        return float("inf")
    diff, ref = (got - want)[~inf_want], want[~inf_want]
    if not diff.numel():
        return 0.0
    if metric == "max_abs":
        return float(diff.abs().max())
    if metric == "rel_l2":
        return float(diff.norm() / ref.norm().clamp_min(1e-300))
    raise ValueError(f"metric must be 'max_abs' or 'rel_l2', got {metric!r}")


def errors_against_reference(
    case: CPCase, shards: list[dict[str, Tensor]], metric: str = "max_abs",
    names: tuple[str, ...] = ("out", "lse", "dq", "dk", "dv"),
) -> dict[str, float]:
    """Unshard per-rank results and compare each of ``names`` with the float64 whole-sequence
    reference (every one must be in each rank's results)."""
    layout = Layout.parse(case.layout)
    errors = {}
    reference = reference_grads(case)
    for name in names:
        ref = reference[name]
        dim = 2 if name == "lse" else 1  # lse is [B, H, S]
        got = layout.unshard([s[name] for s in shards], dim=dim)
        errors[name] = tensor_error(got, ref, metric)
    return errors


def check_cp_case(mesh, case: CPCase, metric: str = "max_abs") -> dict[str, float]:
    """Errors of out, lse, dq, dk, dv (CP on ``mesh`` vs. the one-process reference)."""
    if mesh.world_size != case.world_size:
        case = replace(case, world_size=mesh.world_size)
    return errors_against_reference(case, mesh.run(run_cp_case_on_rank, case), metric)
