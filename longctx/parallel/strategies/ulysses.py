"""Ulysses attention: all-to-all from sequence shards to head shards, full local attention, back.

Each of ``P`` ranks gives every other rank its tokens of that rank's heads, so rank ``j`` ends up
with the *whole* sequence for heads ``j*H/P .. (j+1)*H/P - 1`` and runs the local kernel on it
(DeepSpeed-Ulysses).  Communication per layer is four all-to-alls of a shard, independent of
``P``, but the head count bounds the degree.

Each exchange is one all-to-all of q, k and v packed together (and of dq, dk, dv in backward,
in the inputs' dtype where no kv head is replicated).  Optional pipelining: with ``chunks > 1``
a rank's ``H/P`` heads are processed in that many groups; the exchange of chunk ``c + 1`` is in
flight while the kernel runs on chunk ``c``, and chunk ``c``'s output travels back while chunk
``c + 1`` computes (backward alike).  The default, :data:`HEAD_CHUNKS` = 1, is what measured
fastest over NVLink (``benchmarks/RESULTS.md``).

GQA: rank ``j`` receives the kv heads its query heads use.  When there are fewer kv heads than
ranks, a kv head is sent to every rank that needs it (replicated, never expanded to ``H``) and
the replicas' gradients are summed at the owner.  A split exists when ``H % P == 0`` and the
query heads per rank either cover whole GQA groups or fit inside one; chunks obey the same rule
(see :func:`head_chunks`), so a kv block travels with the first chunk that uses it and its
gradient with the last.

Example (on each rank of a process group; any layout)::

    from longctx.parallel.strategies.ulysses import ulysses_attention
    out = ulysses_attention(q, k, v, group, mask=Mask(causal=True))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ...kernels.base import acc_dtype
from ...kernels.mask import Positions, Segment
from ..layout import Layout
from ..comm import AllToAllComm, CommRequest
from ..context import CPContext, build_context, cast_grads
from .blocks import attend, attend_backward

_MAX_RUNS = 64
_MAX_BLOCKS = 64  # reorder by block copies up to this many blocks, else token by token

# Head chunks a rank's H/P heads are pipelined in (fewer when the heads do not split so).  1 by
# default: on 4x H200 (NVLink) at 32k tokens, 2 chunks were 3-8% slower than 1 (smaller kernels,
# NCCL's all-to-all taking SMs from them; RESULTS.md, session 6); slower links may gain from more.
HEAD_CHUNKS: int = 1

__all__ = [
    "HEAD_CHUNKS",
    "HeadChunks",
    "HeadShards",
    "TokenOrder",
    "token_order",
    "check_head_split",
    "head_chunks",
    "ulysses_forward",
    "ulysses_backward",
    "UlyssesAttention",
    "ulysses_attention",
]


def check_head_split(heads: int, kv_heads: int, degree: int) -> None:
    """Raise a ValueError saying what to change when ``heads``/``kv_heads`` can't split ``degree`` ways."""
    if heads % degree:
        raise ValueError(
            f"ulysses over {degree} ranks needs num_heads divisible by {degree}, got {heads} heads; "
            "use strategy='ring'/'zigzag'/'striped', or 'hybrid' with a ulysses degree dividing "
            f"{heads}"
        )
    per_rank, group = heads // degree, heads // kv_heads
    if per_rank % group and group % per_rank:
        raise ValueError(
            f"ulysses over {degree} ranks gives each rank {per_rank} query heads, which neither "
            f"cover whole GQA groups of {group} nor fit inside one ({heads} heads, {kv_heads} kv "
            "heads); choose a degree such that the heads per rank divide or are divided by the "
            "group size, or use a ring strategy"
        )


