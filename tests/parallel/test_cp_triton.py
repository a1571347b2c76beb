"""The CP strategies drive the Triton kernel (Triton's interpreter on CPU, float32) correctly:
slices of shards, offset global positions per ring step, float32 partial gradients."""

from __future__ import annotations

import pytest

from longctx.testing import CPCase, check_cp_case

COMBOS = [
    ("ring", "contiguous"),
    ("zigzag", "zigzag"),
    ("striped", "striped"),
    ("allgather", "contiguous"),
    ("ulysses", "zigzag"),
]


@pytest.fixture(scope="module")
def mesh2(meshes):
    return meshes.get(2, env={"TRITON_INTERPRET": "1"})  # the workers interpret Triton


@pytest.mark.parametrize("mask", ["causal", "documents"])
@pytest.mark.parametrize("strategy,layout", COMBOS, ids=[s for s, _ in COMBOS])
def test_triton_kernel_under_cp(mesh2, strategy, layout, mask):
    case = CPCase(
        strategy, layout, mask, world_size=2, dtype="float32", kernel="triton", batch=1,
        tokens_per_rank=16, head_dim=16,
    )
    errors = check_cp_case(mesh2, case)
    assert max(errors.values()) < 1e-5, errors
