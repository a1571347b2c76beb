"""Bad input to the public entry raises errors that say what to change."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import longctx
from longctx.testing import MeshError


def qkv(s=16, h=4, hkv=2, d=8, dtype=torch.float32, sk=None):
    q = torch.randn(1, s, h, d).to(dtype)
    k = torch.randn(1, sk or s, hkv, d).to(dtype)
    return q, k, k.clone()


@pytest.mark.parametrize(
    "make,kwargs,match",
    [
        (lambda: qkv(s=7), {"strategy": "zigzag"}, r"multiple of 2.*pad_to_multiple"),
        (lambda: qkv(s=6), {"layout": "striped:4"}, r"multiple of 4.*pad_to_multiple"),
        (lambda: qkv(sk=8), {}, r"q holds 16 local tokens but k/v hold 8.*same layout"),
        (lambda: qkv(), {"strategy": "zigzag", "layout": "contiguous"}, r"layout 'zigzag'"),
        (lambda: qkv(), {"strategy": "striped", "layout": "zigzag"}, r"strategy='ring'"),
        (lambda: qkv(h=6, hkv=4), {}, r"not a multiple of the 4 kv heads"),
        (lambda: qkv(dtype=torch.int32), {}, r"use one of float16, bfloat16"),
        (lambda: qkv(), {"strategy": "tree"}, r"unknown strategy 'tree'; choose one of"),
        (lambda: qkv(), {"kernel": "fastest"}, r"unknown kernel 'fastest'; available"),
        (lambda: qkv(), {"layout": "spiral"}, r"'contiguous', 'zigzag', 'striped'"),
        (
            lambda: qkv(),
            {"mask": longctx.Mask(cu_seqlens=torch.tensor([0, 5, 12]))},
            r"ends at 12 but the global sequence has 16",
        ),
    ],
)
def test_bad_input_single_process(make, kwargs, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        longctx.attention(q, k, v, **kwargs)


def _ulysses_error(group, heads, kv_heads):
    q, k, v = qkv(s=4, h=heads, hkv=kv_heads)
    try:
        longctx.attention(q, k, v, group, strategy="ulysses")
    except ValueError as e:
        return str(e)
    return None


def test_ulysses_head_split_errors(mesh2):
    # 3 heads over 2 ranks: not divisible
    assert all("divisible by 2" in m for m in mesh2.run(_ulysses_error, 3, 3))
    # 6 heads over 2 ranks = 3 per rank, GQA groups of 2: neither covers nor fits
    assert all("GQA groups of 2" in m for m in mesh2.run(_ulysses_error, 6, 3))


def test_hybrid_needs_two_groups():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"HybridGroups\(ulysses=..., ring=...\)"):
        longctx.attention(q, k, v, strategy="hybrid")


def test_mixed_dtypes_and_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"share a dtype.*\.to\(q\.dtype\)"):
        longctx.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="must be on one device"):
        longctx.attention(q, k.to("meta"), v)


def test_two_dimensional_mesh_is_refused():
    class FakeMesh:  # the duck type resolve_group checks: a DeviceMesh with ndim and get_group
        ndim = 2

        def get_group(self):  # pragma: no cover - never reached
            raise AssertionError

    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"1-D mesh.*mesh\['cp'\]"):
        longctx.attention(q, k, v, FakeMesh())


def _distributed_error(group, local_len, layout, strategy):
    rank = dist.get_rank(group)
    q, k, v = qkv(s=local_len)
    try:
        longctx.attention(q, k, v, group, strategy=strategy, layout=layout)
    except ValueError as e:
        return f"rank{rank}: {e}"
    return None


def _raise_on_rank_one(group):
    if dist.get_rank(group) == 1:
        raise RuntimeError("boom on purpose")
    return dist.get_rank(group)


@pytest.fixture(scope="module")
def mesh2(meshes):
    return meshes.get(2)


def test_non_divisible_global_length_on_a_mesh(mesh2):
    # 2 ranks x 3 tokens = 6 tokens: zigzag needs a multiple of 2P = 4
    messages = mesh2.run(_distributed_error, 3, "zigzag", "zigzag")
    for m in messages:
        assert m is not None and "multiple of 4" in m and "pad_to_multiple" in m


def test_rank_failure_reports_the_traceback(mesh2):
    with pytest.raises(MeshError, match=r"(?s)rank 1.*boom on purpose"):
        mesh2.run(_raise_on_rank_one)
    assert mesh2.run(dist.get_rank) == [0, 1]  # the mesh keeps serving after a failure


def test_linear_strategy_through_the_entry():
    q = torch.randn(1, 8, 4, 8, dtype=torch.float64)
    k = v = torch.randn(1, 8, 2, 8, dtype=torch.float64)
    decay = longctx.retnet_log_decay(4)
    via_entry = longctx.attention(q, k, v, strategy="linear", log_decay=decay)
    assert torch.equal(via_entry, longctx.linear_attention(q, k, v, log_decay=decay))
    with pytest.raises(ValueError, match="no log-sum-exp"):
        longctx.attention(q, k, v, strategy="linear", return_lse=True)
    with pytest.raises(ValueError, match="log_decay is for strategy='linear'"):
        longctx.attention(q, k, v, log_decay=decay)


def test_scale_and_heads_and_list_boundaries():
    q, k, v = qkv()
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match=r"scale must be a finite number > 0"):
            longctx.attention(q, k, v, scale=bad)
    with pytest.raises(ValueError, match=r"k/v have 0 heads; they need at least one"):
        longctx.attention(q, k[:, :, :0], v[:, :, :0])
    with_list = longctx.Mask(causal=True, cu_seqlens=[0, 5, 16])
    with_tensor = longctx.Mask(causal=True, cu_seqlens=torch.tensor([0, 5, 16]))
    assert torch.equal(
        longctx.attention(q, k, v, mask=with_list), longctx.attention(q, k, v, mask=with_tensor)
    )
    with pytest.raises(TypeError, match=r"1-D integer tensor \(or a list\)"):
        longctx.Mask(cu_seqlens="0,5,16")


def test_strategy_capabilities_are_checked():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"strategy 'star' does not take window masks"):
        longctx.attention(q, k, v, strategy=longctx.Star(2, 2), mask=longctx.Mask(causal=True, window=4))
    with pytest.raises(ValueError, match=r"cu_seqlens is for strategy='linear', not 'ring'"):
        longctx.attention(q, k, v, cu_seqlens=torch.tensor([0, 16]))


def _refused_then_usable(group, strategy, layout, kernel):
    """Rank body: a call every rank refuses (a kernel that cannot run CPU tensors), then the same
    call with a kernel that can: the group must still work (nothing was posted before the error)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8 * world, 4, 8, generator=g, dtype=torch.float64)
    kv = torch.randn(1, 8 * world, 2, 8, generator=g, dtype=torch.float64)
    q_l, kv_l = (longctx.shard(t, layout, world, rank) for t in (q, kv))
    mask = longctx.Mask(causal=True)
    try:
        longctx.attention(q_l, kv_l, kv_l, group, strategy=strategy, layout=layout, mask=mask,
                          kernel=kernel)
        refused = None
    except ValueError as e:
        refused = str(e)
    out = longctx.attention(q_l, kv_l, kv_l, group, strategy=strategy, layout=layout, mask=mask)
    whole = longctx.attention(q, kv, kv, mask=mask)
    return refused, float((out - longctx.shard(whole, layout, world, rank)).abs().max())


@pytest.mark.parametrize("kernel", ["sdpa", "triton"])
@pytest.mark.parametrize(
    "strategy,layout",
    [("ring", "contiguous"), ("zigzag", "zigzag"), ("striped", "striped"),
     ("allgather", "contiguous"), ("ulysses", "zigzag")],
)
def test_refused_call_leaves_the_group_usable(mesh2, strategy, layout, kernel):
    for refused, err in mesh2.run(_refused_then_usable, strategy, layout, kernel):
        assert refused is not None and f"kernel {kernel!r} cannot run this call" in refused
        assert err < 1e-12


def _shards_of_rank_length(group, check):
    rank = dist.get_rank(group)
    q, k, v = qkv(s=8 + 4 * rank)  # rank 1 holds more tokens than rank 0
    try:
        longctx.attention(q, k, v, group, strategy="ring", check_shards=check)
    except ValueError as e:
        return str(e)
    return None


def test_opt_in_equal_shard_check(mesh2):
    messages = mesh2.run(_shards_of_rank_length, True)
    for m in messages:
        assert "ranks hold shards of different shapes" in m and "rank 1: q [1, 12, 4, 8]" in m
    assert mesh2.run(dist.get_rank) == [0, 1]
