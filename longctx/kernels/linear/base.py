"""Causal linear attention with per-head decay: the local kernel contract and its torch reference.

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
``initial_state`` may be None (zero).  Two implementations: :class:`LinearReference` (here, torch,
any device and dtype) and ``LinearTriton`` (:mod:`longctx.kernels.linear_triton`).

Example::

    >>> import torch
    >>> from longctx.kernels.linear_reference import linear_attention_reference, retnet_log_decay
    >>> q = torch.randn(2, 10, 4, 8, dtype=torch.float64)
    >>> k = v = torch.randn(2, 10, 2, 8, dtype=torch.float64)           # GQA: 2 kv heads
    >>> g = retnet_log_decay(4)                                          # [H], <= 0
    >>> out, state = linear_attention_reference(q, k, v, log_decay=g, return_final_state=True)
    >>> out.shape, state.shape, state.dtype
    (torch.Size([2, 10, 4, 8]), torch.Size([2, 4, 8, 8]), torch.float64)
    >>> o1, s1 = linear_attention_reference(q[:, :6], k[:, :6], v[:, :6], log_decay=g,
    ...                                     return_final_state=True)
    >>> o2 = linear_attention_reference(q[:, 6:], k[:, 6:], v[:, 6:], log_decay=g, initial_state=s1)
    >>> torch.allclose(torch.cat([o1, o2], 1), out)
    True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from .base import (
    SUPPORTED_DTYPES,
    acc_dtype,
    check_qkv_tensors,
    expand_kv_heads,
    host_to_device,
)

__all__ = [
    "LinearShape",
    "LinearArgs",
    "LinearAttentionKernel",
    "LinearReferenceConfig",
    "LinearReference",
    "LinearKernelFunction",
    "check_cu_seqlens",
    "check_linear_inputs",
    "check_state",
    "recurrent_linear_attention",
    "chunked_linear_attention",
    "linear_attention_reference",
    "StateExchange",
    "resolve_state",
    "forward_with_exchange",
    "backward_with_exchange",
    "entering_weight",
    "apply_state_reference",
    "state_grad_reference",
    "retnet_log_decay",
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
    # (a few microseconds per call), a read-back (a host sync, which stalls the launch queue) for
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
    with the semantics of :func:`forward_with_exchange` / :func:`backward_with_exchange`
    (context parallelism hands the states over in the middle of a call); without them those
    functions build the same result from ``forward``/``backward`` and a torch correction.
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


def forward_with_exchange(
    kernel: LinearAttentionKernel, q: Tensor, k: Tensor, v: Tensor, args: LinearArgs,
    initial_state: Tensor | None, exchange: StateExchange,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A forward whose entering state is known only after its final state.

    Returns ``out, final, entering`` where ``final`` is ``kernel.forward(q, k, v, args,
    initial_state)``'s final state, ``entering = exchange(final)`` (``[B, H, Dk, Dv]`` or None),
    and ``out`` is the output of ``kernel.forward`` from ``initial_state + entering``.  The
    kernel's fused ``forward_exchange`` when it has one; else its forward from
    ``initial_state`` and :func:`apply_state_reference` for the first document's tokens.

    Example (one device: the entering state arrives from elsewhere)::

        >>> import torch
        >>> q = k = v = torch.randn(1, 6, 2, 4, dtype=torch.float64)
        >>> args = LinearArgs.build(q, k, v)
        >>> h = torch.randn(1, 2, 4, 4, dtype=torch.float64)
        >>> out, final, entering = forward_with_exchange(LinearReference(), q, k, v, args, None,
        ...                                              lambda final: h)
        >>> torch.allclose(out, LinearReference().forward(q, k, v, args, h)[0])
        True
    """
    fused = getattr(kernel, "forward_exchange", None)
    if fused is not None:
        return fused(q, k, v, args, initial_state, exchange)
    out, final = kernel.forward(q, k, v, args, initial_state)
    entering = resolve_state(exchange(final))
    check_state(entering, check_linear_inputs(q, k, v), q.device, "entering state")
    if entering is not None:
        weight = entering_weight(args, q.shape[1], q.shape[2], acc_dtype(q.dtype), q.device)
        apply_state_reference(out, q, entering, weight)
    return out, final, entering


