"""Run a :class:`~longctx.models.LlamaModel` block by block with a caller-supplied attention.

Inference needs the model's own modules (its weights, norms, RoPE) with a different attention
in the middle of each block: star phase 1, a ring, or phase 2 against a sharded KV cache.
:func:`block_forward` calls a block's submodules in exactly the order of
:class:`~longctx.models.llama.TransformerBlock` (``attention_norm -> attention.qkv -> attend ->
attention.project_out -> residual -> ffn_norm -> feed_forward -> residual``), so with the model's
own attention core it reproduces ``LlamaModel.forward`` bit for bit (``tests/test_inference.py``
checks it).  Nothing is copied out of the model.

Example::

    >>> import torch
    >>> from longctx.models import LlamaModel, ModelConfig, SequenceContext
    >>> from longctx.inference.layers import block_forward, rope_for
    >>> model = LlamaModel(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
    ...                                vocab_size=64), seed=0)
    >>> ids = torch.randint(0, 64, (2, 8))
    >>> x = model.embedding(ids)                                   # [B, S, hidden]
    >>> rope = rope_for(model, torch.arange(8), x.dtype)
    >>> seq = SequenceContext.single_device(8)
    >>> attend = lambda q, k, v: model.layers[0].attention.core(q, k, v, seq)
    >>> y = model.norm(block_forward(model.layers[0], x, rope, attend))
    >>> torch.equal(y, model(ids, seq))
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..models.llama import LlamaModel, TransformerBlock, rope_cos_sin

__all__ = ["AttendFn", "block_forward", "check_softmax_model", "rope_for"]

# attend(q [B, S, H, D], k [B, S, H_kv, D], v [B, S, H_kv, D]) -> out [B, S, H, D]; q and k are
# already rotated by RoPE at their global positions.
AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def check_softmax_model(model: LlamaModel) -> None:
    """Raise unless every layer is softmax attention (the KV cache of this package)."""
    linear = [i for i, kind in enumerate(model.config.layer_kinds) if kind != "softmax"]
    if linear:
        raise NotImplementedError(
            f"layers {linear} are linear attention; CP inference here keeps a softmax KV cache "
            "(star/ring prefill, sharded decode). A linear layer would need its state carried "
            "instead; serve hybrid models with the training forward (longctx.models) for now"
        )


def rope_for(model: LlamaModel, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoPE ``cos, sin [S, head_dim / 2]`` for tokens at global ``positions [S]``.

    ``dtype`` is the dtype of the hidden states; the tables are built as ``LlamaModel.forward``
    builds them (at least float32).
    """
    cfg = model.config
    rope_dtype = torch.promote_types(dtype, torch.float32)
    device = model.embedding.weight.device
    return rope_cos_sin(positions.to(device), cfg.kv_channels, cfg.rotary_base, rope_dtype)


def block_forward(
    block: TransformerBlock, x_bsh: Tensor, rope: tuple[Tensor, Tensor], attend: AttendFn
) -> Tensor:
    """One pre-norm block with ``attend`` as its attention: ``x [B, S, hidden]`` -> same shape.

    ``h = x + wo(attend(qkv(norm(x)))); out = h + ffn(norm(h))``, calling the block's own
    submodules in ``TransformerBlock.forward``'s order.
    """
    q, k, v = block.attention.qkv(block.attention_norm(x_bsh), rope)
    h = x_bsh + block.attention.project_out(attend(q, k, v))
    return h + block.feed_forward(block.ffn_norm(h))
