"""AdamW and the learning-rate schedule (linear warmup, then cosine / linear / constant decay).

Example::

    >>> from longctx.train.config import OptimConfig, ScheduleConfig
    >>> from longctx.train.optim import lr_at
    >>> opt, sch = OptimConfig(lr=1.0), ScheduleConfig(warmup_steps=2, min_lr=0.1)
    >>> [round(lr_at(s, opt, sch, total_steps=6), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.775, 0.325, 0.1]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig, ScheduleConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_at"]


def lr_at(step: int, optim: OptimConfig, schedule: ScheduleConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup: ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps; then the
    decay runs from ``lr`` at the first step after warmup to ``min_lr`` at the last step.
    """
    peak, floor, warmup = optim.lr, schedule.min_lr, schedule.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule.decay == "constant":
        return peak
    span = max(total_steps - 1 - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule.decay == "linear":
        return peak + (floor - peak) * progress
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on parameters with 2+ dims (matrices), none on norms.

    Parameters may be plain tensors or DTensors (TP / FSDP2 shards); AdamW's per-element update
    works on each rank's shard.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, schedule: ScheduleConfig,
    total_steps: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor is ``lr_at(step) / optim.lr``.

    Its state (``last_epoch`` = the step) is checkpointed; the schedule itself is a plain function
    (LambdaLR saves no state for functions), so a resumed run follows the *current* config: e.g.
    raising ``train.steps`` on resume stretches the decay from the resumed step on.
    """

    def factor(step: int) -> float:
        return lr_at(step, optim, schedule, total_steps) / optim.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
