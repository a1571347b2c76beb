"""Megatron-style config and a GPT/Llama decoder (single-device code) whose attention calls
:func:`longctx.attention`; parallelism is applied in one place, :func:`parallelize_model`.

Example::

    >>> import torch
    >>> from longctx.models import LlamaModel, ModelConfig, SequenceContext
    >>> model = LlamaModel(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
    ...                                vocab_size=64), seed=0)
    >>> model(torch.zeros(1, 8, dtype=torch.long), SequenceContext.single_device(8)).shape
    torch.Size([1, 8, 32])
"""

from .config import (
    ModelConfig,
    attention_flops_per_token,
    flops_per_token,
    matmul_flops_per_token,
    num_params,
)
from .context import SequenceContext
from .llama import (
    Attention,
    FeedForward,
    LlamaModel,
    RMSNorm,
    TransformerBlock,
    apply_rope,
    rope_cos_sin,
)

__all__ = [
    "Attention",
    "FeedForward",
    "LlamaModel",
    "ModelConfig",
    "RMSNorm",
    "SequenceContext",
    "TransformerBlock",
    "apply_rope",
    "attention_flops_per_token",
    "flops_per_token",
    "matmul_flops_per_token",
    "num_params",
    "rope_cos_sin",
]
