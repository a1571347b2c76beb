"""Which (query, key) pairs may attend, described from **global** token positions.

A local kernel only ever sees a shard of queries and a shard of keys.  To know which pairs are
allowed it needs the global position of every token it holds; :class:`Positions` describes them
compactly (runs of ``start + i * stride``, or an explicit index tensor) and :class:`Mask` turns two
position sets into an allowed-pair matrix.  Because everything is stated in global positions, one
kernel call can score a local query shard against a remote key shard under any layout.

Example::

    >>> import torch
    >>> from longctx.kernels.mask import Mask, Positions
    >>> m = Mask(causal=True, window=3)
    >>> m.allowed(torch.arange(4), torch.arange(4)).int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [0, 1, 1, 1]], dtype=torch.int32)
    >>> q = Positions.contiguous(0, 4); k = Positions.contiguous(8, 4)
    >>> m.any_allowed(q, k)   # keys after every query: the whole block is empty
    False
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import InitVar, dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._device import host_to_device

__all__ = ["Segment", "Positions", "BlockSummary", "BlockSparse", "Mask"]

_MAX_RUN_PAIRS = 4096  # past this many (q run, k run) pairs, block tests use the runs' hull


@dataclass(frozen=True)
class Segment:
    """``length`` tokens at global positions ``start + i * stride``, ``i = 0 .. length-1``."""

    start: int
    length: int
    stride: int = 1

    def __post_init__(self) -> None:
        if self.start < 0 or self.length < 0 or self.stride < 1:
            raise ValueError(
                f"Segment needs start >= 0, length >= 0 and stride >= 1; got {self}"
            )

    @property
    def last(self) -> int:
        return self.start + (self.length - 1) * self.stride


@dataclass(frozen=True, eq=False)
class Positions:
    """Global positions of the tokens of one shard, in local order.

    Either a tuple of :class:`Segment` runs (cheap to reason about: the ring uses their bounds to
    skip empty steps without touching the device) or an explicit 1-D integer ``index`` tensor.
    """

    segments: tuple[Segment, ...] = ()
    index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.index is not None:
            if self.segments:
                raise ValueError("Positions takes either segments or an index tensor, not both")
            if self.index.dim() != 1 or self.index.dtype.is_floating_point:
                raise ValueError(
                    f"Positions.index must be a 1-D integer tensor, got shape "
                    f"{tuple(self.index.shape)} dtype {self.index.dtype}"
                )

    # -- constructors -------------------------------------------------------------------------
    @staticmethod
    def contiguous(start: int, length: int) -> "Positions":
        return Positions((Segment(start, length, 1),))

    @staticmethod
    def strided(start: int, length: int, stride: int) -> "Positions":
        return Positions((Segment(start, length, stride),))

    @staticmethod
    def from_index(index: Tensor) -> "Positions":
        return Positions(index=index.to(torch.int64))

    @staticmethod
    def cat(parts: Sequence["Positions"]) -> "Positions":
        """Positions of several shards laid end to end (e.g. all-gathered keys).

        Runs that continue one another are merged: contiguous shards make one run.
        """
        if all(p.index is None for p in parts):
            merged: list[Segment] = []
            for s in (s for p in parts for s in p.segments if s.length):
                prev = merged[-1] if merged else None
                if prev is not None and prev.stride == s.stride and s.start == prev.last + s.stride:
                    merged[-1] = Segment(prev.start, prev.length + s.length, s.stride)
                else:
                    merged.append(s)
            return Positions(tuple(merged))
        return Positions.from_index(torch.cat([p.materialize() for p in parts]))

    # -- queries --------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.index is not None:
            return int(self.index.numel())
        return sum(s.length for s in self.segments)

    def materialize(self, device: torch.device | str | None = None) -> Tensor:
        """The positions as an int64 tensor ``[len(self)]``."""
        if self.index is not None:
            return self.index.to(device=device, dtype=torch.int64)
        parts = [
            torch.arange(s.length, device=device, dtype=torch.int64) * s.stride + s.start
            for s in self.segments
        ]
        if not parts:
            return torch.empty(0, dtype=torch.int64, device=device)
        return torch.cat(parts)

    def bounds(self) -> Iterator[tuple[int, int]]:
        """``(min, max)`` global position of each run (one run for an index tensor)."""
        if self.index is not None:
            if self.index.numel():
                yield int(self.index.min()), int(self.index.max())
            return
        for s in self.segments:
            if s.length:
                yield s.start, s.last

    def max(self) -> int:
        return max((hi for _, hi in self.bounds()), default=-1)

    def slice(self, begin: int, end: int) -> "Positions":
        """Positions of local tokens ``begin:end`` (segment form, continuing runs merged)."""
        if self.index is not None:
            return Positions(index=self.index[begin:end])
        out: list[Positions] = []
        offset = 0
        for s in self.segments:
            lo, hi = max(begin - offset, 0), min(end - offset, s.length)
            if lo < hi:
                out.append(Positions((Segment(s.start + lo * s.stride, hi - lo, s.stride),)))
            offset += s.length
        return Positions.cat(out)  # runs that continue one another become one

    def local_runs(self) -> list[tuple[int, int, "Positions"]]:
        """``(local_begin, local_end, positions)`` per segment: used to split work per run."""
        if self.index is not None:
            return [(0, len(self), self)]
        runs, offset = [], 0
        for s in self.segments:
            runs.append((offset, offset + s.length, Positions((s,))))
            offset += s.length
        return runs


@dataclass(frozen=True)
class BlockSummary:
    """A host copy of which (query block, key block) pairs some batch row and head lists, at a
    coarsened resolution: ``table[i, j]`` is True when any query block ``i*q_factor ..
    (i+1)*q_factor - 1`` lists any key block ``j*k_factor .. (j+1)*k_factor - 1``.

    Made once per mask (:class:`BlockSparse` builds it at construction when its lists are on the
    CPU, or when asked with ``summarize=True``), it answers "may this query interval attend to
    this key interval" on the host without touching the device, conservatively (True when
    unsure) -- what context parallelism needs to skip a ring step and its send/recv.
    """

    table: Tensor  # bool [ceil(n_q_blocks / q_factor), ceil(n_kv_blocks / k_factor)], CPU
    q_factor: int
    k_factor: int

    def may_attend(self, qb_lo: int, qb_hi: int, kb_lo: int, kb_hi: int) -> bool:
        """Blocks ``qb_lo..qb_hi`` against ``kb_lo..kb_hi`` (inclusive, block numbers)."""
        f, g = self.q_factor, self.k_factor
        return bool(self.table[qb_lo // f : qb_hi // f + 1, kb_lo // g : kb_hi // g + 1].any())


_SUMMARY_MAX = 1024  # a summary has at most this many rows and columns (blocks are grouped)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class BlockSparse:
    """Which key blocks each query block may attend to, per batch row and head, on **global**
    positions (FlexAttention's ``BlockMask`` layout).

    Query block ``i`` covers global positions ``i*q_block .. (i+1)*q_block - 1``, key block ``j``
    covers ``j*kv_block ..``.  For batch row ``b``, mask head ``h`` and query block ``i`` the
    listed key blocks are ``kv_indices[b, h, i, :kv_num_blocks[b, h, i]]`` together with
    ``full_kv_indices[b, h, i, :full_kv_num_blocks[b, h, i]]``; pairs in other blocks are not
    allowed.  Inside a listed block the other conditions of the :class:`Mask` (causal, window,
    documents) still apply element-wise: ``Mask(causal=True) & Mask(block_sparse=bs)`` is the
    conjunction.  The ``full_kv`` pair is FlexAttention's list of blocks that need no element
    mask; it is kept for interop (:meth:`from_flex_block_mask`).  The kernels take the union of
    both lists and work out themselves which blocks need the element mask (:meth:`split_lists`),
    so a wrong "full" claim never changes a result.

    - ``kv_num_blocks``: int ``[Bm, Hm, n_q_blocks]``; ``kv_indices``: int
      ``[Bm, Hm, n_q_blocks, max_blocks]`` (entries past the count are ignored).  ``Bm`` is 1
      (every batch row) or the batch; ``Hm`` is 1 (every head), the number of query heads, or
      the number of kv heads (query head ``h`` then uses mask head ``h // (H / H_kv)``).
    - ``n_kv_blocks``: key blocks the indices refer to (default: as many key blocks as the
      query blocks cover tokens).
    - The lists may live on a GPU: nothing reads them back to the host per call.  The kernels'
      forms (sorted, deduplicated lists, split into partial and full blocks, and the transposed
      key-block -> query-block lists of the dK/dV pass) are made once per mask on the lists'
      device with tensor ops and cached on this object.
    - Context parallelism: :meth:`select_heads` gives a Ulysses rank's lists, and
      :meth:`Mask.any_allowed` (through :class:`BlockSummary`) tells a ring step with nothing
      listed, on the host.
    - ``check`` (construction only): validate the values (indices in range, counts within the
      list).  Default: when the lists are on the CPU (free); ``True`` on a GPU costs one sync.
      Unchecked bad entries are dropped by the kernels, never read out of bounds.
    - ``summarize`` (construction only): keep a host :class:`BlockSummary` for
      :meth:`Mask.any_allowed`.  Default: when the lists are on the CPU; ``True`` on a GPU
      costs one device->host copy, once.  Without it, block-level tests assume the lists may
      allow anything (conservative).

    Example::

        >>> import torch
        >>> bs = BlockSparse.from_indices(2, torch.tensor([[0, -1], [0, 1], [2, -1]]))
        >>> bs.kv_num_blocks.tolist(), bs.shape
        ([[[1, 2, 1]]], (1, 1, 3, 3))
        >>> Mask(block_sparse=bs).allowed(torch.arange(6), torch.arange(6)).int()
        tensor([[1, 1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0, 0],
                [0, 0, 0, 0, 1, 1],
                [0, 0, 0, 0, 1, 1]], dtype=torch.int32)
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    q_block: int = 128
    kv_block: int = 128
    full_kv_num_blocks: Tensor | None = None
    full_kv_indices: Tensor | None = None
    n_kv_blocks: int | None = None
    summary: BlockSummary | None = None
    check: InitVar[bool | None] = None
    summarize: InitVar[bool | None] = None

    # -- construction ---------------------------------------------------------------------------
    def __post_init__(self, check: bool | None, summarize: bool | None) -> None:
        for name in ("q_block", "kv_block"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"BlockSparse.{name} must be an int >= 1, got {getattr(self, name)}")
        pairs = [("kv", self.kv_num_blocks, self.kv_indices)]
        if (self.full_kv_num_blocks is None) != (self.full_kv_indices is None):
            raise ValueError(
                "pass both full_kv_num_blocks and full_kv_indices, or neither"
            )
        if self.full_kv_num_blocks is not None:
            pairs.append(("full_kv", self.full_kv_num_blocks, self.full_kv_indices))
        for name, num, idx in pairs:
            if num.dim() != 3 or idx.dim() != 4 or idx.shape[:3] != num.shape:
                raise ValueError(
                    f"{name}_num_blocks must be [B, H, n_q_blocks] and {name}_indices "
                    f"[B, H, n_q_blocks, max_blocks] with the same first three sizes; got "
                    f"{tuple(num.shape)} and {tuple(idx.shape)} (use BlockSparse.from_indices "
                    "for 2-D lists padded with -1)"
                )
            if num.dtype.is_floating_point or idx.dtype.is_floating_point or num.dtype == torch.bool:
                raise ValueError(
                    f"{name}_num_blocks / {name}_indices must be integer tensors, got "
                    f"{num.dtype} / {idx.dtype}"
                )
            if num.device != self.kv_num_blocks.device or idx.device != num.device:
                raise ValueError(
                    "the block lists must all be on one device; got "
                    f"{self.kv_num_blocks.device}, {num.device}, {idx.device} (move them with .to)"
                )
        if self.full_kv_num_blocks is not None:
            if self.full_kv_num_blocks.shape[:2] != self.kv_num_blocks.shape[:2] or (
                self.full_kv_num_blocks.shape[2] != self.kv_num_blocks.shape[2]
            ):
                raise ValueError(
                    f"full_kv_num_blocks {tuple(self.full_kv_num_blocks.shape)} must match "
                    f"kv_num_blocks {tuple(self.kv_num_blocks.shape)}"
                )
        if self.n_kv_blocks is None:
            n_k = _cdiv(self.n_q_blocks * self.q_block, self.kv_block)
            object.__setattr__(self, "n_kv_blocks", n_k)
        if self.n_kv_blocks < 0:
            raise ValueError(f"BlockSparse.n_kv_blocks must be >= 0, got {self.n_kv_blocks}")
        on_cpu = self.device.type == "cpu"
        if check if check is not None else on_cpu:
            self._check_values(pairs)
        if self.summary is None and (summarize if summarize is not None else on_cpu):
            object.__setattr__(self, "summary", self._make_summary())

    def _check_values(self, pairs) -> None:
        n_k = self.n_kv_blocks
        for name, num, idx in pairs:
            width = idx.shape[-1]
            if num.numel() and (int(num.min()) < 0 or int(num.max()) > width):
                raise ValueError(
                    f"{name}_num_blocks holds counts in [{int(num.min())}, {int(num.max())}] but "
                    f"{name}_indices lists at most {width} blocks per query block; counts must be "
                    f"in [0, {width}] (widen the index list or lower the counts)"
                )
            used = torch.arange(width, device=idx.device) < num.unsqueeze(-1)
            vals = idx[used]
            if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= n_k):
                raise ValueError(
                    f"{name}_indices lists key block {int(vals.max()) if int(vals.max()) >= n_k else int(vals.min())} "
                    f"but there are {n_k} key blocks (0 .. {n_k - 1}); fix the indices or pass "
                    "n_kv_blocks= for a longer key sequence"
                )

    @staticmethod
    def from_indices(
        q_block: int, kv_indices: Tensor, num_kv_blocks: int | None = None, *,
        kv_block: int | None = None, **kw,
    ) -> "BlockSparse":
        """From index lists padded with negative entries: ``kv_indices`` is
        ``[n_q_blocks, max]``, ``[H, n_q_blocks, max]`` or ``[B, H, n_q_blocks, max]``.

        ``num_kv_blocks`` defaults to the number of query blocks (a square block grid).
        """
        if kv_indices.dim() not in (2, 3, 4):
            raise ValueError(
                f"kv_indices must be [n_q_blocks, max_nnz], [H, n_q_blocks, max_nnz] or "
                f"[B, H, n_q_blocks, max_nnz] (pad with -1), got shape {tuple(kv_indices.shape)}"
            )
        idx = kv_indices.reshape((1,) * (4 - kv_indices.dim()) + tuple(kv_indices.shape))
        n_k = num_kv_blocks if num_kv_blocks is not None else idx.shape[2]
        big = torch.iinfo(torch.int32).max
        if idx.device.type == "cpu" and idx.numel() and int(idx.max()) >= n_k:
            raise ValueError(
                f"kv_indices refers to key block {int(idx.max())} but there are only {n_k} key "
                "blocks; pass num_kv_blocks="
            )
        valid = idx >= 0
        compact = torch.where(valid, idx.to(torch.int64), big).sort(-1).values
        num = valid.sum(-1).to(torch.int32)
        compact = torch.where(compact == big, 0, compact).to(torch.int32)
        kv_block = kv_block if kv_block is not None else q_block
        return BlockSparse(num, compact.contiguous(), q_block, kv_block, n_kv_blocks=n_k, **kw)

    @staticmethod
    def from_table(q_block: int, table: Tensor, *, kv_block: int | None = None, **kw) -> "BlockSparse":
        """From a bool table ``[n_q_blocks, n_kv_blocks]`` (or ``[H, ..]``, ``[B, H, ..]``):
        ``table[..., i, j]`` allows query block ``i`` to attend to key block ``j``."""
        if table.dim() not in (2, 3, 4) or table.dtype != torch.bool:
            raise ValueError(
                "the table must be a bool tensor [n_q_blocks, n_kv_blocks] (or [H, ...] / "
                f"[B, H, ...]); got shape {tuple(table.shape)} dtype {table.dtype}"
            )
        t = table.reshape((1,) * (4 - table.dim()) + tuple(table.shape))
        num, idx = _table_to_lists(t)
        kv_block = kv_block if kv_block is not None else q_block
        return BlockSparse(num, idx, q_block, kv_block, n_kv_blocks=t.shape[-1], **kw)

    # -- shape ----------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(Bm, Hm, n_q_blocks, n_kv_blocks)``."""
        b, h, n = self.kv_num_blocks.shape
        return (b, h, n, self.n_kv_blocks)

    @property
    def n_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[2]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    @property
    def per_head(self) -> bool:
        """Whether the lists differ by batch row or head (a batch or head dim above 1)."""
        return self.kv_num_blocks.shape[0] > 1 or self.kv_num_blocks.shape[1] > 1

    def _lists(self):
        yield self.kv_num_blocks, self.kv_indices
        if self.full_kv_num_blocks is not None:
            yield self.full_kv_num_blocks, self.full_kv_indices

    def _replace(self, **changes) -> "BlockSparse":
        fields = dict(
            kv_num_blocks=self.kv_num_blocks, kv_indices=self.kv_indices, q_block=self.q_block,
            kv_block=self.kv_block, full_kv_num_blocks=self.full_kv_num_blocks,
            full_kv_indices=self.full_kv_indices, n_kv_blocks=self.n_kv_blocks,
            summary=self.summary,
        )
        fields.update(changes)
        return BlockSparse(**fields, check=False, summarize=False)

    def to(self, device: torch.device | str) -> "BlockSparse":
        """The lists on ``device`` (the host summary is kept); ``self`` when already there."""
        device = torch.device(device)
        if device == self.device:
            return self
        move = lambda t: None if t is None else host_to_device(t, device)  # noqa: E731
        return self._replace(
            kv_num_blocks=move(self.kv_num_blocks), kv_indices=move(self.kv_indices),
            full_kv_num_blocks=move(self.full_kv_num_blocks),
            full_kv_indices=move(self.full_kv_indices),
        )

    def __and__(self, other: "BlockSparse") -> "BlockSparse":
        """The pairs both allow: per batch row, head and query block, the key blocks both
        list.  Both need the same ``q_block``, ``kv_block`` and block counts; a batch or head
        dim of 1 broadcasts.  Made with tensor ops on the lists' device; a host summary is made
        only when both had one (on a GPU that is one device->host copy, as for
        :meth:`with_summary`), so lists without summaries combine with no host sync."""
        if not isinstance(other, BlockSparse):
            return NotImplemented
        mine, theirs = (self.q_block, self.kv_block), (other.q_block, other.kv_block)
        if mine != theirs or self.shape[2:] != other.shape[2:]:
            raise ValueError(
                "block-sparse masks combine only with the same blocks: got (q_block, kv_block) "
                f"{mine} vs {theirs} and (n_q_blocks, n_kv_blocks) {self.shape[2:]} vs "
                f"{other.shape[2:]}; build both with the same block sizes and sequence length"
            )
        if self.device != other.device:
            raise ValueError(
                f"block-sparse masks on {self.device} and {other.device}: move one with .to()"
            )
        for dim, name in ((0, "batch"), (1, "head")):
            a, b = self.shape[dim], other.shape[dim]
            if a != b and 1 not in (a, b):
                raise ValueError(
                    f"block-sparse masks with {a} and {b} {name} lists cannot combine: give "
                    f"one of them 1 (shared) or both the same number"
                )
        table = self.to_table() & other.to_table()  # [Bm, Hm, nq, nk], broadcast
        summarize = self.summary is not None and other.summary is not None
        return BlockSparse.from_table(
            self.q_block, table, kv_block=self.kv_block, check=False, summarize=summarize
        )

    def with_summary(self) -> "BlockSparse":
        """These lists with a host :class:`BlockSummary` (one device->host copy: build it once,
        outside the step loop); ``self`` when it has one."""
        return self if self.summary is not None else self._replace(summary=self._make_summary())

    def mask_heads(self, heads: int, kv_heads: int | None = None) -> int:
        """Divisor mapping a query head to its mask head (``h // divisor``) for a call with
        ``heads`` query heads and ``kv_heads`` kv heads; 0 when one mask head serves all.

        Raises a ValueError saying what to change when the mask's head count fits neither.
        """
        kv_heads = heads if kv_heads is None else kv_heads
        hm = self.kv_num_blocks.shape[1]
        if hm == 1:
            return 0
        if hm == heads:
            return 1
        if hm == kv_heads:
            return heads // kv_heads
        raise ValueError(
            f"the block-sparse lists have {hm} heads but the call has {heads} query heads and "
            f"{kv_heads} kv heads; give the lists 1, {heads} or {kv_heads} heads (under Ulysses, "
            "take each rank's heads with BlockSparse.select_heads)"
        )

    def check_call(self, batch: int, heads: int, kv_heads: int, device: torch.device) -> int:
        """Raise a ValueError saying what to change when these lists cannot serve a kernel call
        on ``q [batch, S, heads, D]`` on ``device``; returns :meth:`mask_heads`'s divisor.
        Shapes and devices only: no device work."""
        if self.device != torch.device(device):
            raise ValueError(
                f"the block-sparse lists are on {self.device} but q is on {device}; move the mask "
                "once with mask.to(q.device) (kernels never copy the lists per call)"
            )
        bm = self.kv_num_blocks.shape[0]
        if bm not in (1, batch):
            raise ValueError(
                f"the block-sparse lists have batch {bm} but q has batch {batch}; give them "
                f"batch 1 (shared by every row) or {batch}"
            )
        return self.mask_heads(heads, kv_heads)

    def select_heads(self, lo: int, hi: int, heads: int, kv_heads: int | None = None) -> "BlockSparse":
        """The lists for a call on query heads ``lo .. hi-1`` of ``heads`` (``kv_heads`` kv
        heads): what a Ulysses rank passes to its kernel.  Lists per kv head keep the kv heads
        those query heads use; lists shared by all heads are returned as they are.  Results are
        cached, so repeated calls return the same object with its device caches.

        Example::

            >>> import torch
            >>> bs = BlockSparse.from_table(4, torch.eye(2, dtype=torch.bool).expand(8, 2, 2))
            >>> bs.select_heads(2, 4, heads=8).shape, bs.select_heads(2, 4, 8, kv_heads=2).shape
            ((1, 2, 2, 2), (1, 2, 2, 2))
        """
        if not 0 <= lo < hi <= heads:
            raise ValueError(f"select_heads needs 0 <= lo < hi <= heads, got lo={lo}, hi={hi}, heads={heads}")
        div = self.mask_heads(heads, kv_heads)
        if div == 0:
            return self
        m_lo, m_hi = lo // div, (hi - 1) // div + 1
        if (m_lo, m_hi) == (0, self.kv_num_blocks.shape[1]):
            return self
        key = (m_lo, m_hi)
        cache = self._head_selections
        if key not in cache:
            cut = lambda t: None if t is None else t[:, m_lo:m_hi]  # noqa: E731
            cache[key] = self._replace(
                kv_num_blocks=cut(self.kv_num_blocks), kv_indices=cut(self.kv_indices),
                full_kv_num_blocks=cut(self.full_kv_num_blocks),
                full_kv_indices=cut(self.full_kv_indices),
            )
        return cache[key]

    @functools.cached_property
    def _head_selections(self) -> dict:
        return {}

    # -- dense views (tests, the reference kernel) -------------------------------------------------
    def to_table(self) -> Tensor:
        """Bool ``[Bm, Hm, n_q_blocks, n_kv_blocks]`` on the lists' device (cached)."""
        return self._table

    @functools.cached_property
    def _table(self) -> Tensor:
        Bm, Hm, nq, nk = self.shape
        table = torch.zeros(Bm, Hm, nq, nk + 1, dtype=torch.bool, device=self.device)
        for num, idx in self._lists():
            table.scatter_(3, _masked_indices(num, idx, nk).to(torch.int64), True)
        return table[..., :nk].contiguous()

    def _make_summary(self) -> BlockSummary:
        nq, nk = self.n_q_blocks, self.n_kv_blocks
        f, g = max(1, _cdiv(nq, _SUMMARY_MAX)), max(1, _cdiv(nk, _SUMMARY_MAX))
        cq, ck = _cdiv(nq, f), _cdiv(nk, g)
        table = torch.zeros(cq, ck + 1, dtype=torch.bool, device=self.device)
        rows = (torch.arange(nq, device=self.device) // f)  # coarse row of each query block
        for num, idx in self._lists():
            cols = _masked_indices(num, idx, nk)  # [Bm, Hm, nq, max]; nk = unused
            cols = torch.where(cols < nk, cols // g, ck).to(torch.int64)
            r = rows.view(1, 1, nq, 1).expand_as(cols)
            table[r.reshape(-1), cols.reshape(-1)] = True
        return BlockSummary(table[:, :ck].cpu(), f, g)

    # -- kernel forms (made once per mask, on the lists' device, tensor ops only) ----------------
    @functools.cached_property
    def kernel_lists(self) -> tuple[Tensor, Tensor]:
        """``(count int32 [Bm, Hm, n_q_blocks], indices int32 [Bm, Hm, n_q_blocks, width])``:
        the union of both lists per query block, sorted ascending, duplicates and out-of-range
        entries dropped (valid entries first)."""
        nk = self.n_kv_blocks
        parts = [_masked_indices(num, idx, nk) for num, idx in self._lists()]
        if sum(p.shape[-1] for p in parts) == 0:  # keep one column: kernels index the rows
            parts.append(torch.full((*parts[0].shape[:3], 1), nk, device=self.device))
        merged = torch.cat(parts, -1).sort(-1).values  # [Bm, Hm, nq, w]; nk = unused
        dup = torch.zeros_like(merged, dtype=torch.bool)
        dup[..., 1:] = merged[..., 1:] == merged[..., :-1]
        merged = torch.where(dup, nk, merged).sort(-1).values
        count = (merged < nk).sum(-1).to(torch.int32)
        return count.contiguous(), torch.where(merged < nk, merged, 0).to(torch.int32).contiguous()

    @functools.cached_property
    def transposed_lists(self) -> tuple[Tensor, Tensor]:
        """The lists by key block, for the dK/dV pass, in compressed-row form:
        ``(offsets int32 [Bm*Hm*n_kv_blocks + 1], q_blocks int32 [Bm*Hm*n_q_blocks*width])``;
        the query blocks of key block ``j`` of (batch row ``b``, mask head ``h``) are
        ``q_blocks[offsets[r]:offsets[r+1]]`` with ``r = (b*Hm + h)*n_kv_blocks + j``, ascending."""
        count, idx = self.kernel_lists
        valid = torch.arange(idx.shape[-1], device=idx.device) < count.unsqueeze(-1).long()
        key, q_blocks = _transpose(valid, idx, self.n_kv_blocks)
        Bm, Hm, nq, nk = self.shape
        n_rows = Bm * Hm * nk
        starts = torch.arange(n_rows + 1, device=idx.device) * nq  # first key of every row
        return torch.searchsorted(key, starts).to(torch.int32), q_blocks

    def split_lists(self, mask: "Mask") -> "SplitLists":
        """The lists split by ``mask``'s causal / window / documents conditions into blocks they
        cut inside (partial: element mask needed) and blocks they allow whole (full); blocks
        they exclude entirely are dropped.  Blocks are global, so the split holds for any
        block-aligned shard.  Made once per set of conditions on the lists' device (tensor ops,
        cached on this object).  See :class:`SplitLists`."""
        key = (mask.causal, mask.window,
               None if mask.cu_seqlens is None else mask._boundaries)
        if key not in self._splits:
            self._splits[key] = _split(self, mask)
        return self._splits[key]

    @functools.cached_property
    def _splits(self) -> dict:
        return {}

    # -- FlexAttention interop -------------------------------------------------------------------
    @staticmethod
    def from_flex_block_mask(block_mask, **kw) -> "BlockSparse":
        """The lists of a ``torch.nn.attention.flex_attention.BlockMask`` (partial and full).

        The BlockMask's ``mask_mod`` is not carried over: give its element-wise part as the
        :class:`Mask`'s causal / window / documents conditions.
        """
        q_block, kv_block = block_mask.BLOCK_SIZE
        kw.setdefault("n_kv_blocks", _cdiv(block_mask.seq_lengths[1], kv_block))
        return BlockSparse(
            block_mask.kv_num_blocks, block_mask.kv_indices, q_block, kv_block,
            full_kv_num_blocks=block_mask.full_kv_num_blocks,
            full_kv_indices=block_mask.full_kv_indices, **kw,
        )


    def to_flex_block_mask(self, q_len: int, kv_len: int | None = None, **kw):
        """These lists alone (no causal / window / documents) as a FlexAttention ``BlockMask``;
        see :meth:`Mask.to_flex_block_mask` for the options and for masks with conditions."""
        return Mask(block_sparse=self).to_flex_block_mask(q_len, kv_len, **kw)


class SplitLists(NamedTuple):
    """:meth:`BlockSparse.split_lists`: forward lists ``[Bm, Hm, n_q_blocks, width]`` int32,
    ascending with the sentinel ``n_kv_blocks`` past the valid entries (so a row can be
    searched), and the transposed lists as sorted int64 keys ``((b*Hm + h)*n_kv_blocks + j) *
    n_q_blocks + i`` (sentinel past the valid ones) with the query block ``i`` of each as int32."""

    part: Tensor
    full: Tensor
    part_t_keys: Tensor
    part_t_q: Tensor
    full_t_keys: Tensor
    full_t_q: Tensor


def _transpose(valid: Tensor, idx: Tensor, n_k: int) -> tuple[Tensor, Tensor]:
    """Entries ``idx [Bm, Hm, nq, w]`` where ``valid`` -> sorted int64 keys ``(row * nq + i)``,
    ``row = (b*Hm + h)*n_k + idx`` (invalid: the sentinel ``Bm*Hm*n_k*nq``), and the query block
    ``i`` of each key (int32)."""
    Bm, Hm, nq, _ = idx.shape
    dev = idx.device
    bh = torch.arange(Bm * Hm, device=dev).view(Bm, Hm, 1, 1)
    qb = torch.arange(nq, device=dev).view(1, 1, nq, 1)
    row = bh * n_k + idx.to(torch.int64)  # [Bm, Hm, nq, w]
    key = torch.where(valid, row * nq + qb, Bm * Hm * n_k * nq).reshape(-1).sort().values
    return key, (key % nq).to(torch.int32).contiguous()


def _split(bs: BlockSparse, mask: "Mask") -> SplitLists:
    count, idx = bs.kernel_lists
    nk = bs.n_kv_blocks
    Bm, Hm, nq, w = idx.shape
    dev = idx.device
    valid = torch.arange(w, device=dev) < count.unsqueeze(-1).long()
    q_lo = (torch.arange(nq, device=dev) * bs.q_block).view(1, 1, nq, 1)
    k_lo = idx.long() * bs.kv_block
    any_, full = mask.range_flags(q_lo, q_lo + bs.q_block - 1, k_lo, k_lo + bs.kv_block - 1)
    part_ok, full_ok = valid & any_ & ~full, valid & full
    part = torch.where(part_ok, idx, nk).sort(-1).values.to(torch.int32).contiguous()
    whole = torch.where(full_ok, idx, nk).sort(-1).values.to(torch.int32).contiguous()
    return SplitLists(part, whole, *_transpose(part_ok, idx, nk), *_transpose(full_ok, idx, nk))


def _masked_indices(num: Tensor, idx: Tensor, n_k: int) -> Tensor:
    """int64 ``idx`` with entries past the count, negative or ``>= n_k`` replaced by ``n_k``."""
    used = torch.arange(idx.shape[-1], device=idx.device) < num.to(torch.int64).unsqueeze(-1)
    idx = idx.to(torch.int64)
    return torch.where(used & (idx >= 0) & (idx < n_k), idx, n_k)


def _table_to_lists(table: Tensor) -> tuple[Tensor, Tensor]:
    """Bool ``[..., nq, nk]`` -> ``(count int32 [..., nq], indices int32 [..., nq, nk])``,
    allowed blocks first, ascending."""
    order = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True)
    return table.sum(-1).to(torch.int32).contiguous(), order.to(torch.int32).contiguous()


@dataclass(frozen=True, eq=False)
class Mask:
    """Allowed (query, key) pairs as a conjunction of conditions on global positions.

    - ``causal``: key position <= query position.
    - ``window``: ``query - key < window`` (and ``key - query < window`` when not causal).
    - ``cu_seqlens``: global document boundaries ``[0, e1, e2, ..., S]`` of a packed sequence;
      tokens only attend inside their own document.
    - ``block_sparse``: a :class:`BlockSparse` allow list (per batch row and head, on global
      block numbers); the other conditions apply inside its listed blocks.

    The default ``Mask()`` allows every pair.  Combine masks with ``&``: the pairs both allow
    (two windows: the narrower; two block-sparse lists: :meth:`BlockSparse.__and__`; two
    document masks are refused: merge their ``cu_seqlens`` first).
    """

    causal: bool = False
    window: int | None = None
    cu_seqlens: Tensor | None = None
    block_sparse: BlockSparse | None = None

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"Mask.window must be >= 1 (tokens), got {self.window}")
        if self.cu_seqlens is not None:
            cu = self.cu_seqlens
            if isinstance(cu, (list, tuple)):  # a Python sequence of boundaries is fine too
                cu = torch.tensor(cu, dtype=torch.int64)
            if not isinstance(cu, Tensor):
                raise TypeError(
                    "Mask.cu_seqlens must be a 1-D integer tensor (or a list) of global document "
                    f"boundaries [0, end_1, ..., S]; got {type(cu).__name__}"
                )
            if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
                raise ValueError(
                    "Mask.cu_seqlens must be a 1-D integer tensor [0, end_1, ..., S] with at least "
                    f"2 entries; got shape {tuple(cu.shape)} dtype {cu.dtype}"
                )
            cu = cu.detach().to("cpu", torch.int64)
            if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(
                    f"Mask.cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}"
                )
            object.__setattr__(self, "cu_seqlens", cu)

    def __and__(self, other: "Mask") -> "Mask":
        if self.cu_seqlens is not None and other.cu_seqlens is not None:
            raise ValueError("cannot combine two document masks; merge the cu_seqlens first")
        windows = [w for w in (self.window, other.window) if w is not None]
        return Mask(
            causal=self.causal or other.causal,
            window=min(windows) if windows else None,
            cu_seqlens=self.cu_seqlens if self.cu_seqlens is not None else other.cu_seqlens,
            block_sparse=(self.block_sparse & other.block_sparse
                          if self.block_sparse is not None and other.block_sparse is not None
                          else self.block_sparse or other.block_sparse),
        )

    @property
    def is_full(self) -> bool:
        return (
            not self.causal
            and self.window is None
            and self.cu_seqlens is None
            and self.block_sparse is None
        )

    def validate(self, seq_len: int) -> None:
        """Check that the mask covers a global sequence of ``seq_len`` tokens."""
        if self.cu_seqlens is not None and int(self.cu_seqlens[-1]) != seq_len:
            raise ValueError(
                f"Mask.cu_seqlens ends at {int(self.cu_seqlens[-1])} but the global sequence has "
                f"{seq_len} tokens; the last boundary must equal the global length (pad the last "
                "document or add a padding document)"
            )
        if self.block_sparse is not None:
            bs = self.block_sparse
            for side, n, size in (("query", bs.n_q_blocks, bs.q_block),
                                  ("key", bs.n_kv_blocks, bs.kv_block)):
                need = _cdiv(seq_len, size)
                if n < need:
                    raise ValueError(
                        f"the block-sparse lists cover {n} {side} blocks of {size} tokens, fewer "
                        f"than the {need} blocks a {seq_len}-token sequence needs; build the "
                        f"lists for {need} {side} blocks"
                    )

    def to(self, device: torch.device | str) -> "Mask":
        """This mask with its block-sparse lists on ``device`` (``self`` when already there)."""
        if self.block_sparse is None or self.block_sparse.device == torch.device(device):
            return self
        return dataclasses.replace(self, block_sparse=self.block_sparse.to(device))

    def select_heads(self, lo: int, hi: int, heads: int, kv_heads: int | None = None) -> "Mask":
        """The mask for a call on query heads ``lo .. hi-1`` (see :meth:`BlockSparse.select_heads`)."""
        if self.block_sparse is None:
            return self
        bs = self.block_sparse.select_heads(lo, hi, heads, kv_heads)
        return self if bs is self.block_sparse else dataclasses.replace(self, block_sparse=bs)

    def block_flags(self, q_block: int, kv_block: int, q_len: int, kv_len: int,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """For the grid of ``q_block x kv_block`` blocks of a ``q_len x kv_len`` sequence from
        position 0: ``(any, full)`` bool ``[n_q_blocks, n_kv_blocks]``, whether causal / window /
        documents allow some pair of the block (conservative) and every pair (exact).  The
        block-sparse lists are not consulted."""
        nq, nk = _cdiv(q_len, q_block), _cdiv(kv_len, kv_block)
        q_lo = torch.arange(nq, device=device) * q_block
        k_lo = torch.arange(nk, device=device) * kv_block
        q_hi = (q_lo + q_block).clamp(max=q_len) - 1
        k_hi = (k_lo + kv_block).clamp(max=kv_len) - 1
        return self.range_flags(q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :])

    def range_flags(self, q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor
                    ) -> tuple[Tensor, Tensor]:
        """``(any, full)`` for query positions ``[q_lo, q_hi]`` against key positions
        ``[k_lo, k_hi]`` (broadcastable int tensors): may causal / window / documents allow some
        pair (conservative), do they allow every pair (exact).  Lists not consulted."""
        ql, qh, kl, kh = q_lo, q_hi, k_lo, k_hi
        shape = torch.broadcast_shapes(ql.shape, qh.shape, kl.shape, kh.shape)
        any_ = torch.ones(shape, dtype=torch.bool, device=ql.device)
        full = any_.clone()
        if self.causal:
            any_ &= kl <= qh
            full &= kh <= ql
        if self.window is not None:
            w = self.window
            any_ &= (ql - kh) < w
            full &= (qh - kl) < w
            if not self.causal:
                any_ &= (kl - qh) < w
                full &= (kh - ql) < w
        if self.cu_seqlens is not None:
            dql, dqh = self.document_ids(ql), self.document_ids(qh)
            dkl, dkh = self.document_ids(kl), self.document_ids(kh)
            any_ &= (dql <= dkh) & (dkl <= dqh)
            full &= (dql == dqh) & (dkl == dkh) & (dql == dkl)
        return any_, full & any_

    def to_flex_block_mask(
        self, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
        kv_heads: int | None = None, exact_mask_mod: bool = True,
    ):
        """This mask as a FlexAttention ``BlockMask`` over global positions ``0 .. q_len-1`` /
        ``0 .. kv_len-1``: the block-sparse lists split into partial blocks (where causal /
        window / documents cut inside the block: ``mask_mod`` applies them) and full blocks;
        listed blocks those conditions exclude entirely are dropped.  Made with tensor ops on
        the lists' device.

        - ``heads`` / ``kv_heads``: map the lists' heads to ``heads`` query heads (needed for
          lists per kv head; FlexAttention's block mask has 1 or ``heads`` heads).
        - ``exact_mask_mod``: ``mask_mod`` also looks the pair's block up in the lists, so the
          mask is exact where FlexAttention runs unfused (eager, CPU), which reads only
          ``mask_mod``; ``False`` gives the plain conditions (what compiled FlexAttention needs:
          it skips unlisted blocks itself; the fair form for benchmarks).

        Example::

            >>> import torch
            >>> bs = BlockSparse.from_table(2, torch.ones(2, 2, dtype=torch.bool))
            >>> bm = (Mask(causal=True) & Mask(block_sparse=bs)).to_flex_block_mask(4)
            >>> bm.kv_num_blocks.tolist(), bm.full_kv_num_blocks.tolist()
            ([[[1, 1]]], [[[0, 1]]])
        """
        from torch.nn.attention.flex_attention import BlockMask

        if self.block_sparse is None:
            raise ValueError(
                "to_flex_block_mask needs block-sparse lists; for masks without them use "
                "torch.nn.attention.flex_attention.create_block_mask with a mask_mod"
            )
        kv_len = q_len if kv_len is None else kv_len
        bs = self.block_sparse
        nq, nk = _cdiv(q_len, bs.q_block), _cdiv(kv_len, bs.kv_block)
        if bs.n_q_blocks < nq or bs.n_kv_blocks < nk:
            raise ValueError(
                f"the lists cover {bs.n_q_blocks} x {bs.n_kv_blocks} blocks, fewer than the "
                f"{nq} x {nk} of a {q_len} x {kv_len} attention"
            )
        table = bs.to_table()[:, :, :nq, :nk]
        if heads is not None:
            div = bs.mask_heads(heads, kv_heads)
            if div:
                table = table.index_select(1, torch.arange(heads, device=bs.device) // div)
        any_, full = self.block_flags(bs.q_block, bs.kv_block, q_len, kv_len, bs.device)
        part_num, part_idx = _table_to_lists(table & any_ & ~full)
        full_num, full_idx = _table_to_lists(table & full)
        return BlockMask.from_kv_blocks(
            part_num, part_idx, full_num, full_idx, BLOCK_SIZE=(bs.q_block, bs.kv_block),
            mask_mod=self._mask_mod(bs.device, max(q_len, kv_len),
                                    table.contiguous() if exact_mask_mod else None),
            seq_lengths=(q_len, kv_len),
        )

    def _mask_mod(self, device, length: int, table: Tensor | None = None):
        """The element conditions as a FlexAttention ``mask_mod`` (positions below ``length``),
        and the block lookup in ``table [Bm, Hm, nq, nk]`` when given."""
        causal, window = self.causal, self.window
        qb = kb = 1
        if table is not None:
            qb, kb = self.block_sparse.q_block, self.block_sparse.kv_block
            one_b, one_h = table.shape[0] == 1, table.shape[1] == 1
        docs = None
        if self.cu_seqlens is not None:
            docs = self.document_ids(torch.arange(length, device=device))  # [length]

        def mask_mod(b, h, q_idx, kv_idx):
            ok = q_idx >= 0
            if causal:
                ok = ok & (kv_idx <= q_idx)
            if window is not None:
                ok = ok & (q_idx - kv_idx < window)
                if not causal:
                    ok = ok & (kv_idx - q_idx < window)
            if docs is not None:
                ok = ok & (docs[q_idx] == docs[kv_idx])
            if table is not None:
                ok = ok & table[0 if one_b else b, 0 if one_h else h, q_idx // qb, kv_idx // kb]
            return ok

        return mask_mod

    @functools.cached_property
    def _boundaries(self) -> tuple[int, ...]:
        """``cu_seqlens`` as Python ints, for block-level tests on the host."""
        return tuple(self.cu_seqlens.tolist())

    @functools.cached_property
    def _cu_seqlens_copies(self) -> dict[torch.device, Tensor]:
        return {}

    def cu_seqlens_on(self, device: torch.device | str) -> Tensor:
        """``cu_seqlens`` (int64) on ``device``: copied once per mask and device, without a host
        sync (a plain ``.to(device)`` from pageable memory waits for the device's queue, on every
        kernel call of every layer)."""
        assert self.cu_seqlens is not None
        device = torch.device(device)
        if device not in self._cu_seqlens_copies:
            cu = self.cu_seqlens.to(torch.int64)
            self._cu_seqlens_copies[device] = host_to_device(cu, device)
        return self._cu_seqlens_copies[device]

    def document_ids(self, pos: Tensor) -> Tensor:
        """Document index of each global position (needs ``cu_seqlens``)."""
        return torch.searchsorted(self.cu_seqlens_on(pos.device), pos, right=True) - 1

    # -- element level ----------------------------------------------------------------------------
    def allowed(
        self, q_pos: Tensor, k_pos: Tensor, *, heads: int | None = None,
        kv_heads: int | None = None,
    ) -> Tensor:
        """May the query at ``q_pos[i]`` attend to the key at ``k_pos[j]``?

        Returns bool ``[Sq, Sk]`` when the mask is the same for every batch row and head, else
        ``[Bm, Hm, Sq, Sk]`` (the block-sparse lists' batch and head dims).  With ``heads``
        (and ``kv_heads`` for GQA) always ``[Bm, heads or 1, Sq, Sk]``: broadcastable against
        ``[B, heads, Sq, Sk]`` scores, mask heads mapped to query heads.
        """
        q = q_pos.view(-1, 1)
        k = k_pos.view(1, -1)
        ok = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q_pos.device)
        if self.causal:
            ok &= k <= q
        if self.window is not None:
            ok &= (q - k) < self.window
            if not self.causal:
                ok &= (k - q) < self.window
        if self.cu_seqlens is not None:
            ok &= self.document_ids(q) == self.document_ids(k)
        if self.block_sparse is not None:
            bs = self.block_sparse
            table = bs.to_table().to(q_pos.device)  # [Bm, Hm, nq, nk]
            Bm, Hm, nq, nk = bs.shape
            qb, kb = q_pos // bs.q_block, k_pos // bs.kv_block
            inside = (qb < nq).view(-1, 1) & (kb < nk).view(1, -1)
            blocks = table[:, :, qb.clamp(max=max(nq - 1, 0)).view(-1, 1),
                           kb.clamp(max=max(nk - 1, 0)).view(1, -1)]  # [Bm, Hm, Sq, Sk]
            ok = ok & inside & blocks
            if heads is not None:
                div = bs.mask_heads(heads, kv_heads)
                if div:
                    ok = ok.index_select(1, torch.arange(heads, device=ok.device) // div)
                return ok
            return ok if bs.per_head else ok[0, 0]
        return ok.view(1, 1, *ok.shape) if heads is not None else ok

    # -- block level (conservative: False means certainly no allowed pair) ------------------------
    def interval_may_attend(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> bool:
        """Could any query in ``[q_lo, q_hi]`` attend to any key in ``[k_lo, k_hi]``?"""
        if self.causal and q_hi < k_lo:
            return False
        if self.window is not None:
            gap = q_lo - k_hi if self.causal else max(q_lo - k_hi, k_lo - q_hi)
            if gap >= self.window:
                return False
        if self.cu_seqlens is not None:
            cu = self._boundaries

            def doc(p: int) -> int:  # = document_ids, on one position, without a tensor
                return bisect.bisect_right(cu, p) - 1

            if doc(q_hi) < doc(k_lo) or doc(k_hi) < doc(q_lo):
                return False
        if self.block_sparse is not None:
            bs = self.block_sparse
            qb_lo, qb_hi = q_lo // bs.q_block, min(q_hi // bs.q_block, bs.n_q_blocks - 1)
            kb_lo, kb_hi = k_lo // bs.kv_block, min(k_hi // bs.kv_block, bs.n_kv_blocks - 1)
            if qb_lo > qb_hi or kb_lo > kb_hi:  # past the lists: nothing listed
                return False
            if bs.summary is not None and not bs.summary.may_attend(qb_lo, qb_hi, kb_lo, kb_hi):
                return False
        return True

    def any_allowed(self, q: Positions, k: Positions) -> bool:
        """Conservative test for a whole (query shard, key shard) pair: False means skip it."""
        if self.is_full:
            return len(q) > 0 and len(k) > 0
        q_runs, k_runs = list(q.bounds()), list(k.bounds())
        if len(q_runs) * len(k_runs) > _MAX_RUN_PAIRS:  # many short stripes: test the hulls
            q_runs = [(min(lo for lo, _ in q_runs), max(hi for _, hi in q_runs))]
            k_runs = [(min(lo for lo, _ in k_runs), max(hi for _, hi in k_runs))]
        return any(
            self.interval_may_attend(qlo, qhi, klo, khi)
            for qlo, qhi in q_runs
            for klo, khi in k_runs
        )
