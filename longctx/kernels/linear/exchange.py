"""A state that arrives in the middle of a linear-attention call (context parallelism's exchange).

Under context parallelism a shard's entering state depends on the other shards' final states, so
a call needs its own final state before it can finish its output (and, backward, the entering
state's gradient before the final state's gradient is known).  :func:`forward_with_exchange` and
:func:`backward_with_exchange` run any :class:`~longctx.kernels.linear.base.LinearAttentionKernel`
that way: the kernel's fused ``forward_exchange`` / ``backward_exchange`` when it has them,
else its plain ``forward`` / ``backward`` plus a torch correction for the first document's
tokens (:func:`apply_state_reference`, :func:`state_grad_reference`).  What the exchange does
(an all-gather, in :mod:`longctx.parallel.strategies.linear`) is the caller's
(:data:`~longctx.kernels.linear.base.StateExchange`); nothing here communicates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import acc_dtype
from .base import (
    LinearArgs,
    LinearAttentionKernel,
    StateExchange,
    check_linear_inputs,
    check_state,
    resolve_state,
)

__all__ = [
    "forward_with_exchange",
    "backward_with_exchange",
    "entering_weight",
    "apply_state_reference",
    "state_grad_reference",
]


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
        >>> from longctx.kernels.linear import LinearArgs, LinearReference
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

