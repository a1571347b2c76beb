"""Typed configs of the trainable sparse attention layers (``attention_kinds`` ``moba``/``nsa``).

Example::

    >>> from longctx.models.sparse.config import MobaConfig, NSAConfig
    >>> MobaConfig.from_dict({"block_size": 64, "top_k": 3, "query_block": 16})
    MobaConfig(block_size=64, top_k=3, query_block=16)
    >>> NSAConfig(select_block=32, query_block=32, window=64).num_compressed(256)
    15
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["MobaConfig", "NSAConfig", "sparse_config_from"]


def _positive(owner: str, values: dict[str, Any]) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name} must be an int >= 1, got {value!r}")


class _FromDict:
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build from a mapping (a YAML section); unknown keys raise, listing the allowed ones."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; allowed keys: {allowed}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MobaConfig(_FromDict):
    """MoBA (Mixture of Block Attention, Lu et al. 2025) layer parameters.

    - ``block_size``: tokens per key block (on global positions); the gate scores each block by
      its mean-pooled key.
    - ``top_k``: blocks each query block attends to, its own block included (MoBA's convention:
      the current block is always chosen and counts as one of the ``k``).
    - ``query_block``: queries that share one selection, made by the block's first query (so
      no query's blocks depend on later tokens): the block-sparse kernel's query tile. Must
      divide ``block_size``; 1 is per-token MoBA.
    """

    block_size: int = 512
    top_k: int = 3
    query_block: int = 64

    def __post_init__(self) -> None:
        _positive("MobaConfig", asdict(self))
        if self.block_size % self.query_block:
            raise ValueError(
                f"MobaConfig.query_block={self.query_block} must divide block_size="
                f"{self.block_size} (a query block lies inside one key block)"
            )


@dataclass(frozen=True)
class NSAConfig(_FromDict):
    """NSA (Native Sparse Attention, Yuan et al. 2025) layer parameters.

    - ``compress_block`` / ``compress_stride``: the compressed branch summarises keys/values
      ``[i*stride, i*stride + compress_block)`` into one token each with a learned MLP
      (intra-block position embedding + two layers, hidden ``compress_hidden``, default the
      head dim). The paper's values: 32 and 16.
    - ``select_block`` / ``top_n``: the selected branch attends to the ``top_n`` highest-scoring
      earlier blocks of ``select_block`` tokens plus its own block; the scores are the
      compressed branch's attention probabilities summed over the query heads of a kv group.
    - ``window``: the sliding-window branch's width (tokens).
    - ``query_block``: queries that share one selection, made from the block's first query
      (causal; must divide ``select_block``; 1 is the paper's per-token selection).
    """

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    top_n: int = 16
    window: int = 512
    query_block: int = 64
    compress_hidden: int | None = None

    def __post_init__(self) -> None:
        values = asdict(self)
        if values["compress_hidden"] is None:
            values.pop("compress_hidden")
        _positive("NSAConfig", values)
        if self.compress_block % self.compress_stride:
            raise ValueError(
                f"NSAConfig.compress_stride={self.compress_stride} must divide compress_block="
                f"{self.compress_block}"
            )
        if self.select_block % self.query_block:
            raise ValueError(
                f"NSAConfig.query_block={self.query_block} must divide select_block="
                f"{self.select_block}"
            )

    def num_compressed(self, seq_len: int) -> int:
        """Compressed tokens of a ``seq_len`` sequence (whole blocks only)."""
        if seq_len < self.compress_block:
            return 0
        return (seq_len - self.compress_block) // self.compress_stride + 1


def sparse_config_from(kind: str, value: Any):
    """``None`` / a mapping / a config -> the config of layer kind ``"moba"`` or ``"nsa"``."""
    cls = {"moba": MobaConfig, "nsa": NSAConfig}[kind]
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.from_dict(value)
    raise ValueError(
        f"ModelConfig.{kind} must be a mapping of {cls.__name__} fields or None, got {value!r}"
    )
