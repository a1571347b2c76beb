"""Star attention: the two-phase pattern against a one-process reference with the same mask."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import longctx
from longctx.parallel.strategies.star import Star, StarPattern

WORLD_SIZES = [1, 2, 3, 4, 8]


def naive_star(q, k, v, pattern: StarPattern, scale):
    """Float64 masked softmax attention with autograd; GQA by repeating kv heads."""
    S, H, Hkv = q.shape[1], q.shape[2], k.shape[2]
    ok = pattern.allowed(torch.arange(S), torch.arange(S))
    ke, ve = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, ke) * scale
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, ve)


def inputs(S, H=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, S, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv, H)]


def _star_on_rank(group, S, star, heads, kv_heads):
    P, r = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, dout = (longctx.shard(t, "contiguous", P, r) for t in inputs(S, heads, kv_heads))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = longctx.attention(q, k, v, group, strategy=star)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda p: f"P{p}")
def mesh(request, meshes):
    return meshes.get(request.param)


@pytest.mark.parametrize(
    "anchor,query,heads,kv_heads",
    [(4, 3, 4, 2), (12, 12, 4, 4), (0, 5, 4, 1), (6, 0, 4, 2), (1, 1, 6, 3)],
)
def test_star_matches_reference(mesh, anchor, query, heads, kv_heads):
    P, L = mesh.world_size, 12
    S, star = P * L, Star(anchor_len=anchor, query_len=query)
    shards = mesh.run(_star_on_rank, S, star, heads, kv_heads)
    got = [torch.cat([s[i] for s in shards], dim=1) for i in range(4)]  # contiguous unshard
    q, k, v, dout = (t.requires_grad_() for t in inputs(S, heads, kv_heads))
    want = naive_star(q, k, v, StarPattern(star, S, P), scale=8**-0.5)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    for g, w in zip(got, (want.detach(), *want_grads)):
        assert (g - w).abs().max() < 1e-10


def test_one_block_is_full_causal_attention():
    q, k, v, _ = inputs(16)
    star = longctx.attention(q, k, v, strategy=Star(anchor_len=4, query_len=3))
    full = longctx.attention(q, k, v, mask=longctx.Mask(causal=True))
    torch.testing.assert_close(star, full, rtol=0, atol=1e-13)  # float64, two merge orders


@pytest.mark.parametrize(
    "star,kwargs,match",
    [
        (Star(anchor_len=17, query_len=0), {}, r"anchor_len=17 is longer than a block \(16"),
        (Star(anchor_len=2, query_len=20), {}, r"query_len=20 is longer than the last shard"),
        (Star(2, 2), {"layout": "zigzag"}, r"runs on layout 'contiguous'"),
        (Star(2, 2), {"mask": longctx.Mask()}, r"causal by construction"),
    ],
)
def test_bad_star_input(star, kwargs, match):
    q, k, v, _ = inputs(16)
    with pytest.raises(ValueError, match=match):
        longctx.attention(q, k, v, strategy=star, **kwargs)
