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

from ..kernels.linear import available_linear_kernels, retnet_log_decay
from ..kernels.mask import Mask
from ..parallel.api import attention as cp_attention
from .config import ModelConfig
from .context import SequenceContext

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


# -- RoPE ---------------------------------------------------------------------------------------
def rope_cos_sin(
    positions: Tensor, head_dim: int, base: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos, sin ``[S, head_dim / 2]`` for tokens at ``positions [S]`` (integer, global).

    Angles ``pos * base^(-2i / head_dim)`` are formed in float64 so positions in the millions keep
    their fractional phase, then cast to ``dtype``.
    """
    if positions.dim() != 1:
        raise ValueError(f"RoPE positions must be 1-D [S], got shape {tuple(positions.shape)}")
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim
    )  # [D/2]
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [S, D/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x_bshd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, S, H, D]`` by position: pairs ``(x[i], x[i + D/2])`` turn by ``angle_i``.

    ``cos``/``sin`` are ``[S, D/2]`` (:func:`rope_cos_sin`); the rotation runs in their dtype (at
    least float32) and the result has ``x``'s dtype. Megatron's non-interleaved ("rotate half")
    convention.
    """
    dtype = torch.promote_types(x_bshd.dtype, cos.dtype)
    x = x_bshd.to(dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [B, S, H, D/2] each
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # [1, S, 1, D/2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x_bshd.dtype)


# -- layers -------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, reduced in at least float32."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Attention(nn.Module):
    """Softmax attention with RoPE and GQA; the score computation is :func:`longctx.attention`.

    ``forward(x [B, S, hidden], rope=(cos, sin), seq) -> [B, S, hidden]``. Head counts are read
    from the projections' outputs at run time, so column-sharded ``wq``/``wk``/``wv`` (tensor
    parallel) give ``heads / tp`` local heads without any change here.
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        h, D = config.hidden_size, config.kv_channels
        H, G = config.num_attention_heads, config.num_query_groups
        self.head_dim = D
        kw = dict(bias=False, device=device, dtype=dtype)
        self.wq = nn.Linear(h, H * D, **kw)
        self.wk = nn.Linear(h, G * D, **kw)
        self.wv = nn.Linear(h, G * D, **kw)
        self.wo = nn.Linear(H * D, h, **kw)

    def qkv(self, x_bsh: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Projections with RoPE: q ``[B, S, H_local, D]``, k/v ``[B, S, G_local, D]``."""
        B, S, _ = x_bsh.shape
        D = self.head_dim
        q = self.wq(x_bsh).view(B, S, -1, D)  # [B, S, H_local * D] -> [B, S, H_local, D]
        k = self.wk(x_bsh).view(B, S, -1, D)  # [B, S, G_local * D] -> [B, S, G_local, D]
        v = self.wv(x_bsh).view(B, S, -1, D)
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    @staticmethod
    def core(q: Tensor, k: Tensor, v: Tensor, seq: SequenceContext) -> Tensor:
        """Context-parallel attention on local shards: ``[B, S, H_local, D]``."""
        return cp_attention(
            q, k, v, seq.cp_group, strategy=seq.strategy, layout=seq.layout, mask=seq.mask,
            kernel=seq.kernel,
        )

    def project_out(self, out_bshd: Tensor) -> Tensor:
        """``[B, S, H_local, D]`` -> ``[B, S, hidden]`` (under TP: all-reduced by ``wo``)."""
        return self.wo(out_bshd.flatten(2))  # [B, S, H_local * D]

    def forward(self, x_bsh: Tensor, rope: tuple[Tensor, Tensor], seq: SequenceContext) -> Tensor:
        q, k, v = self.qkv(x_bsh, rope)
        return self.project_out(self.core(q, k, v, seq))


class LinearAttention(nn.Module):
    """Causal linear attention with per-head decay (TransNormerLLM's NormAttention, as in the
    Lightning-Attention layers of MiniMax-01), the same interface as :class:`Attention`.

    ``q = silu(wq x)``, ``k = silu(wk x)``, ``v = wv x`` (GQA heads as in :class:`Attention`; no
    RoPE: the decay carries position), ``o = sum_{j<=i} lambda_h^(i-j) (q_i . k_j) v_j`` scaled by
    ``head_dim ** -0.5`` with RetNet's fixed decays ``lambda_h = 1 - 2^(-5-h)``
    (:func:`~longctx.kernels.linear.retnet_log_decay`), then an RMS normalisation of each
    head's output (what keeps un-normalised linear attention stable; no gain: ``wo`` absorbs any
    per-channel scale, and a gain shared by the heads would need an all-reduce under TP) and
    ``wo``.  The core is :func:`longctx.attention` with ``strategy="linear"`` (LASP-2: one
    all-gather of states per call), which needs the **contiguous** layout under CP; documents in
    ``seq.mask`` reset the state.

    Under tensor parallelism the decays follow the global head index: ``parallelize_model`` sets
    :attr:`head_offset` to this rank's first head.
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        h, D = config.hidden_size, config.kv_channels
        H, G = config.num_attention_heads, config.num_query_groups
        self.head_dim = D
        self.num_heads = H  # global; the decays are indexed by global head
        self.head_offset = 0  # first global head of this rank (tensor parallel)
        # a fixed CPU tensor, not a buffer: checked on the host and copied to the GPU once
        self.global_log_decay = retnet_log_decay(H)
        kw = dict(bias=False, device=device, dtype=dtype)
        self.wq = nn.Linear(h, H * D, **kw)
        self.wk = nn.Linear(h, G * D, **kw)
        self.wv = nn.Linear(h, G * D, **kw)
        self.wo = nn.Linear(H * D, h, **kw)
        self.norm_epsilon = config.norm_epsilon

    def qkv(self, x_bsh: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Projections with the SiLU feature map: q ``[B, S, H_local, D]``, k/v ``[B, S, G_local,
        D]`` (``rope`` is unused: linear layers take position from the decay)."""
        B, S, _ = x_bsh.shape
        D = self.head_dim
        q = F.silu(self.wq(x_bsh)).view(B, S, -1, D)  # [B, S, H_local * D] -> [B, S, H_local, D]
        k = F.silu(self.wk(x_bsh)).view(B, S, -1, D)  # [B, S, G_local * D] -> [B, S, G_local, D]
        v = self.wv(x_bsh).view(B, S, -1, D)
        return q, k, v

    def log_decay(self, local_heads: int) -> Tensor:
        """``[local_heads]`` float32 log-decays of this rank's heads, on the CPU (checked there
        and moved with the call, so no step waits on a read-back from the GPU)."""
        return self.global_log_decay[self.head_offset:self.head_offset + local_heads]

    def core(self, q: Tensor, k: Tensor, v: Tensor, seq: SequenceContext) -> Tensor:
        """Context-parallel linear attention on local shards: ``[B, S, H_local, D]``."""
        if not seq.mask.causal or seq.mask.window is not None or seq.mask.block_sparse is not None:
            raise ValueError(
                f"linear attention layers are causal with optional documents; the sequence's "
                f"mask is {seq.mask}. Drop the window / block-sparse / non-causal mask, or make "
                "every layer softmax (model.attention_kinds)"
            )
        kernel = seq.kernel if seq.kernel in available_linear_kernels() else "auto"
        return cp_attention(
            q, k, v, seq.cp_group, strategy="linear", layout=seq.layout,
            mask=Mask(causal=True, cu_seqlens=seq.mask.cu_seqlens), kernel=kernel,
            log_decay=self.log_decay(q.shape[2]),
        )

    def project_out(self, out_bshd: Tensor) -> Tensor:
        """Per-head RMS normalisation, then ``[B, S, H_local, D]`` -> ``[B, S, hidden]``."""
        normed = F.rms_norm(out_bshd, (out_bshd.shape[-1],), None, self.norm_epsilon)
        return self.wo(normed.flatten(2))  # [B, S, H_local * D]

    def forward(self, x_bsh: Tensor, rope: tuple[Tensor, Tensor], seq: SequenceContext) -> Tensor:
        q, k, v = self.qkv(x_bsh, rope)
        return self.project_out(self.core(q, k, v, seq))


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
    if kind in ("moba", "nsa"):  # imported here: the sparse layers build on Attention
        from .sparse.layers import MobaAttention, NSAAttention

        return MobaAttention if kind == "moba" else NSAAttention
    return LinearAttention if kind == "linear" else Attention


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
