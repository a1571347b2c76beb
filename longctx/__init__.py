"""longctx: context-parallel attention, fused local kernels and models for very long sequences.

Example::

    >>> import torch, longctx
    >>> q = torch.randn(1, 32, 4, 16); k = v = torch.randn(1, 32, 2, 16)
    >>> longctx.attention(q, k, v, mask=longctx.Mask(causal=True)).shape
    torch.Size([1, 32, 4, 16])
"""

from .kernels import BlockSparse, Mask, Positions, available_kernels, get_kernel, retnet_log_decay
from .parallel import (
    ContextParallelAttention,
    CPConfig,
    Layout,
    Star,
    attention,
    shard,
    unshard,
)
from .parallel.strategies import linear_attention

__version__ = "0.1.0"

__all__ = [
    "BlockSparse",
    "CPConfig",
    "ContextParallelAttention",
    "Layout",
    "Mask",
    "Positions",
    "Star",
    "attention",
    "available_kernels",
    "get_kernel",
    "linear_attention",
    "retnet_log_decay",
    "shard",
    "unshard",
]
