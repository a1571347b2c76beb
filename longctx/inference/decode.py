"""Phase 2: tokens after the context attend to the whole sharded KV cache, merged by LSE.

The new tokens (a query segment, or one generated token per step) live on the *query rank*
(the last one), which runs the model's non-attention parts for them.  Per layer:

1. the query rank computes ``q, k, v`` of the new tokens (RoPE at their global positions) and
   appends ``k, v`` to its cache;
2. ``q [B, T, H, D]`` is broadcast to every rank;
3. every rank scores it against the keys it caches (the local kernel, causal mask on global
   positions) and gets a partial ``(out, lse)``;
4. the partials are gathered to the query rank (one collective: ``out`` and ``lse`` packed as
   ``[B, T, H, D + 1]``) and merged by their LSE (:func:`~longctx.kernels.merge.merge_partials`);
   the query rank continues the block with the merged output.

No K/V ever moves.  The other ranks only take part in the two collectives and their kernel call.
The same code follows a star prefill and a ring prefill.

Example (one process: the whole cache is local)::

    >>> import torch
    >>> from longctx.models import LlamaModel, ModelConfig
    >>> from longctx.inference import PrefillConfig, extend, prefill
    >>> model = LlamaModel(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
    ...                                num_query_groups=2, vocab_size=64), seed=0)
    >>> ids = torch.randint(0, 64, (2, 12))
    >>> state = prefill(model, ids, config=PrefillConfig(mode="ring"), reserve=3)
    >>> hidden = extend(model, state.cache, torch.randint(0, 64, (2, 3)))  # [B, T, hidden]
    >>> hidden.shape, state.cache.seq_len, state.cache.layers[0].length
    (torch.Size([2, 3, 32]), 15, 15)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels.base import AttentionKernel, acc_dtype, get_kernel
from ..kernels.mask import Mask, Positions
from ..kernels.merge import merge_partials
from ..models.llama import LlamaModel
from ..parallel.comm import GatherComm
from ..parallel.context import resolve_group
from .cache import LayerKV, ShardedKVCache
from .layers import block_forward, check_softmax_model, rope_for

__all__ = ["cache_partial", "extend", "phase2_attention"]

_CAUSAL = Mask(causal=True)


def cache_partial(
    q: Tensor, layer: LayerKV, q_pos: Positions, kernel: AttentionKernel, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of ``q [B, T, H, D]`` at ``q_pos`` to one rank's cached keys, causal.

    Returns the partial ``out [B, T, H, D]`` and ``lse [B, H, T]`` in the accumulation dtype.
    The keys before the first query (all of them off the query rank) and the new keys (the
    queries' own positions) are two kernel calls, a full block and an aligned-causal diagonal:
    both shapes the vendor kernels take.
    """
    q_start = next(q_pos.bounds())[0]
    n_past = min(max(q_start - layer.start, 0), layer.length)
    out = lse = None
    for begin, end in ((0, n_past), (n_past, layer.length)):
        if begin == end:
            continue
        o, o_lse = kernel.forward(
            q, layer.k[:, begin:end], layer.v[:, begin:end], scale=scale, mask=_CAUSAL,
            q_pos=q_pos, k_pos=layer.positions(begin, end),
        )
        o = o.to(acc_dtype(q.dtype))
        out, lse = (o, o_lse) if out is None else merge_partials(out, lse, o, o_lse)
    if out is None:  # an empty cache: no allowed key
        B, T, H, D = q.shape
        out = q.new_zeros(B, T, H, D, dtype=acc_dtype(q.dtype))
        lse = torch.full((B, H, T), float("-inf"), dtype=out.dtype, device=q.device)
    return out, lse


