"""The training loop: context-parallel micro-batches, chunked loss, AdamW, DCP checkpoints.

One :class:`Trainer` per process; every process of the run builds one with the same
:class:`~longctx.train.config.TrainConfig`.  A step:

1. **Data.** Each data-parallel rank takes its own packed samples (``grad_accum_steps`` x
   ``micro_batch_size``); the cp (and tp) ranks of one dp rank read the same samples — the
   stream is deterministic — and :func:`~longctx.data.shard_sample` gives each cp rank its shard
   (``[1, S / cp]`` tokens and labels, global positions) and a
   :class:`~longctx.models.context.SequenceContext` carrying the cp group, strategy, layout,
   kernel and the document mask.
2. **Loss.** The label tokens of the whole step are counted on every rank and summed over
   dp x cp (one all-reduce) *before* any backward; each micro-batch's loss is the chunked
   cross-entropy **sum** (:func:`~longctx.train.loss.chunked_cross_entropy`) divided by that
   global count, so the gradients summed over dp x cp and accumulation are exactly those of the
   mean loss over every label token of the step — whatever the mesh.
3. **Gradients.** FSDP2 reduce-scatters them in backward (only on the last micro-batch:
   ``set_requires_gradient_sync``); without FSDP, :func:`~longctx.models.parallelize.
   reduce_gradients` all-reduces them over dp and cp (TP-replicated parameters are complete
   already).  Then the global-norm clip, AdamW, the LR schedule.
4. **Bookkeeping.** One all-reduce carries the loss and the "stop" flag (SIGTERM/SIGINT seen on
   any rank); rank 0 logs; checkpoints every ``checkpoint.interval`` steps, at the end, and
   when stopping.

Example (one process, the tiny model, a few steps; ``longctx train`` runs the real thing)::

    >>> import tempfile
    >>> from longctx.train import Trainer, load_config
    >>> tmp = tempfile.mkdtemp()
    >>> cfg = load_config(None, [f"output_dir={tmp}", "parallel.cp=1", "train.steps=2",
    ...     "model.num_layers=1", "model.seq_length=128", "data.synthetic.num_samples=8",
    ...     "data.synthetic.max_length=120", "data.synthetic.min_length=60",
    ...     f"data.synthetic_path={tmp}/syn.jsonl", "logging.tensorboard=false"])
    >>> trainer = Trainer(cfg, quiet=True)
    >>> summary = trainer.train()
    >>> summary.final_step, summary.checkpoint.name
    (2, 'step-00000002')
    >>> trainer.close()
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data import (
    IGNORE_INDEX,
    AccuracyReport,
    CPMicroBatch,
    PackedSample,
    SyntheticSample,
    answer_accuracy,
    build_packed_dataset,
    concat_samples,
    generate_samples,
    shard_sample,
    to_sequence_context,
)
from ..models import LlamaModel, SequenceContext, flops_per_token, num_params
from ..models.parallelize import (
    ParallelConfig,
    clip_grad_norm_,
    parallelize_model,
    reduce_gradients,
)
from ..parallel.layout import Layout
from ..parallel.mesh import build_mesh
from .checkpoint import Checkpointer, ModelOptimizerState, rng_state, set_rng_state
from .config import TrainConfig
from .distributed import DistEnv, init_distributed
from .loss import chunked_argmax, chunked_cross_entropy
from .metrics import MetricsLogger, StepMetrics, default_peak_flops, format_count, format_duration
from .optim import build_optimizer, build_scheduler

__all__ = ["GracefulStop", "TrainSummary", "Trainer", "TrainingInterrupted"]

logger = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """A signal stopped the run at a step boundary; a checkpoint was saved (``checkpoint``)."""

    def __init__(self, message: str, step: int, checkpoint: Path | None, signal_name: str):
        super().__init__(message)
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class GracefulStop:
    """Catches SIGTERM (and a first SIGINT) while active: ``requested`` names the signal.

    The trainer reads the flag at the next step boundary (all ranks agree through one
    all-reduce), saves a checkpoint and stops.  A second SIGINT raises KeyboardInterrupt at once.
    Handlers can only be installed from the main thread; elsewhere this is a no-op.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._sigints = 0

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:  # noqa: PYI034 (Self needs Python 3.11)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass(frozen=True)
class TrainSummary:
    """What a :meth:`Trainer.train` call did."""

    start_step: int
    final_step: int
    total_steps: int
    tokens: int  # global tokens trained on in this call
    seconds: float  # wall-clock of the steps of this call
    losses: tuple[float, ...]  # per step of this call
    tensorboard_dir: Path | None
    checkpoint: Path | None  # the newest checkpoint written (or resumed from)
    stopped_by: str | None = None  # the signal that stopped the run
    data_exhausted: bool = False
    accuracy: AccuracyReport | None = None  # held-out passkey/MQAR answers, end of the run

    @property
    def steps(self) -> int:
        return self.final_step - self.start_step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _DataExhausted(Exception):
    pass


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


