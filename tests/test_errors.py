"""Bad input to the public entry raises errors that say what to change."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import longctx
from longctx.testing import MeshError, SimulatedMesh


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
def mesh2():
    with SimulatedMesh(2) as m:
        yield m


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
