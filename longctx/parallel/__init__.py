"""Context parallelism: sequence layouts, one module per strategy, and the public entry.

Imports ``torch.distributed``; never imports models or trainers.
"""

from .api import ContextParallelAttention, CPConfig, attention
from .context import CPContext, build_context
from .layout import Layout, document_ids, pad_to_multiple, positions, shard, unshard
from .strategies import STRATEGIES, Star

__all__ = [
    "STRATEGIES",
    "CPConfig",
    "CPContext",
    "ContextParallelAttention",
    "Layout",
    "Star",
    "attention",
    "build_context",
    "document_ids",
    "pad_to_multiple",
    "positions",
    "shard",
    "unshard",
]
