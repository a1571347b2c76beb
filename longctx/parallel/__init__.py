"""Context parallelism: sequence layouts, one module per strategy, and the public entry.

:data:`STRATEGIES` is the table of strategies and what each supports (see
:class:`~longctx.parallel.strategies.base.StrategySpec`).  Imports ``torch.distributed``; never
imports models or trainers.
"""

from .api import ContextParallelAttention, CPConfig, attention
from .context import CPContext, build_context
from .layout import Layout, document_ids, pad_to_multiple, positions, shard, unshard
from .strategies import STRATEGIES, Star, StrategySpec, get_strategy

__all__ = [
    "STRATEGIES",
    "CPConfig",
    "CPContext",
    "ContextParallelAttention",
    "Layout",
    "Star",
    "StrategySpec",
    "attention",
    "build_context",
    "document_ids",
    "get_strategy",
    "pad_to_multiple",
    "positions",
    "shard",
    "unshard",
]
