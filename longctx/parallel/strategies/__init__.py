"""The context-parallel strategies: one module each, and the one table that lists them.

:data:`STRATEGIES` maps each name to its :class:`~longctx.parallel.strategies.base.StrategySpec`:
the layouts it runs on and assumes, the mask pieces, GQA and return values it supports, the kernel
family it calls, and its math.  :func:`longctx.attention`, :class:`~longctx.parallel.CPConfig`,
:func:`~longctx.parallel.api.choose_strategy` and the trainer's config all read this table.

Example::

    >>> from longctx.parallel.strategies import STRATEGIES
    >>> [name for name, s in STRATEGIES.items() if s.default_layout != "contiguous"]
    ['zigzag', 'striped']
    >>> STRATEGIES["ulysses"].head_split, STRATEGIES["linear"].return_lse
    (True, False)
"""

from . import allgather, hybrid, linear, ring, star, striped, ulysses, zigzag
from .allgather import allgather_attention
from .base import MASK_PIECES, CPAttention, StrategySpec, mask_pieces
from .hybrid import hybrid_attention
from .linear import linear_attention
from .ring import ring_attention
from .star import Star, star_attention
from .striped import striped_attention
from .ulysses import ulysses_attention
from .zigzag import zigzag_attention

STRATEGIES: dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        ring.SPEC,
        zigzag.SPEC,
        striped.SPEC,
        allgather.SPEC,
        ulysses.SPEC,
        hybrid.SPEC,
        star.SPEC,
        linear.SPEC,
    )
}


def get_strategy(strategy: "str | Star") -> StrategySpec:
    """The spec of a strategy name (or of a :class:`Star`), with an error listing the names.

    Example::

        >>> get_strategy("zigzag").layouts
        ('zigzag',)
    """
    if isinstance(strategy, Star):
        return STRATEGIES["star"]
    try:
        return STRATEGIES[strategy]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)} (star: pass "
            "strategy=longctx.Star(anchor_len, query_len)) or 'auto'"
        ) from None


__all__ = [
    "MASK_PIECES",
    "STRATEGIES",
    "CPAttention",
    "Star",
    "StrategySpec",
    "allgather_attention",
    "get_strategy",
    "hybrid_attention",
    "linear_attention",
    "mask_pieces",
    "ring_attention",
    "star_attention",
    "striped_attention",
    "ulysses_attention",
    "zigzag_attention",
]
