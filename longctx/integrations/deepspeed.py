"""DeepSpeed adapter: longctx attention under DeepSpeed-Ulysses and ALST, an mpu, an engine.

- :class:`UlyssesLocalAttention`: the ``local_attention`` of
  ``deepspeed.sequence.layer.DistributedAttention``.  After DeepSpeed's all-to-all it holds the
  whole sequence for a slice of the heads and runs a longctx kernel under a mask on global
  positions (causal, window, packed documents); given an inner ``group`` it runs a longctx
  strategy over it (e.g. a ring across nodes under DeepSpeed's all-to-all inside a node).
- :func:`register_ulysses_hf`: ALST (``UlyssesSPAttentionHF``) with longctx's transformers
  implementation ``longctx`` as its core attention (documents from the gathered position ids).
- :class:`ContextParallelMPU`: DeepSpeed's mpu interface over data x context parallel groups:
  ZeRO shards and averages gradients over dp x cp, and :meth:`ContextParallelMPU.loss` scales
  each CP rank's loss so that this average is the mean loss's gradient.
- :func:`initialize_engine`: ``deepspeed.initialize`` with that mpu, ZeRO stage 1, 2 or 3;
  :class:`DeepSpeedLossEngine`: a trainer's step through it, for models whose loss reads an output
  weight outside their forward (chunked cross entropy), as longctx's trainer does.

Needs ``pip install "longctx[deepspeed]"`` (deepspeed >=0.19,<0.20; ``DS_BUILD_OPS=0`` is enough:
on CPUs DeepSpeed JIT-builds its small shared-memory op on first start and caches it under
``TORCH_EXTENSIONS_DIR``).

Example (inside a torchrun job; ``model`` computes its attention with ``mpu``'s CP group)::

    from longctx.integrations.deepspeed import ContextParallelMPU, initialize_engine
    mpu = ContextParallelMPU.build(cp_size=2)
    engine = initialize_engine(model, {"zero_optimization": {"stage": 3}, ...}, mpu=mpu)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..kernels.mask import Mask
from ..parallel.api import attention
from ._deps import require

require("deepspeed")

__all__ = [
    "ZERO_STAGES",
    "ContextParallelMPU",
    "DeepSpeedLossEngine",
    "UlyssesLocalAttention",
    "initialize_engine",
    "register_ulysses_hf",
]

ZERO_STAGES = (0, 1, 2, 3)


class UlyssesLocalAttention(nn.Module):
    """``local_attention`` for DeepSpeed's ``DistributedAttention`` (DeepSpeed-Ulysses).

    ``forward(q, k, v, *args, cu_seqlens=None, **kwargs)``: ``[s, b, h, d]`` (``seq_dim=0``,
    DeepSpeed's default ``gather_idx=0``) or ``[b, s, h, d]`` (``seq_dim=1``, with
    ``gather_idx=1``); k/v may have fewer heads (GQA, read in place).  Returns the same layout
    ``[.., h, d]``, which DeepSpeed's output all-to-all expects.  ``cu_seqlens``: global
    document boundaries of a packed row.  ``group``: an inner CP group to run ``strategy`` over
    with ``layout`` (None: the gathered sequence is whole here).

    Example::

        >>> import torch
        >>> attn = UlyssesLocalAttention(causal=True)
        >>> q = torch.randn(16, 1, 4, 8); k = v = torch.randn(16, 1, 2, 8)  # [s, b, h, d]
        >>> attn(q, k, v).shape
        torch.Size([16, 1, 4, 8])
    """

    def __init__(
        self,
        *,
        causal: bool = True,
        window: int | None = None,
        kernel: str = "auto",
        scale: float | None = None,
        seq_dim: int = 0,
        group=None,
        strategy: str = "ring",
        layout: str = "contiguous",
    ):
        super().__init__()
        if seq_dim not in (0, 1):
            raise ValueError(f"seq_dim is 0 ([s, b, h, d]) or 1 ([b, s, h, d]), got {seq_dim}")
        self.causal, self.window, self.kernel, self.scale = causal, window, kernel, scale
        self.seq_dim, self.group, self.strategy, self.layout = seq_dim, group, strategy, layout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *args, cu_seqlens=None, **kwargs) -> Tensor:
        if args:
            raise TypeError(
                f"UlyssesLocalAttention takes q, k, v (and cu_seqlens=); got {len(args)} extra "
                "positional arguments from DistributedAttention"
            )
        mask = Mask(causal=self.causal, window=self.window, cu_seqlens=cu_seqlens)
        if self.seq_dim == 0:  # [s, b, h, d] -> [b, s, h, d]
            q, k, v = (x.transpose(0, 1).contiguous() for x in (q, k, v))
        out = attention(
            q, k, v, self.group,
            strategy=self.strategy if self.group is not None else "ring",
            layout=self.layout if self.group is not None else None,
            mask=mask, kernel=self.kernel, scale=self.scale,
        )
        return out.transpose(0, 1) if self.seq_dim == 0 else out  # back to the input's layout


class ContextParallelMPU:
    """DeepSpeed's mpu interface for data x context parallel training with longctx attention.

    DeepSpeed sees one data-parallel group, ``dp_cp`` (every rank of the dp x cp grid): ZeRO
    partitions parameters, gradients and optimizer states over it and *averages* gradients over
    it, the same way at every stage.  The CP ranks of one sequence must therefore sum their
    gradients: :meth:`loss` scales each rank's token-loss sum by ``cp / tokens`` (the sequence's
    token count), so that the average over dp x cp is the mean over dp of each sequence's mean
    loss.  (DeepSpeed's own sequence-parallel face is not used: its ZeRO-3 reduce-scatter path
    averages over sequence-parallel ranks where stages 1 and 2 sum.)  Model parallel is one rank.

    ``cp``: this rank's CP group; ``dp``: the ranks with the same CP rank (who load different
    data); ``dp_cp``: both.  Build it with :meth:`build` (ranks ``[i*cp, (i+1)*cp)`` form a CP
    group) or :meth:`from_mesh` (a :func:`longctx.parallel.mesh.build_mesh` mesh without TP).
    """

    def __init__(self, cp, dp, dp_cp, model_parallel):
        self.cp, self.dp, self.dp_cp, self.model_parallel = cp, dp, dp_cp, model_parallel
        cp_size, dp_size = dist.get_world_size(cp), dist.get_world_size(dp)
        if cp_size * dp_size != dist.get_world_size(dp_cp):
            raise ValueError(
                f"dp ({dp_size}) x cp ({cp_size}) ranks must make the dp_cp group "
                f"({dist.get_world_size(dp_cp)} ranks)"
            )
        if dist.get_world_size(model_parallel) != 1:
            raise ValueError("ContextParallelMPU's model-parallel group must be this rank alone")

    @staticmethod
    def _own_group():
        """A group of this rank alone (collective: every rank creates every singleton)."""
        own = None
        for r in range(dist.get_world_size()):
            g = dist.new_group([r])
            if r == dist.get_rank():
                own = g
        return own

    @classmethod
    def build(cls, cp_size: int) -> ContextParallelMPU:
        """Groups over the whole world: CP groups of ``cp_size`` consecutive ranks (collective)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if cp_size < 1 or world % cp_size:
            raise ValueError(
                f"cp_size={cp_size} must divide the world size {world}; launch a multiple of it"
            )
        cp = dp = None
        for i in range(world // cp_size):
            g = dist.new_group(list(range(i * cp_size, (i + 1) * cp_size)))
            if rank // cp_size == i:
                cp = g
        for j in range(cp_size):
            g = dist.new_group(list(range(j, world, cp_size)))
            if rank % cp_size == j:
                dp = g
        return cls(cp, dp, dist.new_group(list(range(world))), cls._own_group())

    @classmethod
    def from_mesh(cls, mesh) -> ContextParallelMPU:
        """From a :class:`longctx.parallel.mesh.ParallelMesh` with ``tp == 1``."""
        if mesh.dims.tp != 1:
            raise ValueError(
                f"ContextParallelMPU covers dp x cp; this mesh has tp={mesh.dims.tp}. DeepSpeed's "
                "ZeRO here does not see longctx's tensor parallelism: use tp=1"
            )
        return cls(
            mesh.group("cp"), mesh.group("dp"), mesh.fsdp_mesh.get_group("dp_cp"), cls._own_group()
        )

    def loss(self, token_loss_sum: Tensor, tokens) -> Tensor:
        """This rank's loss for the engine: ``cp * token_loss_sum / tokens``.

        ``token_loss_sum``: the sum of this rank's token losses; ``tokens``: the token count of
        the whole sequence (all CP ranks).  Report ``all_reduce(loss, cp) / cp``.
        """
        return token_loss_sum * (self.get_context_parallel_world_size() / tokens)

    # longctx's own face
    def get_context_parallel_group(self):
        return self.cp

    def get_context_parallel_world_size(self) -> int:
        return dist.get_world_size(self.cp)

    def get_context_parallel_rank(self) -> int:
        return dist.get_rank(self.cp)

    def get_data_loading_group(self):
        """The ranks that load different batches (same CP rank): plain data parallel."""
        return self.dp

    # DeepSpeed's (Megatron-style) mpu face
    def get_data_parallel_group(self):
        return self.dp_cp

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.dp_cp)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp_cp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dp_cp)

    def get_model_parallel_group(self):
        return self.model_parallel

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def register_ulysses_hf(
    model,
    *,
    sequence_parallel_size: int,
    micro_batch_size: int,
    seq_length: int | None = None,
    core_attn_implementation: str = "longctx",
):
    """ALST: DeepSpeed's ``UlyssesSPAttentionHF`` around longctx's transformers attention.

    Sets ``model``'s attention implementation to ``core_attn_implementation`` (a longctx
    implementation; ``"longctx"`` runs on the gathered whole sequence) and registers ALST over it;
    returns DeepSpeed's sequence-parallel mpu (pass it to ``deepspeed.initialize``).  Feed
    ``position_ids`` with every batch (ALST gathers them; restarts at 0 mark packed documents).
    """
    from . import transformers as lt

    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    except ImportError as exc:
        raise ImportError(
            "this DeepSpeed has no ALST (deepspeed.runtime.sequence_parallel.ulysses_sp."
            f"UlyssesSPAttentionHF): {exc}; pip install \"longctx[deepspeed]\""
        ) from exc
    if core_attn_implementation not in lt.IMPLEMENTATIONS:
        raise ValueError(
            f"core_attn_implementation={core_attn_implementation!r} is not a longctx "
            f"implementation; choose one of {sorted(lt.IMPLEMENTATIONS)}"
        )
    if getattr(model.config, "longctx_cp_size", None) not in (None, 1):
        raise ValueError(
            "under ALST the core attention sees the whole sequence: drop longctx_cp_size from "
            "the model config (DeepSpeed's all-to-all is the context parallelism here)"
        )
    model.set_attn_implementation(core_attn_implementation)
    return UlyssesSPAttentionHF.register_with_transformers(
        model,
        core_attn_implementation=core_attn_implementation,
        sequence_parallel_size=sequence_parallel_size,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        seq_length_is_variable=seq_length is None,
    )


