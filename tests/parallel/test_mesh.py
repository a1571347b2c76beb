"""build_mesh places ranks with tp innermost, then ulysses, ring, dp; bad sizes are refused."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from longctx.parallel.mesh import ParallelDims, build_mesh
from longctx.testing import SimulatedMesh


def _members(group, dims):
    pm = build_mesh(dims, "cpu")
    return {
        name: sorted(dist.get_process_group_ranks(pm.group(name)))
        for name in ("dp", "cp", "tp", "ring", "ulysses")
    }


@pytest.fixture(scope="module")
def mesh8():
    with SimulatedMesh(8) as m:
        yield m


def test_rank_placement_2x2x2_with_cp_split(mesh8):
    dims = ParallelDims(dp=2, cp=2, tp=2, ulysses=2)  # cp = ring 1 x ulysses 2
    members = mesh8.run(_members, dims)
    # rank = ((dp * cp) + cp_rank) * tp + tp_rank
    assert members[5] == {
        "dp": [1, 5], "cp": [5, 7], "tp": [4, 5], "ring": [5], "ulysses": [5, 7],
    }


def test_cp_split_ring_by_ulysses(mesh8):
    dims = ParallelDims(cp=8, ulysses=4)  # ring 2 x ulysses 4: cp rank = ring * 4 + ulysses
    members = mesh8.run(_members, dims)
    assert members[6]["ulysses"] == [4, 5, 6, 7]
    assert members[6]["ring"] == [2, 6]
    assert members[6]["cp"] == list(range(8))


def _build(group, dims):
    build_mesh(dims, "cpu")


def test_sizes_must_multiply_to_world(mesh8):
    with pytest.raises(Exception, match="product is 8"):
        mesh8.run(_build, ParallelDims(dp=3, cp=2))


def test_ulysses_must_divide_cp():
    with pytest.raises(ValueError, match="must divide cp=6"):
        ParallelDims(cp=6, ulysses=4)
