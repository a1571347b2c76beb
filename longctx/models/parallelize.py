"""The one place where parallelism is applied to a :class:`~longctx.models.llama.LlamaModel`.

The model code is single-device; :func:`parallelize_model` turns it into a parallel model in place,
torchtitan style, in this order:

1. **Tensor parallel** (when ``tp > 1`` in the mesh), DTensor ``parallelize_module`` per block:
   ``wq wk wv w1 w3`` column-wise, ``wo w2`` row-wise, all with ``use_local_output=True`` so the
   block sees plain local tensors (``heads / tp`` heads, ``ffn / tp`` features) and the residual
   stream stays a plain replicated ``[B, S_local, hidden]`` tensor. One all-reduce after ``wo`` and
   one after ``w2`` in forward; one per column-parallel input in backward. The embedding, the
   norms and the output projection stay **replicated** over ``tp`` (plain parameters): their
   gradients come out complete and identical on every tp rank, and the trainer's chunked loss can
   use ``model.output_weight`` as an ordinary ``[vocab, hidden]`` tensor. (Vocabulary-parallel
   embedding/output would save ``2 V h (1 - 1/tp)`` parameters per rank before FSDP and needs a
   vocab-parallel cross entropy; FSDP already shards them over dp x cp.)
2. **Activation checkpointing** per block: ``"full"`` wraps each block in ``checkpoint_wrapper``
   (only the block input is kept); ``"selective"`` recomputes everything except the attention
   core (its q, k, v, out, lse are kept), so the quadratic attention and its CP communication
   never run twice - the right trade at long context.
3. **torch.compile** per block, of the parts around the attention core (norms, projections, RoPE,
   MLP, residuals: :meth:`TransformerBlock.compile_around_attention`); the core (kernels and
   Python-driven CP communication) runs eagerly. Parameter names do not change. (Compiling the
   whole block would graph-break at the core and, under ``checkpoint``, fall back to eager.)
4. **FSDP2** ``fully_shard`` per block, then the root (embedding, final norm, output), over the
   flattened ``dp x cp`` mesh dimension: CP ranks hold the same weights and their gradients add
   up like data-parallel ones. Gradients are **summed** over dp x cp by default
   (``grad_reduction="sum"``): normalise the loss by the global token count over dp x cp.

Without FSDP, gradients are not reduced in backward: call :func:`reduce_gradients` after the last
backward of a step (a no-op for FSDP models, so it can always be called), then
:func:`clip_grad_norm_`, which computes the global norm for any mix of plain, TP-sharded and
FSDP-sharded gradients.

Chunked loss under FSDP: the root's parameters (embedding, final norm, output) are not resharded
after forward, so ``model.logits(hidden_chunk)`` / ``model.output_weight`` may be used between
forward and backward; their gradients are reduce-scattered at the end of backward (tested).
Before the first forward they are sharded DTensors.

Example (on each of 8 ranks after ``dist.init_process_group``)::

    from longctx.models import LlamaModel, ModelConfig
    from longctx.models.parallelize import ParallelConfig, parallelize_model, reduce_gradients
    from longctx.parallel.mesh import ParallelDims, build_mesh

    pmesh = build_mesh(ParallelDims(dp=2, cp=2, tp=2), device_type="cuda")
    model = LlamaModel(cfg, device="meta")
    model = parallelize_model(model, pmesh, ParallelConfig(fsdp=True, param_dtype="bfloat16",
                                                           activation_checkpointing="selective"))
    model.to_empty(device="cuda"); model.init_weights(seed=0)
    hidden = model(input_ids, seq)          # seq.cp_group = pmesh.group("cp")
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..parallel.mesh import ParallelDims, ParallelMesh
from .config import ModelConfig
from .llama import LinearAttention, LlamaModel, TransformerBlock

__all__ = [
    "ParallelConfig",
    "build_dp_cp_tp_mesh",
    "clip_grad_norm_",
    "parallelize_model",
    "reduce_gradients",
    "tp_plan",
    "validate_parallel_dims",
]

ACModes = Literal["none", "full", "selective"]
GradReduction = Literal["sum", "mean"]
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def _parse_dtype(name: str, value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ValueError(
        f"ParallelConfig.{name}={value!r}; choose one of {sorted(_DTYPES)} or None"
    )


@dataclass(frozen=True)
class ParallelConfig:
    """How :func:`parallelize_model` parallelizes the model (sizes come from the mesh).

    - ``fsdp``: FSDP2 over dp x cp (also useful on one rank for mixed precision).
    - ``activation_checkpointing``: ``"none"``, ``"full"`` or ``"selective"`` (see module doc).
    - ``compile`` / ``compile_backend``: ``torch.compile`` each block around its attention core.
    - ``param_dtype`` / ``reduce_dtype``: FSDP2 mixed precision (``"bfloat16"``, ``"float32"``,
      ...). ``param_dtype=None`` computes in the parameters' dtype; ``reduce_dtype=None`` reduces
      gradients in float32 when ``param_dtype`` is 16-bit, else in ``param_dtype``. Needs ``fsdp``.
      Blocks do not cast their inputs: the residual stream arrives in ``param_dtype`` from the
      embedding, while the RoPE cos/sin stay in float32.
    - ``reshard_after_forward``: FSDP2's (blocks; the root never reshards after forward).
    - ``grad_reduction``: ``"sum"`` (loss normalised by the global token count) or ``"mean"``
      over the dp x cp ranks.
    """

    fsdp: bool = False
    activation_checkpointing: ACModes = "none"
    compile: bool = False
    compile_backend: str = "inductor"
    param_dtype: torch.dtype | str | None = None
    reduce_dtype: torch.dtype | str | None = None
    reshard_after_forward: bool = True
    grad_reduction: GradReduction = "sum"

    def __post_init__(self) -> None:
        if self.activation_checkpointing not in get_args(ACModes):
            raise ValueError(
                f"ParallelConfig.activation_checkpointing={self.activation_checkpointing!r}; "
                f"choose one of {list(get_args(ACModes))}"
            )
        if self.grad_reduction not in get_args(GradReduction):
            raise ValueError(
                f"ParallelConfig.grad_reduction={self.grad_reduction!r}; choose one of "
                f"{list(get_args(GradReduction))}"
            )
        for name in ("fsdp", "compile", "reshard_after_forward"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"ParallelConfig.{name} must be true or false, got {getattr(self, name)!r}"
                )
        for name in ("param_dtype", "reduce_dtype"):
            object.__setattr__(self, name, _parse_dtype(name, getattr(self, name)))
        if not self.fsdp and (self.param_dtype is not None or self.reduce_dtype is not None):
            raise ValueError(
                "ParallelConfig.param_dtype / reduce_dtype are FSDP2 mixed precision; set "
                "fsdp=true (it works on a single rank too) or leave them unset"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ParallelConfig:
        """Build from a mapping; unknown keys raise and list the allowed ones."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown ParallelConfig key(s) {unknown}; allowed keys: {allowed}")
        return cls(**dict(values))


