"""Ulysses attention: all-to-all from sequence shards to head shards, full local attention, back.

Each of ``P`` ranks gives every other rank its tokens of that rank's heads, so rank ``j`` ends up
with the *whole* sequence for heads ``j*H/P .. (j+1)*H/P - 1`` and runs one local kernel on it
(DeepSpeed-Ulysses).  Communication per layer is four all-to-alls of a shard, independent of
``P``, but the head count bounds the degree.

GQA: rank ``j`` receives the kv heads its query heads use.  When there are fewer kv heads than
ranks, a kv head is sent to every rank that needs it (replicated, never expanded to ``H``) and
the replicas' gradients are summed at the owner.  A split exists when ``H % P == 0`` and the
query heads per rank either cover whole GQA groups or fit inside one.

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
from ..comm import AllToAllComm
from ..context import CPContext, build_context, cast_grads
from .blocks import backward_block, forward_block

_MAX_RUNS = 64

__all__ = [
    "TokenOrder",
    "token_order",
    "check_head_split",
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


@dataclass(frozen=True, eq=False)
class TokenOrder:
    """Gathered tokens sorted into global order: their positions (few runs) and the permutations.

    After the all-to-all the sequence sits in rank order, e.g. zigzag's ``2P`` chunks interleaved;
    sorting turns it back into one run (or a few), so each kernel call takes the fast path.
    ``perm`` is None when the tokens are already in order.
    """

    positions: Positions
    perm: Tensor | None  # sorted = gathered[:, perm]
    inverse: Tensor | None  # gathered = sorted[:, inverse]

    def sort(self, x: Tensor, dim: int = 1) -> Tensor:
        return x if self.perm is None else x.index_select(dim, self.perm)

    def unsort(self, x: Tensor, dim: int = 1) -> Tensor:
        return x if self.inverse is None else x.index_select(dim, self.inverse)


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
        return TokenOrder(gathered, None, None)
    idx = gathered.materialize()
    perm = torch.argsort(idx)
    return TokenOrder(_runs(idx[perm]), perm.to(device), torch.argsort(perm).to(device))


def seq_to_heads(x: Tensor, comm: AllToAllComm) -> Tensor:
    """``[B, S/P, H, D]`` sequence shard -> ``[B, S, H/P, D]`` head shard (rank order of tokens)."""
    P = comm.world_size
    B, s, H, D = x.shape
    send = x.reshape(B, s, P, H // P, D).permute(2, 0, 1, 3, 4)  # [P(dst), B, s, H/P, D]
    recv = comm.all_to_all(send)  # [P(src), B, s, H/P, D]
    return recv.permute(1, 0, 2, 3, 4).reshape(B, P * s, H // P, D)


def heads_to_seq(x: Tensor, comm: AllToAllComm) -> Tensor:
    """``[B, S, H/P, D]`` head shard -> ``[B, S/P, H, D]`` sequence shard."""
    P = comm.world_size
    B, S, h, D = x.shape
    send = x.reshape(B, P, S // P, h, D).permute(1, 0, 2, 3, 4)  # [P(dst), B, S/P, h, D]
    recv = comm.all_to_all(send)  # [P(src head group), B, S/P, h, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(B, S // P, P * h, D)


def lse_heads_to_seq(lse: Tensor, comm: AllToAllComm) -> Tensor:
    """``[B, H/P, S]`` -> ``[B, H, S/P]``."""
    P = comm.world_size
    B, h, S = lse.shape
    send = lse.reshape(B, h, P, S // P).permute(2, 0, 1, 3)  # [P(dst), B, h, S/P]
    recv = comm.all_to_all(send)  # [P(src head group), B, h, S/P]
    return recv.permute(1, 0, 2, 3).reshape(B, P * h, S // P)


def kv_seq_to_heads(x: Tensor, heads: int, comm: AllToAllComm) -> Tensor:
    """``[B, S/P, H_kv, D]`` -> ``[B, S, n, D]``: the kv heads this rank's query heads use."""
    slices = _kv_head_slices(heads, x.shape[2], comm.world_size)
    send = torch.stack([x[:, :, sl] for sl in slices])  # [P(dst), B, S/P, n, D]
    recv = comm.all_to_all(send)  # [P(src), B, S/P, n, D]
    B, s, n, D = send.shape[1:]
    return recv.permute(1, 0, 2, 3, 4).reshape(B, comm.world_size * s, n, D)