def initialize_engine(model: nn.Module, config: dict, *, mpu=None, optimizer=None):
    """``deepspeed.initialize`` for a CP model: returns the engine.

    ``config``: a DeepSpeed config dict (``zero_optimization.stage`` in 0..3); ``mpu``: a
    :class:`ContextParallelMPU` (None: data parallel only); ``optimizer``: a torch optimizer
    (default: the config's ``optimizer`` section).  ``train_batch_size`` is derived from
    ``train_micro_batch_size_per_gpu`` and the number of data-loading replicas when absent
    (DeepSpeed's own count includes the CP ranks; the batch size is scaled to match).
    """
    import deepspeed

    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ValueError(f"zero_optimization.stage must be one of {ZERO_STAGES}, got {stage}")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    config = dict(config)
    if "train_batch_size" not in config:  # DeepSpeed counts every rank of dp x cp as a replica
        micro = config.get("train_micro_batch_size_per_gpu", 1)
        config["train_batch_size"] = (
            micro * config.get("gradient_accumulation_steps", 1) * dist.get_world_size()
        )
    if optimizer is not None:
        config.setdefault("zero_allow_untested_optimizer", True)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        config=config,
        mpu=mpu,
    )
    return engine


class _LossModule(nn.Module):
    """``loss_fn(model(*inputs), output_weight(model), labels)`` inside one forward, so that
    ZeRO-3 gathers the output weight (registered as an external parameter) for the loss."""

    def __init__(self, model: nn.Module, loss_fn, output_weight):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.output_weight = output_weight

    def forward(self, *inputs, labels):
        return self.loss_fn(self.model(*inputs), self.output_weight(self.model), labels)


