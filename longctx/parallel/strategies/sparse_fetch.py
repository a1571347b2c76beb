"""Context parallelism for trainable sparse attention (MoBA, NSA): fetch only the selected blocks.

A trainable sparse layer decides at run time which key blocks each query block attends to.  Under
context parallelism (the ring family's layouts: contiguous, zigzag, striped) this module:

1. sums the small per-block key summaries over the ranks (:func:`block_key_means`: detached
   block means for MoBA's gate; :func:`all_reduce_sum`: a differentiable sum for NSA's
   compression partials), so every rank scores its queries against every block;
2. lets the layer select blocks where its queries are (a :class:`SparseSelection`: per head and
   local query block, the allowed key blocks on **global** positions, FlexAttention's
   ``kv_num_blocks``/``kv_indices`` shape);
3. in :func:`selected_attention`, all-gathers which blocks each rank needs (one bit per block)
   and moves only those keys/values, in one all-to-all (their gradients travel back the same
   way); when that would move more bytes than the ring (every rank receives the ``P - 1``
   other shards), it runs the ring-family strategy with the selection as a per-head
   block-sparse mask instead.

Ulysses needs none of this: :func:`seq_to_heads` / :func:`heads_to_seq` move a layer's inputs to
whole sequences of a subset of heads, where the layer runs as on one device.

Everything is exact (float64 tests against the one-process layer, :mod:`tests.test_sparse_layers`).
One host sync per :func:`selected_attention` call reads the ``P x P`` token counts of the exchange
(the all-to-all's buffer sizes must be known to the host); the selection itself never syncs.

Example (one process: the same calls without communication)::

    >>> import torch
    >>> from longctx.kernels.mask import Mask
    >>> from longctx.parallel.strategies.sparse_fetch import (
    ...     SparseCP, SparseSelection, selected_attention)
    >>> cp = SparseCP.build(seq_len=8)
    >>> q = torch.randn(1, 8, 2, 4, dtype=torch.float64); k = v = torch.randn(1, 8, 1, 4,
    ...                                                                        dtype=torch.float64)
    >>> # query blocks of 4 tokens; block 0 sees key block 0, block 1 sees key blocks 0 and 1
    >>> sel = SparseSelection(block_size=4, query_block=4,
    ...     kv_num_blocks=torch.tensor([[[1, 2]]]), kv_indices=torch.tensor([[[[0, -1], [0, 1]]]]))
    >>> out = selected_attention(q, k, v, cp, sel, Mask(causal=True), scale=0.5)
    >>> dense = torch.softmax((torch.einsum("bqhd,bkd->bhqk", q, k[:, :, 0]) * 0.5).masked_fill(
    ...     torch.ones(8, 8).triu(1).bool(), float("-inf")), -1)
    >>> torch.allclose(out, torch.einsum("bhqk,bkd->bqhd", dense, v[:, :, 0]))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...kernels._device import host_to_device
from ...kernels.base import acc_dtype, get_kernel
from ...kernels.mask import Mask, Positions
from ...kernels.merge import merge_into
from ..comm import AllToAllComm, GatherComm
from ..layout import Layout

__all__ = [
    "FetchStats",
    "SparseCP",
    "SparseSelection",
    "all_reduce_sum",
    "block_key_means",
    "heads_to_seq",
    "kernel_attention",
    "selected_attention",
    "selection_mask",
    "seq_to_heads",
]


# -- the per-call context -------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SparseCP:
    """Where this rank's tokens sit: group, rank, world size, every rank's global positions.

    ``group=None`` is one process holding the whole sequence (positions ``0 .. S-1``).
    Build it with :meth:`build`; ``positions[r]`` are rank ``r``'s global positions in local
    order (:meth:`~longctx.parallel.layout.Layout.positions`).
    """

    group: object
    world_size: int
    rank: int
    seq_len: int
    layout: Layout
    positions: tuple[Positions, ...]
    _device_positions: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def build(seq_len: int, group=None, layout: str | Layout = "contiguous") -> SparseCP:
        """``seq_len`` is the **global** length (local tokens times the group size)."""
        world = group.size() if group is not None else 1
        rank = group.rank() if group is not None else 0
        lay = Layout.parse(layout)
        lay.check(seq_len, world)
        positions = tuple(lay.positions(seq_len, world, r) for r in range(world))
        return SparseCP(group, world, rank, seq_len, lay, positions)

    @property
    def local_positions(self) -> Positions:
        return self.positions[self.rank]

    def positions_on(self, rank: int, device: torch.device) -> Tensor:
        """Rank ``rank``'s global positions as an int64 tensor on ``device`` (made once)."""
        key = (rank, device)
        if key not in self._device_positions:
            self._device_positions[key] = self.positions[rank].materialize(device)
        return self._device_positions[key]

    def check_blocks(self, block: int, what: str) -> None:
        """Raise unless every local run of every rank is whole blocks of ``block`` tokens."""
        for r, pos in enumerate(self.positions):
            for begin, end, run in pos.local_runs():
                seg = run.segments[0] if run.segments else None
                if seg is None or seg.stride != 1 or seg.start % block or (end - begin) % block:
                    raise ValueError(
                        f"{what}={block} must tile every rank's contiguous runs of tokens, but "
                        f"rank {r} of the {str(self.layout)!r} layout holds a run "
                        f"{run.segments or 'given by an index'}; choose a {what} that divides the "
                        f"runs (contiguous: S/P tokens, zigzag: S/(2P), striped:w: w)"
                    )


