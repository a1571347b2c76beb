"""Shared fixtures: one pool of simulated meshes for the whole session.

Starting a mesh of N processes costs seconds per rank on a 2-core machine, so every test module
takes its meshes from one pool (``meshes.get(world_size)``) instead of starting its own.
"""

from __future__ import annotations

import pytest

from longctx.testing import MeshPool


@pytest.fixture(scope="session")
def meshes():
    pool = MeshPool(max_ranks=18)  # world sizes 1, 2, 3, 4 and 8 at once
    yield pool
    pool.close()