# -- meshes -------------------------------------------------------------------------------------
def build_dp_cp_tp_mesh(pmesh: ParallelMesh) -> DeviceMesh:
    """The 2-D DeviceMesh ``("dp_cp", "tp")`` over the same ranks as ``pmesh``.

    ``build_mesh`` places rank ``((dp * cp_size) + cp) * tp_size + tp`` and builds this view
    once (``pmesh.fsdp_mesh``): dp and cp flattened with cp fastest. FSDP shards over
    ``"dp_cp"``; TP uses ``"tp"`` of this same mesh (FSDP2 + TP need both from one root mesh).
    """
    return pmesh.fsdp_mesh


# -- tensor parallel ----------------------------------------------------------------------------
def tp_plan() -> dict[str, Any]:
    """The per-block TP plan: submodule name -> DTensor ``ParallelStyle``."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    col, row = ColwiseParallel(use_local_output=True), RowwiseParallel(use_local_output=True)
    return {
        "attention.wq": col,
        "attention.wk": col,
        "attention.wv": col,
        "attention.wo": row,
        "feed_forward.w1": col,
        "feed_forward.w3": col,
        "feed_forward.w2": row,
    }


def validate_parallel_dims(cfg: ModelConfig, dims: ParallelDims) -> None:
    """Raise ValueError unless the model's heads, query groups and MLP split over ``dims.tp``
    (and the local heads over ``dims.ulysses``). Pure; call it before starting processes."""
    tp = dims.tp
    for name, value in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_query_groups", cfg.num_query_groups),
        ("ffn_hidden_size", cfg.ffn_hidden_size),
    ):
        if value % tp:
            raise ValueError(
                f"tensor parallel size tp={tp} must divide ModelConfig.{name}={value}; choose tp "
                f"in {[d for d in range(1, value + 1) if value % d == 0]} or change {name}"
            )
    ulysses = dims.ulysses
    heads_local = cfg.num_attention_heads // tp
    if ulysses > 1 and heads_local % ulysses:
        raise ValueError(
            f"Ulysses degree {ulysses} must divide the local head count num_attention_heads / tp "
            f"= {cfg.num_attention_heads} / {tp} = {heads_local}; lower ulysses or tp"
        )


# -- entry --------------------------------------------------------------------------------------
def parallelize_model(
    model: LlamaModel, pmesh: ParallelMesh, config: ParallelConfig = ParallelConfig()
) -> LlamaModel:
    """Apply TP (``pmesh.dims.tp > 1``), activation checkpointing, compile and FSDP2, in place.

    Call on every rank with the same arguments (it builds process groups). Returns ``model``.
    Weights may be real (every rank built them from the same seed) or on ``meta`` (then
    ``model.to_empty(device=...)`` and ``model.init_weights(seed)`` after this call).
    """
    if not isinstance(model, LlamaModel):
        raise TypeError(f"parallelize_model expects a LlamaModel, got {type(model).__name__}")
    if getattr(model, "_longctx_parallelized", False):
        raise ValueError("parallelize_model was already applied to this model")
    validate_parallel_dims(model.config, pmesh.dims)
    dims = pmesh.dims
    need_2d = dims.tp > 1 or config.fsdp
    mesh_2d = build_dp_cp_tp_mesh(pmesh) if need_2d else None

    if dims.tp > 1:
        from torch.distributed.tensor.parallel import parallelize_module

        plan = tp_plan()
        tp_rank = mesh_2d["tp"].get_local_rank()
        for block in model.layers:
            parallelize_module(block, mesh_2d["tp"], plan)
            if isinstance(block.attention, LinearAttention):  # decays follow the global head
                block.attention.head_offset = tp_rank * (block.attention.num_heads // dims.tp)

    for i, block in enumerate(model.layers):
        if config.compile:
            block.compile_around_attention(backend=config.compile_backend)
        model.layers[i] = _apply_ac(block, config.activation_checkpointing)

    if config.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        reduce_dtype = config.reduce_dtype
        if reduce_dtype is None and config.param_dtype in (torch.bfloat16, torch.float16):
            reduce_dtype = torch.float32
        root_mp = MixedPrecisionPolicy(param_dtype=config.param_dtype, reduce_dtype=reduce_dtype)
        # blocks keep their inputs' dtypes: x is already param_dtype, RoPE cos/sin stay float32
        block_mp = MixedPrecisionPolicy(
            param_dtype=config.param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
        )
        dp_cp = mesh_2d["dp_cp"]
        for block in model.layers:
            fully_shard(
                block, mesh=dp_cp, mp_policy=block_mp,
                reshard_after_forward=config.reshard_after_forward,
            )
        fully_shard(model, mesh=dp_cp, mp_policy=root_mp)
        if config.grad_reduction == "sum":
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_gradient_divide_factor(1.0)

    model._longctx_parallelized = True
    model._longctx_grad_reduction = config.grad_reduction
    return model


def _apply_ac(block: TransformerBlock, mode: str) -> nn.Module:
    if mode == "full":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        return checkpoint_wrapper(block, preserve_rng_state=False)
    if mode == "selective":
        block.recompute_around_attention = True
    return block


@torch.no_grad()
def reduce_gradients(
    model: nn.Module, pmesh: ParallelMesh, op: GradReduction | None = None
) -> None:
    """Sum (or average) gradients over dp x cp when FSDP did not; a no-op for FSDP models.

    Call after the last backward of a step, before clipping. ``op`` defaults to the model's
    ``ParallelConfig.grad_reduction`` (``"sum"`` for an unparallelized model). TP-sharded
    parameters reduce their local shards; replicated parameters are already complete over tp.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if isinstance(model, FSDPModule):
        return
    op = op or getattr(model, "_longctx_grad_reduction", "sum")
    n = pmesh.dims.dp * pmesh.dims.cp
    if n == 1:
        return
    grads = [
        p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        for p in model.parameters()
        if p.grad is not None
    ]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])  # one buffer per dtype
        for dim in ("dp", "cp"):
            if getattr(pmesh.dims, dim) > 1:
                dist.all_reduce(flat, group=pmesh.group(dim))
        if op == "mean":
            flat /= n
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip gradients to a global norm over all ranks; returns the norm before clipping.

    Works for every layout :func:`parallelize_model` produces: plain (replicated) gradients count
    once, DTensor gradients (TP shards, FSDP shards, both) add their shards' contributions over
    the mesh dimensions they are sharded on. Call after :func:`reduce_gradients`. Every rank gets
    the same norm (a float64 scalar tensor). ``norm_type`` may be a float >= 1 or ``inf``.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(0.0, dtype=torch.float64)
    inf = norm_type == float("inf")
    if not inf and norm_type < 1:
        raise ValueError(f"norm_type must be >= 1 or inf, got {norm_type}")
    device = (grads[0].to_local() if isinstance(grads[0], DTensor) else grads[0]).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    groups: dict[tuple, list[torch.Tensor]] = {}  # (mesh, sharded dims) -> local grads
    for g in grads:
        if isinstance(g, DTensor):
            if any(p.is_partial() for p in g.placements):
                raise ValueError(
                    f"a gradient has Partial placements {g.placements}; reduce gradients first"
                )
            # every non-replicated placement (Shard, FSDP+TP's _StridedShard) splits the tensor
            dims = tuple(i for i, p in enumerate(g.placements) if not p.is_replicate())
            groups.setdefault((g.device_mesh, dims), []).append(g.to_local())
        else:
            groups.setdefault((None, ()), []).append(g)
    for (mesh, dims), local in groups.items():
        norms = torch.stack([torch.linalg.vector_norm(t, norm_type).double() for t in local])
        part = norms.max() if inf else norms.pow(norm_type).sum()
        for d in dims:  # combine the shards held along each sharded mesh dimension
            op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
            dist.all_reduce(part, op=op, group=mesh.get_group(d))
        total = torch.maximum(total, part) if inf else total + part
    norm = total if inf else total.pow(1.0 / norm_type)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return norm
