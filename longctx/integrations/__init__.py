"""Adapters that put longctx's context-parallel attention into trainers people already use.

Each adapter is its own module and imports its framework only when it is imported itself, so
``import longctx`` never imports megatron, transformers or deepspeed:

- :mod:`longctx.integrations.megatron`: a megatron-core core-attention module and GPT layer specs
  (``pip install "longctx[megatron]"``).
- :mod:`longctx.integrations.transformers`: Hugging Face attention implementations
  (``longctx_zigzag``, ``longctx_ring``, ...), batch sharding and the CP loss
  (``pip install "longctx[transformers]"``).
- :mod:`longctx.integrations.deepspeed`: local attention for DeepSpeed-Ulysses and ALST, and an
  mpu over data x context parallel groups (``pip install "longctx[deepspeed]"``).

A framework that is missing raises an ImportError naming the extra to install; a version outside
the supported range raises :class:`UnsupportedVersionError`.
"""

from ._deps import SUPPORTED, UnsupportedVersionError, require

__all__ = ["SUPPORTED", "UnsupportedVersionError", "require"]
