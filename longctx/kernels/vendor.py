"""Vendor attention (cuDNN or FlashAttention-2, via torch's SDPA ops) on the local kernel contract.

torch ships two fused attention kernels that also return the log-sum-exp, which is what the
contract (and the LSE merge of a ring) needs:

- ``torch.ops.aten._scaled_dot_product_cudnn_attention`` (cuDNN; fastest on Hopper), LSE shaped
  ``[B, H, Sq, 1]``;
- ``torch.ops.aten._scaled_dot_product_flash_attention`` (FlashAttention-2), LSE ``[B, H, Sq]``;

both in natural log and float32, and both with backward ops that take an ``out``/``lse`` pair, so
the **global** (merged) ``out``/``lse`` of a ring can be passed per key block, as the contract
asks.  They only know two masks: everything, or causal aligned top-left (query ``i`` sees key
``j <= i``).  :class:`VendorSDPA` therefore accepts exactly the (mask, positions) pairs that reduce
to one of those on global positions:

- ``Mask()`` (full) for any positions;
- ``Mask(causal=True)`` when every key precedes every query (a full block of a ring), when every
  key follows every query (an empty block: ``out = 0``, ``lse = -inf``, zero gradients, no call),
  or when queries and keys are the same contiguous run (the diagonal block).

GQA (``H = g * Hkv``): cuDNN takes the grouped K/V as they are and returns dK/dV per kv head;
FlashAttention-2 runs with K/V expanded to ``H`` heads (one copy of K and V per call; dK/dV summed
back over each group in float32).  cuDNN's own GQA measured faster than expanding
(``benchmarks/RESULTS.md``, "Vendor kernel").

The backward of a long aligned-causal call is split by query chunks (:class:`CausalSplit`): chunk
``i`` is the backward of one causal call on its own keys and of one full call on every earlier
key, both from the global ``out``/``lse``, with the pieces' gradients summed in float32.  cuDNN's
full-mask backward runs faster per FLOP than its long causal one, so long calls with a small head
dim gain from the split; where it gains, and where one call is faster, is measured in
``benchmarks/RESULTS.md`` ("Vendor kernel"), and :class:`CausalSplit`'s defaults follow it.  The
forward always runs as one call: split the same way, the merges cost what the kernels gained.

Anything else (windows, documents, block-sparse, striped or offset diagonals), float32/float64,
or CPU tensors is refused with the reason; :func:`longctx.kernels.dispatch.select_kernel` asks
:meth:`VendorSDPA.unsupported_reason` and routes those calls to the Triton kernel or the reference.

Example::

    >>> import torch
    >>> from longctx.kernels.mask import Mask
    >>> from longctx.kernels.vendor import VendorSDPA
    >>> q = k = v = torch.randn(1, 8192, 16, 128, device="cuda", dtype=torch.bfloat16)
    >>> out, lse = VendorSDPA("cudnn").forward(q, k, v, scale=128 ** -0.5, mask=Mask(causal=True))
    >>> lse.shape, lse.dtype          # contract: [B, H, Sq], float32, natural log
    (torch.Size([1, 16, 8192]), torch.float32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .base import (
    check_qkv,
    default_positions,
    expand_kv_heads,
    grad_dtype_for,
    register_kernel,
    sum_kv_groups,
)
from .mask import Mask, Positions

__all__ = ["CausalSplit", "VendorSDPA", "vendor_mask_mode"]

Backend = Literal["auto", "cudnn", "flash"]
CUDNN_MIN_QUERIES = 128  # shorter query blocks (decode) go to FlashAttention-2 under "auto"
_aten = torch.ops.aten


def vendor_mask_mode(mask: Mask, q_pos: Positions, k_pos: Positions) -> str | None:
    """How ``mask`` on these global positions maps onto the vendor kernels.

    Returns ``"full"`` (no mask), ``"causal"`` (aligned causal), ``"empty"`` (no allowed pair) or
    None when the vendor kernels cannot express it.
    """
    if len(q_pos) == 0 or len(k_pos) == 0:
        return "empty"
    if mask.is_full:
        return "full"
    if mask.window is not None or mask.cu_seqlens is not None or mask.block_sparse is not None:
        return None
    # plain causal: key <= query
    q_bounds, k_bounds = list(q_pos.bounds()), list(k_pos.bounds())
    q_lo, q_hi = min(b[0] for b in q_bounds), max(b[1] for b in q_bounds)
    k_lo, k_hi = min(b[0] for b in k_bounds), max(b[1] for b in k_bounds)
    if k_hi <= q_lo:
        return "full"
    if q_hi < k_lo:
        return "empty"
    if (
        q_pos.index is None and k_pos.index is None
        and len(q_pos.segments) == 1 and len(k_pos.segments) == 1
    ):
        qs, ks = q_pos.segments[0], k_pos.segments[0]
        if qs.stride == 1 and ks.stride == 1 and qs.start == ks.start and qs.length == ks.length:
            return "causal"
    return None


@dataclass(frozen=True)
class CausalSplit:
    """When :class:`VendorSDPA` runs the backward of an aligned-causal call by query chunks (see
    the module docstring).

    Attributes:
        min_queries: split calls with at least this many queries; None never splits.
        chunk: query tokens per chunk (the last one may be shorter).
        max_head_dim: split only calls with at most this head dim; None: any (the head dims
            where the split gained: ``benchmarks/RESULTS.md``, "Vendor kernel").

    Example::

        >>> CausalSplit().spans(32768), CausalSplit().spans(65536)
        ([(0, 32768)], [(0, 32768), (32768, 65536)])
        >>> CausalSplit(min_queries=1024, chunk=512).spans(1300)
        [(0, 512), (512, 1024), (1024, 1300)]
        >>> CausalSplit().spans(131072, head_dim=128)  # above max_head_dim: one call
        [(0, 131072)]
    """

    min_queries: int | None = 65536
    chunk: int = 32768
    max_head_dim: int | None = 64

    def __post_init__(self) -> None:
        if self.min_queries is not None and self.min_queries < 1:
            raise ValueError(
                f"CausalSplit.min_queries must be >= 1 or None, got {self.min_queries}"
            )
        if self.chunk < 1:
            raise ValueError(f"CausalSplit.chunk must be >= 1, got {self.chunk}")

    def spans(self, queries: int, head_dim: int | None = None) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` query chunks of a causal call with ``queries`` queries and
        ``head_dim`` (None: not checked) -- one span when it is not split."""
        too_wide = None not in (head_dim, self.max_head_dim) and head_dim > self.max_head_dim
        if (self.min_queries is None or queries < self.min_queries or queries <= self.chunk
                or too_wide):
            return [(0, queries)]
        n = math.ceil(queries / self.chunk)
        return [(i * self.chunk, min((i + 1) * self.chunk, queries)) for i in range(n)]