# -- the selection --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SparseSelection:
    """Per head and local query block, the allowed key blocks on global positions.

    - ``block_size``: tokens per key block (key block ``j`` = global positions
      ``j*block_size ..``).
    - ``query_block``: tokens per query block; query block ``i`` is local tokens
      ``i*query_block ..`` (whole blocks of global positions, see :meth:`SparseCP.check_blocks`).
    - ``kv_num_blocks [B, Hs, nq]`` (int), ``kv_indices [B, Hs, nq, max]`` (int, entries past
      the count are ignored): FlexAttention's shape. ``Hs`` is the query head count or the kv
      head count (then a kv head's list serves its query heads).
    """

    block_size: int
    query_block: int
    kv_num_blocks: Tensor
    kv_indices: Tensor

    def __post_init__(self) -> None:
        if self.kv_indices.dim() != 4 or self.kv_num_blocks.shape != self.kv_indices.shape[:3]:
            raise ValueError(
                "SparseSelection needs kv_num_blocks [B, H, nq] and kv_indices [B, H, nq, max]; "
                f"got {tuple(self.kv_num_blocks.shape)} and {tuple(self.kv_indices.shape)}"
            )

    def valid(self) -> Tensor:
        """Bool ``[B, Hs, nq, max]``: which entries of ``kv_indices`` count."""
        slot = torch.arange(self.kv_indices.shape[-1], device=self.kv_indices.device)
        return slot < self.kv_num_blocks.unsqueeze(-1)

    def table(self, num_blocks: int) -> Tensor:
        """Bool ``[B, Hs, nq, num_blocks]``: the lists as a dense table."""
        idx = torch.where(self.valid(), self.kv_indices.long(), num_blocks)
        table = torch.zeros(
            (*idx.shape[:3], num_blocks + 1), dtype=torch.bool, device=idx.device
        )
        table.scatter_(-1, idx, True)
        return table[..., :num_blocks]

    def needed_blocks(self, num_blocks: int) -> Tensor:
        """Bool ``[num_blocks]``: blocks any head or query block of this rank attends to."""
        return self.table(num_blocks).flatten(0, 2).any(0)


# -- local attention ------------------------------------------------------------------------------
def _run_pairs(q_pos: Positions, k_pos: Positions):
    for qb, qe, qp in q_pos.local_runs():
        for kb, ke, kp in k_pos.local_runs():
            yield qb, qe, qp, kb, ke, kp


