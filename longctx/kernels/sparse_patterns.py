"""Builders of block-sparse masks from the sparse-attention literature.

Each builder is a pure function returning a :class:`~longctx.kernels.mask.BlockSparse` on global
block numbers (made with tensor ops on ``device``; nothing is read back to the host), to be
combined with element-wise conditions, usually ``Mask(causal=True) & Mask(block_sparse=...)``.
Patterns are block-granular: a query block sees whole key blocks (the element conditions cut
inside them).

- :func:`sliding_window_with_sinks`: StreamingLLM's attention sinks plus a local window.
- :func:`strided_per_head`: S2-Attention's per-head strided (dilated) patterns with a local band,
  shifted per head so that the heads together cover every block.
- :func:`star_anchor_local`: Star Attention's phase 1, every context chunk attends to the anchor
  chunk and to itself.
- :func:`topk_blocks`: the block selection of MoBA / NSA, top-k key blocks per query block and
  head from per-block scores, causal-aware, optionally always with the query's own block.
- :func:`random_blocks`: random earlier blocks per query block and head (benchmarks).

Example::

    >>> from longctx.kernels.mask import Mask
    >>> bs = sliding_window_with_sinks(12, window=3, sinks=2, block=2)
    >>> bs.to_table()[0, 0].int()     # query block x key block
    tensor([[1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 0, 1, 1, 0, 0],
            [1, 0, 0, 1, 1, 0],
            [1, 0, 0, 0, 1, 1]], dtype=torch.int32)
    >>> mask = Mask(causal=True) & Mask(block_sparse=bs)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .mask import BlockSparse

__all__ = [
    "sliding_window_with_sinks",
    "strided_per_head",
    "star_anchor_local",
    "topk_blocks",
    "random_blocks",
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(seq_len: int, block: int) -> int:
    if seq_len < 1 or block < 1:
        raise ValueError(f"seq_len and block must be >= 1, got seq_len={seq_len}, block={block}")
    return _cdiv(seq_len, block)


def _from_candidates(cand: Tensor, valid: Tensor, q_block: int, kv_block: int, n_kv: int,
                     **kw) -> BlockSparse:
    """Lists from candidate key blocks ``cand [Bm, Hm, nq, w]`` (int64) where ``valid``:
    valid entries first, ascending (the candidates must hold no duplicate valid entry)."""
    big = torch.iinfo(torch.int64).max
    keyed = torch.where(valid, cand, big).sort(-1).values
    num = valid.sum(-1).to(torch.int32)
    idx = torch.where(keyed == big, 0, keyed).to(torch.int32)
    kw.setdefault("check", False)  # in range by construction
    return BlockSparse(num.contiguous(), idx.contiguous(), q_block, kv_block, n_kv_blocks=n_kv,
                       **kw)


def sliding_window_with_sinks(
    seq_len: int, window: int, sinks: int, block: int = 128, *,
    device: torch.device | str | None = None, **kw,
) -> BlockSparse:
    """StreamingLLM: every query block sees the key blocks holding the first ``sinks`` tokens and
    those within ``window`` tokens before any of its queries (its own block included).

    Causal by construction at the block level (no later block is listed); pair it with
    ``Mask(causal=True)`` for the element level.  The window is block-granular: a query sees
    between ``window`` and ``window + block - 1`` earlier tokens.

    Example::

        >>> sliding_window_with_sinks(8, window=2, sinks=1, block=2).kv_num_blocks.tolist()
        [[[1, 2, 3, 3]]]
    """
    nq = _check(seq_len, block)
    if window < 1 or sinks < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
    n_sink = _cdiv(sinks, block)
    n_win = _cdiv(window - 1, block) + 1  # own block and the earlier ones the window reaches
    i = torch.arange(nq, device=device).view(nq, 1)
    sink = torch.arange(n_sink, device=device).view(1, n_sink).expand(nq, n_sink)
    lo = torch.div(i * block - (window - 1), block, rounding_mode="floor")  # [nq, 1]
    win = lo + torch.arange(n_win, device=device).view(1, n_win)
    win = torch.minimum(win, i.expand(nq, n_win) + n_win)  # beyond the own block: invalid below
    cand = torch.cat([sink, win], 1)  # [nq, n_sink + n_win]
    valid = torch.cat([sink <= i, (win >= n_sink) & (win >= 0) & (win <= i)], 1)
    return _from_candidates(cand.view(1, 1, *cand.shape), valid.view(1, 1, *valid.shape),
                            block, block, nq, **kw)


def strided_per_head(
    seq_len: int, heads: int, stride: int, local_blocks: int = 1, block: int = 128, *,
    device: torch.device | str | None = None, **kw,
) -> BlockSparse:
    """S2-Attention style: head ``h`` sees its ``local_blocks`` latest blocks (own included) and
    every earlier block ``j`` with ``(j + h) % stride == 0``: a dilated pattern shifted per head,
    so that any ``stride`` consecutive heads together see every earlier block.

    Lists ``[1, heads, n_blocks, width]``; pair with ``Mask(causal=True)``.

    Example::

        >>> bs = strided_per_head(8, heads=2, stride=2, local_blocks=1, block=2)
        >>> bs.to_table()[0, :, 3].int().tolist()   # query block 3, per head
        [[1, 0, 1, 1], [0, 1, 0, 1]]
    """
    nq = _check(seq_len, block)
    if heads < 1 or stride < 1 or local_blocks < 1:
        raise ValueError(
            f"heads, stride and local_blocks must be >= 1, got {heads}, {stride}, {local_blocks}"
        )
    i = torch.arange(nq, device=device).view(1, nq, 1)
    h = torch.arange(heads, device=device).view(heads, 1, 1)
    local = i - local_blocks + 1 + torch.arange(local_blocks, device=device).view(1, 1, -1)
    local = local.expand(heads, nq, local_blocks)
    n_far = _cdiv(nq, stride)
    first = (-h) % stride  # smallest j >= 0 with (j + h) % stride == 0: [heads, 1, 1]
    far = (first + stride * torch.arange(n_far, device=device).view(1, 1, n_far)).expand(
        heads, nq, n_far)
    local_lo = i - local_blocks + 1
    cand = torch.cat([local, far], -1)
    valid = torch.cat([local >= 0, (far < local_lo) & (far <= i)], -1)  # far: below the band
    return _from_candidates(cand.unsqueeze(0), valid.unsqueeze(0), block, block, nq, **kw)


def star_anchor_local(
    seq_len: int, chunk: int, block: int = 128, *, device: torch.device | str | None = None,
    **kw,
) -> BlockSparse:
    """Star Attention, phase 1: the sequence is cut in chunks of ``chunk`` tokens (a multiple of
    ``block``); every query block sees the first chunk (the anchor) and its own chunk.  Pair
    with ``Mask(causal=True)``.

    Example::

        >>> star_anchor_local(8, chunk=4, block=2).to_table()[0, 0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    """
    nq = _check(seq_len, block)
    if chunk < block or chunk % block:
        raise ValueError(f"chunk ({chunk}) must be a multiple of block ({block})")
    r = chunk // block
    i = torch.arange(nq, device=device).view(nq, 1)
    j = torch.arange(r, device=device).view(1, r)
    anchor = j.expand(nq, r)
    own = (i // r) * r + j  # [nq, r]
    cand = torch.cat([anchor, own], 1)
    valid = torch.cat([anchor < nq, (own < nq) & (i >= r)], 1)  # chunk 0 is its own anchor
    return _from_candidates(cand.view(1, 1, nq, 2 * r), valid.view(1, 1, nq, 2 * r), block,
                            block, nq, **kw)


def topk_blocks(
    scores: Tensor, k: int, q_block: int, kv_block: int | None = None, *, causal: bool = True,
    include_own: bool = True, **kw,
) -> BlockSparse:
    """MoBA / NSA block selection: per batch row, head and query block, the ``k`` key blocks of
    highest score.

    Args:
        scores: ``[B, H, n_q_blocks, n_kv_blocks]`` (any float dtype; ``-inf`` never selected).
        k: blocks per query block (fewer where fewer are eligible).
        causal: only key blocks starting at or before the query block's last token are eligible.
        include_own: the key block holding the query block's last token is always selected (one
            of the ``k``).

    Returns lists ``[B, H, n_q_blocks, k]`` on ``scores``' device, ascending; tensor ops only.

    Example::

        >>> import torch
        >>> s = torch.tensor([[[[0., 0, 0, 0], [5, 0, 0, 0], [1, 9, 0, 0], [3, 2, 8, 0]]]])
        >>> bs = topk_blocks(s, 2, q_block=4)
        >>> bs.kv_num_blocks.tolist(), bs.kv_indices.tolist()
        ([[[1, 2, 2, 2]]], [[[[0, 0], [0, 1], [1, 2], [2, 3]]]])
    """
    if scores.dim() != 4:
        raise ValueError(
            f"scores must be [B, H, n_q_blocks, n_kv_blocks], got shape {tuple(scores.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kv_block = q_block if kv_block is None else kv_block
    B, H, nq, nk = scores.shape
    dev = scores.device
    s = scores.float()
    own = (torch.arange(nq, device=dev) * q_block + q_block - 1) // kv_block  # [nq]
    j = torch.arange(nk, device=dev).view(1, nk)
    if causal:
        s = s.masked_fill((j > own.view(nq, 1)).view(1, 1, nq, nk), float("-inf"))
    if include_own:
        s = s.masked_fill((j == own.view(nq, 1)).view(1, 1, nq, nk), float("inf"))
    kk = min(k, nk)
    top = s.topk(kk, dim=-1)
    valid = top.values > float("-inf")
    return _from_candidates(top.indices, valid, q_block, kv_block, nk, **kw)


def random_blocks(
    seq_len: int, k: int, block: int = 128, *, batch: int = 1, heads: int = 1,
    causal: bool = True, include_own: bool = True, generator: torch.Generator | None = None,
    device: torch.device | str | None = None, **kw,
) -> BlockSparse:
    """``k`` random key blocks per query block and head (the own block among them with
    ``include_own``; only earlier blocks with ``causal``): sparsity for benchmarks.

    Example::

        >>> import torch
        >>> bs = random_blocks(16, 2, block=2, heads=3, generator=torch.Generator().manual_seed(0))
        >>> bs.shape, bs.kv_num_blocks[0, 0].tolist()
        ((1, 3, 8, 8), [1, 2, 2, 2, 2, 2, 2, 2])
    """
    n = _check(seq_len, block)
    scores = torch.rand(batch, heads, n, n, generator=generator).to(device)
    return topk_blocks(scores, k, block, causal=causal, include_own=include_own, **kw)
