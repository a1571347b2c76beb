"""Generation with a context-parallel prefill and a sharded KV cache.

:func:`generate` puts the pieces together on every rank of a CP group:

1. the context ``[B, S]`` is split contiguously (``L = S / P`` tokens per rank) and prefilled,
   star or ring (:mod:`longctx.inference.prefill`);
2. an optional query segment ``[B, Q]`` (a prompt suffix, e.g. the question after a long
   document; ``Q <= L``) runs as phase 2 (:mod:`longctx.inference.decode`): its tokens attend
   causally to the whole context and to one another, and their K/V join the query rank's cache;
3. tokens are generated one at a time: the query rank computes the logits of the last token and
   picks the next one (:mod:`longctx.inference.sampling`), the token is broadcast, and phase 2
   runs it through the model.  Star and ring prefills are followed by this same decode.

Batch rows share one context length and one query length.  The model must be a plain
(single-device code) :class:`~longctx.models.LlamaModel` with the same weights on every rank: no
tensor parallelism or FSDP sharding.

Example (one process; with a group, call it on every rank with the same arguments)::

    >>> import torch
    >>> from longctx.models import LlamaModel, ModelConfig
    >>> from longctx.inference import GenerationConfig, PrefillConfig, SamplingConfig, generate
    >>> model = LlamaModel(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
    ...                                vocab_size=64), seed=0)
    >>> g = torch.Generator().manual_seed(0)
    >>> context = torch.randint(0, 64, (2, 24), generator=g)        # [B, S]
    >>> question = torch.randint(0, 64, (2, 3), generator=g)        # [B, Q]
    >>> cfg = GenerationConfig(max_new_tokens=5, sampling=SamplingConfig(temperature=0.8, seed=1))
    >>> out = generate(model, context, query_ids=question, prefill=PrefillConfig("ring"),
    ...                generation=cfg)
    >>> out.tokens.shape, out.cache.seq_len                          # 24 + 3 + 4 cached
    (torch.Size([2, 5]), 31)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..models.llama import LlamaModel
from ..parallel.comm import GatherComm
from ..parallel.context import resolve_group
from ..parallel.layout import shard
from .cache import ShardedKVCache
from .decode import extend
from .prefill import PrefillConfig, prefill
from .sampling import SamplingConfig, sample_next

__all__ = ["GenerationConfig", "GenerationResult", "check_prompt", "generate"]


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate after the prompt.

    - ``max_new_tokens``: tokens to generate (fewer when every row has produced ``eos``);
    - ``sampling``: greedy or temperature/top-k sampling with a seed (:class:`SamplingConfig`);
    - ``eos_token_id``: stop once every row has produced it; finished rows are padded with it;
    - ``return_logits``: keep each step's logits (on the query rank).
    """

    max_new_tokens: int = 32
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_id: int | None = None
    return_logits: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(
                f"GenerationConfig.max_new_tokens={self.max_new_tokens!r}; use an int >= 0"
            )
        if not isinstance(self.sampling, SamplingConfig):
            raise TypeError(
                "GenerationConfig.sampling must be a SamplingConfig(temperature=..., top_k=..., "
                f"seed=...); got {type(self.sampling).__name__}"
            )


@dataclass(eq=False)
class GenerationResult:
    """``tokens [B, N]`` (every rank; ``N <= max_new_tokens``), ``logits [B, N, vocab]`` (query
    rank with ``return_logits``, else None: step ``i``'s logits chose ``tokens[:, i]``), and
    this rank's cache (``cache.seq_len`` = context + query + generated tokens already cached)."""

    tokens: Tensor
    logits: Tensor | None
    cache: ShardedKVCache


def check_prompt(context_len: int, query_len: int, world_size: int) -> int:
    """Check that a prompt splits over ``world_size`` ranks; returns the block length ``L``."""
    if context_len < world_size or context_len % world_size:
        rest = context_len % world_size
        fix = (
            f"trim it to {context_len - rest} tokens (drop the first {rest}) or move its last "
            f"{rest} tokens to the front of the query segment"
            if context_len >= world_size
            else "use a longer context or fewer ranks"
        )
        raise ValueError(
            f"the context has {context_len} tokens, which does not split into {world_size} "
            f"equal contiguous blocks (one per rank): {fix}"
        )
    shard_len = context_len // world_size
    if query_len > shard_len:
        raise ValueError(
            f"the query segment has {query_len} tokens but the last shard holds {shard_len} "
            "(context tokens per rank); the query segment is processed on the query rank (the "
            f"last) and must fit in one shard: shorten it to <= {shard_len} tokens (move the "
            "rest into the context), use a longer context, or use fewer ranks"
        )
    return shard_len


