"""Test support: a simulated device mesh and CP-vs-reference checks (used by tests/ and users)."""

from .cp_check import (
    MASK_KINDS,
    CPCase,
    check_cp_case,
    errors_against_reference,
    first_host_sync,
    host_sync_in_step,
    reference_grads,
    run_cp_case_on_rank,
    tensor_error,
)
from .mesh import MeshConfig, MeshError, MeshPool, SimulatedMesh

__all__ = [
    "MASK_KINDS",
    "CPCase",
    "MeshConfig",
    "MeshError",
    "MeshPool",
    "SimulatedMesh",
    "check_cp_case",
    "errors_against_reference",
    "first_host_sync",
    "host_sync_in_step",
    "reference_grads",
    "run_cp_case_on_rank",
    "tensor_error",
]
