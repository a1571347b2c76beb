"""Zigzag ring attention: the ring over megatron's zigzag layout, causal work balanced per step.

The sequence is cut into ``2P`` chunks and rank ``r`` holds chunks ``r`` and ``2P-1-r``.  Under a
causal mask every ring step then costs every rank the same: the diagonal step computes chunk
``r`` against itself and chunk ``2P-1-r`` against both; a step whose keys come from an earlier
rank computes both query chunks against the first key chunk only; one from a later rank, the
second query chunk against both key chunks.  :func:`~longctx.parallel.plan.plan_calls` derives
exactly these calls from the global positions, so the kernel never sees an empty chunk pair.

Example (on each rank; shards made with ``longctx.parallel.shard(x, "zigzag", P, rank)``)::

    out = longctx.attention(q, k, v, group, strategy="zigzag", mask=longctx.Mask(causal=True))
"""

from __future__ import annotations

from torch import Tensor

from .base import StrategySpec
from .ring import ring_backward, ring_forward

__all__ = ["SPEC", "zigzag_attention"]

SPEC = StrategySpec(
    name="zigzag",
    summary="the ring over megatron's zigzag layout (2P chunks): causal work even at every step",
    default_layout="zigzag",
    layouts=("zigzag",),
    forward=ring_forward,
    backward=ring_backward,
)


def zigzag_attention(q: Tensor, k: Tensor, v: Tensor, group=None, **kwargs):
    """Zigzag ring attention on zigzag shards; see :func:`longctx.attention` for the arguments."""
    return SPEC.run(q, k, v, group, **kwargs)
