"""Causal linear attention with per-head decay: the local kernel contract, its checks, the registry.

The recurrence (RetNet / Lightning Attention-2 / TransNormerLLM), for every batch row and query
head ``h``::

    S_t = lambda_h * S_{t-1} + k_t^T v_t          state   [Dk, Dv], float32 (float64 for float64)
    o_t = scale * q_t S_t                          output  [Dv]   (token t sees itself)

- **Layout** ``[batch, seq, heads, head_dim]`` like the rest of longctx: ``q [B, S, H, Dk]``,
  ``k [B, S, H_kv, Dk]``, ``v [B, S, H_kv, Dv]`` (``Dv`` may differ from ``Dk``).
- **GQA**: ``H % H_kv == 0``; query head ``h`` reads kv head ``h // (H // H_kv)``.  The state is
  per *query* head (heads sharing k/v still decay differently), so states are ``[B, H, Dk, Dv]``.
- **Decay**: ``log_decay`` is a float tensor ``[H]`` of per-head log-decays ``g_h <= 0``,
  ``lambda_h = exp(g_h)`` (RetNet: ``g_h = log(1 - 2**(-5 - h))``, see :func:`retnet_log_decay`).
  ``None`` is the no-decay variant (``lambda = 1``).  The decay is a fixed buffer: gradients into
  it are not computed (a ``log_decay`` that requires grad is refused).  All decay factors are
  ``exp(g * n)`` with ``n >= 0``, so nothing overflows.  Its values are checked where it lives:
  pass it on the CPU (it moves with the call) so that no call waits on a read-back from the GPU.
- **Scale**: ``scale`` multiplies ``q``; default ``Dk ** -0.5`` (as in flash-linear-attention).
- **States**: ``initial_state [B, H, Dk, Dv]`` is the state before token 0, ``final_state`` the state
  after the last token; both in the accumulation dtype (:func:`~longctx.kernels.base.acc_dtype`)
  and differentiable.  Two calls with the state passed equal one call on the concatenation.
- **Documents** (packed sequences): ``cu_seqlens = [0, e_1, ..., S]`` (1-D integer, shared by all
  batch rows, like :class:`~longctx.kernels.mask.Mask`).  The state resets to zero before every
  interior boundary ``e_i``, so a document's first token never sees the previous document.  The
  sequence is a *stream*: ``initial_state`` belongs to the first document and ``final_state`` to
  the last, so a packed stream cut anywhere (even mid-document) chains exactly; if a cut falls on a
  document boundary, pass no state to the next call.

The kernel contract (:class:`LinearAttentionKernel`), which context parallelism builds on::

    forward(q, k, v, args, initial_state) -> out [B, S, H, Dv] (q.dtype), final_state [B, H, Dk, Dv]
    backward(dout, dfinal, q, k, v, args, initial_state) -> dq, dk, dv, dinitial   (acc dtype)

``args`` (:class:`LinearArgs`) carries the validated scale, decay and documents; ``dfinal`` and
``initial_state`` may be None (zero).  Implementations register a name with
:func:`register_linear_kernel` when their module is imported: ``"reference"``
(:class:`~longctx.kernels.linear.reference.LinearReference`, torch, any device and dtype) and
``"triton"`` (:class:`~longctx.kernels.linear.triton.LinearTriton`).  The state exchange of
context parallelism is in :mod:`longctx.kernels.linear.exchange`.  This module imports no kernel.

Example::

    >>> import torch
    >>> from longctx.kernels.linear.base import LinearArgs, get_linear_kernel, retnet_log_decay
    >>> q = torch.randn(2, 10, 4, 8, dtype=torch.float64)
    >>> k = v = torch.randn(2, 10, 2, 8, dtype=torch.float64)           # GQA: 2 kv heads
    >>> args = LinearArgs.build(q, k, v, log_decay=retnet_log_decay(4))  # [H] decays, <= 0
    >>> out, state = get_linear_kernel("reference").forward(q, k, v, args, None)
    >>> out.shape, state.shape, state.dtype
    (torch.Size([2, 10, 4, 8]), torch.Size([2, 4, 8, 8]), torch.float64)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..base import SUPPORTED_DTYPES, acc_dtype, check_qkv_tensors, host_to_device

__all__ = [
    "LinearShape",
    "LinearArgs",
    "LinearAttentionKernel",
    "LinearKernelFunction",
    "StateExchange",
    "resolve_state",
    "check_cu_seqlens",
    "check_linear_inputs",
    "check_state",
    "retnet_log_decay",
    "register_linear_kernel",
    "get_linear_kernel",
    "available_linear_kernels",
]


# --------------------------------------------------------------------------------------------------
# input checks and the per-call arguments
# --------------------------------------------------------------------------------------------------
class LinearShape(NamedTuple):
    """Sizes of one linear-attention call (see the module docstring)."""

    batch: int
    seq: int
    heads: int
    kv_heads: int
    dk: int
    dv: int

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA)."""
        return self.heads // self.kv_heads

    @property
    def state(self) -> tuple[int, int, int, int]:
        """Shape of ``initial_state`` / ``final_state``: ``(B, H, Dk, Dv)``."""
        return (self.batch, self.heads, self.dk, self.dv)


