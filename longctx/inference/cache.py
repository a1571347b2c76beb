"""A KV cache sharded across context-parallel ranks, one :class:`LayerKV` per layer.

After a distributed prefill of a context of ``S`` tokens on ``P`` ranks (contiguous layout,
``L = S / P`` tokens each), rank ``r`` keeps the K/V of its own block, global positions
``r*L .. (r+1)*L - 1``; K is stored **after RoPE**, so a cached key never needs its position
again.  Tokens processed later (the query segment, generated tokens) are appended on the *query
rank*, the last one, whose cache therefore covers ``(P-1)*L .. seq_len - 1``.  Every rank's keys
are one contiguous run of global positions (:meth:`LayerKV.positions`).

The anchor of star attention is *not* copied into other ranks' caches: in phase 2 each key is
counted once, where it lives.

Batch rows share one length (the same context length per row; pad or bucket prompts to equal
lengths before calling).

Example (one process holds everything)::

    >>> import torch
    >>> from longctx.inference.cache import LayerKV
    >>> kv = LayerKV.from_kv(torch.zeros(2, 6, 1, 4), torch.zeros(2, 6, 1, 4), start=0, reserve=2)
    >>> kv.append(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4))
    >>> kv.length, kv.capacity, kv.keys().shape, kv.positions().segments[0]
    (7, 8, torch.Size([2, 7, 1, 4]), Segment(start=0, length=7, stride=1))
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..kernels.mask import Positions

__all__ = ["LayerKV", "ShardedKVCache"]


@dataclass(eq=False)
class LayerKV:
    """One layer's K/V on one rank: buffers ``[B, capacity, H_kv, D]``, the first ``length`` used.

    ``start`` is the global position of slot 0; slot ``i`` holds position ``start + i``.
    """

    k: Tensor
    v: Tensor
    start: int
    length: int

    @staticmethod
    def from_kv(k: Tensor, v: Tensor, start: int, reserve: int = 0) -> "LayerKV":
        """Cache ``k``/``v [B, n, H_kv, D]`` at positions ``start ..``; room for ``reserve`` more.

        Without ``reserve`` the tensors are kept as they are (no copy).
        """
        if k.shape != v.shape or k.dim() != 4:
            raise ValueError(
                f"k and v must both be [B, n, H_kv, D]; got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0 tokens, got {reserve}")
        n = k.shape[1]
        if reserve == 0:
            return LayerKV(k, v, start, n)
        B, _, Hkv, D = k.shape
        kbuf = k.new_empty(B, n + reserve, Hkv, D)
        vbuf = v.new_empty(B, n + reserve, Hkv, D)
        kbuf[:, :n], vbuf[:, :n] = k, v
        return LayerKV(kbuf, vbuf, start, n)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def keys(self) -> Tensor:
        """``[B, length, H_kv, D]`` (a view)."""
        return self.k[:, : self.length]

    def values(self) -> Tensor:
        """``[B, length, H_kv, D]`` (a view)."""
        return self.v[:, : self.length]

    def positions(self, begin: int = 0, end: int | None = None) -> Positions:
        """Global positions of slots ``begin:end`` (default: all used slots)."""
        end = self.length if end is None else end
        return Positions.contiguous(self.start + begin, end - begin)

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add ``k``/``v [B, T, H_kv, D]`` at the next positions; grows (by copying) when full."""
        B, T = k.shape[:2]
        if k.shape[0] != self.k.shape[0] or k.shape[2:] != self.k.shape[2:] or v.shape != k.shape:
            raise ValueError(
                f"appended k/v {tuple(k.shape)}/{tuple(v.shape)} do not match the cache's "
                f"[B={self.k.shape[0]}, *, H_kv={self.k.shape[2]}, D={self.k.shape[3]}]"
            )
        need = self.length + T
        if need > self.capacity:  # reserve more at prefill to avoid this copy
            new_cap = max(need, 2 * self.capacity)
            grown_k = self.k.new_empty(B, new_cap, *self.k.shape[2:])
            grown_v = self.v.new_empty(B, new_cap, *self.v.shape[2:])
            grown_k[:, : self.length] = self.keys()
            grown_v[:, : self.length] = self.values()
            self.k, self.v = grown_k, grown_v
        self.k[:, self.length : need] = k
        self.v[:, self.length : need] = v
        self.length = need

    def nbytes(self) -> int:
        """Bytes of the allocated buffers."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


@dataclass(eq=False)
class ShardedKVCache:
    """This rank's part of the KV cache of one batch: one :class:`LayerKV` per layer.

    - ``context_len``: the prefilled context length ``S`` (``S / world_size`` tokens per rank);
    - ``seq_len``: tokens of the global sequence so far (context, query segment and generated
      tokens), the same on every rank; the next token sits at global position ``seq_len``;
    - the query rank (``world_size - 1``) holds every token after the context.
    """

    layers: list[LayerKV]
    rank: int
    world_size: int
    context_len: int
    seq_len: int

    @property
    def query_rank(self) -> int:
        return self.world_size - 1

    @property
    def is_query_rank(self) -> bool:
        return self.rank == self.query_rank

    @property
    def shard_len(self) -> int:
        """Context tokens per rank (``L = S / P``)."""
        return self.context_len // self.world_size

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    def nbytes(self) -> int:
        """Bytes of this rank's K/V buffers, all layers."""
        return sum(layer.nbytes() for layer in self.layers)
