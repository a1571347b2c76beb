"""The run config: one typed, nested dataclass loaded from YAML with ``--set key.sub=value``.

``TrainConfig()`` *is* the embedded default run (``configs/tiny.yaml`` spells the same values
out): a tiny Llama learning synthetic passkey retrieval, byte tokenizer, ``cp=4`` zigzag on a
simulated CPU mesh.  A YAML file (and then every ``--set``) is merged over those defaults field by
field, so a config names only what it changes; then pydantic reads the result into the dataclasses,
checking every value against its field's type strictly (``"2"`` is no int, ``true`` no number;
``3e-4`` reads as a number, as in YAML 1.2), and every component checks its own values.  Errors
name the bad key as a dotted path and say what is allowed::

    unknown config key 'optim.lrr'; allowed keys in 'optim': betas, eps, lr, weight_decay
    (did you mean 'optim.lr'?)

Sections (``longctx train --print-config`` prints them all, resolved):

- ``model``: :class:`~longctx.models.config.ModelConfig` (megatron-core names).
- ``data``: :class:`~longctx.data.DataConfig`; ``data.packing.seq_length`` follows
  ``model.seq_length`` unless set (then they must agree).
- ``parallel``: :class:`ParallelismConfig`: mesh sizes, the CP strategy/layout/kernel, and how the
  model is parallelized (FSDP2, activation checkpointing, compile).
- ``optim`` (AdamW), ``schedule`` (warmup + cosine/linear/constant decay to ``min_lr``),
  ``train`` (steps, batch, accumulation, clipping, precision, device, loss chunking, peak FLOP/s),
  ``logging`` (TensorBoard, interval), ``checkpoint`` (DCP: interval, keep, resume),
  ``eval`` (passkey/MQAR answer accuracy on held-out synthetic samples).
- top level: ``name`` (the run's folder under ``output_dir``), ``output_dir``, ``seed``.

Example::

    >>> from longctx.train.config import TrainConfig, load_config
    >>> cfg = load_config(None, ["parallel.cp=2", "optim.lr=3e-4", "train.steps=10"])
    >>> cfg.parallel.cp, cfg.optim.lr, cfg.train.steps, cfg.data.packing.seq_length
    (2, 0.0003, 10, 1024)
    >>> load_config(None, ["optim.lrr=1"])
    Traceback (most recent call last):
    ...
    ValueError: unknown config key 'optim.lrr'; allowed keys in 'optim': betas, eps, lr, weight_decay (did you mean 'optim.lr'?)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from ..data import DataConfig, SyntheticConfig, check_seq_length
from ..models.config import ModelConfig

__all__ = [
    "CheckpointConfig",
    "EvalConfig",
    "LoggingConfig",
    "OptimConfig",
    "ParallelismConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_overrides",
    "load_config",
]

Precision = Literal["auto", "bf16", "fp32", "fp64"]
Device = Literal["auto", "cpu", "cuda"]
Decay = Literal["cosine", "linear", "constant"]
ACMode = Literal["none", "full", "selective"]

# The embedded default run's model and data: sized so that, on 2 CPU cores in about three
# minutes, the model learns to retrieve a 2-digit pass key from its context (see configs/tiny.yaml).
# ffn_hidden_size / kv_channels are derived.
TINY_MODEL = ModelConfig(
    num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, seq_length=1024,
    vocab_size=259,  # the byte tokenizer: 256 bytes + <pad> <bos> <eos>
    # about sqrt(2 / (5 * hidden)), the small-init rule; megatron's 0.02 is for wide models, and
    # with it this one stayed at chance on the retrieval for the whole run
    init_method_std=0.06,
)
TINY_DATA = DataConfig(
    synthetic=SyntheticConfig(
        task="passkey", passkey_digits=2, num_samples=20000, min_length=40, max_length=160
    )
)


# -- sections -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParallelismConfig:
    """The ``parallel`` section: mesh sizes, context-parallel attention, model parallelization.

    - ``dp`` / ``cp`` / ``tp`` / ``ulysses``: mesh sizes (``dp=None``: the ranks left over,
      ``world_size // (cp * tp)``); ``ulysses`` divides ``cp`` (``strategy="hybrid"``: Ulysses
      inside, ring across). Ranks: ``tp`` fastest, then cp, then dp.
    - ``strategy``: a softmax CP strategy of the table ``longctx.parallel.STRATEGIES``, or
      ``auto`` (:func:`longctx.parallel.api.choose_strategy`: Ulysses when the heads split over
      cp, else the ring that balances the layout); ``layout``: how the sequence is sharded
      (None: the strategy's ``default_layout`` in the table; zigzag for ``auto``); ``kernel``:
      the local attention kernel (``auto`` picks per call).  Both are checked as
      :class:`~longctx.parallel.CPConfig` checks them.
    - ``fsdp``, ``activation_checkpointing``, ``compile``, ``compile_backend``,
      ``reshard_after_forward``: :class:`~longctx.models.parallelize.ParallelConfig`.
    """

    dp: int | None = None
    cp: int = 4
    tp: int = 1
    ulysses: int = 1
    strategy: str = "zigzag"
    layout: str | None = None
    kernel: str = "auto"
    fsdp: bool = False
    activation_checkpointing: ACMode = "none"
    compile: bool = False
    compile_backend: str = "inductor"
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        from ..kernels import available_kernels
        from ..parallel.api import CPConfig, softmax_strategies

        for name in ("cp", "tp", "ulysses"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp is not None and self.dp < 1:
            raise ValueError(f"parallel.dp must be >= 1 or null (the ranks left), got {self.dp}")
        if self.cp % self.ulysses:
            raise ValueError(
                f"parallel.ulysses={self.ulysses} must divide parallel.cp={self.cp} "
                "(cp = ring x ulysses)"
            )
        allowed = [*softmax_strategies(), "auto"]
        if self.strategy not in allowed:
            raise ValueError(f"parallel.strategy={self.strategy!r}; allowed values: {allowed}")
        try:
            CPConfig(strategy=self.strategy, layout=self.layout)  # the table's layout rules
        except ValueError as e:
            raise ValueError(f"parallel.layout: {e}") from None
        if self.strategy == "hybrid" and self.ulysses == 1 and self.cp > 1:
            raise ValueError(
                "parallel.strategy='hybrid' needs parallel.ulysses > 1 (Ulysses inside, ring "
                "across); set ulysses to a divisor of cp, or pick strategy 'ring'/'zigzag'"
            )
        if self.ulysses > 1 and self.strategy != "hybrid":
            raise ValueError(
                f"parallel.ulysses={self.ulysses} only applies to strategy 'hybrid' (got "
                f"{self.strategy!r}); set ulysses=1, or strategy='hybrid'"
            )
        if self.kernel not in available_kernels():
            raise ValueError(
                f"parallel.kernel={self.kernel!r}; allowed values: {available_kernels()}"
            )

    @property
    def resolved_layout(self) -> str:
        """The layout the sequence is sharded with (the strategy's default when unset)."""
        from ..parallel.api import CPConfig

        return CPConfig(strategy=self.strategy, layout=self.layout).resolved_layout

    def dims(self, world_size: int):
        """:class:`~longctx.parallel.mesh.ParallelDims` for ``world_size`` ranks (dp inferred)."""
        from ..parallel.mesh import ParallelDims

        per_dp = self.cp * self.tp
        dp = self.dp
        if dp is None:
            if world_size % per_dp:
                raise ValueError(
                    f"{world_size} ranks cannot be split into data-parallel groups of "
                    f"parallel.cp x parallel.tp = {self.cp} x {self.tp} = {per_dp} ranks; launch a "
                    f"multiple of {per_dp} processes or change cp/tp"
                )
            dp = world_size // per_dp
        if dp * per_dp != world_size:
            raise ValueError(
                f"parallel.dp x cp x tp = {dp} x {self.cp} x {self.tp} = {dp * per_dp} but "
                f"{world_size} processes were launched; launch {dp * per_dp} processes or set "
                f"parallel.dp=null to use all of them"
            )
        return ParallelDims(dp=dp, cp=self.cp, tp=self.tp, ulysses=self.ulysses)

    def world_size(self) -> int:
        """Processes this config asks for (``dp=None`` counts as 1)."""
        return (self.dp or 1) * self.cp * self.tp


@dataclass(frozen=True)
class OptimConfig:
    """AdamW: ``lr`` (peak), ``betas``, ``eps``, ``weight_decay`` (matrices only; norms and
    other 1-D parameters are not decayed)."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be in [0, 1), got {list(self.betas)}")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError("optim.eps must be > 0 and optim.weight_decay >= 0")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning rate: linear warmup from 0 over ``warmup_steps``, then ``decay`` (cosine, linear,
    constant) from ``optim.lr`` to ``min_lr`` at the last step (``train.steps``)."""

    warmup_steps: int = 10
    decay: Decay = "cosine"
    min_lr: float = 3e-4

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.min_lr < 0:
            raise ValueError(f"schedule.min_lr must be >= 0, got {self.min_lr}")


@dataclass(frozen=True)
class TrainingConfig:
    """The ``train`` section.

    - ``steps``: optimizer steps; ``micro_batch_size``: packed sequences per micro-batch per
      data-parallel rank (more than one are laid end to end, documents kept apart by the mask);
      ``grad_accum_steps``: micro-batches per step.  Global batch per step:
      ``dp * grad_accum_steps * micro_batch_size`` sequences.
    - ``clip_grad_norm``: global gradient-norm clip (null: no clipping; the norm is still logged).
    - ``precision``: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` (FSDP2 mixed precision with
      fp32 master weights and fp32 reductions, or autocast without FSDP), ``fp32``, ``fp64``.
    - ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda``.
    - ``loss_chunk_size``: tokens per chunk of the cross-entropy (the ``[tokens, vocab]``
      logits exist for one chunk at a time).
    - ``peak_flops_per_device``: for MFU; null: 989e12 on H100/H200 (bf16 dense), 312e12 on
      A100, and a nominal 1e11 per CPU process.
    """

    steps: int = 600
    micro_batch_size: int = 2
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = 1.0
    precision: Precision = "auto"
    device: Device = "auto"
    loss_chunk_size: int = 2048
    peak_flops_per_device: float | None = None
    # "deepspeed": the step runs through a DeepSpeed engine (ZeRO over dp x cp), configured by
    # ``deepspeed`` (e.g. {zero_optimization: {stage: 3}}); see longctx.integrations.deepspeed
    engine: Literal["torch", "deepspeed"] = "torch"
    deepspeed: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum_steps", "loss_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(
                f"train.clip_grad_norm must be > 0 or null (no clipping), got {self.clip_grad_norm}"
            )


@dataclass(frozen=True)
class LoggingConfig:
    """``dir``: TensorBoard folder (null: ``<output_dir>/<name>/tensorboard``);
    ``tensorboard``: write event files; ``log_interval``: steps between progress lines/scalars."""

    dir: str | None = None
    tensorboard: bool = True
    log_interval: int = 50

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ValueError(f"logging.log_interval must be >= 1, got {self.log_interval}")


@dataclass(frozen=True)
class CheckpointConfig:
    """torch.distributed.checkpoint (DCP) folders ``<dir>/step-<N>``.

    - ``enabled``; ``dir`` (null: ``<output_dir>/<name>/checkpoints``).
    - ``interval``: steps between saves (0: only at the end); the last step and a SIGTERM always
      save. ``keep``: newest checkpoints kept (0: all).
    - ``resume``: ``auto`` (the newest complete checkpoint in ``dir``, if any), ``none`` (start
      fresh; refused when ``dir`` already holds checkpoints), or the path of a ``step-<N>`` folder.
    """

    enabled: bool = True
    dir: str | None = None
    interval: int = 200
    keep: int = 2
    resume: str = "auto"

    def __post_init__(self) -> None:
        if self.interval < 0 or self.keep < 0:
            raise ValueError("checkpoint.interval and checkpoint.keep must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """Long-context answer accuracy (:func:`longctx.data.answer_accuracy`) on ``num_samples``
    held-out synthetic passkey/MQAR samples (generated like ``data.synthetic`` with the next
    seed), at the end of the run and every ``interval`` steps (0: only at the end).
    ``num_samples: 0`` turns it off; it runs only when training on the synthetic data."""

    num_samples: int = 64
    interval: int = 200

    def __post_init__(self) -> None:
        if self.num_samples < 0 or self.interval < 0:
            raise ValueError("eval.num_samples and eval.interval must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run; ``TrainConfig()`` is the embedded default (``configs/tiny.yaml``)."""

    # How pydantic reads a run from plain data (:meth:`from_dict`): unknown keys are errors, and
    # types are strict (JSON's: an int for a float is fine, "2" for an int or true for a number is
    # not). The sections' dataclasses (ModelConfig, DataConfig, ...) have no pydantic config of
    # their own, so they are read with this one.
    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)

    name: str = "tiny"
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=lambda: TINY_MODEL)
    data: DataConfig = field(default_factory=lambda: TINY_DATA)
    parallel: ParallelismConfig = field(default_factory=ParallelismConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self._check_consistency()

    # -- cross-section checks -------------------------------------------------------------------
    def _check_consistency(self) -> None:
        from ..models.parallelize import validate_parallel_dims
        from ..parallel.mesh import ParallelDims

        S = self.model.seq_length
        if self.data.packing.seq_length != S:
            raise ValueError(
                f"data.packing.seq_length={self.data.packing.seq_length} differs from "
                f"model.seq_length={S}; remove data.packing.seq_length (it follows the model) or "
                "make them equal"
            )
        par = self.parallel
        try:
            check_seq_length(S, par.resolved_layout, par.cp)
        except ValueError as e:
            raise ValueError(f"model.seq_length: {e} (parallel.layout / parallel.cp)") from None
        dims = ParallelDims(dp=1, cp=par.cp, tp=par.tp, ulysses=par.ulysses)
        try:
            validate_parallel_dims(self.model, dims)
        except ValueError as e:
            msg = str(e).replace("ModelConfig.", "model.")
            raise ValueError(f"parallel.tp / parallel.ulysses: {msg}") from None
        if par.strategy == "ulysses" and (self.model.num_attention_heads // par.tp) % par.cp:
            raise ValueError(
                f"parallel.strategy='ulysses' splits heads over cp: parallel.cp={par.cp} must "
                f"divide num_attention_heads / tp = {self.model.num_attention_heads // par.tp}; "
                "lower cp, or use 'hybrid' with parallel.ulysses dividing the heads"
            )
        if "linear" in self.model.layer_kinds and par.cp > 1:
            from ..parallel.layout import Layout
            from ..parallel.strategies import STRATEGIES

            kind = Layout.parse(par.resolved_layout).kind
            if not STRATEGIES["linear"].accepts_layout(kind) or par.strategy == "hybrid":
                raise ValueError(
                    f"model.attention_kinds has linear layers, whose CP (LASP-2) passes the state "
                    f"through the shards in sequence order, so the sequence must be sharded "
                    f"contiguously; got parallel.strategy={par.strategy!r} with layout "
                    f"{par.resolved_layout!r}. Set parallel.layout=contiguous and "
                    "parallel.strategy to ulysses, ring or allgather (for the softmax layers)"
                )
        if self.train.micro_batch_size > 1 and self.data.packing.cross_document_attention:
            raise ValueError(
                f"train.micro_batch_size={self.train.micro_batch_size} lays sequences end to end "
                "and keeps them apart with the document mask, which "
                "data.packing.cross_document_attention=true turns off (the sequences would attend "
                "to each other); use micro_batch_size=1 with train.grad_accum_steps instead"
            )
        if self.schedule.min_lr > self.optim.lr:
            raise ValueError(
                f"schedule.min_lr={self.schedule.min_lr} is above optim.lr={self.optim.lr}"
            )
        if self.checkpoint.resume not in ("auto", "none") and not self.checkpoint.resume:
            raise ValueError("checkpoint.resume must be 'auto', 'none' or a checkpoint path")

    # -- paths ----------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.logging.dir) if self.logging.dir else self.run_dir / "tensorboard"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    # -- conversion -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Merge ``values`` (nested dicts, e.g. parsed YAML) over the defaults and check them.

        A section given in part keeps the defaults of its other keys (fields a component derived,
        such as ``model.ffn_hidden_size``, are derived again); ``data.packing.seq_length``
        follows ``model.seq_length`` unless given.  Raises ValueError naming the dotted key.
        """
        given = _plain(values, derived=False)
        merged = _merge(_plain(cls(), derived=False), given)
        packing_given = isinstance(given.get("data"), dict) and isinstance(
            given["data"].get("packing"), dict) and "seq_length" in given["data"]["packing"]
        model, data = merged.get("model"), merged.get("data")
        if (not packing_given and isinstance(model, dict) and "seq_length" in model
                and isinstance(data, dict) and isinstance(data.get("packing"), dict)):
            data["packing"]["seq_length"] = model["seq_length"]
        try:
            # plain YAML data is JSON data: pydantic's JSON mode reads lists as tuples, and its
            # strict mode there is the one wanted for a config file
            return _adapter().validate_json(json.dumps(merged, default=str))
        except ValidationError as e:
            raise ValueError(_explain(e, merged)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists (YAML-safe); ``from_dict(to_dict())`` round-trips."""
        return _plain(self, derived=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- loading and overrides ------------------------------------------------------------------------
class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1), except that ``3e-4`` / ``1e5`` read as numbers, as in
    YAML 1.2 (1.1 wants a dot and a signed exponent: ``3.0e-4``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: plain data only


def _parse_value(text: str) -> Any:
    """An override's value: YAML (``2``, ``3e-4``, ``true``, ``null``, ``[0.9, 0.95]``), or the
    text itself when it is not valid YAML."""
    try:
        return _load_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``values`` with ``key.sub=value`` overrides applied (values parsed as YAML scalars/lists).

    >>> apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=0.5", "parallel.cp=2"])
    {'optim': {'lr': 0.5}, 'parallel': {'cp': 2}}
    """
    out = copy.deepcopy(dict(values))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(
                f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. "
                "--set parallel.cp=2 --set optim.lr=3e-4"
            )
        parts = key.split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ValueError(
                    f"--set {item!r}: {'.'.join(parts[: depth + 1])!r} is a value, not a section"
                )
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return out


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """``TrainConfig`` from a YAML file (None: the embedded default) and ``--set`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"config file {str(p)!r} does not exist; pass --config configs/<name>.yaml "
                "(or no --config for the embedded tiny default)"
            )
        try:
            loaded = _load_yaml(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(
                f"config file {str(p)!r} must hold a mapping of sections (model:, data:, ...), "
                f"got {type(loaded).__name__}"
            )
        values = loaded
    return TrainConfig.from_dict(apply_overrides(values, overrides))


# -- reading plain data (pydantic), and its errors -------------------------------------------------
@functools.cache
def _adapter() -> TypeAdapter:
    return TypeAdapter(TrainConfig)


def _plain(obj: Any, *, derived: bool) -> Any:
    """Plain dicts/lists of ``obj`` (dataclasses: their init fields; ``derived=False`` leaves out
    the fields a component derived, listed in its ``derived_fields``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        skip = () if derived else set(getattr(obj, "derived_fields", ()))
        return {f.name: _plain(getattr(obj, f.name), derived=derived)
                for f in fields(obj) if f.init and f.name not in skip}
    if isinstance(obj, Mapping):
        return {k: _plain(v, derived=derived) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, derived=derived) for v in obj]
    return obj


def _merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base`` key by key where both are mappings (plain data)."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return over


def _dotted(path: Sequence[str]) -> str:
    return ".".join(path)


def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _dataclass_in(t: Any) -> Any:
    """The dataclass of type ``t`` (``X`` or ``X | None``), else None."""
    if _is_dataclass_type(t):
        return t
    return next((a for a in get_args(t) if _is_dataclass_type(a)), None)


def _init_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.init]


def _locate(loc: Sequence[Any]) -> tuple[list[str], Any]:
    """The config keys that a pydantic error location walks through, and the last one's type
    (the rest of the location is inside that field: union members, list items)."""
    path: list[str] = []
    t: Any = TrainConfig
    for item in loc:
        cls = _dataclass_in(t)
        if cls is None or item not in _init_fields(cls):
            break
        path.append(item)
        t = typing.get_type_hints(cls)[item]
    return path, t


def _lookup(values: Any, path: Sequence[str]) -> Any:
    for key in path:
        values = values.get(key) if isinstance(values, dict) else None
    return values


def _describe(t: Any) -> str:
    """What a value of type ``t`` is, for the error messages: "an int", "a number or null"."""
    origin, args = get_origin(t), get_args(t)
    if t is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if _is_dataclass_type(t):
        return "a section (mapping)"
    return {int: "an int", float: "a number", bool: "true or false", str: "a string"}.get(
        t, getattr(t, "__name__", str(t))
    )


def _explain(error: ValidationError, values: dict[str, Any]) -> str:
    """One message for pydantic's first error (an unknown key first): the dotted key, what it
    must be or what is allowed, and the value given."""
    errors = error.errors()
    order = {"unexpected_keyword_argument": 0, "missing": 1}
    # an unknown key first, the outermost first (stable: in pydantic's order among equals)
    first = min(errors, key=lambda e: (order.get(e["type"], 2), len(e["loc"])))
    loc = first["loc"]
    if first["type"] == "unexpected_keyword_argument":
        path, t = _locate(loc[:-1])
        key = str(loc[-1])
        allowed = _init_fields(_dataclass_in(t))
        where = f"in {_dotted(path)!r}" if path else "at the top level"
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {_dotted([*path, close[0]])!r}?)" if close else ""
        return (f"unknown config key {_dotted([*path, key])!r}; allowed keys {where}: "
                f"{', '.join(sorted(allowed))}{hint}")
    path, t = _locate(loc)
    if first["type"] == "missing" and len(path) == len(loc):
        return (f"config key {_dotted(path)!r} is required ({_describe(t)}); add it to the "
                f"{_dotted(path[:-1]) or 'top level'!r} section")
    if first["type"] == "value_error":  # a component's own check (its __post_init__)
        msg = str(first["ctx"]["error"])
        cls = _dataclass_in(t)
        if path and cls is not None:  # "ModelConfig.hidden_size" -> "model.hidden_size"
            section = _dotted(path)
            msg = msg.replace(f"{cls.__name__}.", f"{section}.")
            if not msg.startswith(path[0]) and f"{section}." not in msg:
                msg = f"{section}: {msg}"
        return msg
    value = _lookup(values, path)
    return (f"config key {_dotted(path)!r} must be {_describe(t)}, got {value!r} "
            f"({type(value).__name__})")
