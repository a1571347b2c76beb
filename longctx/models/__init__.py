"""Megatron-style config and a GPT/Llama decoder (single-device code) whose attention calls
:func:`longctx.attention`; parallelism is applied in one place, :func:`parallelize_model`
(:mod:`longctx.models.parallelize`).

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
from .parallelize import (
    ParallelConfig,
    clip_grad_norm_,
    parallelize_model,
    reduce_gradients,
    validate_parallel_dims,
)

__all__ = [
    "Attention",
    "FeedForward",
    "LlamaModel",
    "ModelConfig",
    "ParallelConfig",
    "RMSNorm",
    "SequenceContext",
    "TransformerBlock",
    "apply_rope",
    "attention_flops_per_token",
    "clip_grad_norm_",
    "flops_per_token",
    "matmul_flops_per_token",
    "num_params",
    "parallelize_model",
    "reduce_gradients",
    "rope_cos_sin",
    "validate_parallel_dims",
]
