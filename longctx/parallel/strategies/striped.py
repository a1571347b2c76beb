"""Striped attention: the ring over a striped layout, where causal work is even at every step.

Token ``t`` lives on rank ``(t // w) % P`` (stripe width ``w``, default 1).  Every rank then holds
an even sample of the whole sequence, so under a causal mask every (query shard, key shard) pair
is a near-triangle of the same size: each ring step costs every rank about half a block, instead
of the contiguous ring's mix of full, diagonal and empty blocks (Brandon et al., 2023).  The
kernel applies the mask on the global positions ``rank + i * P``.

Example (on each rank; shards made with ``longctx.parallel.shard(x, "striped", P, rank)``)::

    out = longctx.attention(q, k, v, group, strategy="striped", mask=longctx.Mask(causal=True))
"""

from __future__ import annotations

from torch import Tensor

from .base import StrategySpec
from .ring import ring_backward, ring_forward

__all__ = ["SPEC", "striped_attention"]

SPEC = StrategySpec(
    name="striped",
    summary="the ring over a striped layout (token t on rank t mod P): causal work even at every step",
    default_layout="striped",
    layouts=("striped",),
    forward=ring_forward,
    backward=ring_backward,
)


def striped_attention(q: Tensor, k: Tensor, v: Tensor, group=None, **kwargs):
    """Striped ring attention on striped shards; see :func:`longctx.attention` for the arguments."""
    return SPEC.run(q, k, v, group, **kwargs)