def phase2_attention(
    q: Tensor | None, layer: LayerKV, comm: GatherComm, *, query_rank: int, q_pos: Positions,
    q_shape: tuple[int, int, int, int], kernel: AttentionKernel, scale: float,
) -> Tensor | None:
    """One layer of phase 2 on every rank: broadcast q, partial per rank, LSE merge.

    Args:
        q: ``[B, T, H, D]`` on the query rank (the new tokens' queries, RoPE applied); ignored
            elsewhere (pass None).
        layer: this rank's cache of the layer (the query rank has already appended the new
            tokens' K/V).
        comm: collectives over the CP group.
        query_rank: the rank that holds the new tokens.
        q_pos: the new tokens' global positions.
        q_shape: ``(B, T, H, D)``, so that the other ranks can receive ``q``.
        kernel, scale: the local kernel and the score scale.

    Returns:
        The merged ``out [B, T, H, D]`` (q's dtype) on the query rank, None on the others.
    """
    on_query = comm.rank == query_rank
    if not on_query:
        q = layer.k.new_empty(q_shape)
    q = comm.broadcast(q, query_rank)
    out, lse = cache_partial(q, layer, q_pos, kernel, scale)
    # [B, T, H, D] ++ [B, H, T] -> [B, T, H, 1] -> packed [B, T, H, D + 1]: one collective
    packed = torch.cat([out, lse.transpose(1, 2).unsqueeze(-1)], dim=-1)
    parts = comm.all_gather(packed)  # [P, B, T, H, D + 1]
    if not on_query:
        return None
    D = q_shape[-1]
    out, lse = parts[0, ..., :D], parts[0, ..., D].transpose(1, 2)  # lse: [B, T, H] -> [B, H, T]
    for r in range(1, comm.world_size):
        out, lse = merge_partials(out, lse, parts[r, ..., :D], parts[r, ..., D].transpose(1, 2))
    return out.to(q.dtype)


def extend(
    model: LlamaModel, cache: ShardedKVCache, new_ids: Tensor, group=None, *,
    kernel: "str | AttentionKernel" = "reference",
) -> Tensor | None:
    """Run ``new_ids [B, T]`` (the tokens after ``cache.seq_len``) through the model as phase 2.

    Call it on every rank with the same ``new_ids`` (the other ranks only read its shape).  The
    query rank appends the tokens' K/V to its cache; ``cache.seq_len`` advances by ``T`` on every
    rank.

    Returns:
        ``hidden [B, T, hidden]`` (final norm applied; :meth:`LlamaModel.logits` gives the logits)
        on the query rank, None on the others.
    """
    check_softmax_model(model)
    comm = GatherComm(resolve_group(group))
    if comm.world_size != cache.world_size or comm.rank != cache.rank:
        raise ValueError(
            f"the cache was built on rank {cache.rank} of {cache.world_size} but this call runs on "
            f"rank {comm.rank} of {comm.world_size}: pass the group the prefill used"
        )
    if len(cache.layers) != len(model.layers):
        raise ValueError(
            f"the cache has {len(cache.layers)} layers but the model has {len(model.layers)}: "
            "use the cache prefilled by this model"
        )
    if new_ids.dim() != 2 or new_ids.shape[0] != cache.batch_size or new_ids.shape[1] == 0:
        raise ValueError(
            f"new_ids must be [batch={cache.batch_size}, tokens >= 1]; got "
            f"{tuple(new_ids.shape)}"
        )
    kernel = get_kernel(kernel)
    cfg = model.config
    B, T = new_ids.shape
    q_shape = (B, T, cfg.num_attention_heads, cfg.kv_channels)
    scale = 1.0 / math.sqrt(cfg.kv_channels)
    q_pos = Positions.contiguous(cache.seq_len, T)
    common = dict(
        query_rank=cache.query_rank, q_pos=q_pos, q_shape=q_shape, kernel=kernel, scale=scale
    )
    with torch.inference_mode():
        if cache.is_query_rank:
            hidden = _query_rank_layers(model, cache, new_ids, comm, common)
        else:
            for layer in cache.layers:
                phase2_attention(None, layer, comm, **common)
            hidden = None
    cache.seq_len += T
    return hidden


def _query_rank_layers(
    model: LlamaModel, cache: ShardedKVCache, new_ids: Tensor, comm: GatherComm, common: dict
) -> Tensor:
    """The query rank's part of :func:`extend`: the whole model on the new tokens."""
    p0, T = cache.seq_len, new_ids.shape[1]
    x = model.embedding(new_ids.to(model.embedding.weight.device))  # [B, T, hidden]
    rope = rope_for(model, torch.arange(p0, p0 + T), x.dtype)
    for block, layer in zip(model.layers, cache.layers, strict=True):

        def attend(q: Tensor, k: Tensor, v: Tensor, layer: LayerKV = layer) -> Tensor:
            layer.append(k, v)
            return phase2_attention(q, layer, comm, **common)

        x = block_forward(block, x, rope, attend)
    return model.norm(x)