class Trainer:
    """Builds everything a run needs on this process and trains (see the module docstring).

    Args:
        config: the run; every process passes the same one.
        quiet: no output on rank 0 (tests).  Rank 0's output is ``logging`` INFO records (the
            ``longctx.train.trainer`` and ``longctx.train.metrics`` loggers).

    Attributes: ``env`` (rank, device, ...), ``dims`` (dp, cp, tp, ulysses), ``pmesh``,
    ``dp_rank`` / ``cp_rank`` / ``tp_rank``, ``model``, ``optimizer``, ``scheduler``,
    ``dataset``, ``step`` (optimizer steps done), ``resumed_from``.
    """

    def __init__(self, config: TrainConfig, *, quiet: bool = False):
        self.config = config
        cfg = config
        self.env: DistEnv = init_distributed(cfg.train.device)
        try:
            self._build(quiet)
        except BaseException:
            self.env.close()
            raise

    # -- construction ---------------------------------------------------------------------------
    def _build(self, quiet: bool) -> None:
        cfg, env = self.config, self.env
        self.quiet = quiet
        self.dims = cfg.parallel.dims(env.world_size)
        self.precision = _resolve_precision(cfg.train.precision, env.device)
        torch.manual_seed(cfg.seed)
        self.pmesh = build_mesh(self.dims, env.device.type)
        self.dp_rank, self.cp_rank, self.tp_rank = (int(c) for c in self.pmesh.mesh.get_coordinate())
        self.layout = cfg.parallel.resolved_layout
        if cfg.parallel.strategy == "hybrid":
            self.cp_group: Any = self.pmesh.hybrid_groups()
        else:
            self.cp_group = self.pmesh.group("cp") if self.dims.cp > 1 else None

        # data: local rank 0 of every node first (it may write the synthetic file and the Arrow
        # cache), then the others read what it wrote
        for turn in (True, False):
            if (env.local_rank == 0) == turn:
                self.dataset = build_packed_dataset(cfg.data, self.dp_rank, self.dims.dp)
            dist.barrier()
        tok = self.dataset.tokenizer
        if tok.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({tok.vocab_size} ids, {tok!r}); set model.vocab_size >= "
                f"{tok.vocab_size}"
            )
        self._data_iter = None

        # model: built on meta, parallelized, then allocated and initialised from the seed (the
        # values do not depend on the mesh)
        fp64 = self.precision == "fp64"
        param_dtype = torch.float64 if fp64 else torch.float32
        bf16 = self.precision == "bf16"
        pcfg = ParallelConfig(
            fsdp=cfg.parallel.fsdp,
            activation_checkpointing=cfg.parallel.activation_checkpointing,
            compile=cfg.parallel.compile,
            compile_backend=cfg.parallel.compile_backend,
            param_dtype="bfloat16" if (bf16 and cfg.parallel.fsdp) else None,
            reduce_dtype="float32" if (bf16 and cfg.parallel.fsdp) else None,
            reshard_after_forward=cfg.parallel.reshard_after_forward,
            grad_reduction="sum",
        )
        self.autocast_dtype = torch.bfloat16 if (bf16 and not cfg.parallel.fsdp) else None
        model = LlamaModel(cfg.model, seed=cfg.seed, device="meta", dtype=param_dtype)
        self.model = parallelize_model(model, self.pmesh, pcfg)
        self.model.to_empty(device=env.device)
        self.model.init_weights(cfg.seed)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.schedule, cfg.train.steps)
        self.ds_engine = None  # train.engine: deepspeed -> the step runs through DeepSpeed
        if cfg.train.engine == "deepspeed":
            from ..integrations.deepspeed import build_trainer_engine

            self.ds_engine = build_trainer_engine(
                cfg, self.model, self.optimizer, self.pmesh,
                functools.partial(chunked_cross_entropy, chunk_size=cfg.train.loss_chunk_size),
            )
        self.step = 0
        self.resumed_from: Path | None = None
        self._resume_note = ""
        self.last_checkpoint: Path | None = None

        self.tokens_per_step = (
            self.dims.dp * cfg.train.grad_accum_steps * cfg.train.micro_batch_size
            * cfg.model.seq_length
        )
        self.flops_per_token = flops_per_token(cfg.model, cfg.model.seq_length)
        if cfg.train.peak_flops_per_device is not None:
            self.peak_flops, self.peak_flops_source = cfg.train.peak_flops_per_device, "config"
        else:
            self.peak_flops, self.peak_flops_source = default_peak_flops(env.device)

        self.checkpointer = (
            Checkpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep, rank=env.rank)
            if cfg.checkpoint.enabled else None
        )
        self._resume()

    def _print(self, text: str) -> None:
        """Rank 0's progress text: INFO records of this module's logger."""
        if self.env.is_main and not self.quiet:
            logger.info(text)

    # -- data -----------------------------------------------------------------------------------
    def _next_sample(self) -> PackedSample:
        if self._data_iter is None:
            self._data_iter = iter(self.dataset)
        try:
            return next(self._data_iter)
        except StopIteration:
            raise _DataExhausted from None

    def next_micro_batches(self) -> list[CPMicroBatch]:
        """This rank's ``grad_accum_steps`` micro-batches of the next step (on CPU)."""
        t = self.config.train
        out = []
        for _ in range(t.grad_accum_steps):
            samples = [self._next_sample() for _ in range(t.micro_batch_size)]
            sample = samples[0] if len(samples) == 1 else concat_samples(samples)
            out.append(shard_sample(sample, self.layout, self.dims.cp, self.cp_rank))
        return out

    def sequence_context(self, mb: CPMicroBatch) -> SequenceContext:
        p = self.config.parallel
        return to_sequence_context(
            mb, self.cp_group, p.strategy, self.layout, p.kernel,
            cross_document_attention=self.config.data.packing.cross_document_attention,
        )

    # -- one step -------------------------------------------------------------------------------
    def _forward_backward(self, micro_batches: list[CPMicroBatch]) -> tuple[torch.Tensor, int]:
        """Gradients of the step accumulated and reduced; returns (this rank's summed loss,
        the global label-token count)."""
        device = self.env.device
        local = sum(mb.num_label_tokens for mb in micro_batches)
        count = torch.tensor([local], dtype=torch.int64, device=device)
        dist.all_reduce(count)  # over the world: every tp rank counted the same tokens
        global_count = max(int(count.item()) // self.dims.tp, 1)
        fsdp = self.config.parallel.fsdp
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, mb in enumerate(micro_batches):
            if fsdp:
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            mb = mb.to(device, non_blocking=True)
            seq = self.sequence_context(mb)
            autocast = (
                torch.autocast(device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None else nullcontext()
            )
            if self.ds_engine is not None:  # forward, loss and backward inside DeepSpeed
                loss = self.ds_engine.forward(mb.input_ids, seq, labels=mb.labels)
                self.ds_engine.backward(loss, global_count)
                loss_sum += loss.detach().to(torch.float64)
                continue
            with autocast:
                hidden = self.model(mb.input_ids, seq)  # [1, S_local, hidden]
            weight = self.model.output_weight  # [V, hidden]
            compute = self.autocast_dtype or hidden.dtype
            loss = chunked_cross_entropy(
                hidden.to(compute), weight.to(compute), mb.labels,
                chunk_size=self.config.train.loss_chunk_size,
            )
            (loss / global_count).backward()
            loss_sum += loss.detach().to(torch.float64)
        if self.ds_engine is None:
            reduce_gradients(self.model, self.pmesh)  # a no-op under FSDP
        return loss_sum, global_count

    def forward_backward(self, micro_batches: list[CPMicroBatch]) -> float:
        """Forward and backward of one step, gradients reduced over the mesh (not applied);
        returns the step's global mean loss."""
        loss_sum, count = self._forward_backward(micro_batches)
        dist.all_reduce(loss_sum)
        return float(loss_sum) / self.dims.tp / count

    def train_step(self, micro_batches: list[CPMicroBatch], stop: GracefulStop | None = None
                   ) -> StepMetrics:
        """Forward, backward, clip, AdamW, LR schedule; returns the step's global metrics."""
        start = time.perf_counter()
        loss_sum, count = self._forward_backward(micro_batches)
        clip = self.config.train.clip_grad_norm
        lr = self.optimizer.param_groups[0]["lr"]
        if self.ds_engine is not None:  # clips by train.clip_grad_norm, zeroes the gradients
            norm = self.ds_engine.step()
            norm = math.nan if norm is None else norm
        else:
            norm = clip_grad_norm_(self.model, clip if clip is not None else math.inf)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        flag = 1.0 if (stop is not None and stop.requested) else 0.0
        reduced = torch.stack([loss_sum, torch.tensor(flag, dtype=torch.float64,
                                                      device=loss_sum.device)])
        dist.all_reduce(reduced)  # loss over dp x cp (x tp copies), stop flag from any rank
        self.step += 1
        loss = float(reduced[0]) / self.dims.tp / count
        stop_signal = (stop.requested or "SIGTERM") if float(reduced[1]) > 0 else None
        return StepMetrics(
            step=self.step, loss=loss, grad_norm=float(norm), lr=lr,
            tokens=self.tokens_per_step, label_tokens=count,
            seconds=time.perf_counter() - start, stop_signal=stop_signal,
        )

    # -- evaluation -----------------------------------------------------------------------------
    def eval_samples(self) -> list[SyntheticSample]:
        """Held-out synthetic samples (``data.synthetic`` with the next seed); [] when training
        on files or ``eval.num_samples`` is 0."""
        n = self.config.eval.num_samples
        if n == 0 or self.config.data.dataset is not None:
            return []
        syn = self.config.data.synthetic
        return generate_samples(dataclasses.replace(syn, seed=syn.seed + 1, num_samples=n))

    @torch.no_grad()
    def predict_next_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Greedy next-token ids ``[1, T]`` for one sequence ``[1, T]`` (every rank calls it with
        the same ids): padded to the layout's multiple, sharded over cp like training, argmax of
        the local logits in chunks, gathered over cp."""
        T = input_ids.shape[1]
        lay = Layout.parse(self.layout)
        cp = self.dims.cp
        multiple = lay.required_multiple(cp)
        padded_len = -(-T // multiple) * multiple
        ids = torch.full((padded_len,), self.dataset.tokenizer.pad_id, dtype=torch.int64)
        ids[:T] = input_ids[0].cpu()
        bounds = [0, T, padded_len] if padded_len > T else [0, T]
        sample = PackedSample(ids, torch.full_like(ids, IGNORE_INDEX),
                              torch.tensor(bounds, dtype=torch.int32))
        mb = shard_sample(sample, lay, cp, self.cp_rank).to(self.env.device)
        autocast = (torch.autocast(self.env.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else nullcontext())
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast:
                hidden = self.model(mb.input_ids, self.sequence_context(mb))  # [1, S_local, h]
            weight = self.model.output_weight
            pred = chunked_argmax(hidden.to(weight.dtype), weight,
                                  self.config.train.loss_chunk_size)  # [1, S_local]
        finally:
            self.model.train(was_training)
        if cp > 1:
            parts = [torch.empty_like(pred) for _ in range(cp)]
            dist.all_gather(parts, pred.contiguous(), group=self.pmesh.group("cp"))
            pred = lay.unshard(parts, dim=1)
        return pred[:, :T].cpu()

    def evaluate(self, samples: list[SyntheticSample] | None = None) -> AccuracyReport | None:
        """Answer accuracy of the model on held-out passkey/MQAR samples (every rank calls it;
        all get the same report); None when there is nothing to evaluate."""
        samples = self.eval_samples() if samples is None else samples
        if not samples:
            return None
        return answer_accuracy(
            samples, self.predict_next_tokens, self.dataset.tokenizer,
            add_bos=self.config.data.packing.add_bos,
        )

    # -- checkpoints ----------------------------------------------------------------------------
    def _train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data": self.dataset.state_dict(),
            "world_size": self.env.world_size,
            "dims": dataclasses.asdict(self.dims),
        }

    def save_checkpoint(self) -> Path:
        """Save the full state at the current step (every rank calls it)."""
        if self.checkpointer is None:
            raise ValueError("checkpoint.enabled is false; nothing is saved")
        state = {
            "app": ModelOptimizerState(self.model, self.optimizer),
            "train": self._train_state(),
            "rng": {f"rank{self.env.rank}": rng_state(self.env.device)},
        }
        meta = {"world_size": self.env.world_size, "dims": dataclasses.asdict(self.dims),
                "config": self.config.to_dict()}
        self.last_checkpoint = self.checkpointer.save(self.step, state, meta)
        return self.last_checkpoint

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore model, optimizer, scheduler, data position, step and (same world size) RNG
        from a checkpoint saved on any mesh."""
        path = Checkpointer.resolve(path)
        keys = Checkpointer.saved_keys(path)
        rank_keys = {k.split(".")[1] for k in keys if k.startswith("rng.rank")}
        me = f"rank{self.env.rank}"
        restore_rng = len(rank_keys) == self.env.world_size and me in rank_keys
        state: dict[str, Any] = {
            "app": ModelOptimizerState(self.model, self.optimizer),
            "train": self._train_state(),
        }
        if restore_rng:
            current = rng_state(self.env.device)  # placeholders of the right sizes
            state["rng"] = {me: {k: v for k, v in current.items() if f"rng.{me}.{k}" in keys}}
        Checkpointer(path.parent).load(path, state)
        train = state["train"]
        self.step = int(train["step"])
        self.scheduler.load_state_dict(train["scheduler"])
        self.dataset.load_state_dict(train["data"])
        self._data_iter = None
        if restore_rng:
            set_rng_state(state["rng"][me], self.env.device)
        else:
            torch.manual_seed(self.config.seed + self.step)
        self.resumed_from = path
        self.last_checkpoint = path
        saved = train["dims"]
        if train["world_size"] != self.env.world_size or saved != dataclasses.asdict(self.dims):
            self._resume_note = (
                f"resharded from dp={saved['dp']} cp={saved['cp']} tp={saved['tp']} "
                f"({train['world_size']} ranks) to dp={self.dims.dp} cp={self.dims.cp} "
                f"tp={self.dims.tp}" + ("" if restore_rng else "; RNG states reseeded")
            )

    def _resume(self) -> None:
        ck = self.config.checkpoint
        if not ck.enabled and ck.resume in ("auto", "none"):
            return
        if ck.resume == "none":
            existing = self.checkpointer.latest() if self.checkpointer else None
            if existing is not None:
                raise ValueError(
                    f"checkpoint.resume=none but {str(self.checkpointer.directory)!r} already "
                    f"holds checkpoints (newest: {existing.name}); resume from them "
                    "(checkpoint.resume=auto), pick another checkpoint.dir or name, or delete "
                    "them"
                )
            return
        if ck.resume == "auto":
            path = self.checkpointer.latest()
            if path is None:
                return
        else:
            path = Checkpointer.resolve(ck.resume)
        self.load_checkpoint(path)

    # -- the loop -------------------------------------------------------------------------------
    def describe(self) -> str:
        cfg, env, d = self.config, self.env, self.dims
        m = cfg.model
        p = cfg.parallel
        data = cfg.data
        source = (f"files {data.dataset.path!r}" if data.dataset is not None
                  else f"synthetic {data.synthetic.describe()}")
        mesh = f"dp={d.dp} x cp={d.cp} x tp={d.tp}"
        if d.ulysses > 1:
            mesh += f" (ulysses {d.ulysses} x ring {d.ring})"
        extras = ", fsdp" if p.fsdp else ""
        if p.activation_checkpointing != "none":
            extras += f", activation checkpointing {p.activation_checkpointing}"
        plural = "es" if env.world_size > 1 else ""
        lines = [
            (f"longctx train: run {cfg.name!r} on {env.world_size} process{plural} "
             f"({env.device.type}, {env.backend}): {mesh}, strategy {p.strategy} (layout "
             f"{self.layout}), kernel {p.kernel}, precision {self.precision}{extras}"),
            (f"  model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} "
             f"heads ({m.num_query_groups} kv), {format_count(num_params(m))} parameters; "
             f"{m.seq_length} tokens per sequence, {self.tokens_per_step} tokens per step "
             f"(dp {d.dp} x accumulation {cfg.train.grad_accum_steps} x micro-batch "
             f"{cfg.train.micro_batch_size} x {m.seq_length})"),
            (f"  data: {source}, {self.dataset.tokenizer!r}; peak FLOP/s per device "
             f"{self.peak_flops:.3g} ({self.peak_flops_source})"),
        ]
        if self.resumed_from is not None:
            note = f" ({self._resume_note})" if self._resume_note else ""
            lines.append(f"  resumed from {self.resumed_from} at step {self.step}{note}")
        return "\n".join(lines)

    def train(self, on_step_end: Callable[[Trainer, StepMetrics], None] | None = None
              ) -> TrainSummary:
        """Train to ``train.steps``; returns a :class:`TrainSummary` (rank 0 also prints one).

        Raises :class:`TrainingInterrupted` after saving a checkpoint when SIGTERM (or Ctrl-C)
        arrives. ``on_step_end(trainer, metrics)`` runs after every step (tests, hooks).
        """
        cfg = self.config
        total = cfg.train.steps
        start_step = self.step
        env = self.env
        if env.is_main and not self.quiet:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self._print(self.describe())
        tb_dir = cfg.tensorboard_dir if cfg.logging.tensorboard else None
        metrics = MetricsLogger(
            is_main=env.is_main and not self.quiet, total_steps=total,
            interval=cfg.logging.log_interval, tensorboard_dir=tb_dir,
            flops_per_token=self.flops_per_token, peak_flops=self.peak_flops,
            world_size=env.world_size, device=env.device, start_step=start_step,
        )
        losses: list[float] = []
        eval_samples = self.eval_samples()
        report: AccuracyReport | None = None
        stopped_by = None
        exhausted = False
        seconds = 0.0
        try:
            if self.step >= total:
                self._print(
                    f"  already at step {self.step} of train.steps={total}: nothing to train. "
                    "Raise train.steps to continue this run, or start a new one with another "
                    "name / checkpoint.dir"
                )
            with GracefulStop() as stop:
                while self.step < total:
                    try:
                        micro_batches = self.next_micro_batches()
                    except _DataExhausted:
                        exhausted = True
                        self._print(
                            f"  the data ran out after step {self.step} (data.packing."
                            f"num_epochs={cfg.data.packing.num_epochs}); stopping early"
                        )
                        break
                    m = self.train_step(micro_batches, stop)
                    seconds += m.seconds
                    losses.append(m.loss)
                    metrics.log(m)
                    if on_step_end is not None:
                        on_step_end(self, m)
                    every = cfg.eval.interval
                    if eval_samples and every and self.step % every == 0 and self.step < total:
                        self._log_eval(self.evaluate(eval_samples), metrics)
                    interval = cfg.checkpoint.interval
                    due = self.step == total or (interval and self.step % interval == 0)
                    if self.checkpointer is not None and (due or m.stop_signal):
                        self.save_checkpoint()
                    if m.stop_signal:
                        stopped_by = m.stop_signal
                        break
            if exhausted and self.checkpointer is not None and self.step > start_step:
                self.save_checkpoint()
            if eval_samples and stopped_by is None and self.step > start_step:
                report = self.evaluate(eval_samples)
                self._log_eval(report, metrics, echo=False)  # the summary prints it
        finally:
            metrics.close()
        summary = TrainSummary(
            start_step=start_step, final_step=self.step, total_steps=total,
            tokens=(self.step - start_step) * self.tokens_per_step, seconds=seconds,
            losses=tuple(losses), tensorboard_dir=tb_dir, checkpoint=self.last_checkpoint,
            stopped_by=stopped_by, data_exhausted=exhausted, accuracy=report,
        )
        self._print(self.format_summary(summary))
        if stopped_by is not None:
            where = (f"saved checkpoint {summary.checkpoint}" if summary.checkpoint
                     else "no checkpoint (checkpoint.enabled is false)")
            raise TrainingInterrupted(
                f"stopped by {stopped_by} at step {self.step}: {where}; run the same command "
                "again to resume", self.step, summary.checkpoint, stopped_by,
            )
        return summary

    def _log_eval(self, report: AccuracyReport | None, metrics: MetricsLogger,
                  echo: bool = True) -> None:
        if report is None:
            return
        if echo:
            metrics.print(f"eval at step {self.step}: {report}")
        if metrics.writer is not None:
            metrics.writer.add_scalar("eval/exact_match", report.exact_match, self.step)
            metrics.writer.add_scalar("eval/token_accuracy", report.token_accuracy, self.step)
            for task, value in report.by_task.items():
                metrics.writer.add_scalar(f"eval/exact_match_{task}", value, self.step)
            metrics.writer.flush()

    def format_summary(self, s: TrainSummary) -> str:
        mfu = (self.flops_per_token * s.tokens_per_s / (self.peak_flops * self.env.world_size)
               if self.flops_per_token is not None else None)
        head = "stopped" if s.stopped_by else "finished"
        if s.steps == 0:
            lines = [f"longctx train: nothing to do at step {s.final_step}/{s.total_steps}"]
        else:
            lines = [
                f"longctx train: {head} at step {s.final_step}/{s.total_steps} "
                f"({s.steps} steps this run) in {format_duration(s.seconds)}: "
                f"{format_count(s.tokens)} tokens, {format_count(s.tokens_per_s)} tokens/s"
                + (f", MFU {mfu:.2%}" if mfu is not None else "")
            ]
        if s.losses:
            tail = s.losses[-min(10, len(s.losses)):]
            lines.append(
                f"  loss {s.losses[0]:.4f} (first step) -> {s.losses[-1]:.4f} (last step); "
                f"mean of the last {len(tail)} steps {sum(tail) / len(tail):.4f}"
            )
        if s.accuracy is not None:
            lines.append(f"  held-out answers: {s.accuracy}")
        if s.tensorboard_dir is not None:
            lines.append(f"  tensorboard: tensorboard --logdir {s.tensorboard_dir}")
        if s.checkpoint is not None:
            lines.append(f"  checkpoint: {s.checkpoint}")
        return "\n".join(lines)

    def close(self) -> None:
        """Release the process group if this trainer started it."""
        self.env.close()
