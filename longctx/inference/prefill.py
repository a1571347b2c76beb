"""Distributed prefill of a long context (phase 1): every rank runs the model on its block.

The context of ``S`` tokens is split contiguously over the ``P`` ranks of the CP group
(``L = S / P`` tokens each).  Each rank runs the model's embedding, norms, projections and MLPs
on its own block; per layer, attention goes one of two ways (:class:`PrefillConfig`):

- ``"star"`` (Star Attention, phase 1): a block attends causally to itself and to the *anchor*,
  the first ``anchor_len`` tokens of the context, whose K/V (after RoPE) are broadcast from
  rank 0; nothing else is communicated.  Approximate for ``P > 1`` (a block does not see the
  blocks between the anchor and itself), exact when the context fits in one block (``P = 1``, or
  ``P = 2`` with the anchor covering rank 0's block).
- ``"ring"``: exact causal attention with :func:`longctx.attention` (``strategy="ring"``).

Each rank keeps its block's K/V in a :class:`~longctx.inference.cache.ShardedKVCache`; the
anchor's K/V stay only in rank 0's cache.  The query rank (the last) reserves room for the
tokens that phase 2 will append.

Example (one process: ``P = 1``, star is exact)::

    >>> import torch
    >>> from longctx.models import LlamaModel, ModelConfig
    >>> from longctx.inference import PrefillConfig, prefill
    >>> model = LlamaModel(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
    ...                                vocab_size=64), seed=0)
    >>> ids = torch.randint(0, 64, (2, 16))                  # [B, L]: this rank's block
    >>> state = prefill(model, ids, config=PrefillConfig(mode="star", anchor_len=4))
    >>> state.last_hidden.shape, state.cache.context_len, state.cache.layers[1].keys().shape
    (torch.Size([2, 32]), 16, torch.Size([2, 16, 4, 8]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..kernels.base import AttentionKernel, acc_dtype, get_kernel
from ..kernels.mask import Mask, Positions
from ..kernels.merge import merge_partials
from ..models.llama import LlamaModel
from ..parallel.api import attention as cp_attention
from ..parallel.comm import GatherComm
from ..parallel.context import resolve_group
from .cache import LayerKV, ShardedKVCache
from .layers import block_forward, check_softmax_model, rope_for

__all__ = ["PrefillConfig", "PrefillState", "prefill", "star_context_attention"]

PrefillMode = Literal["star", "ring"]
_MODES = ("star", "ring")
_CAUSAL = Mask(causal=True)


@dataclass(frozen=True)
class PrefillConfig:
    """How the context is prefilled.

    - ``mode``: ``"star"`` (anchor + own block, approximate) or ``"ring"`` (exact).
    - ``anchor_len``: star only; tokens of the anchor (a prefix of rank 0's block).  ``None``
      means one whole block (``S / P``), Star Attention's choice.  Must be ``<= S / P``.
    - ``kernel``: the local attention kernel (``longctx.kernels.available_kernels()``), used by
      the prefill and by phase 2; ``"auto"`` picks the fastest one per call on a GPU.
    """

    mode: PrefillMode = "star"
    anchor_len: int | None = None
    kernel: str = "reference"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"PrefillConfig.mode={self.mode!r}; choose 'star' or 'ring'")
        if self.anchor_len is not None and (
            not isinstance(self.anchor_len, int) or self.anchor_len < 0
        ):
            raise ValueError(
                f"PrefillConfig.anchor_len={self.anchor_len!r}; use a token count >= 0, or None "
                "for one whole block"
            )

    def anchor_for(self, shard_len: int) -> int:
        """The anchor length on blocks of ``shard_len`` tokens (raises when it does not fit)."""
        if self.anchor_len is None:
            return shard_len
        if self.anchor_len > shard_len:
            raise ValueError(
                f"PrefillConfig.anchor_len={self.anchor_len} is longer than a block: the context "
                f"is split into blocks of {shard_len} tokens per rank and the anchor is a prefix "
                f"of rank 0's block; use anchor_len <= {shard_len} (or None for one block), a "
                "longer context, or fewer ranks"
            )
        return self.anchor_len


@dataclass(eq=False)
class PrefillState:
    """What a prefill leaves on each rank.

    - ``cache``: this rank's :class:`ShardedKVCache`;
    - ``last_hidden [B, hidden]``: the final hidden state (final norm applied) of this rank's last
      context token; on the query rank that is the context's last token, whose logits give the
      first generated token when there is no query segment.
    """

    cache: ShardedKVCache
    last_hidden: Tensor


def star_context_attention(
    q: Tensor, k: Tensor, v: Tensor, comm: GatherComm, *, anchor_len: int, block_start: int,
    kernel: AttentionKernel, scale: float,
) -> Tensor:
    """Star phase 1 for one rank's block: ``q [B, L, H, D]``, ``k``/``v [B, L, H_kv, D]``.

    Causal attention to the block itself, merged by LSE with attention to the anchor (the K/V of
    global positions ``0 .. anchor_len - 1``, broadcast from rank 0; rank 0's own block already
    holds them).  Returns ``out [B, L, H, D]`` in q's dtype.
    """
    B, L, Hkv, D = k.shape
    own = Positions.contiguous(block_start, L)
    out, lse = kernel.forward(q, k, v, scale=scale, mask=_CAUSAL, q_pos=own, k_pos=own)
    if comm.world_size == 1 or anchor_len == 0:
        return out
    # k, v [B, A, H_kv, D] each -> [2, B, A, H_kv, D]: one broadcast
    anchor = torch.stack([k[:, :anchor_len], v[:, :anchor_len]]) if comm.rank == 0 else (
        k.new_empty(2, B, anchor_len, Hkv, D)
    )
    anchor = comm.broadcast(anchor, 0)
    if comm.rank == 0:
        return out
    out_a, lse_a = kernel.forward(
        q, anchor[0], anchor[1], scale=scale, mask=_CAUSAL, q_pos=own,
        k_pos=Positions.contiguous(0, anchor_len),
    )
    merged, _ = merge_partials(out_a.to(acc_dtype(q.dtype)), lse_a, out, lse)
    return merged.to(q.dtype)


def prefill(
    model: LlamaModel, local_ids: Tensor, group=None, *, config: PrefillConfig = PrefillConfig(),
    reserve: int = 0,
) -> PrefillState:
    """Prefill this rank's contiguous block ``local_ids [B, L]`` of a context of ``L * P`` tokens.

    Call on every rank of ``group`` (a ProcessGroup, a 1-D DeviceMesh, or None for one process)
    with its block: rank ``r`` holds context tokens ``r*L .. (r+1)*L - 1``.  ``reserve`` is the
    number of tokens phase 2 will add (query segment + new tokens): the query rank allocates its
    cache for them up front.  Runs under ``torch.inference_mode``.

    Returns:
        A :class:`PrefillState` (this rank's cache and last hidden state).
    """
    check_softmax_model(model)
    comm = GatherComm(resolve_group(group))
    if local_ids.dim() != 2 or local_ids.dtype.is_floating_point:
        raise ValueError(
            "local_ids must be integer token ids [batch, tokens of this rank's block]; got "
            f"shape {tuple(local_ids.shape)} dtype {local_ids.dtype}"
        )
    L = local_ids.shape[1]
    if L == 0:
        raise ValueError("the context block is empty: every rank needs at least one token")
    P, rank = comm.world_size, comm.rank
    anchor_len = config.anchor_for(L) if config.mode == "star" else 0
    kernel = get_kernel(config.kernel)
    cfg = model.config
    scale = 1.0 / math.sqrt(cfg.kv_channels)
    start = rank * L
    group = comm.group
    layers: list[LayerKV] = []

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        layers.append(LayerKV.from_kv(k, v, start, reserve if rank == P - 1 else 0))
        if config.mode == "ring":
            return cp_attention(
                q, k, v, group, strategy="ring", layout="contiguous", mask=_CAUSAL,
                kernel=kernel, scale=scale,
            )
        return star_context_attention(
            q, k, v, comm, anchor_len=anchor_len, block_start=start, kernel=kernel, scale=scale
        )

    with torch.inference_mode():
        x = model.embedding(local_ids.to(model.embedding.weight.device))  # [B, L, hidden]
        rope = rope_for(model, torch.arange(start, start + L), x.dtype)
        for block in model.layers:
            x = block_forward(block, x, rope, attend)
        last_hidden = model.norm(x[:, -1])  # [B, hidden]
    cache = ShardedKVCache(layers, rank=rank, world_size=P, context_len=L * P, seq_len=L * P)
    return PrefillState(cache, last_hidden)
