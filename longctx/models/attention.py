"""The attention modules of a layer, for one device: softmax :class:`Attention` and
:class:`LinearAttention`, and the rotary embedding they apply on global positions.

Context parallelism enters only through :func:`longctx.attention` (the ``seq`` context carries
the group, the mask and the positions); :mod:`longctx.models.llama` builds blocks of these, and
the trainable sparse layers (:mod:`longctx.models.sparse`) extend :class:`Attention`.

Example::

    >>> import torch
    >>> from longctx.models import ModelConfig, SequenceContext
    >>> cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
    ...                   num_query_groups=2, vocab_size=64, seq_length=16)
    >>> attn = Attention(cfg)
    >>> rope = rope_cos_sin(torch.arange(16), cfg.head_dim, base=10000.0)
    >>> attn(torch.randn(1, 16, 32), rope, SequenceContext.single_device(16)).shape
    torch.Size([1, 16, 32])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.linear import available_linear_kernels, retnet_log_decay
from ..kernels.mask import Mask
from ..parallel.api import attention as cp_attention
from .config import ModelConfig
from .context import SequenceContext

__all__ = ["Attention", "LinearAttention", "RMSNorm", "apply_rope", "rope_cos_sin"]


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
