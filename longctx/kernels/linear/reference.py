"""The torch reference of the linear-attention contract (:mod:`longctx.kernels.linear.base`).

Two forms of the same math, both plain torch (any device, any float dtype, math in the
accumulation dtype):

- :func:`recurrent_linear_attention`: the definition, one token at a time
  (``S_t = lambda * S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``); slow, the ground truth.
- :func:`chunked_linear_attention`: the Lightning Attention-2 form the Triton kernel computes,
  quadratic with the decay mask inside a chunk, the running state across chunks.

:class:`LinearReference` is the kernel (registered as ``"reference"``), its backward plain
autograd through a recomputed forward; :func:`linear_attention_reference` the differentiable
function.

Example::

    >>> import torch
    >>> from longctx.kernels.linear import linear_attention_reference, retnet_log_decay
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

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..base import acc_dtype, expand_kv_heads
from .base import (
    LinearArgs,
    LinearShape,
    check_linear_inputs,
    check_state,
    register_linear_kernel,
)

__all__ = [
    "LinearReferenceConfig",
    "LinearReference",
    "recurrent_linear_attention",
    "chunked_linear_attention",
    "linear_attention_reference",
]


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


register_linear_kernel("reference", LinearReference)
