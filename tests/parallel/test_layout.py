"""Sequence layouts: shard/unshard round trips, positions, document ids, errors."""

from __future__ import annotations

import pytest
import torch

from longctx.parallel import layout as L
from longctx.parallel.layout import Layout

LAYOUTS = ["contiguous", "zigzag", "striped", "striped:2", "striped:3"]
WORLDS = [1, 2, 3, 4, 8]


def _seq_len(layout: Layout, world_size: int, blocks: int = 3) -> int:
    return layout.required_multiple(world_size) * blocks


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_round_trip(name: str, world_size: int, dim: int) -> None:
    layout = Layout.parse(name)
    S = _seq_len(layout, world_size)
    shape = [2, 3, 4]
    shape[dim] = S
    x = torch.randn(shape)
    shards = [L.shard(x, name, world_size, r, dim=dim) for r in range(world_size)]
    for s in shards:
        assert s.is_contiguous() and s.shape[dim] == S // world_size
    torch.testing.assert_close(L.unshard(shards, name, dim=dim), x, rtol=0, atol=0)


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("name", LAYOUTS)
def test_positions_match_shard(name: str, world_size: int) -> None:
    layout = Layout.parse(name)
    S = _seq_len(layout, world_size)
    x = torch.arange(S).view(1, S)  # [B=1, S]
    held = []
    for r in range(world_size):
        local = layout.shard(x, world_size, r)[0]  # [S / P] global indices held by rank r
        pos = L.positions(name, S, world_size, r)
        assert len(pos) == S // world_size
        assert torch.equal(pos.materialize(), local)
        assert torch.equal(layout.local_index(S, world_size, r), local)
        held.append(local)
    assert torch.equal(torch.cat(held).sort().values, torch.arange(S))  # each token exactly once