def check_linear_inputs(q: Tensor, k: Tensor, v: Tensor) -> LinearShape:
    """Raise a ValueError that says what to change when q/k/v break the layout; return sizes."""
    check_qkv_tensors(q, k, v)
    B, S, H, Dk = q.shape
    if k.shape[:2] != (B, S) or v.shape[:2] != (B, S):
        raise ValueError(
            f"q, k, v must have the same batch and sequence sizes; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[3] != Dk:
        raise ValueError(f"q has head_dim {Dk} but k has head_dim {k.shape[3]}; they must match")
    Hkv = k.shape[2]
    if v.shape[2] != Hkv:
        raise ValueError(f"k has {Hkv} heads but v has {v.shape[2]}; they must match")
    if Hkv == 0 or H % Hkv:
        raise ValueError(
            f"q has {H} heads, which is not a multiple of the {Hkv} kv heads; "
            "num_heads must be divisible by num_kv_heads (GQA)"
        )
    return LinearShape(B, S, H, Hkv, Dk, v.shape[3])


def check_state(state: Tensor | None, shape: LinearShape, device: torch.device,
                name: str = "initial_state") -> None:
    """Raise unless ``state`` is None or a float ``[B, H, Dk, Dv]`` tensor on ``device``."""
    if state is None:
        return
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(state).__name__}")
    if tuple(state.shape) != shape.state:
        raise ValueError(
            f"{name} must have shape [batch, heads, dk, dv] = {list(shape.state)} (one state per "
            f"query head); got {list(state.shape)}"
        )
    if state.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {state.dtype}; use a floating dtype (float32)")
    if state.device != device:
        raise ValueError(f"{name} is on {state.device} but q is on {device}; move it with .to()")