def generate(
    model: LlamaModel, context_ids: Tensor, group=None, *, query_ids: Tensor | None = None,
    prefill: PrefillConfig = PrefillConfig(), generation: GenerationConfig = GenerationConfig(),
) -> GenerationResult:
    """Prefill ``context_ids [B, S]`` across the CP group, then generate.

    Args:
        model: a :class:`LlamaModel`, the same weights on every rank.
        context_ids: the whole context ``[B, S]`` (every rank passes the same ids and keeps its
            block; ``S`` must be a multiple of the world size).
        group: the CP ProcessGroup (or a 1-D DeviceMesh); None for one process.
        query_ids: an optional query segment ``[B, Q]`` processed after the context as phase 2
            (``Q <= S / P``); the same ids on every rank.
        prefill: star or ring, anchor length and kernel (:class:`PrefillConfig`).
        generation: how many tokens and how to pick them (:class:`GenerationConfig`).

    Returns:
        A :class:`GenerationResult`; ``tokens`` are the same on every rank.
    """
    comm = GatherComm(resolve_group(group))
    P = comm.world_size
    if context_ids.dim() != 2 or context_ids.dtype.is_floating_point:
        raise ValueError(
            "context_ids must be integer token ids [batch, context_len]; got shape "
            f"{tuple(context_ids.shape)} dtype {context_ids.dtype}"
        )
    B, S = context_ids.shape
    Q = 0
    if query_ids is not None:
        if query_ids.dim() != 2 or query_ids.shape[0] != B or query_ids.dtype.is_floating_point:
            raise ValueError(
                f"query_ids must be integer token ids [batch={B}, query_len]; got shape "
                f"{tuple(query_ids.shape)} dtype {query_ids.dtype}"
            )
        Q = query_ids.shape[1]
    check_prompt(S, Q, P)
    cfg = generation
    kernel = prefill.kernel
    device = model.embedding.weight.device

    state = _prefill(model, context_ids, comm, group, prefill, reserve=Q + cfg.max_new_tokens)
    cache = state.cache
    hidden = state.last_hidden  # [B, hidden]: the context's last token on the query rank
    if Q:
        out = extend(model, cache, query_ids, group, kernel=kernel)
        hidden = out[:, -1] if out is not None else None

    generator = cfg.sampling.generator()
    tokens: list[Tensor] = []
    logits_per_step: list[Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(cfg.max_new_tokens):
        token = torch.empty(B, dtype=torch.int64, device=device)
        if cache.is_query_rank:
            with torch.inference_mode():
                logits = model.logits(hidden)  # [B, vocab]
                token.copy_(sample_next(logits, cfg.sampling, generator))
            if cfg.return_logits:
                logits_per_step.append(logits)
        token = comm.broadcast(token, cache.query_rank)  # [B]: every rank decodes the same
        if cfg.eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, cfg.eos_token_id), token)
            done = done | (token == cfg.eos_token_id)
        tokens.append(token)
        if step + 1 == cfg.max_new_tokens or bool(done.all()):
            break
        out = extend(model, cache, token[:, None], group, kernel=kernel)
        hidden = out[:, -1] if out is not None else None

    token_ids = torch.stack(tokens, 1) if tokens else torch.empty(B, 0, dtype=torch.int64)
    logits = torch.stack(logits_per_step, 1) if logits_per_step else None
    return GenerationResult(token_ids, logits, cache)


def _prefill(model, context_ids, comm: GatherComm, group, config: PrefillConfig, reserve: int):
    """This rank's contiguous block of the context, prefilled."""
    local = shard(context_ids, "contiguous", comm.world_size, comm.rank)  # [B, S] -> [B, S/P]
    return prefill(model, local, group, config=config, reserve=reserve)
