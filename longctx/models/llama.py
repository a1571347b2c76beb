"""A GPT/Llama-style decoder written for one device; context parallelism enters only via attention.

``LlamaModel.forward(input_ids [B, S_local], seq) -> hidden [B, S_local, hidden]``: embedding,
``num_layers`` pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> SwiGLU -> residual),
final RMSNorm.  The output projection is separate (:meth:`LlamaModel.logits`,
:attr:`LlamaModel.output_weight`) so a trainer can compute the loss in sequence chunks without
ever holding ``[tokens, vocab]`` logits.

The same code runs with and without parallelism:

- **CP**: ``seq`` (a :class:`~longctx.models.context.SequenceContext`) carries this rank's global
  token positions, the mask and the CP group; RoPE rotates each token by its *global* position and
  attention is :func:`longctx.attention`, so a rank's shard needs nothing else.
- **TP**: every reshape reads the local head count from the tensor itself
  (``view(B, S, -1, head_dim)``), so after ``wq``/``wk``/``wv`` are sharded column-wise the module
  sees ``heads / tp`` heads.  Parallelism is applied in :mod:`longctx.models.parallelize`.
- **GQA**: ``wk``/``wv`` produce ``num_query_groups`` heads; they are never expanded.
- **Hybrid linear/softmax** (``ModelConfig.attention_kinds``): a ``"linear"`` layer is a
  :class:`LinearAttention` (Lightning-Attention-2 kernel, LASP-2 CP) with the same projection
  names, so TP, FSDP, checkpointing and init treat both kinds alike; ``"moba"`` / ``"nsa"``
  layers are the trainable sparse attentions of :mod:`longctx.models.sparse.layers`.

Weight names (``wq wk wv wo``, ``w1`` gate, ``w3`` up, ``w2`` down) match torchtitan's, so the
TP plan is a table of names.

Example::

    >>> import torch
    >>> from longctx.models import LlamaModel, ModelConfig, SequenceContext
    >>> cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
    ...                   num_query_groups=2, vocab_size=64, seq_length=16)
    >>> model = LlamaModel(cfg, seed=0)
    >>> ids = torch.randint(0, 64, (2, 16))
    >>> hidden = model(ids, SequenceContext.single_device(16))
    >>> hidden.shape, model.logits(hidden).shape
    (torch.Size([2, 16, 32]), torch.Size([2, 16, 64]))
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, LinearAttention, RMSNorm, apply_rope, rope_cos_sin
from .config import ModelConfig
from .context import SequenceContext
from .sparse.layers import MobaAttention, NSAAttention

__all__ = [
    "Attention",
    "LinearAttention",
    "FeedForward",
    "LlamaModel",
    "RMSNorm",
    "TransformerBlock",
    "apply_rope",
    "rope_cos_sin",
]

# Wrapper prefixes that parallelize_model may add to parameter names (checkpoint_wrapper).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)`` with ``w1`` the gate, ``w3`` up, ``w2`` down."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        kw = dict(bias=False, device=device, dtype=dtype)
        self.w1 = nn.Linear(h, f, **kw)
        self.w3 = nn.Linear(h, f, **kw)
        self.w2 = nn.Linear(f, h, **kw)

    def forward(self, x_bsh: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x_bsh)) * self.w3(x_bsh))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``, ``[B, S, hidden]``;
    ``attn`` is :class:`Attention` or :class:`LinearAttention` (``config.layer_kinds``).

    The forward runs in three parts: ``pre`` (norm, q/k/v projections, RoPE), the attention
    ``core`` (:func:`longctx.attention`: kernels and CP communication) and ``post`` (``wo``,
    residual, norm, MLP, residual). :func:`~longctx.models.parallelize.parallelize_model` uses the
    seams: :meth:`compile_around_attention` compiles ``pre`` and ``post`` (the core stays eager),
    and ``recompute_around_attention`` (selective activation checkpointing) recomputes ``pre`` and
    ``post`` in backward but never the core, whose inputs and outputs attention keeps anyway: the
    quadratic part and its communication never run twice.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = config.layer_kinds[layer_idx]
        self.attention_norm = RMSNorm(config.hidden_size, config.norm_epsilon, device, dtype)
        self.attention: Attention | LinearAttention = _layer_class(self.kind)(config, device, dtype)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_epsilon, device, dtype)
        self.feed_forward = FeedForward(config, device, dtype)
        self.recompute_around_attention = False
        self._compiled: tuple[Any, Any] | None = None  # (pre, post) once compiled

    def forward(self, x_bsh: Tensor, rope: tuple[Tensor, Tensor], seq: SequenceContext) -> Tensor:
        pre, post = self._compiled or (self._pre_attention, self._post_attention)
        # parts: (q, k, v), plus the gates of NSA layers
        if self.recompute_around_attention:
            parts = checkpoint(pre, x_bsh, rope, use_reentrant=False)
            out = self.attention.core(*parts, seq)
            return checkpoint(post, x_bsh, out, use_reentrant=False)
        parts = pre(x_bsh, rope)
        return post(x_bsh, self.attention.core(*parts, seq))

    def compile_around_attention(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` the parts before and after the attention core (kwargs passed on)."""
        self._compiled = (
            torch.compile(self._pre_attention, **compile_kwargs),
            torch.compile(self._post_attention, **compile_kwargs),
        )

    def _pre_attention(self, x_bsh: Tensor, rope: tuple[Tensor, Tensor]):
        return self.attention.qkv(self.attention_norm(x_bsh), rope)

    def _post_attention(self, x_bsh: Tensor, out_bshd: Tensor) -> Tensor:
        h = x_bsh + self.attention.project_out(out_bshd)
        return h + self.feed_forward(self.ffn_norm(h))


