"""The public entry: :func:`attention` and the :class:`ContextParallelAttention` module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..kernels.base import AttentionKernel
from ..kernels.mask import Mask
from .context import check_head_split, resolve_group
from .layout import Layout
from .strategies import STRATEGIES, Star, get_strategy

__all__ = [
    "CPConfig",
    "ContextParallelAttention",
    "attention",
    "choose_strategy",
    "softmax_strategies",
]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh_or_group=None,
    *,
    strategy: str | Star = "ring",
    layout: str | Layout | None = None,
    mask: Mask | None = None,
    kernel: str | AttentionKernel = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    log_decay: Tensor | None = None,
    check_shards: bool = False,
    **options,
):
    """Context-parallel attention over the local shards of a sequence.

    Every strategy is an entry of one table, :data:`longctx.parallel.strategies.STRATEGIES`,
    which says what it supports; a call it cannot run is refused before any communication, on
    every rank alike, with an error that says what to change.

    Args:
        q: ``[B, S/P, H, D]`` this rank's queries, sharded with ``layout``.
        k, v: ``[B, S/P, H_kv, D]`` this rank's keys/values (``H % H_kv == 0``; never expanded).
        mesh_or_group: the context-parallel ProcessGroup or a 1-D DeviceMesh; None = one process.
            For ``strategy="hybrid"``: :class:`~longctx.parallel.context.HybridGroups` or a 2-D
            ``(ring, ulysses)`` DeviceMesh (see :mod:`longctx.parallel.mesh`).
        strategy: ``"auto"`` (see :func:`choose_strategy`), ``"ring"``, ``"zigzag"``,
            ``"striped"``, ``"allgather"``, ``"ulysses"``,
            ``"hybrid"``, ``"linear"`` (causal linear attention with per-head decay, LASP-2
            style; ``kernel`` then names a linear kernel), or a
            :class:`~longctx.parallel.strategies.star.Star` (star attention with its anchor and
            query lengths).
        layout: how the sequence was sharded (``"contiguous"``, ``"zigzag"``, ``"striped"``,
            ``"striped:w"``); defaults to the strategy's own layout (``default_layout`` in the
            table: zigzag and striped for those two, contiguous for the others).
        mask: a :class:`~longctx.kernels.mask.Mask` on global positions (default: full).
        kernel: local kernel name (``longctx.kernels.available_kernels()``) or instance;
            ``"auto"`` picks per call: cuDNN/flash SDPA where they apply, else the Triton kernel
            on GPUs, the torch reference on CPUs (``select_kernel(..., explain=True)`` says why).
        scale: score scale, default ``1/sqrt(D)``.
        return_lse: also return the float32 log-sum-exp ``[B, H, S/P]`` (softmax strategies).
        log_decay: ``strategy="linear"`` only: per-head log-decays ``[H]`` (<= 0), None = none.
        check_shards: first check, with one small all-gather, that every rank holds shards of
            the same shapes and dtype (an error on every rank instead of a hang).
        **options: the strategy's own options (``STRATEGIES[name].options``), e.g. linear's
            ``cu_seqlens``, ``initial_state``, ``return_final_state``.

    Returns:
        ``out [B, S/P, H, D]`` in q's dtype (and ``lse`` if asked), differentiable in q, k, v.

    Example (a single process; with a group, pass each rank's shards)::

        >>> import torch, longctx
        >>> q = torch.randn(1, 16, 4, 8); k = v = torch.randn(1, 16, 2, 8)
        >>> out = longctx.attention(q, k, v, mask=longctx.Mask(causal=True))
        >>> out.shape
        torch.Size([1, 16, 4, 8])
    """
    if strategy == "auto":
        strategy = choose_strategy(q, k, mesh_or_group, layout=layout, mask=mask)
    spec = get_strategy(strategy)
    options = dict(options)
    if isinstance(strategy, Star):
        options["star"] = strategy
    if log_decay is not None:
        options["log_decay"] = log_decay
    for name in sorted(set(options) - set(spec.options)):
        owners = [s.name for s in STRATEGIES.values() if name in s.options]
        raise ValueError(
            f"{name} is for strategy={' or '.join(map(repr, owners))}, not {spec.name!r}"
            if owners else f"unknown option {name!r} for strategy {spec.name!r}"
        )
    return spec.run(
        q, k, v, mesh_or_group, layout=layout, mask=mask, kernel=kernel, scale=scale,
        return_lse=return_lse, check_shards=check_shards, **options,
    )


def choose_strategy(q: Tensor, k: Tensor, mesh_or_group=None, *, layout=None, mask=None) -> str:
    """The strategy ``strategy="auto"`` runs, read from the table and the group.

    Ulysses when the heads split over the group (one all-to-all pair instead of ``P`` ring steps,
    one long kernel call: it led on one group in the 4x and 8x H200 runs of
    ``benchmarks/RESULTS.md``, "Softmax CP"); otherwise the ring variant whose own layout the
    inputs are in when the mask is causal (zigzag, striped: causal work even at every step), else
    the ring.

    Example::

        >>> import torch
        >>> q = torch.randn(1, 8, 4, 16); k = torch.randn(1, 8, 2, 16)
        >>> choose_strategy(q, k)        # one process: nothing to communicate
        'ring'
    """
    group = resolve_group(mesh_or_group)
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return "ring"
    try:
        check_head_split(q.shape[2], k.shape[2], world)
        return "ulysses"
    except ValueError:
        pass
    kind = Layout.parse(layout).kind if layout is not None else "contiguous"
    if mask is not None and mask.causal:  # the ring variant whose own layout this is
        for name in ("zigzag", "striped"):
            if STRATEGIES[name].default_layout == kind:
                return name
    return "ring"


# The layout a config with strategy="auto" shards in: every strategy auto picks runs on it, and it
# balances causal work for the ring family.
AUTO_LAYOUT = "zigzag"


def softmax_strategies() -> list[str]:
    """The strategies that run with a name and a mask alone (what configs may name)."""
    return sorted(n for n, s in STRATEGIES.items() if s.kernels == "softmax" and not s.required)


@dataclass(frozen=True)
class CPConfig:
    """How :class:`ContextParallelAttention` shards and computes attention."""

    strategy: str = "ring"
    layout: str | None = None
    kernel: str = "auto"
    causal: bool = True
    window: int | None = None

    def __post_init__(self) -> None:
        if self.strategy != "auto":
            spec = get_strategy(self.strategy)
            if spec.kernels != "softmax" or spec.required:
                raise ValueError(
                    f"CPConfig.strategy={self.strategy!r} is not a softmax strategy this module "
                    f"can run with its settings alone; choose one of {softmax_strategies()} or "
                    "'auto' (linear attention: longctx.linear_attention; star: longctx.attention "
                    "with strategy=longctx.Star(...))"
                )
        if self.layout is not None:
            kind = Layout.parse(self.layout).kind
            if self.strategy != "auto" and not get_strategy(self.strategy).accepts_layout(kind):
                raise ValueError(
                    f"CPConfig: strategy {self.strategy!r} does not run on layout {self.layout!r}; "
                    f"it runs on {get_strategy(self.strategy).layouts}"
                )

    @property
    def resolved_layout(self) -> str:
        """The layout the shards are in: ``layout``, else the strategy's default (the table)."""
        if self.layout is not None:
            return self.layout
        if self.strategy == "auto":
            return AUTO_LAYOUT
        return get_strategy(self.strategy).default_layout


class ContextParallelAttention(nn.Module):
    """``nn.Module`` face of :func:`attention` with its settings in a :class:`CPConfig`.

    ``forward(q, k, v, cu_seqlens=None)`` takes local shards; ``cu_seqlens`` (global document
    boundaries of a packed sequence) adds a document mask for that batch.

    Example::

        >>> import torch
        >>> from longctx.parallel import ContextParallelAttention, CPConfig
        >>> attn = ContextParallelAttention(CPConfig(strategy="ring", causal=True))
        >>> q = torch.randn(1, 16, 4, 8); k = v = torch.randn(1, 16, 2, 8)
        >>> attn(q, k, v).shape
        torch.Size([1, 16, 4, 8])
    """

    def __init__(self, config: CPConfig = CPConfig(), group=None):
        super().__init__()
        self.config = config
        self.group = group

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> Tensor:
        c = self.config
        mask = Mask(causal=c.causal, window=c.window, cu_seqlens=cu_seqlens)
        return attention(
            q, k, v, self.group, strategy=c.strategy, layout=c.resolved_layout, mask=mask,
            kernel=c.kernel,
        )

    def extra_repr(self) -> str:
        return f"{self.config}"