def _cudnn_usable(q: Tensor) -> bool:
    if not torch.backends.cudnn.is_available():
        return False
    version = torch.backends.cudnn.version() or 0
    return version >= 90000 and torch.cuda.get_device_capability(q.device) >= (8, 0)


class VendorSDPA:
    """cuDNN / FlashAttention-2 (torch's private SDPA ops) behind the local kernel contract.

    Args:
        backend: ``"cudnn"``, ``"flash"`` or ``"auto"`` (cuDNN where usable and the query block
            has at least ``CUDNN_MIN_QUERIES`` tokens, FlashAttention-2 otherwise).
        split: when the backward of a long aligned-causal call runs by query chunks
            (:class:`CausalSplit`).

    Only full and aligned-causal masks, float16/bfloat16 CUDA tensors and head dims that are
    multiples of 8 up to 256 (cuDNN: up to 128).  See the module docstring.
    """

    name = "sdpa"

    def __init__(self, backend: Backend = "auto", split: CausalSplit = CausalSplit()):
        if backend not in ("auto", "cudnn", "flash"):
            raise ValueError(f"backend must be 'auto', 'cudnn' or 'flash', got {backend!r}")
        self.backend = backend
        self.split = split

    # -- support ----------------------------------------------------------------------------------
    def _backend_for(self, q: Tensor) -> str:
        """cuDNN for query blocks of ``CUDNN_MIN_QUERIES`` or more; FlashAttention-2 for shorter
        ones (decode steps): cuDNN builds an execution plan per new shape, and a decode step's
        key length is new at every step (the cost per token: ``benchmarks/RESULTS.md``,
        "Inference")."""
        if self.backend != "auto":
            return self.backend
        usable = _cudnn_usable(q) and q.shape[-1] <= 128 and q.shape[1] >= CUDNN_MIN_QUERIES
        return "cudnn" if usable else "flash"

    def unsupported_reason(
        self, q: Tensor, mask: Mask, q_pos: Positions | None = None,
        k_pos: Positions | None = None, kv_heads: int | None = None,
    ) -> str | None:
        """Why this kernel cannot run the call (None when it can).  ``kv_heads`` is accepted for
        the dispatcher's uniform call; any grouping is supported."""
        if q.device.type != "cuda":
            return f"the vendor SDPA kernels need CUDA tensors; q is on {q.device}"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"the vendor SDPA kernels take float16/bfloat16; got {q.dtype}"
        D = q.shape[-1]
        backend = self._backend_for(q)
        max_d = 128 if backend == "cudnn" else 256
        if D % 8 or D > max_d:
            return f"head_dim {D} is not supported by {backend} (multiples of 8 up to {max_d})"
        if backend == "cudnn" and not _cudnn_usable(q):
            return "cuDNN attention needs cuDNN >= 9 and an sm80+ GPU; use backend='flash'"
        if q_pos is not None and k_pos is not None and vendor_mask_mode(mask, q_pos, k_pos) is None:
            return (
                "the vendor kernels only express full masks and causal masks whose queries and "
                "keys are the same contiguous run (or wholly before/after each other); windows, "
                "documents, block-sparse and offset/striped diagonals need the Triton kernel"
            )
        return None

    def _prepare(self, q, k, v, mask, q_pos, k_pos):
        check_qkv(q, k, v)
        q_pos, k_pos = default_positions(q, k, q_pos, k_pos)
        reason = self.unsupported_reason(q, mask, q_pos, k_pos, kv_heads=k.shape[2])
        if reason is not None:
            raise ValueError(reason)
        return vendor_mask_mode(mask, q_pos, k_pos), self._backend_for(q)

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Mask = Mask(),
        q_pos: Positions | None = None, k_pos: Positions | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``q [B, Sq, H, D]``, ``k``/``v [B, Sk, H_kv, D]`` -> ``out [B, Sq, H, D]``,
        ``lse [B, H, Sq]``."""
        mode, backend = self._prepare(q, k, v, mask, q_pos, k_pos)
        B, Sq, H, _ = q.shape
        if mode == "empty":
            out = torch.zeros_like(q)
            return out, torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
        return _forward_call(q, k, v, mode == "causal", backend, scale)

    # -- backward ---------------------------------------------------------------------------------
    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
        scale: float, mask: Mask = Mask(), q_pos: Positions | None = None,
        k_pos: Positions | None = None, grad_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients from the global ``out``/``lse`` (see the contract), in ``grad_dtype``
        (default float32); ``grad_dtype=q.dtype`` returns cuDNN's/FA2's own gradients uncast
        (for one unsplit call without expanded kv heads)."""
        mode, backend = self._prepare(q, k, v, mask, q_pos, k_pos)
        Sq = q.shape[1]
        dtype = grad_dtype_for(q, grad_dtype)
        if mode == "empty":
            z = lambda t: torch.zeros(t.shape, dtype=dtype, device=t.device)  # noqa: E731
            return z(q), z(k), z(v)
        dout, out, lse = dout.to(q.dtype), out.to(q.dtype), lse.to(torch.float32)
        spans = self.split.spans(Sq, q.shape[-1]) if mode == "causal" else [(0, Sq)]
        if len(spans) == 1:
            grads = _backward_call(dout, q, k, v, out, lse, mode == "causal", backend, scale,
                                   dtype)
            return tuple(g.to(dtype) for g in grads)
        acc = torch.float32  # the pieces' dK/dV (and the two dQ parts) are summed in float32
        dq = torch.empty(q.shape, dtype=dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for a, b in spans:
            rows = (dout[:, a:b], q[:, a:b])
            dq_a, dk_a, dv_a = _backward_call(*rows, k[:, a:b], v[:, a:b], out[:, a:b],
                                              lse[:, :, a:b], True, backend, scale, acc)
            dk[:, a:b] += dk_a
            dv[:, a:b] += dv_a
            if a:
                dq_p, dk_p, dv_p = _backward_call(*rows, k[:, :a], v[:, :a], out[:, a:b],
                                                  lse[:, :, a:b], False, backend, scale, acc)
                dq_a = dq_a.to(acc) + dq_p
                dk[:, :a] += dk_p
                dv[:, :a] += dv_p
            dq[:, a:b] = dq_a
        return dq, dk.to(dtype), dv.to(dtype)


def _native_gqa(backend: str) -> bool:
    """cuDNN takes K/V with fewer heads than Q; torch's FlashAttention-2 op needs them expanded."""
    return backend == "cudnn"


def _forward_call(q: Tensor, k: Tensor, v: Tensor, causal: bool, backend: str,
                  scale: float) -> tuple[Tensor, Tensor]:
    """One vendor call: ``q [B, Sq, H, D]``, ``k``/``v [B, Sk, H_kv, D]`` (any strides) ->
    ``out [B, Sq, H, D]`` (a transposed view), ``lse [B, H, Sq]`` float32."""
    B, Sq, H, _ = q.shape
    if not _native_gqa(backend):
        k, v = expand_kv_heads(k, H), expand_kv_heads(v, H)
    # the ops take [B, H, S, D]: transposed views of [B, S, H, D], no copy
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "cudnn":
        res = _aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, True, 0.0, causal, False, scale=scale
        )
        out_t, lse = res[0], res[1].reshape(B, H, Sq)  # [B, H, Sq, 1] -> [B, H, Sq]
    else:
        res = _aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=scale)
        out_t, lse = res[0], res[1]
    return out_t.transpose(1, 2), lse.to(torch.float32)  # [B, H, Sq, D] -> [B, Sq, H, D]


