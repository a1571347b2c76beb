"""Context-parallel inference: distributed prefill (star or ring), decode over a sharded KV cache.

A long context is split contiguously over the ranks of a CP group.  Phase 1 (prefill) runs the
model on every rank's block, with star attention (each block sees the anchor and itself) or an
exact ring; every rank keeps its block's K/V.  Phase 2 (a query segment, then one token per step)
runs on the query rank, the last one: per layer its queries are broadcast, every rank attends
them to its cached K/V, and the partial results are merged by their log-sum-exp.

- :func:`generate`: prefill + query segment + greedy/sampled generation (token ids).
- :func:`prefill`, :func:`extend`: the two phases, for custom loops.
- :class:`PrefillConfig`, :class:`GenerationConfig`, :class:`SamplingConfig`: settings.
- :class:`ShardedKVCache`, :class:`LayerKV`: the per-rank cache.
- :func:`block_forward`: one model block with a caller-supplied attention.

Example (one process)::

    >>> import torch
    >>> from longctx.models import LlamaModel, ModelConfig
    >>> from longctx.inference import GenerationConfig, PrefillConfig, generate
    >>> model = LlamaModel(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
    ...                                vocab_size=64), seed=0)
    >>> context = torch.randint(0, 64, (1, 32))
    >>> out = generate(model, context, prefill=PrefillConfig(mode="star", anchor_len=8),
    ...                generation=GenerationConfig(max_new_tokens=4))
    >>> out.tokens.shape
    torch.Size([1, 4])
"""

from .cache import LayerKV, ShardedKVCache
from .decode import cache_partial, extend, phase2_attention
from .generate import GenerationConfig, GenerationResult, check_prompt, generate
from .layers import AttendFn, block_forward, rope_for
from .prefill import PrefillConfig, PrefillState, prefill, star_context_attention
from .sampling import SamplingConfig, sample_next

__all__ = [
    "AttendFn",
    "GenerationConfig",
    "GenerationResult",
    "LayerKV",
    "PrefillConfig",
    "PrefillState",
    "SamplingConfig",
    "ShardedKVCache",
    "block_forward",
    "cache_partial",
    "check_prompt",
    "extend",
    "generate",
    "phase2_attention",
    "prefill",
    "rope_for",
    "sample_next",
    "star_context_attention",
]