def backward_with_exchange(
    kernel: LinearAttentionKernel, dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
    args: LinearArgs, initial_state: Tensor | None, entering: Tensor | None,
    exchange: StateExchange, grad_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The backward of :func:`forward_with_exchange`, whose final-state gradient is known only
    after the entering state's gradient.

    ``exchange`` receives ``d_entering [B, H, Dk, Dv]`` (accumulation dtype), the gradient of
    ``entering`` through the outputs, and returns ``dfinal`` (or None).  Returns ``dq, dk, dv,
    dinitial`` as ``kernel.backward(dout, dfinal, ..., initial_state + entering)`` (``dinitial``
    None without ``initial_state``).  The kernel's fused ``backward_exchange`` when it has one.
    """
    fused = getattr(kernel, "backward_exchange", None)
    if fused is not None:
        return fused(dout, q, k, v, args, initial_state, entering, exchange, grad_dtype)
    shape = check_linear_inputs(q, k, v)
    check_state(entering, shape, q.device, "entering state")
    weight = entering_weight(args, shape.seq, shape.heads, acc_dtype(q.dtype), q.device)
    dfinal = resolve_state(exchange(state_grad_reference(q, dout, weight)))
    dq, dk, dv, dh0 = kernel.backward(dout, dfinal, q, k, v, args, initial_state,
                                      grad_dtype=grad_dtype)
    if entering is not None:  # dq[:, t] += scale * lambda^(t+1) * dout[:, t] @ entering^T
        apply_state_reference(dq, dout, entering, weight, transpose=True)
    return dq, dk, dv, dh0


def entering_weight(args: LinearArgs, seq_len: int, heads: int, dtype: torch.dtype,
                    device: torch.device) -> Tensor:
    """``[T, H]`` in ``dtype``: ``scale * lambda_h^(t+1)``, the weight of a state entering
    before token 0 in the output of token ``t``, for the ``T`` tokens of the first document."""
    T = args.first_doc_end(seq_len)
    if args.log_decay is None:
        return torch.full((T, heads), args.scale, dtype=dtype, device=device)
    t = torch.arange(1, T + 1, dtype=dtype, device=device)  # t + 1 for t = 0..T-1
    return torch.exp(t[:, None] * args.log_decay.to(dtype)[None, :]) * args.scale


def _state_matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the entering-state products: the input's (GEMMs accumulate in float32), except
    float16, whose range is too small for a sum over a shard's tokens."""
    return torch.float32 if dtype == torch.float16 else dtype


def apply_state_reference(y: Tensor, x: Tensor, state: Tensor, weight: Tensor,
                          transpose: bool = False) -> Tensor:
    """``y[:, t, h] += weight[t, h] * (x[:, t, h] @ state[:, h])`` for ``t < T``, in place.

    With ``x = q`` and ``y = out`` this is what a state entering before token 0 adds to the
    output of a call made from a zero state, ``weight[t, h] = scale * lambda_h^(t+1)`` (zero
    where a document has started); with ``transpose=True`` (``state^T``), ``x = dout`` and
    ``y = dq`` it is that term's share of ``dq``. Shapes: ``x [B, n, H, Di]``, ``y [B, n, H, Do]``,
    ``state [B, H, Dk, Dv]`` (``Di, Do = Dk, Dv``, swapped when transposed), ``weight [T, H]``
    float32, ``T <= n`` (only the first ``T`` tokens change). Returns ``y``.
    """
    T = weight.shape[0]
    mm = _state_matmul_dtype(x.dtype)
    s = state.transpose(-1, -2) if transpose else state  # [B, H, Di, Do]
    x_bhti = x[:, :T].transpose(1, 2).to(mm)  # [B, T, H, Di] -> [B, H, T, Di]
    carry_bhto = torch.matmul(x_bhti, s.to(mm)).to(acc_dtype(x.dtype))  # [B, H, T, Do]
    y[:, :T] += (carry_bhto.transpose(1, 2) * weight[..., None]).to(y.dtype)
    return y


def state_grad_reference(q: Tensor, dout: Tensor, weight: Tensor) -> Tensor:
    """Gradient of the entering state of :func:`apply_state_reference` (``x = q``):
    ``d_state [B, H, Dk, Dv] = sum_{t < T} weight[t, h] q[:, t, h]^T dout[:, t, h]`` (float32, or
    float64 for float64 inputs)."""
    T = weight.shape[0]
    mm = _state_matmul_dtype(q.dtype)
    dout_w_bhtv = (dout[:, :T] * weight[..., None]).to(mm).transpose(1, 2)  # [B, H, T, Dv]
    q_bhkt = q[:, :T].permute(0, 2, 3, 1).to(mm)  # [B, T, H, Dk] -> [B, H, Dk, T]
    return torch.matmul(q_bhkt, dout_w_bhtv).to(acc_dtype(q.dtype))  # [B, H, Dk, Dv]


# --------------------------------------------------------------------------------------------------
# torch implementations (plain autograd)
# --------------------------------------------------------------------------------------------------
def _heads_first(q: Tensor, k: Tensor, v: Tensor, shape: LinearShape):
    """``[B, S, h, D]`` -> ``[B, H, S, D]`` in the accumulation dtype, k/v repeated per query head
    (the reference may expand GQA in memory)."""
    acc = acc_dtype(q.dtype)
    k, v = expand_kv_heads(k, shape.heads), expand_kv_heads(v, shape.heads)  # -> [B, S, H, D]
    return tuple(t.to(acc).transpose(1, 2) for t in (q, k, v))  # [B, S, H, D] -> [B, H, S, D]


def _initial(initial_state: Tensor | None, shape: LinearShape, q: Tensor) -> Tensor:
    acc = acc_dtype(q.dtype)
    if initial_state is None:
        return torch.zeros(shape.state, dtype=acc, device=q.device)
    return initial_state.to(acc)


def recurrent_linear_attention(q: Tensor, k: Tensor, v: Tensor, args: LinearArgs,
                               initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The definition, one token at a time: ``out [B, S, H, Dv]`` (q.dtype), ``final_state``.

    Slow (a Python loop over tokens); the ground truth in tests.
    """
    shape = check_linear_inputs(q, k, v)
    qh, kh, vh = _heads_first(q, k, v, shape)  # [B, H, S, D]
    state = _initial(initial_state, shape, q)  # [B, H, Dk, Dv]
    lam = None if args.log_decay is None else args.log_decay.exp()[:, None, None]  # [H, 1, 1]
    docs = args.doc_ids(shape.seq, q.device)
    outs = []
    for t in range(shape.seq):
        if docs is not None and int(docs[t]) != (int(docs[t - 1]) if t else 0):
            state = torch.zeros_like(state)  # a document starts: forget the previous one
        if lam is not None:
            state = state * lam
        state = state + kh[:, :, t, :, None] * vh[:, :, t, None, :]  # k_t^T v_t: [B, H, Dk, Dv]
        outs.append(args.scale * torch.einsum("bhk,bhkv->bhv", qh[:, :, t], state))
    out = torch.stack(outs, 1) if outs else qh.new_zeros(shape.batch, 0, shape.heads, shape.dv)
    return out.to(q.dtype), state  # [B, S, H, Dv]


def _chunk_factors(log_decay: Tensor | None, L: int, heads: int, dtype, device):
    """Decay factors of one chunk of ``L`` tokens (local index ``i``), per head:

    ``mask [H, L, L] = lambda^(i - j)`` for ``j <= i`` (else 0), ``row [H, L] = lambda^(i + 1)``
    (what reaches token i from the state before the chunk), ``col [H, L] = lambda^(L - 1 - j)``
    (what of token j reaches the end of the chunk), ``total [H] = lambda^L``.
    """
    i = torch.arange(L, device=device)
    diff = i[:, None] - i[None, :]  # [L, L]
    causal = diff >= 0
    g = (log_decay if log_decay is not None else torch.zeros(heads, dtype=dtype, device=device))
    g = g.to(dtype)[:, None]  # [H, 1]
    mask = torch.exp(g[:, :, None] * diff.clamp(min=0)) * causal  # [H, L, L]
    row = torch.exp(g * (i + 1))  # [H, L]
    col = torch.exp(g * (L - 1 - i))  # [H, L]
    total = torch.exp(g[:, 0] * L)  # [H]
    return mask, row, col, total


def chunked_linear_attention(q: Tensor, k: Tensor, v: Tensor, args: LinearArgs,
                             initial_state: Tensor | None = None, chunk: int = 64
                             ) -> tuple[Tensor, Tensor]:
    """Lightning Attention-2 form in torch, ``chunk`` tokens at a time (the Triton kernel's math).

    Inside a chunk the quadratic form with the decay mask, across chunks the running state.
    ``out [B, S, H, Dv]`` (q.dtype), ``final_state [B, H, Dk, Dv]`` (accumulation dtype).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    shape = check_linear_inputs(q, k, v)
    qh, kh, vh = _heads_first(q, k, v, shape)  # [B, H, S, D]
    state = _initial(initial_state, shape, q)  # [B, H, Dk, Dv]
    docs = args.doc_ids(shape.seq, q.device)
    outs = []
    for c0 in range(0, shape.seq, chunk):
        c1 = min(c0 + chunk, shape.seq)
        L = c1 - c0
        qc, kc, vc = qh[:, :, c0:c1], kh[:, :, c0:c1], vh[:, :, c0:c1]  # [B, H, L, D]
        mask, row, col, total = _chunk_factors(args.log_decay, L, shape.heads, qh.dtype, q.device)
        if docs is not None:
            d = docs[c0:c1]  # [L]
            carry = docs[c0 - 1] if c0 else torch.zeros((), dtype=d.dtype, device=d.device)
            mask = mask * (d[:, None] == d[None, :])  # no pair across documents
            row = row * (d == carry)  # only the state's own document sees it
            col = col * (d == d[-1])  # only the last document reaches the next chunk
            total = total * (d[-1] == carry)  # a document starts inside: the old state is gone
        scores = torch.einsum("bhik,bhjk->bhij", qc, kc) * mask  # [B, H, L, L]
        intra = torch.einsum("bhij,bhjv->bhiv", scores, vc)
        inter = torch.einsum("bhik,bhkv->bhiv", qc * row[..., None], state)
        outs.append(args.scale * (intra + inter))  # [B, H, L, Dv]
        arriving = torch.einsum("bhjk,bhjv->bhkv", kc * col[..., None], vc)  # [B, H, Dk, Dv]
        state = state * total[:, None, None] + arriving
    if outs:
        out = torch.cat(outs, 2).transpose(1, 2)  # [B, H, S, Dv] -> [B, S, H, Dv]
    else:
        out = qh.new_zeros(shape.batch, 0, shape.heads, shape.dv)
    return out.to(q.dtype), state


@dataclass(frozen=True)
class LinearReferenceConfig:
    """How :class:`LinearReference` computes: ``"chunked"`` (default; ``chunk`` tokens at a time,
    vectorised inside a chunk) or ``"recurrent"`` (token by token, the definition)."""

    mode: Literal["chunked", "recurrent"] = "chunked"
    chunk: int = 64

    def __post_init__(self) -> None:
        if self.mode not in ("chunked", "recurrent"):
            raise ValueError(
                f"LinearReferenceConfig.mode must be 'chunked' or 'recurrent', got {self.mode!r}"
            )
        if self.chunk < 1:
            raise ValueError(f"LinearReferenceConfig.chunk must be >= 1, got {self.chunk}")


class LinearReference:
    """The torch reference of the linear-attention kernel contract (any device, any float dtype).

    ``backward`` recomputes the forward under autograd: simple, exact, memory-hungry.
    """

    name = "reference"

    def __init__(self, config: LinearReferenceConfig = LinearReferenceConfig()):
        self.config = config

    def _run(self, q, k, v, args, initial_state):
        if self.config.mode == "recurrent":
            return recurrent_linear_attention(q, k, v, args, initial_state)
        return chunked_linear_attention(q, k, v, args, initial_state, self.config.chunk)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, args: LinearArgs,
                initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``out [B, S, H, Dv]`` (q.dtype), ``final_state [B, H, Dk, Dv]`` (accumulation dtype)."""
        shape = check_linear_inputs(q, k, v)
        check_state(initial_state, shape, q.device)
        with torch.no_grad():
            return self._run(q, k, v, args, initial_state)

    def backward(self, dout: Tensor, dfinal: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                 args: LinearArgs, initial_state: Tensor | None = None,
                 grad_dtype: torch.dtype | None = None,
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``dq``, ``dk``, ``dv`` (shaped like q, k, v; in ``grad_dtype``, default the
        accumulation dtype) and ``dinitial [B, H, Dk, Dv]`` in the accumulation dtype (None when
        ``initial_state`` is None)."""
        shape = check_linear_inputs(q, k, v)
        check_state(initial_state, shape, q.device)
        acc = acc_dtype(q.dtype)
        with torch.enable_grad():
            inputs = [t.detach().to(acc).requires_grad_() for t in (q, k, v)]
            if initial_state is not None:
                inputs.append(initial_state.detach().to(acc).requires_grad_())
            out, final = self._run(*inputs[:3], args, inputs[3] if len(inputs) > 3 else None)
            outputs, grads = [out], [dout.to(out.dtype)]
            if dfinal is not None:
                outputs.append(final)
                grads.append(dfinal.to(final.dtype))
            got = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
        got = [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]
        dq, dk, dv = (g.to(grad_dtype or acc) for g in got[:3])
        return dq, dk, dv, (got[3] if initial_state is not None else None)


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


def linear_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, log_decay: Tensor | None = None,
    scale: float | None = None, initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None, return_final_state: bool = False,
    config: LinearReferenceConfig = LinearReferenceConfig(),
):
    """Causal linear attention with per-head decay in torch, differentiable by plain autograd.

    Args:
        q: ``[B, S, H, Dk]``; k: ``[B, S, H_kv, Dk]``; v: ``[B, S, H_kv, Dv]`` (``H % H_kv == 0``).
        log_decay: ``[H]`` log-decays ``<= 0`` (``lambda = exp(g)``); None: no decay.
        scale: multiplies q; default ``Dk ** -0.5``.
        initial_state: ``[B, H, Dk, Dv]`` state before token 0 (None: zeros).
        cu_seqlens: ``[0, e_1, ..., S]`` document boundaries; the state resets at each.
        return_final_state: also return the state after the last token.

    Returns:
        ``out [B, S, H, Dv]`` in q's dtype, and ``final_state [B, H, Dk, Dv]`` (float32, float64
        for float64 inputs) if asked.
    """
    args = LinearArgs.build(q, k, v, log_decay=log_decay, scale=scale, cu_seqlens=cu_seqlens)
    check_state(initial_state, check_linear_inputs(q, k, v), q.device)
    out, final = LinearReference(config)._run(q, k, v, args, initial_state)
    return (out, final) if return_final_state else out


def retnet_log_decay(num_heads: int, device: torch.device | str | None = None) -> Tensor:
    """RetNet's per-head decays as log-decays: ``g_h = log(1 - 2**(-5 - h))``, float32 ``[H]``.

    ``lambda_h`` runs from ``1 - 1/32`` (head 0, short memory) towards 1 (long memory).
    """
    h = torch.arange(num_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(torch.float32)


# --------------------------------------------------------------------------------------------------
# kernel selection
# --------------------------------------------------------------------------------------------------
def _triton_factory() -> LinearAttentionKernel:
    from .linear_triton import LinearTriton  # imported on demand: needs triton

    return LinearTriton()


_LINEAR_KERNELS: dict[str, Callable[[], LinearAttentionKernel]] = {
    "reference": LinearReference,
    "triton": _triton_factory,
}


def available_linear_kernels() -> list[str]:
    return sorted(_LINEAR_KERNELS)


def get_linear_kernel(kernel: str | LinearAttentionKernel) -> LinearAttentionKernel:
    """Resolve ``"reference"`` / ``"triton"`` (or pass a kernel object through)."""
    if not isinstance(kernel, str):
        if not isinstance(kernel, LinearAttentionKernel):
            raise TypeError(
                f"kernel must be a name ({available_linear_kernels()}) or an object with forward/"
                f"backward per longctx.kernels.linear_reference.LinearAttentionKernel; got "
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
