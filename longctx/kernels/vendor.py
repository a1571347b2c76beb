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

GQA (``H = g * Hkv``) runs with K/V expanded to ``H`` heads (one copy of K and V per call; dK/dV
summed back over each group in float32): on an H200 at 128k tokens that is ~1.3x faster than
the Triton kernel reading the groups in place (``benchmarks/RESULTS.md``, issue 6).

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

from typing import Literal

import torch
from torch import Tensor

from .base import (
    check_qkv, default_positions, expand_kv_heads, grad_dtype_for, register_kernel, sum_kv_groups,
)
from .mask import Mask, Positions

__all__ = ["VendorSDPA", "vendor_mask_mode"]

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

    Only full and aligned-causal masks, float16/bfloat16 CUDA tensors and head dims that are
    multiples of 8 up to 256 (cuDNN: up to 128); GQA through expanded K/V.  See the module
    docstring.
    """

    name = "sdpa"

    def __init__(self, backend: Backend = "auto"):
        if backend not in ("auto", "cudnn", "flash"):
            raise ValueError(f"backend must be 'auto', 'cudnn' or 'flash', got {backend!r}")
        self.backend = backend

    # -- support ----------------------------------------------------------------------------------
    def _backend_for(self, q: Tensor) -> str:
        """cuDNN for query blocks of ``CUDNN_MIN_QUERIES`` or more; FlashAttention-2 for shorter
        ones (decode steps): cuDNN builds an execution plan per new shape, and a decode step's
        key length is new at every step (measured on 2x H200 at 256k: ~60 ms per token with a
        plan built per step, ~25 ms with the plans cached)."""
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
        """``q [B, Sq, H, D]``, ``k``/``v [B, Sk, H, D]`` -> ``out [B, Sq, H, D]``,
        ``lse [B, H, Sq]``."""
        mode, backend = self._prepare(q, k, v, mask, q_pos, k_pos)
        B, Sq, H, _ = q.shape
        if mode == "empty":
            out = torch.zeros_like(q)
            return out, torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
        k, v = expand_kv_heads(k, H), expand_kv_heads(v, H)
        # the ops take [B, H, S, D]: transposed views of [B, S, H, D], no copy
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        causal = mode == "causal"
        if backend == "cudnn":
            res = _aten._scaled_dot_product_cudnn_attention(
                qt, kt, vt, None, True, 0.0, causal, False, scale=scale
            )
            out_t, lse = res[0], res[1].reshape(B, H, Sq)  # [B, H, Sq, 1] -> [B, H, Sq]
        else:
            res = _aten._scaled_dot_product_flash_attention(
                qt, kt, vt, 0.0, causal, False, scale=scale
            )
            out_t, lse = res[0], res[1]
        out = out_t.transpose(1, 2)  # [B, H, Sq, D] -> [B, Sq, H, D]
        return out, lse.to(torch.float32)

    # -- backward ---------------------------------------------------------------------------------
    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
        scale: float, mask: Mask = Mask(), q_pos: Positions | None = None,
        k_pos: Positions | None = None, grad_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients from the global ``out``/``lse`` (see the contract), in ``grad_dtype``
        (default float32); ``grad_dtype=q.dtype`` returns cuDNN's/FA2's own gradients uncast."""
        mode, backend = self._prepare(q, k, v, mask, q_pos, k_pos)
        B, Sq, H, _ = q.shape
        Sk = k.shape[1]
        dtype = grad_dtype_for(q, grad_dtype)
        if mode == "empty":
            z = lambda t: torch.zeros(t.shape, dtype=dtype, device=t.device)  # noqa: E731
            return z(q), z(k), z(v)
        kv_heads = k.shape[2]
        qt, kt, vt = (t.transpose(1, 2) for t in (q, expand_kv_heads(k, H), expand_kv_heads(v, H)))
        dot, ot = dout.to(q.dtype).transpose(1, 2), out.to(q.dtype).transpose(1, 2)
        causal = mode == "causal"
        lse = lse.to(torch.float32)
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
        # [B, H, S, D] -> [B, S, H, D]; float32 (the default) for accumulation over ring steps
        dq, dk, dv = (g.transpose(1, 2) for g in grads[:3])
        return dq.to(dtype), sum_kv_groups(dk, kv_heads, dtype), sum_kv_groups(dv, kv_heads, dtype)


register_kernel("sdpa", VendorSDPA)
