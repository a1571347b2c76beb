"""Work plans for the context-parallel strategies: pure functions of positions and the mask.

Every rank evaluates these on the same inputs (the layout's positions of every rank, the global
mask), so all ranks agree on how many ring steps run and nobody waits on a transfer that was
skipped.  Nothing here touches a device or a process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..kernels.mask import Mask, Positions

__all__ = ["TileCall", "needed_sources", "plan_calls", "ring_steps"]

_MAX_SPLIT_RUNS = 64  # split a shard pair per run only while this few (q run, k run) pairs exist


@dataclass(frozen=True)
class TileCall:
    """One kernel call on local queries ``q_begin:q_end`` against local keys ``k_begin:k_end``."""

    q_begin: int
    q_end: int
    k_begin: int
    k_end: int


def _continues(pos: Positions, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Do local ranges ``a`` then ``b`` touch, with positions forming one run?"""
    return a[1] == b[0] and len(Positions.cat([pos.slice(*a), pos.slice(*b)]).segments) == 1


def plan_calls(mask: Mask, q_pos: Positions, k_pos: Positions) -> list[TileCall]:
    """Kernel calls that cover every allowed pair of a (query shard, key shard) pair.

    Shards made of several runs (zigzag: two chunks) get one call per (query run, key run) pair
    that has an allowed pair, so a run pair with nothing allowed is never computed and every call
    sees single-run positions (the kernels' fast path: tile ranges follow from the run bounds).
    Calls whose ranges and positions continue one another are merged.  Returns ``[]`` when the
    shards have no allowed pair at all.

    Example (zigzag, P=2, rank 0 holds chunks 0 and 3 of 4, causal diagonal step)::

        >>> from longctx.kernels.mask import Mask, Positions, Segment
        >>> pos = Positions((Segment(0, 4), Segment(12, 4)))
        >>> for call in plan_calls(Mask(causal=True), pos, pos):
        ...     print(call)
        TileCall(q_begin=0, q_end=4, k_begin=0, k_end=4)
        TileCall(q_begin=4, q_end=8, k_begin=0, k_end=4)
        TileCall(q_begin=4, q_end=8, k_begin=4, k_end=8)
    """
    if len(q_pos) == 0 or len(k_pos) == 0:
        return []
    whole = TileCall(0, len(q_pos), 0, len(k_pos))
    q_runs, k_runs = q_pos.local_runs(), k_pos.local_runs()
    if len(q_runs) * len(k_runs) > _MAX_SPLIT_RUNS or len(q_runs) * len(k_runs) == 1:
        return [whole] if mask.any_allowed(q_pos, k_pos) else []
    calls = [
        TileCall(qb, qe, kb, ke)
        for qb, qe, qp in q_runs
        for kb, ke, kp in k_runs
        if mask.any_allowed(qp, kp)
    ]
    merged: list[TileCall] = []
    for c in calls:
        prev = merged[-1] if merged else None
        if prev is not None and (prev.q_begin, prev.q_end) == (c.q_begin, c.q_end) and _continues(
            k_pos, (prev.k_begin, prev.k_end), (c.k_begin, c.k_end)
        ):
            merged[-1] = TileCall(prev.q_begin, prev.q_end, prev.k_begin, c.k_end)
        elif prev is not None and (prev.k_begin, prev.k_end) == (c.k_begin, c.k_end) and _continues(
            q_pos, (prev.q_begin, prev.q_end), (c.q_begin, c.q_end)
        ):
            merged[-1] = TileCall(prev.q_begin, c.q_end, prev.k_begin, prev.k_end)
        else:
            merged.append(c)
    return merged


def ring_steps(mask: Mask, positions: Sequence[Positions]) -> int:
    """How many ring steps are needed (1..P) when rank ``r`` sees rank ``r - s``'s keys at step s.

    Trailing steps in which no rank has an allowed pair are dropped with their communication:
    a sliding window shorter than a shard needs 2 steps whatever the world size.
    """
    world = len(positions)
    last = 0
    for step in range(1, world):
        if any(
            mask.any_allowed(positions[r], positions[(r - step) % world]) for r in range(world)
        ):
            last = step
    return last + 1


def needed_sources(mask: Mask, positions: Sequence[Positions], rank: int) -> list[int]:
    """Ranks whose keys hold at least one key that ``rank``'s queries may attend to."""
    return [src for src, pos in enumerate(positions) if mask.any_allowed(positions[rank], pos)]
