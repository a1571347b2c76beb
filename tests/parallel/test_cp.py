"""Every CP strategy x layout x mask x world size against the one-process reference, float64.

One simulated mesh (real gloo processes) is started per world size for the whole module and
reused by every case.  Forward ``out``/``lse`` and ``dq``/``dk``/``dv`` must match the reference
on the whole sequence to ~1e-12.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import longctx
from longctx.parallel.comm import AllToAllComm
from longctx.parallel.head_exchange import token_order
from longctx.parallel.layout import Layout
from longctx.testing import MASK_KINDS, CPCase, check_cp_case
from longctx.testing.cp_check import errors_against_reference

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
def mesh(request, meshes):
    return meshes.get(request.param)


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


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped", "striped:2"])
def test_token_order_gather_and_scatter_are_one_step_sorts(layout, world):
    """``gather``/``scatter`` equal the two-step forms (rank order, then sort/unsort)."""
    lay = Layout.parse(layout)
    S = lay.required_multiple(world) * 3
    s = S // world
    by_blocks = token_order(lay, S, world, tuple(range(world)), "cpu")
    for order in (by_blocks, dataclasses.replace(by_blocks, blocks=None)):
        _check_gather_and_scatter(order, world, S, s)
    if layout == "zigzag" and world > 1:
        assert len(by_blocks.blocks) == 2 * world - 1  # 2P chunks, the middle two adjacent


def _check_gather_and_scatter(order, world, S, s):
    def sort(x, dim):  # gathered (rank order) -> sorted, by the permutation itself
        return x if order.perm is None else x.index_select(dim, order.perm)

    def unsort(x, dim):
        return x if order.perm is None else x.index_select(dim, torch.argsort(order.perm))

    g = torch.Generator().manual_seed(world)
    recv = torch.randn(world, 2, s, 3, 4, generator=g)  # [P(src), B, s, m, D]
    # [P, B, s, m, D] -> [B, P*s, m, D], rank order
    assert torch.equal(order.gather(recv), sort(recv.movedim(0, 1).reshape(2, S, 3, 4), 1))
    lse_recv = torch.randn(world, 2, 3, s, generator=g)  # [P(src), B, m, s]
    want = sort(lse_recv.permute(1, 2, 0, 3).reshape(2, 3, S), 2)
    assert torch.equal(order.gather(lse_recv, dim=2), want)
    x = torch.randn(2, S, 3, 4, generator=g, dtype=torch.float64)  # sorted [B, S, m, D]
    slots = torch.empty(world, 2, s, 3, 4)  # float32: scatter casts
    order.scatter(x, slots)
    # [B, S, m, D] rank order -> [P(dst), B, s, m, D]
    want = unsort(x, 1).reshape(2, world, s, 3, 4).movedim(1, 0)
    assert torch.equal(slots, want.to(slots.dtype))
    lse = torch.randn(2, 3, S, generator=g)  # [B, m, S]
    lse_slots = torch.empty(world, 2, 3, s)
    order.scatter(lse, lse_slots, dim=2)
    # [B, m, S] rank order -> [P(dst), B, m, s]
    assert torch.equal(lse_slots, unsort(lse, 2).reshape(2, 3, world, s).permute(2, 0, 1, 3))


def _ulysses_on_rank(group, case: CPCase) -> dict[str, torch.Tensor]:
    """Rank body: Ulysses on this rank's shards, out, lse and the gradients."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    layout = Layout.parse(case.layout)
    q, k, v, dout = (layout.shard(t, world, rank) for t in case.make_inputs())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = longctx.attention(
        q, k, v, group, strategy="ulysses", layout=layout, mask=case.make_mask(),
        kernel=case.kernel, return_lse=True,
    )
    out.backward(dout)
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_ulysses_replicated_kv_head(mesh, dtype):
    """MQA over more ranks than kv heads: the kv head is replicated to every rank and the
    replicas' gradients sum at the owner; in bfloat16 the exchanges mix dtypes (bf16 out and dq,
    float32 lse and summed dk/dv) and the results keep the inputs' dtypes."""
    P = mesh.world_size
    case = CPCase(
        "ulysses", "zigzag", "documents", world_size=P, heads=2 * P, kv_heads=1, head_dim=4,
        dtype=dtype,
    )
    shards = mesh.run(_ulysses_on_rank, case)
    if dtype == "float64":
        _assert_close(errors_against_reference(case, shards), case)
        return
    for got in shards:
        assert {n: t.dtype for n, t in got.items()} == {
            "out": torch.bfloat16, "lse": torch.float32, "dq": torch.bfloat16,
            "dk": torch.bfloat16, "dv": torch.bfloat16,
        }
    errors = errors_against_reference(case, shards, "rel_l2")
    assert max(errors.values()) < 1e-2, errors


