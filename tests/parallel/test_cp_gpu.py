"""The CP checks on real GPUs over NCCL, in bf16: error within ~2x the one-GPU kernel's own error.

Skipped without at least 2 CUDA devices.  Errors are relative L2 (||x - ref|| / ||ref||) against
the float64 reference on the same (bf16-rounded) inputs.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from longctx.kernels import available_kernels
from longctx.testing import (
    CPCase,
    SimulatedMesh,
    errors_against_reference,
    host_sync_in_step,
    run_cp_case_on_rank,
)

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(N_GPUS < 2, reason="needs at least 2 CUDA devices"),
]
WORLD = min(N_GPUS, 4)
KERNELS = [k for k in ("reference", "triton") if k in available_kernels()]
COMBOS = [
    ("ring", "contiguous"),
    ("zigzag", "zigzag"),
    ("striped", "striped"),
    ("allgather", "contiguous"),
    ("ulysses", "zigzag"),
    ("hybrid", "zigzag"),
]


def gpu_case(strategy, layout, mask, kernel, world=WORLD) -> CPCase:
    return CPCase(
        strategy, layout, mask, world_size=world, batch=1, tokens_per_rank=512, heads=8,
        kv_heads=2, head_dim=64, dtype="bfloat16", kernel=kernel, device="cuda",
        ulysses=2 if world % 2 == 0 else world,
    )


def single_gpu_errors(case: CPCase) -> dict[str, float]:
    """The same sequence through the same kernel on one GPU, no CP."""
    one = replace(
        case, strategy="ring", layout="contiguous", ulysses=1, world_size=1,
        tokens_per_rank=case.tokens_per_rank * case.world_size,
    )
    return errors_against_reference(one, [run_cp_case_on_rank(None, one)], metric="rel_l2")


@pytest.fixture(scope="module")
def nccl_mesh():
    with SimulatedMesh(WORLD, backend="nccl") as mesh:
        yield mesh


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask", ["causal", "documents", "window"])
@pytest.mark.parametrize("strategy,layout", COMBOS, ids=[s for s, _ in COMBOS])
def test_bf16_cp_error_close_to_single_gpu(nccl_mesh, strategy, layout, mask, kernel):
    case = gpu_case(strategy, layout, mask, kernel)
    cp = errors_against_reference(case, nccl_mesh.run(run_cp_case_on_rank, case), "rel_l2")
    one = single_gpu_errors(case)
    for name in ("out", "dq", "dk", "dv"):
        assert cp[name] <= 2.0 * one[name] + 1e-4, (name, cp, one)
    assert cp["lse"] < 1e-3, cp


@pytest.mark.parametrize("kernel", ["auto", *(k for k in KERNELS if k != "reference")])
@pytest.mark.parametrize("mask", ["causal", "documents"])
@pytest.mark.parametrize("strategy,layout", COMBOS, ids=[s for s, _ in COMBOS])
def test_step_never_waits_for_the_gpu(nccl_mesh, strategy, layout, mask, kernel):
    """A forward+backward makes no host sync (torch's sync debug mode raises on any), so a
    training loop's host runs ahead of the GPU; the all-gather strategy's list indexing did."""
    case = gpu_case(strategy, layout, mask, kernel)
    assert nccl_mesh.run(host_sync_in_step, case) == [None] * WORLD
