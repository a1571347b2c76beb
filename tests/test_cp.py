"""Every CP strategy x layout x mask x world size against the one-process reference, float64.

One simulated mesh (real gloo processes) is started per world size for the whole module and
reused by every case.  Forward ``out``/``lse`` and ``dq``/``dk``/``dv`` must match the reference
on the whole sequence to ~1e-12.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import longctx
from longctx.testing import MASK_KINDS, CPCase, SimulatedMesh, check_cp_case

WORLD_SIZES = [1, 2, 3, 4, 8]
TOL = 1e-10

# (strategy, layout) pairs: the ring and all-gather run on any layout
COMBOS = [
    ("ring", "contiguous"),
    ("ring", "zigzag"),
    ("ring", "striped"),
    ("ring", "striped:2"),
    ("zigzag", "zigzag"),
    ("striped", "striped"),
    ("striped", "striped:2"),
    ("allgather", "contiguous"),
    ("allgather", "zigzag"),
    ("allgather", "striped"),
]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda p: f"P{p}")
def mesh(request):
    with SimulatedMesh(request.param) as m:
        yield m


def _assert_close(errors: dict[str, float], case: CPCase) -> None:
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"{case}: errors above {TOL}: {bad}"


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("strategy,layout", COMBOS, ids=[f"{s}-{lay}" for s, lay in COMBOS])
def test_strategy_matches_reference(mesh, strategy, layout, mask):
    case = CPCase(strategy, layout, mask, world_size=mesh.world_size)
    _assert_close(check_cp_case(mesh, case), case)


HEAD_SPLIT_COMBOS = [
    ("ulysses", "contiguous"),
    ("ulysses", "zigzag"),
    ("ulysses", "striped"),
    ("hybrid", "contiguous"),
    ("hybrid", "zigzag"),
]


def hybrid_degree(world: int) -> int:
    """A Ulysses degree that leaves a real ring when the world allows one (2 x R)."""
    return 2 if world % 2 == 0 and world > 2 else world


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize(
    "strategy,layout", HEAD_SPLIT_COMBOS, ids=[f"{s}-{lay}" for s, lay in HEAD_SPLIT_COMBOS]
)
def test_head_split_strategy_matches_reference(mesh, strategy, layout, mask):
    P = mesh.world_size
    case = CPCase(
        strategy, layout, mask, world_size=P, heads=2 * P, kv_heads=P, head_dim=4,
        ulysses=hybrid_degree(P),
    )
    _assert_close(check_cp_case(mesh, case), case)


@pytest.mark.parametrize("strategy", ["ulysses", "hybrid"])
def test_head_split_replicates_kv_heads_when_fewer_than_ranks(mesh, strategy):
    """MQA: one kv head, needed by every rank; its gradient sums the replicas."""
    P = mesh.world_size
    case = CPCase(
        strategy, "zigzag", "documents", world_size=P, heads=P, kv_heads=1, head_dim=4,
        ulysses=hybrid_degree(P),
    )
    _assert_close(check_cp_case(mesh, case), case)


@pytest.mark.parametrize(
    "heads,kv_heads", [(4, 4), (4, 1), (6, 3)], ids=["mha", "mqa", "gqa-6-3"]
)
@pytest.mark.parametrize("strategy,layout", [("ring", "zigzag"), ("allgather", "striped")])
def test_head_layouts(mesh, strategy, layout, heads, kv_heads):
    case = CPCase(
        strategy, layout, "documents", world_size=mesh.world_size, heads=heads,
        kv_heads=kv_heads, batch=1, head_dim=4,
    )
    _assert_close(check_cp_case(mesh, case), case)


def test_low_precision_dtypes_keep_dtype_and_float32_lse(mesh):
    case = CPCase("ring", "zigzag", "causal", world_size=mesh.world_size, dtype="float32")
    errors = check_cp_case(mesh, case)
    assert max(errors.values()) < 1e-4, errors


def _module_and_device_mesh(group, seq_per_rank):
    """Rank body: the nn.Module wrapper over a 1-D DeviceMesh equals the functional entry."""
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, seq_per_rank * world, 4, 8, generator=g, dtype=torch.float64)
    kv = torch.randn(1, seq_per_rank * world, 2, 8, generator=g, dtype=torch.float64)
    q_l, kv_l = (longctx.shard(t, "striped", world, rank) for t in (q, kv))
    attn = longctx.ContextParallelAttention(
        longctx.CPConfig(strategy="striped", causal=True), group=device_mesh["cp"]
    )
    via_module = attn(q_l, kv_l, kv_l)
    via_function = longctx.attention(
        q_l, kv_l, kv_l, group, strategy="striped", mask=longctx.Mask(causal=True)
    )
    return float((via_module - via_function).abs().max())


def test_module_over_device_mesh(mesh):
    assert max(mesh.run(_module_and_device_mesh, 6)) == 0.0


def _auto_choice(group, heads, kv_heads, layout, causal):
    q = torch.zeros(1, 4, heads, 8)
    k = torch.zeros(1, 4, kv_heads, 8)
    mask = longctx.Mask(causal=causal)
    return longctx.parallel.api.choose_strategy(q, k, group, layout=layout, mask=mask)


def test_auto_strategy_choice(mesh):
    P = mesh.world_size
    if P == 1:
        assert mesh.run(_auto_choice, 4, 2, "zigzag", True) == ["ring"]
        return
    assert set(mesh.run(_auto_choice, 2 * P, P, "zigzag", True)) == {"ulysses"}
    odd = 2 * P + 1  # heads that do not split: the layout's balanced ring
    assert set(mesh.run(_auto_choice, odd, odd, "zigzag", True)) == {"zigzag"}
    assert set(mesh.run(_auto_choice, odd, odd, "striped", True)) == {"striped"}
    assert set(mesh.run(_auto_choice, odd, odd, "contiguous", True)) == {"ring"}


def test_auto_strategy_matches_reference(mesh):
    case = CPCase("auto", "zigzag", "documents", world_size=mesh.world_size)
    _assert_close(check_cp_case(mesh, case), case)