class _KernelAttention(torch.autograd.Function):
    """The local kernel contract (:mod:`longctx.kernels.base`) under autograd, any positions."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, mask, kernel, scale):
        B, Sq, H, D = q.shape
        out = torch.zeros(B, Sq, H, D, dtype=acc_dtype(q.dtype), device=q.device)
        lse = torch.full((B, H, Sq), float("-inf"), dtype=out.dtype, device=q.device)
        for qb, qe, qp, kb, ke, kp in _run_pairs(q_pos, k_pos):
            if not mask.any_allowed(qp, kp):
                continue
            o, l = kernel.forward(
                q[:, qb:qe], k[:, kb:ke], v[:, kb:ke], scale=scale, mask=mask, q_pos=qp, k_pos=kp
            )
            merge_into(out[:, qb:qe], lse[:, :, qb:qe], o, l)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (q_pos, k_pos, mask, kernel, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        q_pos, k_pos, mask, kernel, scale = ctx.args
        acc = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for qb, qe, qp, kb, ke, kp in _run_pairs(q_pos, k_pos):
            if not mask.any_allowed(qp, kp):
                continue
            dq_c, dk_c, dv_c = kernel.backward(
                dout[:, qb:qe], q[:, qb:qe], k[:, kb:ke], v[:, kb:ke], out[:, qb:qe],
                lse[:, :, qb:qe], scale=scale, mask=mask, q_pos=qp, k_pos=kp,
            )
            dq[:, qb:qe] += dq_c
            dk[:, kb:ke] += dk_c
            dv[:, kb:ke] += dv_c
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def kernel_attention(
    q: Tensor, k: Tensor, v: Tensor, *, q_pos: Positions, k_pos: Positions, mask: Mask,
    kernel="auto", scale: float,
) -> tuple[Tensor, Tensor]:
    """Differentiable local attention through a kernel of the contract, on any positions.

    ``q [B, Sq, H, D]`` at ``q_pos``, ``k``/``v [B, Sk, Hkv, D]`` at ``k_pos`` -> out
    ``[B, Sq, H, D]``, lse ``[B, H, Sq]`` (no gradient).  One kernel call per pair of position
    runs (pairs the mask rules out are skipped), merged by LSE.
    """
    return _KernelAttention.apply(q, k, v, q_pos, k_pos, mask, get_kernel(kernel), scale)


# -- summaries ------------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """``sum_r x_r`` on every rank; backward: the sum of the ranks' gradients (an all-reduce)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return GatherComm(group).all_gather(x).sum(0)

    @staticmethod
    def backward(ctx, grad):
        return GatherComm(ctx.group).all_gather(grad.contiguous()).sum(0), None


def all_reduce_sum(x: Tensor, cp: SparseCP) -> Tensor:
    """Differentiable sum of ``x`` over the ranks (``x`` itself on one process).

    Used for NSA's compression partials, which are small: ``[B, S / stride, Hkv, hidden]``.
    """
    if cp.group is None or cp.world_size == 1:
        return x
    return _AllReduceSum.apply(x, cp.group)


