"""One config for the whole data path: files -> tokenizer -> packed samples for a DP rank.

Example (no dataset named: the synthetic long-context set is written once and used)::

    >>> import tempfile
    >>> from longctx.data import DataConfig, build_packed_dataset
    >>> cfg = DataConfig.from_dict({
    ...     "packing": {"seq_length": 1024},
    ...     "synthetic": {"num_samples": 64},
    ...     "synthetic_path": tempfile.mkdtemp() + "/synthetic.jsonl",
    ... })
    >>> ds = build_packed_dataset(cfg, dp_rank=0, dp_size=2)
    >>> next(iter(ds)).input_ids.shape
    torch.Size([1024])
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dataset import DatasetConfig, load_documents
from .packing import PackedDataset, PackingConfig
from .synthetic import SyntheticConfig, synthetic_fingerprint, write_synthetic_dataset
from .tokenizer import TokenizerConfig, load_tokenizer

__all__ = ["DataConfig", "build_packed_dataset", "default_synthetic_path"]


@dataclass(frozen=True)
class DataConfig:
    """The data section of a run config.

    - ``dataset``: the files to train on; None trains on the synthetic long-context dataset
      (``synthetic``), written to ``synthetic_path`` (default: under ``$LONGCTX_CACHE`` or
      ``~/.cache/longctx``, named by a hash of its config).
    - ``tokenizer``, ``packing``: see :class:`TokenizerConfig`, :class:`PackingConfig`
      (``packing.seq_length`` is the model's global sequence length).
    """

    dataset: DatasetConfig | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    packing: PackingConfig = field(default_factory=lambda: PackingConfig(seq_length=1024))
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    synthetic_path: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """From nested dicts (a YAML ``data:`` section); unknown keys raise, naming the key."""
        sections = {
            "dataset": DatasetConfig,
            "tokenizer": TokenizerConfig,
            "packing": PackingConfig,
            "synthetic": SyntheticConfig,
        }
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown data config key(s) {unknown}; allowed: {sorted(cls.__dataclass_fields__)}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            typ = sections.get(key)
            if typ is None or value is None or isinstance(value, typ):
                kwargs[key] = value
                continue
            if not isinstance(value, dict):
                raise ValueError(f"data.{key} must be a mapping, got {type(value).__name__}")
            bad = sorted(set(value) - {f.name for f in dataclasses.fields(typ)})
            if bad:
                raise ValueError(
                    f"unknown key(s) {[f'data.{key}.{b}' for b in bad]}; allowed in data.{key}: "
                    f"{sorted(f.name for f in dataclasses.fields(typ))}"
                )
            try:
                kwargs[key] = typ(**value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"data.{key}: {e}") from e
        return cls(**kwargs)


def default_synthetic_path(config: SyntheticConfig) -> Path:
    """``$LONGCTX_CACHE`` (or ``~/.cache/longctx``) ``/data/synthetic-<hash>.jsonl``, the hash
    of the config and the text format's version (:func:`synthetic_fingerprint`)."""
    root = Path(os.environ.get("LONGCTX_CACHE", Path.home() / ".cache" / "longctx"))
    digest = hashlib.sha256(synthetic_fingerprint(config).encode()).hexdigest()[:12]
    return root / "data" / f"synthetic-{digest}.jsonl"


def build_packed_dataset(config: DataConfig, dp_rank: int = 0, dp_size: int = 1) -> PackedDataset:
    """The :class:`PackedDataset` of DP rank ``dp_rank`` for ``config`` (tokenizer attached as
    ``.tokenizer``).  Every rank may call this at once: the synthetic file is written
    atomically."""
    tokenizer = load_tokenizer(config.tokenizer)
    dataset = config.dataset
    if dataset is None:
        path = Path(config.synthetic_path or default_synthetic_path(config.synthetic))
        write_synthetic_dataset(path, config.synthetic)
        dataset = DatasetConfig(str(path), format="jsonl", streaming=False,
                                cache_dir=str(path.parent / "hf-cache"))
    documents = load_documents(dataset)
    return PackedDataset(documents, tokenizer, config.packing, dp_rank=dp_rank, dp_size=dp_size)