def check_cu_seqlens(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """Validated int64 CPU copy of ``cu_seqlens`` (``[0, e_1, ..., seq_len]``, non-decreasing)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D integer Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(
            "cu_seqlens must be a 1-D integer tensor [0, end_1, ..., seq_len] with at least 2 "
            f"entries; got shape {tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
        )
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
    if int(cu[-1]) != seq_len:
        raise ValueError(
            f"cu_seqlens ends at {int(cu[-1])} but the sequence has {seq_len} tokens; the last "
            "boundary must equal the sequence length (add a padding document)"
        )
    return cu


def _check_log_decay(log_decay: Tensor, heads: int, dtype: torch.dtype,
                     device: torch.device) -> Tensor:
    """Validated ``[H]`` log-decays in the accumulation dtype on ``device``."""
    if not isinstance(log_decay, Tensor):
        raise TypeError(
            f"log_decay must be a float Tensor [heads] (or None for no decay), got "
            f"{type(log_decay).__name__}"
        )
    if log_decay.requires_grad:
        raise ValueError(
            "log_decay requires grad, but gradients into the decay are not implemented: it is a "
            "fixed per-head buffer (RetNet / Lightning Attention). Pass log_decay.detach() or "
            "register it with module.register_buffer"
        )
    if log_decay.shape != (heads,) or not log_decay.dtype.is_floating_point:
        raise ValueError(
            f"log_decay must be a float tensor of shape [heads] = [{heads}] (one log-decay "
            f"g_h <= 0 per query head, lambda_h = exp(g_h)); got shape {list(log_decay.shape)} "
            f"dtype {log_decay.dtype}"
        )
    # the values are checked where the tensor lives: on the host in Python for a CPU tensor
    # (cheap), a read-back (a host sync, which stalls the launch queue) for
    # a GPU one -- so models pass their decay on the CPU
    given = log_decay.detach()
    if given.device.type == "cpu":
        values = tuple(given.tolist())
        ok = all(math.isfinite(g) and g <= 0 for g in values)
    else:
        values = None
        ok = not bool((~torch.isfinite(given) | (given > 0)).any())
    if not ok:
        raise ValueError(
            f"log_decay must be finite and <= 0 (lambda = exp(g) in (0, 1]); got "
            f"{given.tolist()}. A decay rate lambda in (0, 1] is log_decay = log(lambda)"
        )
    if values is not None:
        return _decay_on(values, dtype, str(device))
    return given.to(dtype)


@functools.lru_cache(maxsize=64)
def _decay_on(values: tuple[float, ...], dtype: torch.dtype, device: str) -> Tensor:
    """The checked log-decays on ``device``, copied there once per value set (not per call)."""
    return host_to_device(torch.tensor(values, dtype=dtype), torch.device(device))


@dataclass(frozen=True, eq=False)
class LinearArgs:
    """The validated per-call arguments besides q, k, v and the state.

    Build it with :meth:`build`; kernels receive it as is.

    Attributes:
        scale: multiplies ``q`` (> 0).
        log_decay: ``[H]`` per-head log-decay in the accumulation dtype on q's device, or None
            (no decay, ``lambda = 1``).
        cu_seqlens: int64 CPU ``[n_docs + 1]`` document boundaries, or None (one document).
    """

    scale: float
    log_decay: Tensor | None
    cu_seqlens: Tensor | None

    @staticmethod
    def build(q: Tensor, k: Tensor, v: Tensor, *, log_decay: Tensor | None = None,
              scale: float | None = None, cu_seqlens: Tensor | None = None) -> LinearArgs:
        shape = check_linear_inputs(q, k, v)
        if scale is None:
            scale = shape.dk ** -0.5
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"scale must be finite and > 0 (default head_dim ** -0.5), got {scale}"
            )
        g = None
        if log_decay is not None:
            g = _check_log_decay(log_decay, shape.heads, acc_dtype(q.dtype), q.device)
        cu = check_cu_seqlens(cu_seqlens, shape.seq) if cu_seqlens is not None else None
        return LinearArgs(scale, g, cu)

    def first_doc_end(self, seq_len: int) -> int:
        """Tokens of the first document: those that see a state entering before token 0
        (``seq_len`` without documents; read from the host-side boundaries, no device sync)."""
        if self.cu_seqlens is None:
            return seq_len
        return min(seq_len, int(self.cu_seqlens[1]))

    def doc_ids(self, seq_len: int, device: torch.device) -> Tensor | None:
        """int64 ``[S]``: index of each token's document, counted as the number of interior
        boundaries ``cu_seqlens[1:-1]`` at or before it (None without documents).

        The state resets wherever the id changes; ``initial_state`` belongs to document 0, so a
        boundary at position 0 (an empty first document) cuts it off too.
        """
        if self.cu_seqlens is None:
            return None
        interior = host_to_device(self.cu_seqlens[1:-1], device)
        return torch.searchsorted(interior, torch.arange(seq_len, device=device), right=True)


# --------------------------------------------------------------------------------------------------
# the contract
# --------------------------------------------------------------------------------------------------
@runtime_checkable
class LinearAttentionKernel(Protocol):
    """Local causal linear attention on one device (see the module docstring).

    A kernel may also provide ``forward_exchange(q, k, v, args, initial_state, exchange)`` and
    ``backward_exchange(dout, q, k, v, args, initial_state, entering, exchange, grad_dtype)``
    with the semantics of :func:`~longctx.kernels.linear.exchange.forward_with_exchange` /
    :func:`~longctx.kernels.linear.exchange.backward_with_exchange` (context parallelism
    hands the states over in the middle of a call); without them those functions build the same
    result from ``forward``/``backward`` and a torch correction.
    """

    name: str

    def forward(self, q: Tensor, k: Tensor, v: Tensor, args: LinearArgs,
                initial_state: Tensor | None) -> tuple[Tensor, Tensor]: ...

    def backward(self, dout: Tensor, dfinal: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                 args: LinearArgs, initial_state: Tensor | None,
                 grad_dtype: torch.dtype | None = None,
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]: ...


# --------------------------------------------------------------------------------------------------
# a state that arrives in the middle of a call (context parallelism)
# --------------------------------------------------------------------------------------------------
StateExchange = Callable[[Tensor], "Tensor | Callable[[], Tensor | None] | None"]
"""Called by a kernel between its passes: forward, with the call's final state, returns a state
that enters before token 0 (or None); backward, with the gradient of that entering state, returns
the gradient of the final state (or None).  Context parallelism all-gathers in it.  It may instead
return a pending result, a callable without arguments giving the state: the kernel then does what
work it can before calling it (the backward recomputes its chunk states meanwhile)."""


def resolve_state(got: Tensor | Callable[[], Tensor | None] | None) -> Tensor | None:
    """What a :data:`StateExchange` gave, waited for if it is pending."""
    return got() if callable(got) else got


# --------------------------------------------------------------------------------------------------
# autograd over any kernel, and the decays
# --------------------------------------------------------------------------------------------------
class LinearKernelFunction(torch.autograd.Function):
    """Autograd over any :class:`LinearAttentionKernel`'s explicit forward/backward.

    ``apply(q, k, v, initial_state, kernel, args) -> (out, final_state)``; gradients flow to q, k, v
    and ``initial_state``.
    """

    @staticmethod
    def forward(ctx, q, k, v, initial_state, kernel: LinearAttentionKernel, args: LinearArgs):
        out, final = kernel.forward(q, k, v, args, initial_state)
        ctx.save_for_backward(q, k, v, initial_state)
        ctx.kernel, ctx.args = kernel, args
        ctx.set_materialize_grads(False)
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        q, k, v, h0 = ctx.saved_tensors
        if dout is None:  # only the final state was used
            dout = q.new_zeros(*q.shape[:3], v.shape[-1])
        dq, dk, dv, dh0 = ctx.kernel.backward(dout, dfinal, q, k, v, ctx.args, h0,
                                              grad_dtype=q.dtype)
        dh0 = dh0.to(h0.dtype) if h0 is not None else None
        return dq, dk.to(k.dtype), dv.to(v.dtype), dh0, None, None


def retnet_log_decay(num_heads: int, device: torch.device | str | None = None) -> Tensor:
    """RetNet's per-head decays as log-decays: ``g_h = log(1 - 2**(-5 - h))``, float32 ``[H]``.

    ``lambda_h`` runs from ``1 - 1/32`` (head 0, short memory) towards 1 (long memory).
    """
    h = torch.arange(num_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(torch.float32)


# --------------------------------------------------------------------------------------------------
# kernel selection
# --------------------------------------------------------------------------------------------------
_LINEAR_KERNELS: dict[str, Callable[[], LinearAttentionKernel]] = {}


def register_linear_kernel(name: str, factory: Callable[[], LinearAttentionKernel]) -> None:
    """Make a linear kernel selectable by name (``kernel="name"`` in
    :func:`longctx.parallel.strategies.linear.linear_attention` and the models)."""
    _LINEAR_KERNELS[name] = factory


def available_linear_kernels() -> list[str]:
    return sorted(_LINEAR_KERNELS)


def get_linear_kernel(kernel: str | LinearAttentionKernel) -> LinearAttentionKernel:
    """Resolve ``"reference"`` / ``"triton"`` (or pass a kernel object through)."""
    if not isinstance(kernel, str):
        if not isinstance(kernel, LinearAttentionKernel):
            raise TypeError(
                f"kernel must be a name ({available_linear_kernels()}) or an object with forward/"
                f"backward per longctx.kernels.linear.LinearAttentionKernel; got "
                f"{type(kernel).__name__}"
            )
        return kernel
    try:
        factory = _LINEAR_KERNELS[kernel]
    except KeyError:
        raise ValueError(
            f"unknown linear attention kernel {kernel!r}; available: {available_linear_kernels()}"
        ) from None
    return factory()
