"""One module per context-parallel strategy, each with the same skeleton:
``<name>_forward``, ``<name>_backward``, an autograd Function, and ``<name>_attention``."""

from .allgather import allgather_attention
from .hybrid import hybrid_attention
from .linear import linear_attention
from .ring import ring_attention
from .star import Star, star_attention
from .striped import striped_attention
from .ulysses import ulysses_attention
from .zigzag import zigzag_attention

STRATEGIES = {
    "ring": ring_attention,
    "zigzag": zigzag_attention,
    "striped": striped_attention,
    "allgather": allgather_attention,
    "ulysses": ulysses_attention,
    "hybrid": hybrid_attention,
}

__all__ = [
    "STRATEGIES",
    "Star",
    "star_attention",
    "allgather_attention",
    "hybrid_attention",
    "linear_attention",
    "ring_attention",
    "striped_attention",
    "ulysses_attention",
    "zigzag_attention",
]