def kv_heads_to_seq(dx: Tensor, heads: int, kv_heads: int, comm: AllToAllComm) -> Tensor:
    """Gradient ``[B, S, n, D]`` -> ``[B, S/P, H_kv, D]``, summing replicated kv heads."""
    P = comm.world_size
    B, S, n, D = dx.shape
    send = dx.reshape(B, P, S // P, n, D).permute(1, 0, 2, 3, 4)  # [P(dst), B, S/P, n, D]
    recv = comm.all_to_all(send)  # [P(src head group), B, S/P, n, D]
    out = torch.zeros(B, S // P, kv_heads, D, dtype=dx.dtype, device=dx.device)
    for j, sl in enumerate(_kv_head_slices(heads, kv_heads, P)):
        out[:, :, sl] += recv[j]
    return out


def ulysses_forward(q: Tensor, k: Tensor, v: Tensor, cp: CPContext):
    """Local shards ``q [B, S/P, H, D]``, ``k``/``v [B, S/P, H_kv, D]`` -> out, lse, saved.

    ``saved`` holds the head-sharded tensors backward needs, so it repeats no exchange.
    """
    comm = AllToAllComm(cp.group)
    H = q.shape[2]
    order = _order(cp, q.device)
    q_h = order.sort(seq_to_heads(q, comm))  # [B, S, H/P, D], global order
    k_h = order.sort(kv_seq_to_heads(k, H, comm))  # [B, S, n, D]
    v_h = order.sort(kv_seq_to_heads(v, H, comm))
    B, S, h, D = q_h.shape
    out_h = torch.zeros(B, S, h, D, dtype=acc_dtype(q.dtype), device=q.device)
    lse_h = torch.full((B, h, S), float("-inf"), dtype=out_h.dtype, device=q.device)
    forward_block(q_h, k_h, v_h, order.positions, order.positions, cp, out_h, lse_h)
    out_h = out_h.to(q.dtype)
    out = heads_to_seq(order.unsort(out_h), comm)
    lse = lse_heads_to_seq(order.unsort(lse_h, dim=2), comm)
    return out, lse, (q_h, k_h, v_h, out_h, lse_h)


def _order(cp: CPContext, device: torch.device) -> TokenOrder:
    return token_order(cp.layout, cp.seq_len, cp.world_size, tuple(range(cp.world_size)), str(device))


def ulysses_backward(dout: Tensor, saved: tuple[Tensor, ...], kv_heads: int, cp: CPContext):
    """Gradients of the local shards from the saved head shards, in the accumulation dtype."""
    q_h, k_h, v_h, out_h, lse_h = saved  # in global token order
    comm = AllToAllComm(cp.group)
    H = q_h.shape[2] * comm.world_size
    order = _order(cp, q_h.device)
    dout_h = order.sort(seq_to_heads(dout, comm))
    acc = acc_dtype(q_h.dtype)
    dq_h = torch.zeros(q_h.shape, dtype=acc, device=q_h.device)
    dk_h = torch.zeros(k_h.shape, dtype=acc, device=k_h.device)
    dv_h = torch.zeros(v_h.shape, dtype=acc, device=v_h.device)
    pos = order.positions
    backward_block(dout_h, q_h, k_h, v_h, out_h, lse_h, pos, pos, cp, dq_h, dk_h, dv_h)
    dq = heads_to_seq(order.unsort(dq_h), comm)
    dk = kv_heads_to_seq(order.unsort(dk_h), H, kv_heads, comm)
    dv = kv_heads_to_seq(order.unsort(dv_h), H, kv_heads, comm)
    return dq, dk, dv


class UlyssesAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cp: CPContext):
        out, lse, saved = ulysses_forward(q, k, v, cp)
        ctx.save_for_backward(q, k, v, *saved)
        ctx.cp = cp
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, *saved = ctx.saved_tensors
        grads = ulysses_backward(dout, tuple(saved), k.shape[2], ctx.cp)
        return (*cast_grads(q, k, v, *grads), None)


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, group=None, *, layout="contiguous", mask=None,
    kernel="auto", scale=None, return_lse: bool = False,
):
    """Ulysses attention on local shards; see :func:`longctx.attention` for the arguments."""
    cp = build_context(
        q, k, v, group, strategy="ulysses", layout=layout, mask=mask, kernel=kernel, scale=scale
    )
    check_head_split(q.shape[2], k.shape[2], cp.world_size)
    out, lse = UlyssesAttention.apply(q, k, v, cp)
    return (out, lse) if return_lse else out