@pytest.mark.parametrize("world_size", WORLDS)
def test_zigzag_chunks(world_size: int) -> None:
    P, c = world_size, 5
    chunks = torch.arange(2 * P * c).view(2 * P, c)  # [2P chunks, c]
    for r in range(P):
        local = L.shard(chunks.view(1, -1), "zigzag", P, r)[0]
        assert torch.equal(local, torch.cat([chunks[r], chunks[2 * P - 1 - r]]))
        assert len(L.positions("zigzag", 2 * P * c, P, r).segments) == 2


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("stripe", [1, 2, 3])
def test_striped_owner(world_size: int, stripe: int) -> None:
    layout = Layout("striped", stripe)
    S = _seq_len(layout, world_size, blocks=4)
    owner = torch.empty(S, dtype=torch.int64)
    for r in range(world_size):
        owner[layout.local_index(S, world_size, r)] = r
    assert torch.equal(owner, (torch.arange(S) // stripe) % world_size)
    segs = layout.positions(S, world_size, 0).segments
    assert len(segs) == (1 if stripe == 1 else S // (world_size * stripe))


def test_striped_many_stripes_falls_back_to_index() -> None:
    layout = Layout("striped", 2)
    S = 2 * 2 * (L._MAX_SEGMENTS + 1)
    pos = layout.positions(S, 2, 1)
    assert pos.index is not None
    assert torch.equal(pos.index, layout.local_index(S, 2, 1))
    assert torch.equal(pos.index[:4], torch.tensor([2, 3, 6, 7]))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("name", LAYOUTS)
def test_document_ids(name: str, world_size: int) -> None:
    layout = Layout.parse(name)
    S = _seq_len(layout, world_size, blocks=5)
    gen = torch.Generator().manual_seed(world_size)
    ends = torch.randperm(S - 1, generator=gen)[: max(1, S // 7)] + 1
    cu = torch.cat([torch.tensor([0]), ends.sort().values, torch.tensor([S])])  # crosses ranks
    doc_of = torch.empty(S, dtype=torch.int64)  # brute force: token -> document
    for d in range(len(cu) - 1):
        doc_of[int(cu[d]) : int(cu[d + 1])] = d
    for r in range(world_size):
        got = L.document_ids(cu, name, S, world_size, r)
        assert torch.equal(got, doc_of[layout.local_index(S, world_size, r)])


def test_document_ids_errors() -> None:
    with pytest.raises(ValueError, match="ends at 7"):
        L.document_ids(torch.tensor([0, 3, 7]), "contiguous", 8, 2, 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        L.document_ids(torch.tensor([0, 5, 3, 8]), "contiguous", 8, 2, 0)
    with pytest.raises(ValueError, match="1-D integer"):
        L.document_ids(torch.tensor([0.0, 8.0]), "contiguous", 8, 2, 0)


@pytest.mark.parametrize(
    ("name", "world_size", "seq_len", "multiple", "padded"),
    [
        ("contiguous", 4, 10, 4, 12),
        ("zigzag", 4, 12, 8, 16),
        ("striped", 3, 7, 3, 9),
        ("striped:4", 2, 12, 8, 16),
    ],
)
def test_non_divisible_raises(
    name: str, world_size: int, seq_len: int, multiple: int, padded: int
) -> None:
    layout = Layout.parse(name)
    assert layout.required_multiple(world_size) == multiple
    for call in (
        lambda: layout.check(seq_len, world_size),
        lambda: layout.positions(seq_len, world_size, 0),
        lambda: L.shard(torch.zeros(1, seq_len), name, world_size, 0),
    ):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert name in msg and f"multiple of {multiple}" in msg and str(padded) in msg
        assert "pad_to_multiple" in msg and str(seq_len) in msg


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_pad_to_multiple(dim: int) -> None:
    shape = [3, 5, 2]
    shape[dim] = 10
    x = torch.randn(shape)
    y = L.pad_to_multiple(x, 8, dim=dim, value=-100)
    assert y.shape[dim] == 16
    torch.testing.assert_close(y.narrow(dim, 0, 10), x, rtol=0, atol=0)
    assert bool((y.narrow(dim, 10, 6) == -100).all())
    assert L.pad_to_multiple(x, 5, dim=dim) is x
    padded_len = y.shape[dim]
    Layout.parse("zigzag").check(padded_len, 4)  # now valid
    with pytest.raises(ValueError, match="multiple"):
        L.pad_to_multiple(x, 0)


@pytest.mark.parametrize("name", ["contiguous", "zigzag", "striped", "striped:4"])
def test_parse(name: str) -> None:
    layout = Layout.parse(name)
    assert str(layout) == name and Layout.parse(layout) is layout
    assert Layout.parse(f" {name.upper()} ") == layout


@pytest.mark.parametrize("bad", ["ring", "zig-zag", "striped:0", "striped:x", "zigzag:2", ""])
def test_bad_layout_names(bad: str) -> None:
    with pytest.raises(ValueError, match="valid layouts: 'contiguous', 'zigzag', 'striped'"):
        Layout.parse(bad)


def test_bad_layout_fields() -> None:
    with pytest.raises(ValueError, match="stripe"):
        Layout("striped", 0)
    with pytest.raises(ValueError, match="only applies to the striped"):
        Layout("zigzag", 2)
    with pytest.raises(ValueError, match="valid layouts"):
        Layout("ring")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Layout.parse(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("world_size", "rank"), [(0, 0), (-1, 0), (2, 2), (2, -1), (4, 7)])
def test_bad_rank_or_world(world_size: int, rank: int) -> None:
    x = torch.zeros(1, 16)
    with pytest.raises(ValueError, match="world_size|rank"):
        L.shard(x, "contiguous", world_size, rank)
    with pytest.raises(ValueError, match="world_size|rank"):
        L.positions("zigzag", 16, world_size, rank)


def test_unshard_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        L.unshard([], "contiguous")
    with pytest.raises(ValueError, match="same shape"):
        L.unshard([torch.zeros(1, 4), torch.zeros(1, 2)], "contiguous")
    with pytest.raises(ValueError, match="odd"):
        L.unshard([torch.zeros(1, 3)] * 2, "zigzag")