def _backward_call(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   causal: bool, backend: str, scale: float,
                   group_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of one :func:`_forward_call` from the given (global) ``out``/``lse``:
    ``dq [B, Sq, H, D]``, ``dk``/``dv [B, Sk, H_kv, D]`` as the op returns them (transposed views,
    the input dtype), except dK/dV of expanded kv heads: summed over each group in float32 and
    returned in ``group_dtype``."""
    B, Sq, H, _ = q.shape
    Sk, kv_heads = k.shape[1], k.shape[2]
    if not _native_gqa(backend):
        k, v = expand_kv_heads(k, H), expand_kv_heads(v, H)
    qt, kt, vt, dot, ot = (t.transpose(1, 2) for t in (q, k, v, dout, out))
    # None = an undefined tensor: no bias, not varlen (a defined cum_seq_* selects varlen).
    # The dropout RNG state is unused at p = 0 but must be a defined tensor.
    if backend == "cudnn":
        if dot.stride() != ot.stride():  # cuDNN wants dout laid out like out
            dot = torch.empty_like(ot).copy_(dot)
        seed = torch.zeros((), dtype=torch.long, device=q.device)
        grads = _aten._scaled_dot_product_cudnn_attention_backward(
            dot, qt, kt, vt, ot, lse.reshape(B, H, Sq, 1).contiguous(),  # [B, H, Sq, 1]
            seed, seed, None, None, None, Sq, Sk, 0.0, causal, scale=scale,
        )
    else:
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        grads = _aten._scaled_dot_product_flash_attention_backward(
            dot, qt, kt, vt, ot, lse.contiguous(), None, None, Sq, Sk, 0.0, causal,
            seed, offset, scale=scale,
        )
    dq, dk, dv = (g.transpose(1, 2) for g in grads[:3])  # [B, H, S, D] -> [B, S, H, D]
    if dk.shape[2] != kv_heads:
        dk, dv = sum_kv_groups(dk, kv_heads, group_dtype), sum_kv_groups(dv, kv_heads, group_dtype)
    return dq, dk, dv


register_kernel("sdpa", VendorSDPA)