@torch.no_grad()
def block_key_means(k: Tensor, cp: SparseCP, block_size: int) -> Tensor:
    """Mean of the keys of every global block ``[B, nblk, Hkv, D]`` (no gradient; MoBA's gate).

    Each rank adds its local keys into the blocks of their global positions; the partial sums
    (``nblk`` rows, small) are summed over the ranks.  A block past the sequence end is not
    counted: ``nblk = ceil(S / block_size)`` and the last block averages the tokens it has.
    """
    B, _, Hkv, D = k.shape
    nblk = -(-cp.seq_len // block_size)
    blocks = cp.positions_on(cp.rank, k.device) // block_size  # [S_local]
    sums = torch.zeros(B, nblk, Hkv, D, dtype=acc_dtype(k.dtype), device=k.device)
    sums.index_add_(1, blocks, k.to(sums.dtype))
    if cp.group is not None and cp.world_size > 1:
        sums = GatherComm(cp.group).all_gather(sums).sum(0)
    counts = torch.full((nblk,), float(block_size), dtype=sums.dtype, device=k.device)
    counts[-1] = cp.seq_len - (nblk - 1) * block_size
    return (sums / counts.view(1, nblk, 1, 1)).to(k.dtype)


# -- fetching the selected blocks -----------------------------------------------------------------
@dataclass
class FetchStats:
    """What one :func:`selected_attention` call moved on this rank.

    ``method``: ``"local"`` (one process), ``"fetch"`` (selected blocks, one all-to-all) or
    ``"ring"`` (the fallback strategy). ``bytes_received``: bytes of K/V this rank received in
    forward (the all-to-all's padded slots from the other ranks; for the ring, the ``P - 1``
    other shards); ``payload_bytes``: the bytes of the selected tokens on other ranks;
    ``gather_bytes``: what the ring moves into this rank (``P - 1`` shards).
    """

    method: str
    bytes_received: int
    payload_bytes: int
    gather_bytes: int


class _Fetch(torch.autograd.Function):
    """Send each rank the local K/V tokens it asked for; backward sends their gradients home.

    ``send_idx [P, cap]``: local token indices for each rank (first ``send_counts[j]`` valid,
    the rest padding); ``recv_counts[o]``: tokens received from rank ``o`` (0 for this rank).
    Returns ``[B, sum(recv_counts), Hkv, D]`` for k and v, by source rank, then local order.
    """

    @staticmethod
    def forward(ctx, k, v, send_idx, send_counts, recv_counts, cap, group):
        comm = AllToAllComm(group)
        P = comm.world_size
        # [B, P*cap, Hkv, D] -> [B, P, cap, Hkv, D] -> [P, B, cap, Hkv, D]
        ks = k[:, send_idx.flatten()].unflatten(1, (P, cap)).transpose(0, 1)
        vs = v[:, send_idx.flatten()].unflatten(1, (P, cap)).transpose(0, 1)
        k_recv, v_recv = comm.all_to_all_async([ks, vs]).wait()  # [P(src), B, cap, Hkv, D]
        ctx.save_for_backward(send_idx)
        ctx.meta = (send_counts, recv_counts, cap, group, k.shape)
        k_out = torch.cat([k_recv[o, :, :n] for o, n in enumerate(recv_counts)], dim=1)
        v_out = torch.cat([v_recv[o, :, :n] for o, n in enumerate(recv_counts)], dim=1)
        return k_out, v_out

    @staticmethod
    def backward(ctx, dk_out, dv_out):
        (send_idx,) = ctx.saved_tensors
        send_counts, recv_counts, cap, group, k_shape = ctx.meta
        comm = AllToAllComm(group)
        P = comm.world_size
        B, _, Hkv, D = k_shape

        def slots(g: Tensor) -> Tensor:  # [B, sum(recv), Hkv, D] -> [P, B, cap, Hkv, D] (padded)
            out = g.new_zeros(P, B, cap, Hkv, D)
            for o, part in enumerate(g.split(list(recv_counts), dim=1)):
                out[o, :, : part.shape[1]] = part
            return out

        dk_back, dv_back = comm.all_to_all_async([slots(dk_out), slots(dv_out)]).wait()
        dk = dk_out.new_zeros(k_shape)
        dv = dv_out.new_zeros(k_shape)
        for j, n in enumerate(send_counts):  # [P(dst), B, cap, Hkv, D]: valid rows only
            if n:
                dk.index_add_(1, send_idx[j, :n], dk_back[j, :, :n])
                dv.index_add_(1, send_idx[j, :n], dv_back[j, :, :n])
        return dk, dv, None, None, None, None, None


def _local_blocks(cp: SparseCP, owner: int, block: int) -> Tensor:
    """Global block ids of rank ``owner``'s local blocks, in local order (CPU, made once):
    local tokens ``l*block .. (l+1)*block - 1`` are global block ``result[l]``."""
    key = ("blocks", owner, block)
    if key not in cp._device_positions:
        cp._device_positions[key] = cp.positions[owner].materialize()[::block] // block
    return cp._device_positions[key]


def _wanted(need_row: Tensor, cp: SparseCP, owner: int, block: int) -> tuple[Tensor, Positions]:
    """Rank ``owner``'s local blocks that ``need_row [nblk]`` (CPU bool) marks: local token
    indices (CPU int64, local order) and their global positions."""
    blocks = _local_blocks(cp, owner, block)
    local = torch.nonzero(need_row[blocks]).flatten()  # local block numbers, ascending
    idx = (local[:, None] * block + torch.arange(block)).flatten()
    starts = (blocks[local] * block).tolist()
    return idx, Positions.cat([Positions.contiguous(s, block) for s in starts])


def selection_mask(sel: SparseSelection, cp: SparseCP, kv_block: int | None = None) -> Mask:
    """The selection as a per-head :class:`~longctx.kernels.mask.BlockSparse` mask on global
    positions: this rank's query blocks get their lists, the others none.  ``kv_block`` (a
    divisor of ``sel.block_size``, default the same) splits every listed block into the
    kernel's key blocks.  Tensor ops on the lists' device, no host sync."""
    from ...kernels.mask import BlockSparse

    kv_block = kv_block or sel.block_size
    if sel.block_size % kv_block:
        raise ValueError(
            f"kv_block={kv_block} must divide the selection's block_size={sel.block_size}"
        )
    r = sel.block_size // kv_block
    num, idx = sel.kv_num_blocks.long(), sel.kv_indices.long()
    if r > 1:  # block b -> kernel blocks b*r .. b*r + r - 1
        idx = (idx.unsqueeze(-1) * r + torch.arange(r, device=idx.device)).flatten(-2)
        num = num * r
    device = idx.device
    nq_global = -(-cp.seq_len // sel.query_block)
    rows = cp.positions_on(cp.rank, device)[:: sel.query_block] // sel.query_block  # [nq]
    B, Hs, _, width = idx.shape
    g_num = torch.zeros(B, Hs, nq_global, dtype=torch.int32, device=device)
    g_idx = torch.zeros(B, Hs, nq_global, max(width, 1), dtype=torch.int32, device=device)
    g_num[:, :, rows] = num.to(torch.int32)
    g_idx[:, :, rows, :width] = idx.to(torch.int32)
    bs = BlockSparse(
        g_num, g_idx, sel.query_block, kv_block, n_kv_blocks=-(-cp.seq_len // kv_block),
        check=False, summarize=False,
    )
    return Mask(block_sparse=bs)


def selected_attention(
    q: Tensor, k: Tensor, v: Tensor, cp: SparseCP, sel: SparseSelection, base_mask: Mask, *,
    scale: float, kernel="auto", kv_block: int | None = None, fallback: str = "ring",
    stats: list | None = None,
) -> Tensor:
    """Attention of the local queries to the key blocks ``sel`` lists for them.

    ``q [B, S_local, H, D]``, ``k``/``v [B, S_local, Hkv, D]`` (this rank's shards),
    ``base_mask`` (causal, documents) on global positions -> out ``[B, S_local, H, D]``.
    Under CP the listed blocks' keys/values are fetched from their owners, then one kernel call
    per run of positions applies ``base_mask & selection_mask(sel)``; when fetching would move
    more bytes than the ring, the ring-family strategy ``fallback`` (on ``cp.layout``) runs with
    that mask instead.  ``stats`` (a list) receives a :class:`FetchStats`.
    Gradients reach ``q``, ``k`` and ``v`` (the selection is not differentiated).
    """
    B, S_local, _, D = q.shape
    Hkv = k.shape[2]
    nblk = -(-cp.seq_len // sel.block_size)
    q_pos = cp.local_positions
    if cp.group is None or cp.world_size == 1:
        k_pos, k_all, v_all = q_pos, k, v
        if stats is not None:
            stats.append(FetchStats("local", 0, 0, 0))
    else:
        P, rank = cp.world_size, cp.rank
        need = sel.needed_blocks(nblk)
        need_all = GatherComm(cp.group).all_gather(need.to(torch.uint8))  # [P, nblk]
        need_all = need_all.cpu().bool()  # the one host sync: sizes the exchange
        plans = {  # (to, from) -> local token indices on `from`, their global positions
            (j, o): _wanted(need_all[j], cp, o, sel.block_size)
            for j in range(P) for o in range(P) if j == rank or o == rank
        }
        blocks_of = [_local_blocks(cp, o, sel.block_size) for o in range(P)]
        counts = [[int(need_all[r][blocks_of[o]].sum()) * sel.block_size for o in range(P)]
                  for r in range(P)]
        token_bytes = B * Hkv * D * 2 * k.element_size()  # one token's k and v
        cap = max(1, max(counts[r][o] for r in range(P) for o in range(P) if r != o))
        fetch_bytes = (P - 1) * cap * token_bytes  # per rank: padded slots from P - 1 ranks
        gather_bytes = (P - 1) * S_local * token_bytes
        payload = sum(counts[rank][o] for o in range(P) if o != rank) * token_bytes
        if fetch_bytes < gather_bytes:
            send_idx = torch.zeros(P, cap, dtype=torch.long)
            for j in range(P):
                if j != rank:
                    idx = plans[(j, rank)][0]
                    send_idx[j, : idx.numel()] = idx
            send_idx = host_to_device(send_idx, q.device)
            recv_counts = tuple(0 if o == rank else counts[rank][o] for o in range(P))
            send_counts = tuple(0 if j == rank else counts[j][rank] for j in range(P))
            k_far, v_far = _Fetch.apply(k, v, send_idx, send_counts, recv_counts, cap, cp.group)
            own_idx, own_pos = plans[(rank, rank)]
            own_idx = host_to_device(own_idx, q.device)
            k_all = torch.cat([k[:, own_idx], k_far], dim=1)
            v_all = torch.cat([v[:, own_idx], v_far], dim=1)
            k_pos = Positions.cat([own_pos] + [plans[(rank, o)][1] for o in range(P) if o != rank])
            if stats is not None:
                stats.append(FetchStats("fetch", fetch_bytes, payload, gather_bytes))
        else:  # the ring moves fewer bytes: run it with the selection as a block-sparse mask
            from ..api import attention

            if stats is not None:
                stats.append(FetchStats("ring", gather_bytes, payload, gather_bytes))
            return attention(
                q, k, v, cp.group, strategy=fallback, layout=cp.layout,
                mask=base_mask & selection_mask(sel, cp, kv_block), kernel=kernel, scale=scale,
            )
    mask = base_mask & selection_mask(sel, cp, kv_block)
    out, _ = kernel_attention(
        q, k_all, v_all, q_pos=q_pos, k_pos=k_pos, mask=mask, kernel=kernel, scale=scale
    )
    return out


# -- Ulysses --------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """``x [P, ...]``: slot ``j`` to rank ``j``; its own inverse, so backward is one more."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return AllToAllComm(group).all_to_all(x.contiguous())

    @staticmethod
    def backward(ctx, grad):
        return AllToAllComm(ctx.group).all_to_all(grad.contiguous()), None


def _global_order(cp: SparseCP, device) -> Tensor:
    """Permutation taking the rank-order concatenation of the shards to global order."""
    cat = torch.cat([cp.positions_on(r, device) for r in range(cp.world_size)])
    return torch.argsort(cat)


def _head_groups(heads: int, kv_heads: int, world: int, what: str) -> Tensor | None:
    """For k/v: which kv heads each rank needs, as one index list ``[P * per_rank]``."""
    if heads % world:
        raise ValueError(
            f"Ulysses over {world} ranks needs the {heads} query heads of the {what} layer to "
            f"split evenly; use a ring-family strategy or a head count divisible by {world}"
        )
    local = heads // world
    group = heads // kv_heads
    if local % group and group % local:
        raise ValueError(
            f"Ulysses over {world} ranks gives each rank {local} query heads, which neither "
            f"holds whole kv groups of {group} heads nor lies inside one; change the head counts"
        )
    idx = []
    for j in range(world):
        first, last = (j * local) // group, (j * local + local - 1) // group
        idx.extend(range(first, last + 1))
    return torch.tensor(idx, dtype=torch.long)


def seq_to_heads(x: Tensor, cp: SparseCP, heads: int | None = None) -> Tensor:
    """``[B, S_local, Hx, E]`` sequence shards -> ``[B, S, Hx_local, E]`` whole sequences (global
    order) of this rank's heads.  ``heads``: the query head count when ``x`` holds kv heads
    (each rank gets the kv heads of its query heads; several ranks may share one)."""
    if cp.group is None or cp.world_size == 1:
        return x
    P = cp.world_size
    Hx = x.shape[2]
    if heads is not None and heads != Hx:
        x = x.index_select(2, _head_groups(heads, Hx, P, "sparse").to(x.device))
    elif Hx % P:
        raise ValueError(f"Ulysses over {P} ranks needs heads divisible by {P}, got {Hx}")
    # [B, S_local, P * h, E] -> [P, B, S_local, h, E]
    slots = x.unflatten(2, (P, -1)).permute(2, 0, 1, 3, 4)
    recv = _AllToAll.apply(slots, cp.group)  # [P(src), B, S_local, h, E]
    cat = recv.permute(1, 0, 2, 3, 4).flatten(1, 2)  # [B, P*S_local, h, E], rank order
    return cat[:, _global_order(cp, x.device)]


def heads_to_seq(x: Tensor, cp: SparseCP) -> Tensor:
    """Inverse of :func:`seq_to_heads` for query-head tensors: ``[B, S, H_local, E]`` ->
    ``[B, S_local, H, E]``."""
    if cp.group is None or cp.world_size == 1:
        return x
    P = cp.world_size
    rank_order = torch.cat([cp.positions_on(r, x.device) for r in range(P)])
    cat = x[:, rank_order]  # global order -> rank order [B, P*S_local, h, E]
    slots = cat.unflatten(1, (P, -1)).permute(1, 0, 2, 3, 4)  # [P(dst), B, S_local, h, E]
    recv = _AllToAll.apply(slots, cp.group)  # [P(src heads), B, S_local, h, E]
    return recv.permute(1, 2, 0, 3, 4).flatten(2, 3)  # [B, S_local, P*h, E]
