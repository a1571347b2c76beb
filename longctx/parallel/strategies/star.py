"""Star attention: two-phase context parallelism for long-context inference and fine-tuning.

Star Attention (Acharya et al., 2024) on a contiguous layout of ``P`` shards of ``L`` tokens,
the last ``query_len`` tokens of the sequence being the query segment (on the last rank):

- **phase 1 (context)**: a context token attends causally to its own shard and to the *anchor*,
  the first ``anchor_len`` tokens of the sequence, whose K/V are broadcast from rank 0.  No other
  communication: the shards work in parallel.
- **phase 2 (query)**: the query segment attends causally to *every* token.  Its queries are
  broadcast, every rank scores them against the keys it holds, and the partial results are
  merged by their LSE, so no K/V ever moves.

Both phases run the ordinary local kernel with a causal mask on global positions; only the key
sets differ, so every kernel supports star attention unchanged.  Backward mirrors the forward:
the anchor's dK/dV are reduced to rank 0 and the query segment's dQ to the last rank.
:class:`StarPattern` gives the resulting allowed pairs, for references and tests.

Example (on each rank; ``q [B, S/P, H, D]`` contiguous shards)::

    out = longctx.attention(q, k, v, group, strategy=longctx.Star(anchor_len=4096, query_len=512))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...kernels.base import acc_dtype
from ...kernels.mask import Positions
from ...kernels.merge import merge_partials
from ..comm import GatherComm
from ..context import CPContext
from .base import StrategySpec
from .blocks import backward_block, forward_block

__all__ = [
    "SPEC",
    "Star",
    "StarPattern",
    "star_attention",
    "star_backward",
    "star_forward",
]


@dataclass(frozen=True)
class Star:
    """Star attention settings: the anchor (a prefix) and the query segment (a suffix), in tokens."""

    anchor_len: int
    query_len: int = 0

    def __post_init__(self) -> None:
        if self.anchor_len < 0 or self.query_len < 0:
            raise ValueError(f"Star lengths must be >= 0, got {self}")

    def check(self, shard_len: int) -> None:
        if self.anchor_len > shard_len:
            raise ValueError(
                f"Star.anchor_len={self.anchor_len} is longer than a block ({shard_len} tokens per "
                "rank); the anchor is a prefix of rank 0's block: shorten it or use fewer ranks"
            )
        if self.query_len > shard_len:
            raise ValueError(
                f"Star.query_len={self.query_len} is longer than the last shard ({shard_len} "
                "tokens per rank); the query segment must fit on the last rank: shorten it or "
                "use fewer ranks"
            )


@dataclass(frozen=True)
class StarPattern:
    """The allowed pairs of star attention over a sequence of ``seq_len`` tokens on ``world_size``."""

    star: Star
    seq_len: int
    world_size: int

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bool ``[Sq, Sk]``: causal, and (key in the anchor, or in the query's block, or the
        query is in the query segment)."""
        block = self.seq_len // self.world_size
        q, k = q_pos.view(-1, 1), k_pos.view(1, -1)
        star = (
            (k < self.star.anchor_len)
            | (k // block == q // block)
            | (q >= self.seq_len - self.star.query_len)
        )
        return (k <= q) & star


def _context_keys(k: Tensor, v: Tensor, anchor_k: Tensor, anchor_v: Tensor, cp: CPContext, n: int):
    """Keys of phase 1 for this rank's first ``n`` tokens: [anchor,] own block, and positions."""
    own = cp.all_positions()[cp.rank].slice(0, n)
    if cp.rank == 0 or anchor_k.shape[1] == 0:  # rank 0's own block contains the anchor
        return k[:, :n], v[:, :n], own
    # [B, A, H_kv, D] ++ [B, n, H_kv, D] -> [B, A + n, H_kv, D]
    keys = torch.cat([anchor_k, k[:, :n]], dim=1), torch.cat([anchor_v, v[:, :n]], dim=1)
    return (*keys, Positions.cat([Positions.contiguous(0, anchor_k.shape[1]), own]))


def _lengths(cp: CPContext, star: Star, shard_len: int):
    """(context tokens on this rank, the query segment's global positions)."""
    is_last = cp.rank == cp.world_size - 1
    n_query = star.query_len if is_last else 0
    return shard_len - n_query, Positions.contiguous(cp.seq_len - star.query_len, star.query_len)


def star_forward(q: Tensor, k: Tensor, v: Tensor, cp: CPContext, star: Star):
    """Contiguous shards ``q [B, L, H, D]``, ``k``/``v [B, L, H_kv, D]`` -> out, lse, saved."""
    star.check(q.shape[1])  # the same on every rank: before any communication
    comm = GatherComm(cp.group)
    B, L, H, D = q.shape
    A, Q, last = star.anchor_len, star.query_len, cp.world_size - 1
    n_ctx, q_pos_query = _lengths(cp, star, L)
    out = torch.zeros(B, L, H, D, dtype=acc_dtype(q.dtype), device=q.device)
    lse = torch.full((B, H, L), float("-inf"), dtype=out.dtype, device=q.device)

    # phase 1: context tokens against [anchor,] own block
    anchor_k = comm.broadcast(k[:, :A] if cp.rank == 0 else k.new_empty(B, A, *k.shape[2:]), 0)
    anchor_v = comm.broadcast(v[:, :A] if cp.rank == 0 else v.new_empty(B, A, *v.shape[2:]), 0)
    keys_k, keys_v, keys_pos = _context_keys(k, v, anchor_k, anchor_v, cp, n_ctx)
    own_pos = cp.all_positions()[cp.rank]
    forward_block(
        q[:, :n_ctx], keys_k, keys_v, own_pos.slice(0, n_ctx), keys_pos, cp,
        out[:, :n_ctx], lse[:, :, :n_ctx],
    )

    # phase 2: the query segment against every rank's keys, merged by LSE
    q_query = comm.broadcast(q[:, L - Q :] if cp.rank == last else q.new_empty(B, Q, H, D), last)
    part_out = torch.zeros(B, Q, H, D, dtype=out.dtype, device=q.device)
    part_lse = torch.full((B, H, Q), float("-inf"), dtype=out.dtype, device=q.device)
    forward_block(q_query, k, v, q_pos_query, own_pos, cp, part_out, part_lse)
    all_out, all_lse = comm.all_gather(part_out), comm.all_gather(part_lse)  # [P, ...]
    out_query, lse_query = all_out[0], all_lse[0]
    for r in range(1, cp.world_size):
        out_query, lse_query = merge_partials(out_query, lse_query, all_out[r], all_lse[r])
    if cp.rank == last and Q:
        out[:, L - Q :] = out_query
        lse[:, :, L - Q :] = lse_query
    out = out.to(q.dtype)
    return out, lse, (anchor_k, anchor_v, q_query, out_query.to(q.dtype), lse_query)


def star_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    saved: tuple[Tensor, ...], cp: CPContext, star: Star,
):
    """Gradients of the local shards, in the accumulation dtype."""
    anchor_k, anchor_v, q_query, out_query, lse_query = saved
    comm = GatherComm(cp.group)
    B, L, H, D = q.shape
    A, Q, last = star.anchor_len, star.query_len, cp.world_size - 1
    n_ctx, q_pos_query = _lengths(cp, star, L)
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    own_pos = cp.all_positions()[cp.rank]

    # phase 1
    keys_k, keys_v, keys_pos = _context_keys(k, v, anchor_k, anchor_v, cp, n_ctx)
    dkeys_k = torch.zeros(keys_k.shape, dtype=acc, device=k.device)
    dkeys_v = torch.zeros(keys_v.shape, dtype=acc, device=v.device)
    backward_block(
        dout[:, :n_ctx], q[:, :n_ctx], keys_k, keys_v, out[:, :n_ctx], lse[:, :, :n_ctx],
        own_pos.slice(0, n_ctx), keys_pos, cp, dq[:, :n_ctx], dkeys_k, dkeys_v,
    )
    with_anchor = cp.rank != 0 and A > 0
    dk[:, :n_ctx] += dkeys_k[:, A:] if with_anchor else dkeys_k
    dv[:, :n_ctx] += dkeys_v[:, A:] if with_anchor else dkeys_v
    anchor_shape = (B, A, *k.shape[2:])
    d_anchor_k = dkeys_k[:, :A] if with_anchor else k.new_zeros(anchor_shape, dtype=acc)
    d_anchor_v = dkeys_v[:, :A] if with_anchor else v.new_zeros(anchor_shape, dtype=acc)
    d_anchor_k, d_anchor_v = comm.reduce(d_anchor_k, 0), comm.reduce(d_anchor_v, 0)
    if cp.rank == 0:
        dk[:, :A] += d_anchor_k
        dv[:, :A] += d_anchor_v

    # phase 2
    dout_query = comm.broadcast(
        dout[:, L - Q :] if cp.rank == last else dout.new_empty(B, Q, H, D), last
    )
    dq_query = torch.zeros(B, Q, H, D, dtype=acc, device=q.device)
    backward_block(
        dout_query, q_query, k, v, out_query, lse_query, q_pos_query, own_pos, cp,
        dq_query, dk, dv,
    )
    dq_query = comm.reduce(dq_query, last)
    if cp.rank == last and Q:
        dq[:, L - Q :] += dq_query
    return dq, dk, dv


SPEC = StrategySpec(
    name="star",
    summary="two phases: blocks attend to [anchor + own block], then the query segment to all, "
    "merged by LSE (long-context inference and fine-tuning); strategy=Star(anchor_len, query_len)",
    layouts=("contiguous",),
    masks=frozenset({"causal"}),
    requires_causal=True,
    options=("star",),
    required=("star",),
    forward=star_forward,
    backward=star_backward,
)


def star_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, star: Star, **kwargs):
    """Star attention on contiguous shards; ``mask`` must be plain causal (the default)."""
    return SPEC.run(q, k, v, group, star=star, **kwargs)