class DeepSpeedLossEngine:
    """A training step of ``model`` through a DeepSpeed engine over dp x cp.

    ``loss_fn(hidden, weight, labels) -> token-loss sum`` (e.g. longctx's chunked cross entropy)
    runs in the engine's forward with ``weight = output_weight(model)``; under ZeRO-3 that weight
    is registered as an external parameter so it is gathered there.  Per micro-batch:
    ``loss_sum = eng.forward(*inputs, labels=labels)``, then ``eng.backward(loss_sum, tokens)``
    with ``tokens`` the label-token count of the whole step over every dp x cp rank; after the
    step's micro-batches ``eng.step()`` applies the update and returns the gradient norm (from
    DeepSpeed, None when it computes none).  ``config``: a DeepSpeed config dict; its
    ``gradient_accumulation_steps`` must be the number of micro-batches per step.
    """

    def __init__(
        self,
        model: nn.Module,
        config: dict,
        *,
        mpu: ContextParallelMPU,
        loss_fn,
        output_weight=lambda m: m.output_weight,
        optimizer=None,
    ):
        self.mpu = mpu
        self.loss_module = _LossModule(model, loss_fn, output_weight)
        if config.get("zero_optimization", {}).get("stage", 0) == 3:
            import deepspeed

            deepspeed.zero.register_external_parameter(self.loss_module, output_weight(model))
        self.engine = initialize_engine(self.loss_module, config, mpu=mpu, optimizer=optimizer)
        self.accum = self.engine.gradient_accumulation_steps()
        self._micro = 0

    @property
    def module(self) -> nn.Module:
        """The model (its parameters are partitioned outside forward under ZeRO-3)."""
        return self.loss_module.model

    def forward(self, *inputs, labels: Tensor) -> Tensor:
        """This rank's token-loss sum for one micro-batch (a scalar)."""
        return self.engine(*inputs, labels=labels)

    def backward(self, loss_sum: Tensor, tokens) -> None:
        """Backward of ``loss_sum`` scaled so that DeepSpeed's average over dp x cp is the
        gradient of the step's mean token loss (``tokens``: its global label count)."""
        world = self.mpu.get_data_parallel_world_size()  # DeepSpeed's replicas: dp x cp
        self.engine.backward(loss_sum * (world / tokens), scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.accum:
            self.engine.step()  # DeepSpeed's micro-step: accumulates, updates nothing

    def step(self) -> float | None:
        """Apply the step's update (after its ``gradient_accumulation_steps`` backwards)."""
        if self._micro != self.accum:
            raise RuntimeError(
                f"DeepSpeedLossEngine.step() after {self._micro} backward calls; the config's "
                f"gradient_accumulation_steps is {self.accum}"
            )
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def save_checkpoint(self, directory, tag: str, client_state: dict | None = None) -> None:
        """DeepSpeed's (partitioned) checkpoint of model, optimizer and ``client_state``."""
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state or {})

    def load_checkpoint(self, directory, tag: str | None = None) -> dict:
        """Load a :meth:`save_checkpoint` checkpoint; returns its ``client_state``."""
        _, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        return client_state or {}


