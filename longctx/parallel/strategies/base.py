"""What every context-parallel strategy shares: its registry entry and the autograd skeleton.

A strategy is a :class:`StrategySpec`: its name, the layouts it runs on (and the one it assumes
when none is given), the mask pieces and features it supports, and its math.  The softmax
strategies give two pure functions of the local shards and a
:class:`~longctx.parallel.context.CPContext`::

    forward(q, k, v, cp, **options)  -> out [B, S/P, H, D], lse [B, H, S/P], saved (tensors)
    backward(dout, q, k, v, out, lse, saved, cp, **options) -> dq, dk, dv

and :class:`CPAttention`, the one autograd Function, runs them.  Linear attention, whose kernels
carry a state instead of a log-sum-exp, gives its own ``entry`` instead.  The table of every
strategy is :data:`longctx.parallel.strategies.STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...kernels.mask import Mask
from ..context import build_context

__all__ = ["MASK_PIECES", "CPAttention", "StrategySpec", "mask_pieces"]

# The pieces a Mask is made of (besides the full mask, which every strategy takes).
MASK_PIECES = ("causal", "window", "documents", "block_sparse")


def mask_pieces(mask: Mask | None) -> frozenset[str]:
    """The pieces of ``mask`` among :data:`MASK_PIECES` (empty for the full mask).

    Example::

        >>> sorted(mask_pieces(Mask(causal=True, window=128)))
        ['causal', 'window']
    """
    if mask is None:
        return frozenset()
    present = {
        "causal": mask.causal,
        "window": mask.window is not None,
        "documents": mask.cu_seqlens is not None,
        "block_sparse": mask.block_sparse is not None,
    }
    return frozenset(name for name, on in present.items() if on)


class CPAttention(torch.autograd.Function):
    """The autograd skeleton of every softmax strategy: ``spec.forward`` then ``spec.backward``.

    Returns ``out`` and the non-differentiable ``lse``; gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cp, spec: StrategySpec, options: dict):
        out, lse, saved = spec.forward(q, k, v, cp, **options)
        if lse is None:  # a strategy that skipped it (nobody asked): keep the outputs uniform
            lse = out.new_empty(0, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *saved)
        ctx.cp, ctx.spec, ctx.options = cp, spec, options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        dq, dk, dv = ctx.spec.backward(dout, q, k, v, out, lse, tuple(saved), ctx.cp, **ctx.options)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


@dataclass(frozen=True)
class StrategySpec:
    """One context-parallel strategy: what it supports, and its math.

    Attributes:
        name: the ``strategy=`` name.
        summary: one line for tables and errors.
        default_layout: the layout assumed when the caller gives none.
        layouts: the layout kinds it runs on (``None``: any).
        masks: the mask pieces (:data:`MASK_PIECES`) it accepts; the full mask always works.
        requires_causal: the mask must include ``causal`` (star, linear).
        return_lse: it can return the log-sum-exp.
        kernels: the family ``kernel=`` names: ``"softmax"`` (:mod:`longctx.kernels`) or
            ``"linear"`` (:mod:`longctx.kernels.linear`).
        groups: ``"1d"`` (a ProcessGroup or 1-D DeviceMesh) or ``"2d"`` (HybridGroups or a 2-D
            ``(ring, ulysses)`` DeviceMesh).
        head_split: the heads are split over the group (it needs ``H`` divisible by it).
        whole_sequence: the local kernel runs once over the whole sorted sequence (after a head
            exchange), not on pairs of shards; checks of a kernel look at that call.
        options: the keyword options of its own it accepts (e.g. linear's ``log_decay``).
        required: the options a call must give (star's ``star=Star(...)``).
        forward, backward: the math (softmax strategies), see the module docstring.
        entry: a whole entry of its own, used instead of forward/backward (linear).
    """

    name: str
    summary: str
    default_layout: str = "contiguous"
    layouts: tuple[str, ...] | None = None
    masks: frozenset[str] = frozenset(MASK_PIECES)
    requires_causal: bool = False
    return_lse: bool = True
    kernels: str = "softmax"
    groups: str = "1d"
    head_split: bool = False
    whole_sequence: bool = False
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    forward: Callable[..., Any] | None = field(default=None, repr=False)
    backward: Callable[..., Any] | None = field(default=None, repr=False)
    entry: Callable[..., Any] | None = field(default=None, repr=False)

    def accepts_layout(self, kind: str) -> bool:
        return self.layouts is None or kind in self.layouts

    def check_call(self, mask: Mask | None, return_lse: bool, options: dict) -> None:
        """Raise a ValueError that says what to change when the call needs what this lacks.

        Example::

            >>> from longctx.parallel.strategies import STRATEGIES
            >>> STRATEGIES["linear"].check_call(Mask(causal=True), True, {})
            Traceback (most recent call last):
            ...
            ValueError: strategy 'linear' has no log-sum-exp: drop return_lse=True
        """
        if return_lse and not self.return_lse:
            raise ValueError(f"strategy {self.name!r} has no log-sum-exp: drop return_lse=True")
        unsupported = sorted(mask_pieces(mask) - self.masks)
        if unsupported:
            raise ValueError(
                f"strategy {self.name!r} does not take {' and '.join(unsupported)} masks (it takes "
                f"{sorted(self.masks) or 'only the full mask'}); use strategy='ring', which takes "
                "every mask"
            )
        if self.requires_causal and (mask is None or not mask.causal):
            raise ValueError(
                f"strategy {self.name!r} is causal by construction: pass mask=Mask(causal=True)"
            )
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(
                f"strategy {self.name!r} got unexpected options {unknown}; it takes "
                f"{list(self.options) or 'none'}"
            )
        missing = [o for o in self.required if o not in options]
        if missing:
            raise TypeError(f"strategy {self.name!r} needs the options {missing}")

    def run(
        self, q: Tensor, k: Tensor, v: Tensor, group=None, *, layout=None, mask: Mask | None = None,
        kernel="auto", scale: float | None = None, return_lse: bool = False,
        check_shards: bool = False, **options,
    ):
        """Attention on this rank's shards; see :func:`longctx.attention` for the arguments."""
        if mask is None and self.requires_causal:
            mask = Mask(causal=True)
        self.check_call(mask, return_lse, options)
        layout = self.default_layout if layout is None else layout
        if self.entry is not None:
            return self.entry(
                q, k, v, group, layout=layout, mask=mask, kernel=kernel, scale=scale,
                check_shards=check_shards, **options,
            )
        cp = build_context(
            q, k, v, group, strategy=self, layout=layout, mask=mask, kernel=kernel, scale=scale,
            need_lse=return_lse, check_shards=check_shards,
        )
        out, lse = CPAttention.apply(q, k, v, cp, self, options)
        return (out, lse) if return_lse else out

