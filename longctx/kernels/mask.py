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
import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ._device import host_to_device

__all__ = ["Segment", "Positions", "BlockSparse", "Mask"]

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


@dataclass(frozen=True, eq=False)
class BlockSparse:
    """Block-level allow list over global positions.

    ``table[i, j]`` says whether query block ``i`` (global positions ``i*block_size ..``) may
    attend to key block ``j``.  Build it from per-query-block index lists with
    :meth:`from_indices`.
    """

    block_size: int
    table: Tensor  # bool [num_q_blocks, num_k_blocks]

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"BlockSparse.block_size must be >= 1, got {self.block_size}")
        if self.table.dim() != 2 or self.table.dtype != torch.bool:
            raise ValueError(
                "BlockSparse.table must be a 2-D bool tensor [num_q_blocks, num_k_blocks]; "
                "use BlockSparse.from_indices to build one from index lists"
            )

    @staticmethod
    def from_indices(block_size: int, kv_indices: Tensor, num_kv_blocks: int | None = None):
        """``kv_indices [num_q_blocks, max_nnz]``: allowed key blocks per query block, -1 = pad."""
        if kv_indices.dim() != 2:
            raise ValueError(
                f"kv_indices must be [num_q_blocks, max_nnz] (pad with -1), got shape "
                f"{tuple(kv_indices.shape)}"
            )
        kv_indices = kv_indices.to(torch.int64).cpu()
        n_k = num_kv_blocks if num_kv_blocks is not None else kv_indices.shape[0]
        if kv_indices.numel() and int(kv_indices.max()) >= n_k:
            raise ValueError(
                f"kv_indices refers to key block {int(kv_indices.max())} but there are only "
                f"{n_k} key blocks; pass num_kv_blocks="
            )
        table = torch.zeros(kv_indices.shape[0], n_k + 1, dtype=torch.bool)
        table.scatter_(1, torch.where(kv_indices < 0, n_k, kv_indices), True)
        return BlockSparse(block_size, table[:, :n_k].contiguous())


@dataclass(frozen=True, eq=False)
class Mask:
    """Allowed (query, key) pairs as a conjunction of conditions on global positions.

    - ``causal``: key position <= query position.
    - ``window``: ``query - key < window`` (and ``key - query < window`` when not causal).
    - ``cu_seqlens``: global document boundaries ``[0, e1, e2, ..., S]`` of a packed sequence;
      tokens only attend inside their own document.
    - ``block_sparse``: a :class:`BlockSparse` allow list.

    The default ``Mask()`` allows every pair.  Combine masks with ``&``.
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
        if self.block_sparse is not None and other.block_sparse is not None:
            raise ValueError("cannot combine two block-sparse masks; AND their tables first")
        windows = [w for w in (self.window, other.window) if w is not None]
        return Mask(
            causal=self.causal or other.causal,
            window=min(windows) if windows else None,
            cu_seqlens=self.cu_seqlens if self.cu_seqlens is not None else other.cu_seqlens,
            block_sparse=self.block_sparse or other.block_sparse,
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
            need = -(-seq_len // bs.block_size)
            if bs.table.shape[0] < need or bs.table.shape[1] < need:
                raise ValueError(
                    f"BlockSparse table {tuple(bs.table.shape)} with block_size {bs.block_size} "
                    f"covers fewer than the {need} blocks a {seq_len}-token sequence needs"
                )

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
    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bool ``[Sq, Sk]``: may query at ``q_pos[i]`` attend to key at ``k_pos[j]``."""
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
            table = bs.table.to(q_pos.device)
            ok &= table[q // bs.block_size, k // bs.block_size]
        return ok

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
            b = bs.block_size
            if not bool(bs.table[q_lo // b : q_hi // b + 1, k_lo // b : k_hi // b + 1].any()):
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
