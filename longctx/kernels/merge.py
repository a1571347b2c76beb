"""Merging partial attention results by their log-sum-exp.

Two partial results over disjoint key sets combine exactly:

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

computed in the accumulation dtype, and safe when both sides are ``-inf`` (a row with no allowed
key anywhere stays ``out = 0, lse = -inf``).

Example::

    >>> import torch
    >>> from longctx.kernels.merge import merge_partials
    >>> out_a, out_b = torch.ones(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    >>> lse_a = torch.tensor([[[0.0, float("-inf")]]]); lse_b = torch.full((1, 1, 2), float("-inf"))
    >>> out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    >>> out.flatten().tolist(), lse.flatten().tolist()
    ([1.0, 0.0], [0.0, -inf])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["merge_partials", "merge_into"]


def _weights(lse_part: Tensor, lse: Tensor) -> Tensor:
    """exp(lse_part - lse) as ``[B, S, H, 1]``; 0 where both are -inf."""
    finite = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lse_part - finite)  # lse_part = -inf -> 0
    return w.transpose(1, 2).unsqueeze(-1)  # [B, H, S] -> [B, S, H, 1]


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor):
    """Merge two partials: ``out_* [B, S, H, D]``, ``lse_* [B, H, S]`` -> (out, lse).

    The result is in the dtype of ``lse_a`` (the accumulation dtype).
    """
    lse = torch.logaddexp(lse_a, lse_b.to(lse_a.dtype))
    out = out_a.to(lse.dtype) * _weights(lse_a, lse) + out_b.to(lse.dtype) * _weights(
        lse_b.to(lse.dtype), lse
    )
    return out, lse


def merge_into(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """In-place ``(acc_out, acc_lse) <- merge(acc, (out, lse))``; ``acc_*`` may be slices/views."""
    new_out, new_lse = merge_partials(acc_out, acc_lse, out, lse)
    acc_out.copy_(new_out)
    acc_lse.copy_(new_lse)
