"""Trainable sparse attention layers: MoBA and NSA (``ModelConfig.attention_kinds``).

The configs live in :mod:`.config` (imported by the model config); the layers in
:mod:`.layers` (imported by :class:`~longctx.models.llama.TransformerBlock` when a layer needs
them). Context parallelism for both is :mod:`longctx.parallel.strategies.sparse_fetch`.
"""

from .config import MobaConfig, NSAConfig

__all__ = ["MobaConfig", "NSAConfig"]
