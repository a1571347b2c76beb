"""Per-batch state a model needs beyond token ids: where its tokens sit and how they attend.

Built by the data/CP batching code for every micro-batch and passed down the model explicitly
(never stored in a global), so the single-device model code is the same with or without context
parallelism.

Example (no CP: one process holds the whole sequence)::

    >>> import torch
    >>> from longctx.models.context import SequenceContext
    >>> ctx = SequenceContext.single_device(seq_len=8, cu_seqlens=torch.tensor([0, 3, 8]))
    >>> ctx.position_ids.tolist(), ctx.mask.causal
    ([0, 1, 2, 3, 4, 5, 6, 7], True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.mask import Mask

__all__ = ["SequenceContext"]


@dataclass(frozen=True, eq=False)
class SequenceContext:
    """Everything attention and RoPE need about the local tokens of one micro-batch.

    - ``position_ids [S_local]``: global position of each local token (from the layout), used by
      RoPE; with packed documents RoPE positions restart per document (``rope_position_ids``).
    - ``mask``: allowed pairs on global positions (causal, documents, window, ...).
    - ``cp_group``: the context-parallel group (or HybridGroups, or a DeviceMesh); None = no CP.
    - ``strategy`` / ``layout`` / ``kernel``: passed to :func:`longctx.attention`.
    """

    position_ids: Tensor
    mask: Mask
    cp_group: object = None
    strategy: str = "ring"
    layout: str = "contiguous"
    kernel: str = "auto"

    @property
    def rope_position_ids(self) -> Tensor:
        """Positions for RoPE: restart at 0 at every document start when the mask has documents."""
        if self.mask.cu_seqlens is None:
            return self.position_ids
        cu = self.mask.cu_seqlens_on(self.position_ids.device)
        doc = self.mask.document_ids(self.position_ids)
        return self.position_ids - cu[doc]

    @staticmethod
    def single_device(
        seq_len: int, cu_seqlens: Tensor | None = None, device: torch.device | str | None = None,
        kernel: str = "auto", window: int | None = None,
    ) -> "SequenceContext":
        """Context for a whole causal sequence on one device."""
        return SequenceContext(
            position_ids=torch.arange(seq_len, device=device),
            mask=Mask(causal=True, window=window, cu_seqlens=cu_seqlens),
            kernel=kernel,
        )
