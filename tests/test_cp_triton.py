"""The CP strategies drive the Triton kernel (Triton's interpreter on CPU, float32) correctly:
slices of shards, offset global positions per ring step, float32 partial gradients."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is launched

import pytest  # noqa: E402

from longctx.testing import CPCase, SimulatedMesh, check_cp_case  # noqa: E402

COMBOS = [
    ("ring", "contiguous"),
    ("zigzag", "zigzag"),
    ("striped", "striped"),
    ("allgather", "contiguous"),
    ("ulysses", "zigzag"),
]


@pytest.fixture(scope="module")
def mesh2():
    with SimulatedMesh(2) as m:
        yield m


@pytest.mark.parametrize("mask", ["causal", "documents"])
@pytest.mark.parametrize("strategy,layout", COMBOS, ids=[s for s, _ in COMBOS])
def test_triton_kernel_under_cp(mesh2, strategy, layout, mask):
    case = CPCase(
        strategy, layout, mask, world_size=2, dtype="float32", kernel="triton", batch=1,
        tokens_per_rank=16, head_dim=16,
    )
    errors = check_cp_case(mesh2, case)
    assert max(errors.values()) < 1e-5, errors
