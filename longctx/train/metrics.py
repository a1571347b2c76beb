"""What a run reports: TensorBoard scalars, the rank-0 progress line with ETA, MFU, peak memory.

MFU = ``flops_per_token * tokens/s / (world_size * peak FLOP/s per device)`` with
:func:`longctx.models.config.flops_per_token` (weight matmuls plus causal attention, x3 for
training; model FLOPs, so recomputation is not counted).  The peak comes from
``train.peak_flops_per_device`` or :func:`default_peak_flops`.

Example::

    >>> from longctx.train.metrics import format_duration, format_count
    >>> format_duration(3725.2), format_duration(59.6), format_count(123456)
    ('1:02:05', '1:00', '123.5k')
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MetricsLogger",
    "StepMetrics",
    "default_peak_flops",
    "format_count",
    "format_duration",
    "peak_memory_gib",
]

logger = logging.getLogger(__name__)

CPU_NOMINAL_FLOPS = 1e11  # per process; CPU MFU is only a relative number


def default_peak_flops(device: torch.device) -> tuple[float, str]:
    """``(dense peak FLOP/s per device, where the number comes from)``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name or "H200" in name or "H800" in name or "GH200" in name:
            return 989e12, f"{name}: bf16 dense"
        if "A100" in name or "A800" in name:
            return 312e12, f"{name}: bf16 dense"
        if "B200" in name:
            return 2250e12, f"{name}: bf16 dense"
        return 989e12, f"{name}: unknown GPU, H100 bf16 dense assumed (set train.peak_flops_per_device)"
    return CPU_NOMINAL_FLOPS, "CPU: nominal 1e11 per process"


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated, or the CPU process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 2**20


def format_duration(seconds: float) -> str:
    s = round(max(seconds, 0.0))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step, as every rank sees it (loss and norm are global)."""

    step: int  # 1-based: steps done after this one
    loss: float  # mean over the global label tokens of the step
    grad_norm: float  # before clipping
    lr: float
    tokens: int  # global tokens of the step (dp x accumulation x micro-batch x seq_length)
    label_tokens: int  # global tokens with a label
    seconds: float  # wall-clock of the step
    stop_signal: str | None = None  # a signal asked the run to stop after this step


class MetricsLogger:
    """Rank 0 logs progress lines and writes TensorBoard scalars; other ranks do nothing.

    ``log(m)`` every step; a line (and scalars) every ``interval`` steps and at the last step,
    averaged over the steps since the previous line.  Lines are INFO records of the logger
    ``longctx.train.metrics`` (the ``longctx train`` command prints them as plain lines).
    """

    def __init__(
        self, *, is_main: bool, total_steps: int, interval: int, tensorboard_dir: Path | None,
        flops_per_token: float | None, peak_flops: float, world_size: int,
        device: torch.device, start_step: int = 0,
    ):
        self.is_main = is_main
        self.total_steps = total_steps
        self.interval = interval
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops * world_size
        self.device = device
        self.start_step = start_step
        self._window: list[StepMetrics] = []
        self._step_times: list[float] = []
        self.writer = None
        if is_main and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))
        self.started = time.perf_counter()
        self.tokens = 0
        self.train_seconds = 0.0
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    def print(self, text: str) -> None:
        """Log ``text`` (INFO) on rank 0."""
        if self.is_main:
            logger.info(text)

    def mfu(self, tokens_per_s: float) -> float | None:
        if self.flops_per_token is None:
            return None
        return self.flops_per_token * tokens_per_s / self.peak_flops_total

    def log(self, m: StepMetrics) -> None:
        self.tokens += m.tokens
        self.train_seconds += m.seconds
        self._window.append(m)
        self._step_times.append(m.seconds)
        if self.first_loss is None:
            self.first_loss = m.loss
        self.last_loss = m.loss
        if m.step % self.interval and m.step != self.total_steps and m.stop_signal is None:
            return
        window, self._window = self._window, []
        if not self.is_main:
            return
        seconds = sum(w.seconds for w in window)
        tokens = sum(w.tokens for w in window)
        tok_s = tokens / max(seconds, 1e-9)
        loss = sum(w.loss for w in window) / len(window)
        mfu = self.mfu(tok_s)
        mem = peak_memory_gib(self.device)
        recent = self._step_times[-max(self.interval, 5):]
        eta = (self.total_steps - m.step) * sum(recent) / len(recent)
        elapsed = time.perf_counter() - self.started
        width = len(str(self.total_steps))
        mfu_text = f" | mfu {mfu:6.2%}" if mfu is not None else ""
        self.print(
            f"step {m.step:>{width}}/{self.total_steps} | loss {loss:7.4f} | lr {m.lr:.2e} | "
            f"grad norm {m.grad_norm:7.3f} | {format_count(tok_s)} tok/s{mfu_text} | "
            f"mem {mem:.2f} GiB | elapsed {format_duration(elapsed)} eta {format_duration(eta)}"
        )
        if self.writer is not None:
            w = self.writer
            w.add_scalar("train/loss", loss, m.step)
            w.add_scalar("train/lr", m.lr, m.step)
            w.add_scalar("train/grad_norm", m.grad_norm, m.step)
            w.add_scalar("train/label_tokens", m.label_tokens, m.step)
            w.add_scalar("perf/tokens_per_s", tok_s, m.step)
            w.add_scalar("perf/step_seconds", seconds / len(window), m.step)
            if mfu is not None:
                w.add_scalar("perf/mfu", mfu, m.step)
            w.add_scalar("memory/peak_gib", mem, m.step)
            w.add_scalar("data/tokens_seen", m.step * m.tokens, m.step)  # resumed runs too
            w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
