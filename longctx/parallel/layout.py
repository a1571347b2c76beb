"""Sequence layouts: which global tokens each context-parallel rank holds, and in what order.

A layout is a pure function of ``(seq_len, world_size, rank)``; nothing here touches
``torch.distributed``.  Three layouts (``P`` = world size, ``S`` = global length):

- ``contiguous``: rank ``r`` holds tokens ``r*S/P .. (r+1)*S/P - 1``.
- ``zigzag``: the sequence is cut into ``2P`` chunks; rank ``r`` holds chunks ``r`` and
  ``2P-1-r`` (balances causal work; megatron's layout).
- ``striped`` / ``striped:w``: stripes of ``w`` tokens dealt round-robin, token ``t`` lives on
  rank ``(t // w) % P`` (``w = 1``: token ``t`` on rank ``t % P``).

:meth:`Layout.positions` gives a shard's global positions as
:class:`~longctx.kernels.mask.Positions`, so a local kernel can apply masks on global positions.

Example::

    >>> import torch
    >>> from longctx.parallel.layout import Layout, unshard
    >>> x = torch.arange(8).view(1, 8)  # [B=1, S=8]
    >>> zz = Layout.parse("zigzag")
    >>> [zz.shard(x, 2, r).tolist() for r in range(2)]
    [[[0, 1, 6, 7]], [[2, 3, 4, 5]]]
    >>> [(s.start, s.length) for s in zz.positions(8, 2, rank=1).segments]
    [(2, 2), (4, 2)]
    >>> torch.equal(unshard([zz.shard(x, 2, r) for r in range(2)], zz), x)
    True
    >>> Layout.parse("striped:2").local_index(8, 2, rank=1)
    tensor([2, 3, 6, 7])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from longctx.kernels.mask import Positions, Segment

__all__ = [
    "Layout",
    "LayoutKind",
    "document_ids",
    "pad_to_multiple",
    "positions",
    "shard",
    "unshard",
]

LayoutKind = Literal["contiguous", "zigzag", "striped"]
_KINDS: tuple[str, ...] = get_args(LayoutKind)
_VALID_NAMES = "'contiguous', 'zigzag', 'striped', 'striped:<stripe>' (e.g. 'striped:4')"
# Above this many stripes per rank, striped positions fall back to an index tensor.
_MAX_SEGMENTS = 100_000


def _check_rank(world_size: int, rank: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must satisfy 0 <= rank < world_size={world_size}, got {rank}")


@dataclass(frozen=True)
class Layout:
    """How a global sequence is split over ``world_size`` ranks (see the module docstring)."""

    kind: LayoutKind = "contiguous"
    stripe: int = 1  # striped only: tokens per stripe

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown layout kind {self.kind!r}; valid layouts: {_VALID_NAMES}")
        if not isinstance(self.stripe, int) or self.stripe < 1:
            raise ValueError(f"Layout.stripe must be an int >= 1, got {self.stripe!r}")
        if self.kind != "striped" and self.stripe != 1:
            raise ValueError(
                f"stripe={self.stripe} only applies to the striped layout, not {self.kind!r}"
            )

    def __str__(self) -> str:
        return f"striped:{self.stripe}" if self.kind == "striped" and self.stripe > 1 else self.kind

    @staticmethod
    def parse(layout: str | Layout) -> Layout:
        """``"contiguous" | "zigzag" | "striped" | "striped:<w>"`` (or a Layout) -> Layout."""
        if isinstance(layout, Layout):
            return layout
        if not isinstance(layout, str):
            raise TypeError(f"layout must be a str or Layout, got {type(layout).__name__}")
        kind, sep, stripe = layout.strip().lower().partition(":")
        if kind in _KINDS and not sep:
            return Layout(kind)  # type: ignore[arg-type]
        if kind == "striped" and stripe.strip().isdigit() and int(stripe) >= 1:
            return Layout("striped", int(stripe))
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {_VALID_NAMES}")

    # -- sizes ----------------------------------------------------------------------------------
    def required_multiple(self, world_size: int) -> int:
        """The global length must be a multiple of this: P, 2P (zigzag) or P*stripe (striped)."""
        _check_rank(world_size, 0)
        if self.kind == "zigzag":
            return 2 * world_size
        if self.kind == "striped":
            return world_size * self.stripe
        return world_size

    def check(self, seq_len: int, world_size: int) -> None:
        """Raise ValueError unless ``seq_len`` splits evenly over ``world_size`` ranks."""
        multiple = self.required_multiple(world_size)
        if seq_len < 0:
            raise ValueError(f"seq_len must be >= 0, got {seq_len}")
        if seq_len % multiple:
            padded = -(-seq_len // multiple) * multiple
            raise ValueError(
                f"the {str(self)!r} layout over {world_size} ranks needs a sequence length that is "
                f"a multiple of {multiple}, got {seq_len}; pad to {padded} tokens with "
                f"longctx.parallel.layout.pad_to_multiple(x, {multiple}) (append the padding as an "
                "extra document in cu_seqlens and mask its labels, e.g. with -100)"
            )

    # -- positions ------------------------------------------------------------------------------
    def positions(self, seq_len: int, world_size: int, rank: int) -> Positions:
        """Global positions of rank ``rank``'s ``seq_len / world_size`` tokens, in local order.

        contiguous: one segment; zigzag: two (chunks ``r`` and ``2P-1-r``); striped: one strided
        segment for ``stripe=1``, else one segment per stripe (an index tensor beyond 1e5 stripes).
        """
        _check_rank(world_size, rank)
        self.check(seq_len, world_size)
        P, n = world_size, seq_len // world_size
        if self.kind == "contiguous":
            return Positions.contiguous(rank * n, n)
        if self.kind == "zigzag":
            c = n // 2
            return Positions((Segment(rank * c, c), Segment((2 * P - 1 - rank) * c, c)))
        w = self.stripe
        if w == 1:
            return Positions.strided(rank, n, P)
        num_stripes = n // w
        if num_stripes > _MAX_SEGMENTS:
            return Positions.from_index(self.local_index(seq_len, world_size, rank))
        return Positions(tuple(Segment(b * P * w + rank * w, w) for b in range(num_stripes)))

    def local_index(self, seq_len: int, world_size: int, rank: int) -> Tensor:
        """int64 ``[seq_len / world_size]``: global position of each local token (vectorised)."""
        if self.kind != "striped" or self.stripe == 1:
            return self.positions(seq_len, world_size, rank).materialize()
        _check_rank(world_size, rank)
        self.check(seq_len, world_size)
        P, w = world_size, self.stripe
        stripe_start = torch.arange(seq_len // (P * w)) * (P * w) + rank * w  # [num_stripes]
        return (stripe_start[:, None] + torch.arange(w)).reshape(-1)  # [num_stripes, w] -> [n]

    # -- tensors --------------------------------------------------------------------------------
    def shard(self, x: Tensor, world_size: int, rank: int, dim: int = 1) -> Tensor:
        """Rank ``rank``'s part of ``x`` (global length ``S = x.shape[dim]``).

        ``x [..., S, ...]`` -> contiguous ``[..., S / world_size, ...]``.
        """
        _check_rank(world_size, rank)
        dim = dim % x.dim()
        S = x.shape[dim]
        self.check(S, world_size)
        P, n = world_size, S // world_size
        if self.kind == "contiguous":
            return x.narrow(dim, rank * n, n).contiguous()
        if self.kind == "zigzag":
            c = n // 2
            return torch.cat(
                [x.narrow(dim, rank * c, c), x.narrow(dim, (2 * P - 1 - rank) * c, c)], dim
            )
        w = self.stripe
        pre, post = x.shape[:dim], x.shape[dim + 1 :]
        x = x.reshape(*pre, S // (P * w), P, w, *post)  # [..., S, ...] -> [..., stripes, P, w, ...]
        local = x.select(dim + 1, rank)  # [..., stripes, w, ...]
        return local.reshape(*pre, n, *post).contiguous()  # -> [..., n, ...]

    def unshard(self, shards: Sequence[Tensor], dim: int = 1) -> Tensor:
        """Inverse of :meth:`shard`: P shards ``[..., n, ...]`` -> ``[..., n*P, ...]``.

        ``shards[r]`` is rank ``r``'s shard; ``P = len(shards)``.
        """
        if len(shards) == 0:
            raise ValueError("unshard needs one shard per rank, got an empty list")
        shape = shards[0].shape
        if any(s.shape != shape for s in shards):
            raise ValueError(
                f"all shards must have the same shape, got {[tuple(s.shape) for s in shards]}"
            )
        P, dim = len(shards), dim % len(shape)
        n = shape[dim]
        if self.kind == "contiguous":
            return torch.cat(list(shards), dim)
        if self.kind == "zigzag":
            if n % 2:
                raise ValueError(f"zigzag shards hold two equal chunks; local length {n} is odd")
            c = n // 2
            firsts = [s.narrow(dim, 0, c) for s in shards]  # chunks 0 .. P-1
            seconds = [s.narrow(dim, c, c) for s in reversed(shards)]  # chunks P .. 2P-1
            return torch.cat(firsts + seconds, dim)
        w = self.stripe
        if n % w:
            raise ValueError(
                f"striped:{w} shards hold whole stripes; local length {n} is not a multiple of {w}"
            )
        pre, post = shape[:dim], shape[dim + 1 :]
        # each [..., n, ...] -> [..., stripes, w, ...]
        parts = [s.reshape(*pre, n // w, w, *post) for s in shards]
        full = torch.stack(parts, dim + 1)  # [..., stripes, P, w, ...]
        return full.reshape(*pre, n * P, *post)


# -- module-level conveniences (layout as str or Layout) -----------------------------------------
def shard(x: Tensor, layout: str | Layout, world_size: int, rank: int, dim: int = 1) -> Tensor:
    """``x [..., S, ...]`` -> contiguous ``[..., S / world_size, ...]``; :meth:`Layout.shard`."""
    return Layout.parse(layout).shard(x, world_size, rank, dim)


def unshard(shards: Sequence[Tensor], layout: str | Layout, dim: int = 1) -> Tensor:
    """P shards ``[..., n, ...]`` in rank order -> ``[..., n*P, ...]``; :meth:`Layout.unshard`."""
    return Layout.parse(layout).unshard(shards, dim)


def positions(layout: str | Layout, seq_len: int, world_size: int, rank: int) -> Positions:
    """Global positions rank ``rank`` holds, in local order; see :meth:`Layout.positions`."""
    return Layout.parse(layout).positions(seq_len, world_size, rank)


def pad_to_multiple(x: Tensor, multiple: int, dim: int = 1, value: float = 0) -> Tensor:
    """Pad ``x [..., S, ...]`` at the end of ``dim`` with ``value`` to ``[..., ceil(S/m)*m, ...]``.

    Returns ``x`` itself when ``S`` is already a multiple.  Pad labels with an ignore index
    (e.g. ``value=-100``) and give the padding its own document in ``cu_seqlens``.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    dim = dim % x.dim()
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    pad_shape = (*x.shape[:dim], extra, *x.shape[dim + 1 :])
    return torch.cat([x, x.new_full(pad_shape, value)], dim)


def document_ids(
    cu_seqlens: Tensor, layout: str | Layout, seq_len: int, world_size: int, rank: int
) -> Tensor:
    """Document index of each local token: int64 ``[seq_len / world_size]``.

    ``cu_seqlens`` is the global boundary list ``[0, end_1, ..., seq_len]`` (1-D integer); the
    result lives on its device.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(
            "cu_seqlens must be a 1-D integer tensor [0, end_1, ..., seq_len] with at least 2 "
            f"entries; got shape {tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
        )
    cu = cu_seqlens.to(torch.int64)
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
    if int(cu[-1]) != seq_len:
        raise ValueError(
            f"cu_seqlens ends at {int(cu[-1])} but seq_len is {seq_len}; the last boundary must "
            "equal the global length (add a padding document)"
        )
    pos = Layout.parse(layout).local_index(seq_len, world_size, rank).to(cu.device)
    return torch.searchsorted(cu, pos, right=True) - 1