def _layer_class(kind: str) -> type:
    """The attention module of a layer kind (``ModelConfig.attention_kinds``)."""
    kinds = {"moba": MobaAttention, "nsa": NSAAttention, "linear": LinearAttention}
    return kinds.get(kind, Attention)


class LlamaModel(nn.Module):
    """Embedding, ``num_layers`` :class:`TransformerBlock` s, final RMSNorm; output kept apart.

    Args:
        config: the :class:`~longctx.models.config.ModelConfig`.
        seed: weights are drawn by :meth:`init_weights` from this seed (skipped on ``meta``).
        device, dtype: where and in which dtype the parameters live.

    ``forward(input_ids [B, S_local], seq) -> hidden [B, S_local, hidden_size]`` (final norm
    applied); ``logits(hidden) -> [..., vocab_size]``. Attribute names: ``embedding``, ``layers``
    (a ModuleList of blocks), ``norm``, ``output`` (None when the embedding is tied).
    """

    def __init__(self, config: ModelConfig, *, seed: int = 0, device=None, dtype=None):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embedding = nn.Embedding(config.vocab_size, h, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            TransformerBlock(config, i, device, dtype) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(h, config.norm_epsilon, device, dtype)
        self.output = (
            nn.Linear(h, config.vocab_size, bias=False, device=device, dtype=dtype)
            if config.untie_embeddings_and_output_weights
            else None
        )
        if self.embedding.weight.device.type != "meta":
            self.init_weights(seed)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, seq: SequenceContext) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [batch, local_seq], got shape {tuple(input_ids.shape)}"
            )
        positions = seq.rope_position_ids
        if positions.shape[0] != input_ids.shape[1]:
            raise ValueError(
                f"SequenceContext has {positions.shape[0]} positions but input_ids holds "
                f"{input_ids.shape[1]} tokens per row; build the context for this rank's shard"
            )
        x_bsh = self.embedding(input_ids)  # [B, S, hidden]
        rope_dtype = torch.promote_types(x_bsh.dtype, torch.float32)
        rope = rope_cos_sin(
            positions.to(x_bsh.device), self.config.kv_channels, self.config.rotary_base,
            rope_dtype,
        )
        for layer in self.layers:
            x_bsh = layer(x_bsh, rope, seq)
        return self.norm(x_bsh)

    @property
    def output_weight(self) -> Tensor:
        """``[vocab_size, hidden_size]``: the output projection (the embedding when tied)."""
        return self.embedding.weight if self.output is None else self.output.weight

    def logits(self, hidden: Tensor) -> Tensor:
        """``hidden [..., hidden_size] -> [..., vocab_size]``; call on chunks of tokens."""
        if self.output is None:
            return F.linear(hidden, self.embedding.weight)
        return self.output(hidden)

    # -- init -----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Megatron's init: ``normal(0, init_method_std)``, ``wo``/``w2`` scaled by
        ``1/sqrt(2 num_layers)``, norms at one.

        Each parameter is drawn whole from a generator seeded by ``(seed, its name)`` on its
        device type, then this rank's shard is kept: the values do not depend on the parallel
        layout (TP, FSDP), on parameter order, or on wrappers, so a parallel model initialised
        after :func:`~longctx.models.parallelize.parallelize_model` (e.g. built on ``meta``, then
        ``to_empty``) equals a single-device model with the same seed.
        """
        std = self.config.init_method_std
        out_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, param in self.named_parameters():
            name = _canonical_name(name)
            if name.endswith("norm.weight"):
                full = torch.ones(param.shape, dtype=torch.float32)
            else:
                scaled = name.endswith(("wo.weight", "w2.weight"))
                gen_device = _local(param).device
                gen = torch.Generator(device=gen_device)
                gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                full = torch.empty(param.shape, dtype=torch.float32, device=gen_device)
                full.normal_(0.0, out_std if scaled else std, generator=gen)
            _copy_full_into(param, full)


def _canonical_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _local(param: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def _copy_full_into(param: Tensor, full: Tensor) -> None:
    """Copy the whole-tensor value ``full`` into ``param`` (this rank's shard if a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        shard = distribute_tensor(
            full.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        ).to_local()
        param.to_local().copy_(shard)
    else:
        param.copy_(full)
