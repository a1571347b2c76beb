"""Sequence shards <-> head shards over one all-to-all: the exchanges Ulysses and the hybrid share.

Rank ``j`` of a group of ``P`` gives every rank ``i`` its tokens of ``i``'s heads, and so ends up
with the whole (group's) sequence for its ``H/P`` heads, sorted into global token order
(:class:`TokenOrder`) so the kernel sees one run of positions.  GQA: rank ``j`` receives the kv
heads its query heads use; when there are fewer kv heads than ranks, a kv head is sent to every
rank that needs it (replicated, never expanded to ``H``) and the replicas' gradients are summed at
the owner.  Every exchange packs its tensors into one all-to-all.

Pure reshapes (what a rank sends, what it makes of what it receives) plus the four exchanges:
:func:`qkv_to_heads`, :func:`out_to_seq`, :func:`seq_to_heads` (for dout) and
:func:`grads_to_seq`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.mask import Mask, Positions, Segment
from .comm import AllToAllComm
from .layout import Layout

__all__ = [
    "TokenOrder",
    "grads_to_seq",
    "out_to_seq",
    "qkv_to_heads",
    "seq_to_heads",
    "split_heads",
    "split_kv_heads",
    "token_order",
]

_MAX_RUNS = 64
_MAX_BLOCKS = 64  # reorder by block copies up to this many blocks, else token by token


def _kv_head_slices(heads: int, kv_heads: int, degree: int) -> list[slice]:
    """The kv heads rank ``j``'s query heads use, for every ``j`` (equal counts)."""
    per_rank, group = heads // degree, heads // kv_heads
    count = max(1, per_rank // group)
    return [slice(j * per_rank // group, j * per_rank // group + count) for j in range(degree)]


@dataclass(frozen=True, eq=False)
class TokenOrder:
    """Gathered tokens sorted into global order: their positions (few runs) and the permutations.

    After the all-to-all the sequence sits in rank order, e.g. zigzag's ``2P`` chunks interleaved;
    sorting turns it back into one run (or a few), so each kernel call takes the fast path.
    ``perm`` is None when the tokens are already in order.  ``src`` gives, per sorted token, the
    all-to-all slot and the index within it that it travels in, so that :meth:`gather` and
    :meth:`scatter` move tokens between the exchange buffers and sorted order in one pass: a few
    block copies where the order is made of few blocks (zigzag), an indexed copy otherwise.
    """

    positions: Positions
    perm: Tensor | None  # sorted = gathered[:, perm]
    src: tuple[Tensor, Tensor] | None = None  # (slot, index in slot) per sorted token
    # the same as a few block moves (zigzag: 2P - 1), when there are few: (sorted begin, length,
    # slot, index in slot) each; None: move token by token through ``src``
    blocks: tuple[tuple[int, int, int, int], ...] | None = None

    def gather(self, recv: Tensor, dim: int = 1) -> Tensor:
        """``recv [P(src), ..., s, ...]`` (token dim ``dim + 1``) -> ``[..., P*s, ...]`` sorted
        (token dim ``dim``): the received slots in global order, one copy."""
        moved = recv.movedim(0, dim)  # [..., P, s, ...]
        if self.perm is None:
            return moved.flatten(dim, dim + 1)
        if self.blocks is not None:
            return torch.cat(
                [moved.select(dim, slot).narrow(dim, i, n) for _, n, slot, i in self.blocks], dim
            )
        return moved[(slice(None),) * dim + self.src].contiguous()

    def scatter(self, x: Tensor, slots: Tensor, dim: int = 1) -> None:
        """Write ``x [..., P*s, ...]`` (sorted, token dim ``dim``) into the send ``slots
        [P(dst), ..., s, ...]``: slot ``j`` gets rank ``j``'s tokens in its local order."""
        moved = slots.movedim(0, dim)  # [..., P, s, ...], a view of the slots
        if self.perm is None:
            moved.copy_(x.unflatten(dim, moved.shape[dim : dim + 2]))
        elif self.blocks is not None:
            for t, n, slot, i in self.blocks:
                moved.select(dim, slot).narrow(dim, i, n).copy_(x.narrow(dim, t, n))
        else:
            moved[(slice(None),) * dim + self.src] = x.to(slots.dtype)


def _blocks(perm: Tensor, shard: int, limit: int) -> tuple[tuple[int, int, int, int], ...] | None:
    """``perm`` (sorted token -> gathered token) as moves of consecutive tokens within one slot,
    or None when there are more than ``limit``."""
    jumps = (perm[1:] != perm[:-1] + 1) | (perm[1:] % shard == 0)
    starts = [0, *(jumps.nonzero().flatten() + 1).tolist()]
    if len(starts) > limit:
        return None
    ends = [*starts[1:], perm.numel()]
    return tuple(
        (a, b - a, int(perm[a]) // shard, int(perm[a]) % shard) for a, b in zip(starts, ends)
    )


def _runs(sorted_idx: Tensor) -> Positions:
    """Sorted global positions as stride-1 runs (an index tensor when there are very many)."""
    breaks = ((sorted_idx[1:] - sorted_idx[:-1]) != 1).nonzero().flatten() + 1
    if breaks.numel() > _MAX_RUNS:
        return Positions.from_index(sorted_idx)
    bounds = [0, *breaks.tolist(), sorted_idx.numel()]
    return Positions(
        tuple(Segment(int(sorted_idx[a]), b - a) for a, b in zip(bounds[:-1], bounds[1:]))
    )


@functools.lru_cache(maxsize=64)
def token_order(
    layout: Layout, seq_len: int, world_size: int, members: tuple[int, ...], device: str
) -> TokenOrder:
    """The sorted order of the tokens of CP ranks ``members`` gathered in that order.

    A pure function of the layout, memoised: it runs once per shape, not once per layer.
    """
    gathered = Positions.cat([layout.positions(seq_len, world_size, r) for r in members])
    if len(gathered.segments) == 1:
        return TokenOrder(gathered, None)
    idx = gathered.materialize()
    perm = torch.argsort(idx)
    shard = seq_len // world_size
    src = ((perm // shard).to(device), (perm % shard).to(device))
    blocks = _blocks(perm, shard, _MAX_BLOCKS)
    return TokenOrder(_runs(idx[perm]), perm.to(device), src, blocks)


# --- pure reshapes: what each rank sends, and what it makes of what it receives ---------------


def split_heads(x: Tensor, degree: int) -> Tensor:
    """``[B, s, H, D]`` -> ``[P(dst), B, s, H/P, D]``: each rank's heads (a view)."""
    B, s, H, D = x.shape
    # [B, s, P, H/P, D] -> [P(dst), B, s, H/P, D]
    return x.reshape(B, s, degree, H // degree, D).permute(2, 0, 1, 3, 4)


def split_kv_heads(x: Tensor, heads: int, degree: int) -> Tensor:
    """``[B, s, H_kv, D]`` -> ``[P(dst), B, s, m, D]``: the kv heads each rank's query heads use.

    Rank ``j``'s kv heads are those its query heads use (:func:`_kv_head_slices`); a kv head
    several ranks use is copied into each of their slots.

    Example::

        >>> import torch
        >>> split_kv_heads(torch.zeros(1, 8, 2, 4), heads=8, degree=4).shape  # kv heads replicated
        torch.Size([4, 1, 8, 1, 4])
    """
    B, s, H_kv, D = x.shape
    slices = _kv_head_slices(heads, H_kv, degree)
    m = slices[0].stop - slices[0].start
    if m * degree == H_kv:  # each kv head goes to one rank: a view
        # [B, s, P, m, D] -> [P(dst), B, s, m, D]
        return x.reshape(B, s, degree, m, D).permute(2, 0, 1, 3, 4)
    return torch.stack([x[:, :, sl] for sl in slices])  # [P, B, s, m, D]


def _place_kv_heads(dst: Tensor, recv: Tensor, heads: int, accumulate: bool) -> None:
    """Put ``recv [P(src), B, s, m, D]``, each source rank's kv heads, into ``dst [B, s, H_kv,
    D]`` at their global heads: added (replicas of one head sum up), or copied when
    ``accumulate`` is False (each head arrives once)."""
    for j, sl in enumerate(_kv_head_slices(heads, dst.shape[2], recv.shape[0])):
        if accumulate:
            dst[:, :, sl].add_(recv[j])
        else:
            dst[:, :, sl].copy_(recv[j])


# --- the exchanges ---------------------------------------------------------------------------


def seq_to_heads(x: Tensor, comm: AllToAllComm, order: TokenOrder) -> Tensor:
    """``[B, S/P, H, D]`` sequence shard -> ``[B, S, H/P, D]`` head shard in ``order``'s global
    token order (sorted as it arrives: one copy)."""
    return order.gather(comm.all_to_all(split_heads(x, comm.world_size)))


def qkv_to_heads(
    q: Tensor, k: Tensor, v: Tensor, comm: AllToAllComm, order: TokenOrder
) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence shards ``q [B, S/P, H, D]``, ``k``/``v [B, S/P, H_kv, D]`` -> head shards in
    global order, ``q_h [B, S, H/P, D]`` and ``k_h``/``v_h [B, S, m, D]`` (``m``: the kv heads
    this rank's query heads use), in one all-to-all."""
    P, H = comm.world_size, q.shape[2]
    # [P(dst), B, s, H/P, D], [P(dst), B, s, m, D] x 2
    parts = [split_heads(q, P), split_kv_heads(k, H, P), split_kv_heads(v, H, P)]
    received = comm.all_to_all_async(parts).wait()  # the same shapes, [P(src), ...]
    return tuple(order.gather(t) for t in received)


def out_to_seq(
    out_h: Tensor, lse_h: Tensor | None, comm: AllToAllComm, order: TokenOrder
) -> tuple[Tensor, Tensor | None]:
    """Head shards ``out_h [B, S, H/P, D]`` and (unless None) ``lse_h [B, H/P, S]`` in global
    order -> ``out [B, S/P, H, D]``, ``lse [B, H, S/P]``, in one all-to-all."""
    P = comm.world_size
    B, S, h, D = out_h.shape
    s = S // P
    specs = [((P, B, s, h, D), out_h.dtype)]
    if lse_h is not None:
        specs.append(((P, B, h, s), lse_h.dtype))
    send = comm.send_buffer(specs, out_h.device)
    order.scatter(out_h, send.slots[0])  # [P(dst), B, s, h, D]
    if lse_h is not None:
        order.scatter(lse_h, send.slots[1], dim=2)  # [P(dst), B, h, s]
    out_r, *lse_r = send.start().wait()  # [P(src), B, s, h, D], [P(src), B, h, s]
    out = out_r.permute(1, 2, 0, 3, 4).reshape(B, s, P * h, D)
    lse = lse_r[0].permute(1, 0, 2, 3).reshape(B, P * h, s) if lse_r else None
    return out, lse


def grads_to_seq(
    dq_h: Tensor, dk_h: Tensor, dv_h: Tensor, kv_heads: int, comm: AllToAllComm,
    order: TokenOrder,
) -> tuple[Tensor, Tensor, Tensor]:
    """Head-shard gradients ``dq_h [B, S, H/P, D]``, ``dk_h``/``dv_h [B, S, m, D]`` in global
    order -> ``dq [B, S/P, H, D]``, ``dk``/``dv [B, S/P, H_kv, D]``, in one all-to-all, in the
    dtypes given.  Replicated kv heads are summed at their owner (pass ``dk_h``/``dv_h`` in the
    accumulation dtype then)."""
    P = comm.world_size
    B, S, h, D = dq_h.shape
    s, m, H = S // P, dk_h.shape[2], h * P
    specs = [
        ((P, B, s, h, D), dq_h.dtype),
        ((P, B, s, m, D), dk_h.dtype),
        ((P, B, s, m, D), dv_h.dtype),
    ]
    send = comm.send_buffer(specs, dq_h.device)
    for x, slots in zip((dq_h, dk_h, dv_h), send.slots):
        order.scatter(x, slots)  # [P(dst), B, s, ., D]
    dq_r, dk_r, dv_r = send.start().wait()  # [P(src), B, s, ., D]
    dq = dq_r.permute(1, 2, 0, 3, 4).reshape(B, s, H, D)
    replicated = m * P > kv_heads
    new = torch.zeros if replicated else torch.empty  # every kv head arrives once otherwise
    dk = new(B, s, kv_heads, D, dtype=dk_h.dtype, device=dq_h.device)
    dv = new(B, s, kv_heads, D, dtype=dv_h.dtype, device=dq_h.device)
    _place_kv_heads(dk, dk_r, H, accumulate=replicated)
    _place_kv_heads(dv, dv_r, H, accumulate=replicated)
    return dq, dk, dv


def heads_mask(mask: Mask, comm: AllToAllComm, heads: int, kv_heads: int) -> Mask:
    """The mask for this rank's ``H/P`` query heads: block-sparse lists that differ per head are
    cut to the heads the rank holds after the exchange (others pass through as they are)."""
    per_rank = heads // comm.world_size
    lo = comm.rank * per_rank
    return mask.select_heads(lo, lo + per_rank, heads, kv_heads)