def trainer_deepspeed_config(cfg) -> dict:
    """The DeepSpeed config of a ``longctx train`` run with ``train.engine: deepspeed``.

    ``cfg`` is a :class:`longctx.train.config.TrainConfig`; ``train.deepspeed`` (a dict, e.g.
    ``{"zero_optimization": {"stage": 3}}``) is completed with the run's micro-batch size,
    gradient accumulation and clipping.  Settings DeepSpeed cannot honour here raise errors that
    say what to change.
    """
    t, p = cfg.train, cfg.parallel
    problems = []
    if p.fsdp:
        problems.append("parallel.fsdp: false (ZeRO shards instead)")
    if p.tp != 1:
        problems.append("parallel.tp: 1 (DeepSpeed's mpu here is dp x cp)")
    if t.precision == "bf16":
        problems.append("train.precision: fp32 or fp64 (bf16 autocast is not wired to DeepSpeed)")
    if cfg.checkpoint.enabled:
        problems.append("checkpoint.enabled: false (DeepSpeed checkpoints are not wired yet)")
    ds = dict(getattr(t, "deepspeed", None) or {})
    zero = dict(ds.get("zero_optimization", {}))
    stage = zero.setdefault("stage", 1)
    if stage not in ZERO_STAGES:
        problems.append(f"train.deepspeed.zero_optimization.stage in {ZERO_STAGES}, not {stage}")
    if stage == 3 and cfg.eval.num_samples:
        problems.append("eval.num_samples: 0 under ZeRO-3 (evaluation reads unpartitioned weights)")
    if problems:
        raise ValueError("train.engine: deepspeed needs " + "; ".join(problems))
    ds["zero_optimization"] = zero
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum_steps
    ds.setdefault("gradient_clipping", t.clip_grad_norm or 0.0)
    ds.setdefault("steps_per_print", 1 << 30)
    return ds


def build_trainer_engine(cfg, model: nn.Module, optimizer, mesh, loss_fn) -> DeepSpeedLossEngine:
    """:class:`DeepSpeedLossEngine` for ``longctx train`` (``train.engine: deepspeed``).

    ``mesh``: the trainer's :class:`~longctx.parallel.mesh.ParallelMesh`; ``loss_fn(hidden,
    weight, labels)``: its summed cross entropy; ``optimizer``: its AdamW (its LR schedule keeps
    working: DeepSpeed steps the same parameter groups).
    """
    return DeepSpeedLossEngine(
        model, trainer_deepspeed_config(cfg), mpu=ContextParallelMPU.from_mesh(mesh),
        loss_fn=loss_fn, optimizer=optimizer,
    )
