"""Choosing the next token from logits: greedy, or sampling with temperature and top-k.

Sampling draws one uniform number per batch row from a CPU ``torch.Generator`` seeded by
:attr:`SamplingConfig.seed` and inverts the CDF of the (float64) probabilities, so the chosen
tokens depend only on the seed and the logits: not on the device, the world size or any global
RNG state.

Example::

    >>> import torch
    >>> from longctx.inference.sampling import SamplingConfig, sample_next
    >>> logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    >>> sample_next(logits, SamplingConfig()).tolist()                 # greedy
    [1, 0]
    >>> cfg = SamplingConfig(temperature=0.7, top_k=1, seed=0)  # top-1: the argmax again
    >>> sample_next(logits, cfg, cfg.generator()).tolist()
    [1, 0]
    >>> cfg = SamplingConfig(temperature=1.0, seed=3)
    >>> g = cfg.generator()                                    # one per generation call
    >>> [sample_next(logits, cfg, g).tolist() for _ in range(2)]
    [[0, 0], [1, 0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingConfig", "sample_next"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    - ``temperature``: ``0`` is greedy (argmax); ``> 0`` samples from
      ``softmax(logits / temperature)``.
    - ``top_k``: when sampling, keep only the ``top_k`` most likely tokens (None: all).
    - ``seed``: seeds the ``torch.Generator`` of one generation call.
    """

    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(
                f"SamplingConfig.temperature={self.temperature!r}; use 0 for greedy decoding or "
                "a positive number to sample"
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(
                f"SamplingConfig.top_k={self.top_k!r}; use an int >= 1, or None for no cut-off"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed`` (one per generation call)."""
        return torch.Generator().manual_seed(self.seed)


def sample_next(
    logits: Tensor, config: SamplingConfig, generator: torch.Generator | None = None
) -> Tensor:
    """``logits [B, vocab]`` -> token ids ``[B]`` (int64, on the logits' device).

    Sampling needs ``generator`` (:meth:`SamplingConfig.generator`), which advances by one draw
    per row.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if config.greedy:
        return logits.argmax(dim=-1)
    if generator is None:
        raise ValueError("sampling (temperature > 0) needs a generator: config.generator()")
    scaled = logits.to(torch.float64) / config.temperature
    if config.top_k is not None and config.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, config.top_k, dim=-1).values[:, -1:]  # [B, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)  # [B, vocab]
    u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64)  # [B, 1]
    u = u.to(logits.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)