def _all_to_all_async_on_rank(group):
    """Rank body: mixed dtypes and shapes in one async exchange equal one all_to_all each."""
    comm = AllToAllComm(group)
    P, r = comm.world_size, comm.rank
    base = torch.arange(P * 30, dtype=torch.float64).reshape(P, 5, 6) + 1000 * r
    tensors = [
        base,  # [P, 5, 6]
        base[:, 1:4, ::2].to(torch.float32),  # a strided view, another dtype
        (base[:, :2, :3] * 2).to(torch.int64).permute(0, 2, 1),  # [P, 3, 2]
        base[:, 0, :],  # [P, 6], float64 again: packed with the first
    ]
    got = comm.all_to_all_async(tensors).wait()
    return all(
        g.shape == t.shape and g.dtype == t.dtype and torch.equal(g, comm.all_to_all(t))
        for g, t in zip(got, tensors)
    )


def test_all_to_all_async_packs_tensors_per_dtype(mesh):
    assert all(mesh.run(_all_to_all_async_on_rank))


def _send_buffer_on_rank(group):
    """Rank body: slots written in place (mixed dtypes, one written by an indexed store) travel
    like the same tensors sent one all_to_all each."""
    comm = AllToAllComm(group)
    P, r = comm.world_size, comm.rank
    a = torch.arange(P * 12, dtype=torch.float64).reshape(P, 3, 4) + 100 * r
    b = (torch.arange(P * 5, dtype=torch.float32).reshape(P, 5) - 7 * r).flip(1)
    c = torch.arange(P * 2, dtype=torch.float64).reshape(P, 2, 1) * (r + 1)
    send = comm.send_buffer([(a.shape, a.dtype), (b.shape, b.dtype), (c.shape, c.dtype)], "cpu")
    send.slots[0].copy_(a)
    send.slots[1][:, torch.arange(5).flip(0)] = b.flip(1)  # an indexed store into the slot
    send.slots[2].copy_(c)
    got = send.start().wait()
    want = [comm.all_to_all(t) for t in (a, b, c)]
    return all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want))


def test_send_buffer_slots_travel_like_tensors(mesh):
    assert all(mesh.run(_send_buffer_on_rank))


def test_all_to_all_slots_must_have_one_entry_per_rank():
    comm = AllToAllComm(None)
    with pytest.raises(ValueError, match=r"shape \[1, \.\.\.\] \(one slot per rank\)"):
        comm.send_buffer([((2, 3), torch.float32)], "cpu")


def _ulysses_without_lse_on_rank(group, case: CPCase) -> dict[str, torch.Tensor]:
    """Rank body: Ulysses asked for no lse returns just ``out`` (the lse is not exchanged)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    layout = Layout.parse(case.layout)
    q, k, v, dout = (layout.shard(t, world, rank) for t in case.make_inputs())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = longctx.attention(
        q, k, v, group, strategy="ulysses", layout=layout, mask=case.make_mask(),
        kernel=case.kernel,
    )
    assert isinstance(out, torch.Tensor)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@pytest.mark.parametrize("layout,kv_heads", [("zigzag", 4), ("contiguous", 1)])
def test_ulysses_without_lse_matches_reference(mesh, layout, kv_heads):
    case = CPCase(
        "ulysses", layout, "causal", world_size=mesh.world_size, heads=mesh.world_size,
        kv_heads=min(kv_heads, mesh.world_size), head_dim=4,
    )
    got = mesh.run(_ulysses_without_lse_on_rank, case)
    _assert_close(errors_against_reference(case, got, names=("out", "dq", "dk", "dv")), case)


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