def _kv_head_slices(heads: int, kv_heads: int, degree: int) -> list[slice]:
    """The kv heads rank ``j``'s query heads use, for every ``j`` (equal counts)."""
    per_rank, group = heads // degree, heads // kv_heads
    count = max(1, per_rank // group)
    return [slice(j * per_rank // group, j * per_rank // group + count) for j in range(degree)]


@dataclass(frozen=True)
class HeadChunks:
    """A rank's ``H/P`` query heads in chunks, and the blocks of its kv heads they use.

    ``q[c]`` is chunk ``c``'s local query heads ``(begin, end)``; ``kv[b]`` a block of the
    rank's local kv heads ``(begin, end)``; chunk ``c`` attends to block ``block[c]``.  Chunks
    of whole GQA groups use blocks of their own; chunks inside one group share its kv head, so
    consecutive chunks may use one block.  The same on every rank of the group.
    """

    q: tuple[tuple[int, int], ...]
    kv: tuple[tuple[int, int], ...]
    block: tuple[int, ...]

    def first_use(self, c: int) -> bool:
        """Chunk ``c`` is the first to use its kv block: the block travels with it."""
        return c == 0 or self.block[c - 1] != self.block[c]

    def last_use(self, c: int) -> bool:
        """Chunk ``c`` is the last to use its kv block: the block's gradient travels with it."""
        return c == len(self.q) - 1 or self.block[c + 1] != self.block[c]


@functools.lru_cache(maxsize=64)
def head_chunks(heads: int, kv_heads: int, degree: int, chunks: int = HEAD_CHUNKS) -> HeadChunks:
    """The split of each rank's ``heads / degree`` query heads into at most ``chunks`` chunks.

    The most equal chunks, up to ``chunks``, such that each covers whole GQA groups or lies
    inside one; 1 chunk (no pipelining) when there is no such split, e.g. one head per rank or
    6 heads per rank in groups of 2 asked for 2 chunks (3 heads would straddle a group).

    Example::

        >>> head_chunks(16, 4, 4, 2)   # 4 heads a rank, groups of 4: two chunks share a kv head
        HeadChunks(q=((0, 2), (2, 4)), kv=((0, 1),), block=(0, 0))
        >>> head_chunks(16, 16, 2, 2)  # MHA: each chunk has kv heads of its own
        HeadChunks(q=((0, 4), (4, 8)), kv=((0, 4), (4, 8)), block=(0, 1))
    """
    if chunks < 1:
        raise ValueError(f"ulysses head chunks must be >= 1 (1 = no pipelining), got {chunks}")
    check_head_split(heads, kv_heads, degree)  # then 1 chunk always qualifies
    per_rank, group = heads // degree, heads // kv_heads
    count = next(
        n for n in range(min(chunks, per_rank), 0, -1)
        if per_rank % n == 0 and ((per_rank // n) % group == 0 or group % (per_rank // n) == 0)
    )
    size = per_rank // count
    q = tuple((c * size, (c + 1) * size) for c in range(count))
    # chunk c's kv heads: its whole groups, or the one group it lies in
    kv_of = [(c * size // group, c * size // group + max(1, size // group)) for c in range(count)]
    kv = tuple(dict.fromkeys(kv_of))  # distinct blocks, in chunk order
    return HeadChunks(q, kv, tuple(kv.index(r) for r in kv_of))


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


def split_heads(x: Tensor, degree: int, lo: int = 0, hi: int | None = None) -> Tensor:
    """``[B, s, H, D]`` -> ``[P(dst), B, s, hi-lo, D]``: heads ``lo..hi-1`` of each rank's ``H/P``.

    A view; ``hi`` defaults to ``H/P`` (all of them).
    """
    B, s, H, D = x.shape
    hi = H // degree if hi is None else hi
    # [B, s, P, H/P, D] -> [P(dst), B, s, hi-lo, D]
    return x.reshape(B, s, degree, H // degree, D)[:, :, :, lo:hi].permute(2, 0, 1, 3, 4)


def split_kv_heads(
    x: Tensor, heads: int, degree: int, lo: int = 0, hi: int | None = None
) -> Tensor:
    """``[B, s, H_kv, D]`` -> ``[P(dst), B, s, hi-lo, D]``: local kv heads ``lo..hi-1`` of each.

    Rank ``j``'s local kv heads are those its query heads use (:func:`_kv_head_slices`); a kv head
    several ranks use is copied into each of their slots.  ``hi`` defaults to all of them.
    """
    B, s, H_kv, D = x.shape
    slices = _kv_head_slices(heads, H_kv, degree)
    n = slices[0].stop - slices[0].start
    hi = n if hi is None else hi
    if n * degree == H_kv:  # each kv head goes to one rank: a view
        # [B, s, P, n, D] -> [P(dst), B, s, hi-lo, D]
        return x.reshape(B, s, degree, n, D)[:, :, :, lo:hi].permute(2, 0, 1, 3, 4)
    return torch.stack([x[:, :, sl.start + lo : sl.start + hi] for sl in slices])  # [P, B, s, m, D]


def _place_kv_heads(
    dst: Tensor, recv: Tensor, heads: int, lo: int, hi: int, accumulate: bool = True
) -> None:
    """Put ``recv [P(src), B, s, hi-lo, D]``, local kv heads ``lo..hi-1`` of each source rank,
    into ``dst [B, s, H_kv, D]`` at their global heads: added (replicas of one head sum up), or
    copied when ``accumulate`` is False (each head arrives once)."""
    for j, sl in enumerate(_kv_head_slices(heads, dst.shape[2], recv.shape[0])):
        part = dst[:, :, sl.start + lo : sl.start + hi]
        if accumulate:
            part.add_(recv[j])
        else:
            part.copy_(recv[j])


# --- the whole exchange in one step (hybrid uses these) ---------------------------------------


def seq_to_heads(x: Tensor, comm: AllToAllComm, order: TokenOrder) -> Tensor:
    """``[B, S/P, H, D]`` sequence shard -> ``[B, S, H/P, D]`` head shard in ``order``'s global
    token order (sorted as it arrives: one copy)."""
    return order.gather(comm.all_to_all(split_heads(x, comm.world_size)))


def kv_seq_to_heads(x: Tensor, heads: int, comm: AllToAllComm, order: TokenOrder) -> Tensor:
    """``[B, S/P, H_kv, D]`` -> ``[B, S, n, D]``: the kv heads this rank's query heads use, in
    ``order``'s global token order."""
    return order.gather(comm.all_to_all(split_kv_heads(x, heads, comm.world_size)))


def _tokens_home(x: Tensor, comm: AllToAllComm, order: TokenOrder, dim: int = 1) -> Tensor:
    """``x`` with its token dim ``dim`` (``S``) in ``order``'s global order -> ``[P(src head
    group), ..., S/P, ...]``: every rank's own tokens, unsorted straight into the send buffer."""
    P = comm.world_size
    shape = list(x.shape)
    shape[dim] //= P
    send = comm.send_buffer([((P, *shape), x.dtype)], x.device)
    order.scatter(x, send.slots[0], dim)  # [P(dst), ..., S/P, ...]
    (recv,) = send.start().wait()
    return recv


def heads_to_seq(x: Tensor, comm: AllToAllComm, order: TokenOrder) -> Tensor:
    """``[B, S, H/P, D]`` head shard in ``order``'s global order -> ``[B, S/P, H, D]``."""
    P = comm.world_size
    B, S, h, D = x.shape
    recv = _tokens_home(x, comm, order)  # [P(src head group), B, S/P, h, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(B, S // P, P * h, D)


def lse_heads_to_seq(lse: Tensor, comm: AllToAllComm, order: TokenOrder) -> Tensor:
    """``[B, H/P, S]`` in ``order``'s global order -> ``[B, H, S/P]``."""
    P = comm.world_size
    B, h, S = lse.shape
    recv = _tokens_home(lse, comm, order, dim=2)  # [P(src head group), B, h, S/P]
    return recv.permute(1, 0, 2, 3).reshape(B, P * h, S // P)


def kv_heads_to_seq(
    dx: Tensor, heads: int, kv_heads: int, comm: AllToAllComm, order: TokenOrder
) -> Tensor:
    """Gradient ``[B, S, n, D]`` in ``order``'s global order -> ``[B, S/P, H_kv, D]``, summing
    replicated kv heads."""
    P = comm.world_size
    B, S, n, D = dx.shape
    recv = _tokens_home(dx, comm, order)  # [P(src head group), B, S/P, n, D]
    out = torch.zeros(B, S // P, kv_heads, D, dtype=dx.dtype, device=dx.device)
    _place_kv_heads(out, recv, heads, 0, n)
    return out


# --- forward and backward, pipelined over head chunks -----------------------------------------


@dataclass(frozen=True, eq=False)
class HeadShards:
    """What forward keeps for backward: head shards in global token order, per chunk.

    ``q``/``out``: per chunk ``[B, S, hc, D]``; ``lse``: per chunk ``[B, hc, S]``; ``k``/``v``:
    per kv block ``[B, S, m, D]`` (see :class:`HeadChunks`).
    """

    chunks: HeadChunks
    q: tuple[Tensor, ...]
    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]
    out: tuple[Tensor, ...]
    lse: tuple[Tensor, ...]

    def tensors(self) -> tuple[Tensor, ...]:
        """Flat, for ``ctx.save_for_backward``; :meth:`from_tensors` undoes it."""
        return (*self.q, *self.k, *self.v, *self.out, *self.lse)

    @classmethod
    def from_tensors(cls, chunks: HeadChunks, tensors) -> HeadShards:
        it = iter(tensors)
        n_chunks, n_blocks = len(chunks.q), len(chunks.kv)
        counts = (n_chunks, n_blocks, n_blocks, n_chunks, n_chunks)  # q, k, v, out, lse
        return cls(chunks, *(tuple(next(it) for _ in range(n)) for n in counts))


def _order(cp: CPContext, device: torch.device) -> TokenOrder:
    return token_order(cp.layout, cp.seq_len, cp.world_size, tuple(range(cp.world_size)), str(device))


def _send_inputs(
    q: Tensor, k: Tensor, v: Tensor, c: int, chunks: HeadChunks, comm: AllToAllComm
) -> CommRequest:
    """Start chunk ``c``'s exchange: its query heads, and its kv block if this is the first use."""
    P = comm.world_size
    parts = [split_heads(q, P, *chunks.q[c])]  # [P(dst), B, s, hc, D]
    if chunks.first_use(c):
        lo, hi = chunks.kv[chunks.block[c]]
        parts += [split_kv_heads(t, q.shape[2], P, lo, hi) for t in (k, v)]  # [P(dst), B, s, m, D]
    return comm.all_to_all_async(parts)


def ulysses_forward(
    q: Tensor, k: Tensor, v: Tensor, cp: CPContext, chunks: int = HEAD_CHUNKS,
    need_lse: bool = True,
):
    """Local shards ``q [B, S/P, H, D]``, ``k``/``v [B, S/P, H_kv, D]`` -> out, lse, saved.

    The heads go in up to ``chunks`` chunks (:func:`head_chunks`), each exchange overlapping the
    previous chunk's kernel.  Each chunk is one kernel call over the whole sorted sequence, its
    output returned as the kernel gives it.  ``lse [B, H, S/P]`` travels back only when
    ``need_lse`` (else None).  ``saved`` (:class:`HeadShards`) holds the head-sharded tensors
    backward needs, so it repeats no exchange of q, k, v or out.
    """
    comm = AllToAllComm(cp.group)
    P = comm.world_size
    B, s, H, D = q.shape
    plan = head_chunks(H, k.shape[2], P, chunks)
    order = _order(cp, q.device)
    pos = order.positions
    q_h, k_h, v_h, out_h, lse_h, returns = [], [], [], [], [], []
    incoming = _send_inputs(q, k, v, 0, plan, comm)
    for c in range(len(plan.q)):
        following = _send_inputs(q, k, v, c + 1, plan, comm) if c + 1 < len(plan.q) else None
        q_c, *kv_c = incoming.wait()  # [P(src), B, s, hc, D], then k, v [P(src), B, s, m, D]
        q_h.append(order.gather(q_c))  # [B, S, hc, D], global order
        if kv_c:
            k_h.append(order.gather(kv_c[0]))  # [B, S, m, D]
            v_h.append(order.gather(kv_c[1]))
        b = plan.block[c]
        out_c, lse_c = attend(q_h[c], k_h[b], v_h[b], pos, pos, cp)  # [B, S, hc, D], [B, hc, S]
        out_h.append(out_c)
        lse_h.append(lse_c)
        hc = out_c.shape[2]
        specs = [((P, B, s, hc, D), out_c.dtype)]
        if need_lse:
            specs.append(((P, B, hc, s), lse_c.dtype))
        send = comm.send_buffer(specs, q.device)
        order.scatter(out_c, send.slots[0])  # [P(dst), B, s, hc, D]
        if need_lse:
            order.scatter(lse_c, send.slots[1], dim=2)  # [P(dst), B, hc, s]
        returns.append(send.start())
        incoming = following
    out = q.new_empty(B, s, P, H // P, D)  # [B, S/P, P(src), H/P, D]
    lse = None
    if need_lse:  # [B, P, H/P, S/P]
        lse = torch.empty(B, P, H // P, s, dtype=lse_h[0].dtype, device=q.device)
    for (lo, hi), req in zip(plan.q, returns):
        out_c, *lse_c = req.wait()  # [P(src), B, s, hc, D], [P(src), B, hc, s]
        out[:, :, :, lo:hi] = out_c.permute(1, 2, 0, 3, 4)
        if need_lse:
            lse[:, :, lo:hi] = lse_c[0].permute(1, 0, 2, 3)
    saved = HeadShards(plan, *map(tuple, (q_h, k_h, v_h, out_h, lse_h)))
    return out.reshape(B, s, H, D), None if lse is None else lse.reshape(B, H, s), saved


def ulysses_backward(dout: Tensor, saved: HeadShards, kv_heads: int, cp: CPContext):
    """Gradients of the local shards from the saved head shards, pipelined like forward.

    ``dq`` comes back in q's dtype; ``dk``/``dv`` in k's dtype, or in the accumulation dtype
    when replicated kv heads are summed at their owner.  A chunk whose kv block no other chunk
    shares gets the kernel's gradients in the inputs' dtype (no float32 round trip).
    """
    plan = saved.chunks
    comm = AllToAllComm(cp.group)
    P = comm.world_size
    B, s, H, D = dout.shape
    order = _order(cp, dout.device)
    pos = order.positions
    dtype = saved.q[0].dtype
    acc = acc_dtype(dtype)
    replicated = plan.kv[-1][1] * P > kv_heads
    kv_grad_dtype = acc if replicated else dtype
    returns = []
    incoming = comm.all_to_all_async([split_heads(dout, P, *plan.q[0])])
    for c in range(len(plan.q)):
        following = None
        if c + 1 < len(plan.q):
            following = comm.all_to_all_async([split_heads(dout, P, *plan.q[c + 1])])
        (dout_c,) = incoming.wait()  # [P(src), B, s, hc, D]
        dout_c = order.gather(dout_c)  # [B, S, hc, D], global order
        b = plan.block[c]
        q_c, k_b, v_b = saved.q[c], saved.k[b], saved.v[b]
        own_block = plan.first_use(c) and plan.last_use(c)
        dq_c, dk_c, dv_c = attend_backward(
            dout_c, q_c, k_b, v_b, saved.out[c], saved.lse[c], pos, pos, cp,
            grad_dtype=kv_grad_dtype if own_block else acc,
        )
        if plan.first_use(c):
            dk_b, dv_b = dk_c, dv_c
        else:
            dk_b += dk_c
            dv_b += dv_c
        hc, m = q_c.shape[2], k_b.shape[2]
        specs = [((P, B, s, hc, D), dtype)]
        if plan.last_use(c):
            specs += [((P, B, s, m, D), kv_grad_dtype)] * 2
        send = comm.send_buffer(specs, dout.device)
        order.scatter(dq_c, send.slots[0])  # [P(dst), B, s, hc, D]
        if plan.last_use(c):
            order.scatter(dk_b, send.slots[1])  # [P(dst), B, s, m, D]
            order.scatter(dv_b, send.slots[2])
        returns.append(send.start())
        incoming = following
    # [B, S/P, P(src), H/P, D]
    dq = torch.empty(B, s, P, H // P, D, dtype=dtype, device=dout.device)
    new = torch.zeros if replicated else torch.empty  # every kv head is written once otherwise
    dk = new(B, s, kv_heads, D, dtype=kv_grad_dtype, device=dout.device)
    dv = new(B, s, kv_heads, D, dtype=kv_grad_dtype, device=dout.device)
    for c, req in enumerate(returns):
        dq_c, *dkv = req.wait()  # [P(src), B, s, hc, D], then dk, dv [P(src), B, s, m, D]
        lo, hi = plan.q[c]
        dq[:, :, :, lo:hi] = dq_c.permute(1, 2, 0, 3, 4)
        if dkv:
            lo, hi = plan.kv[plan.block[c]]
            _place_kv_heads(dk, dkv[0], H, lo, hi, accumulate=replicated)
            _place_kv_heads(dv, dkv[1], H, lo, hi, accumulate=replicated)
    return dq.reshape(B, s, H, D), dk, dv


class UlyssesAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cp: CPContext, chunks: int,
                need_lse: bool):
        out, lse, saved = ulysses_forward(q, k, v, cp, chunks, need_lse)
        ctx.save_for_backward(q, k, v, *saved.tensors())
        ctx.cp, ctx.head_chunks = cp, saved.chunks
        if lse is None:
            return out
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor | None = None):
        q, k, v, *rest = ctx.saved_tensors
        saved = HeadShards.from_tensors(ctx.head_chunks, rest)
        grads = ulysses_backward(dout, saved, k.shape[2], ctx.cp)
        return (*cast_grads(q, k, v, *grads), None, None, None)


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, group=None, *, layout="contiguous", mask=None,
    kernel="auto", scale=None, return_lse: bool = False, chunks: int = HEAD_CHUNKS,
):
    """Ulysses attention on local shards; see :func:`longctx.attention` for the arguments.

    ``chunks``: head chunks to pipeline the all-to-alls with the kernel over (at most; 1 = none).
    """
    cp = build_context(
        q, k, v, group, strategy="ulysses", layout=layout, mask=mask, kernel=kernel, scale=scale
    )
    check_head_split(q.shape[2], k.shape[2], cp.world_size)
    return UlyssesAttention.apply(q, k, v, cp, chunks, return_lse)
