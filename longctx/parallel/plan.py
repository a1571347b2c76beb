"""Work plans for the context-parallel strategies: pure functions of positions and the mask.

Every rank evaluates these on the same inputs (the layout's positions of every rank, the global
mask), so all ranks agree on how many ring steps run and nobody waits on a transfer that was
skipped.  Nothing here touches a device or a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..kernels.mask import Mask, Positions

__all__ = ["TileCall", "plan_calls", "ring_steps", "needed_sources"]

_MAX_SPLIT_RUNS = 64  # split a shard pair per run only while this few (q run, k run) pairs exist


@dataclass(frozen=True)
class TileCall:
    """One kernel call on local queries ``q_begin:q_end`` against local keys ``k_begin:k_end``."""

    q_begin: int
    q_end: int
    k_begin: int
    k_end: int


def plan_calls(mask: Mask, q_pos: Positions, k_pos: Positions) -> list[TileCall]:
    """Kernel calls that cover every allowed pair of a (query shard, key shard) pair.

    Shards made of several runs (zigzag: two chunks) are split per run, so that a run pair with
    no allowed pair is never computed; consecutive query runs that need the same keys share a
    call.  Returns ``[]`` when the shards have no allowed pair at all.

    Example (zigzag, P=2, rank 0 holds chunks 0 and 3 of 4, causal diagonal step)::

        >>> from longctx.kernels.mask import Mask, Positions, Segment
        >>> pos = Positions((Segment(0, 4), Segment(12, 4)))
        >>> plan_calls(Mask(causal=True), pos, pos)
        [TileCall(q_begin=0, q_end=4, k_begin=0, k_end=4), TileCall(q_begin=4, q_end=8, k_begin=0, k_end=8)]
    """
    if len(q_pos) == 0 or len(k_pos) == 0:
        return []
    whole = TileCall(0, len(q_pos), 0, len(k_pos))
    q_runs, k_runs = q_pos.local_runs(), k_pos.local_runs()
    if len(q_runs) * len(k_runs) > _MAX_SPLIT_RUNS:
        return [whole] if mask.any_allowed(q_pos, k_pos) else []
    ok = [[mask.any_allowed(qp, kp) for _, _, kp in k_runs] for _, _, qp in q_runs]
    if all(all(row) for row in ok):
        return [whole]
    calls: list[TileCall] = []
    for (qb, qe, _), row in zip(q_runs, ok):
        cols = [j for j, allowed in enumerate(row) if allowed]
        if not cols:
            continue
        # the hull of the allowed key runs; the kernel masks any gap inside it
        kb, ke = k_runs[cols[0]][0], k_runs[cols[-1]][1]
        prev = calls[-1] if calls else None
        if prev is not None and prev.q_end == qb and (prev.k_begin, prev.k_end) == (kb, ke):
            calls[-1] = TileCall(prev.q_begin, qe, kb, ke)
        else:
            calls.append(TileCall(qb, qe, kb, ke))
    return calls


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
