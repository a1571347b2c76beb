"""The local kernel contract, its input checks, and the kernel registry.

Every local attention kernel (the torch reference, Triton kernels, vendor kernels) implements
:class:`AttentionKernel`:

    forward(q, k, v, *, scale, mask, q_pos, k_pos) -> out [B, Sq, H, D] (q.dtype), lse [B, H, Sq]
    backward(dout, q, k, v, out, lse, *, scale, mask, q_pos, k_pos, grad_dtype) -> dq, dk, dv

- ``q [B, Sq, H, D]``, ``k``/``v [B, Sk, H_kv, D]`` with ``H % H_kv == 0`` (GQA; K/V are never
  expanded in memory).
- ``mask`` (:class:`~longctx.kernels.mask.Mask`) is evaluated on the global positions ``q_pos`` and
  ``k_pos`` (:class:`~longctx.kernels.mask.Positions`), so a query shard can be scored against any
  key shard.
- ``lse`` is the natural-log log-sum-exp of the scaled scores over the allowed keys, in the
  accumulation dtype (:func:`acc_dtype`: float32, or float64 for float64 inputs).  A query row with
  no allowed key gets ``out = 0`` and ``lse = -inf``; nothing is NaN, forward or backward.
- ``backward`` takes the **global** (already merged) ``out`` and ``lse``, so a ring step can call
  it on one key block; ``dq``, ``dk``, ``dv`` come back in the accumulation dtype, ready to be
  summed over blocks without rounding.  A caller whose one call covers every key (Ulysses) asks
  for ``grad_dtype=q.dtype`` instead and skips a round trip through float32 (vendor kernels then
  return their native gradients as they are).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ._device import host_to_device
from .mask import Mask, Positions

__all__ = [
    "host_to_device",
    "AttentionKernel",
    "acc_dtype",
    "check_backward_shapes",
    "check_qkv",
    "check_qkv_tensors",
    "check_scale",
    "resolve_scale",
    "default_positions",
    "expand_kv_heads",
    "sum_kv_groups",
    "grad_dtype_for",
    "register_kernel",
    "get_kernel",
    "available_kernels",
    "kernel_unsupported_reason",
    "takes_positions",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for LSE, merged partial outputs and gradient accumulators."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_kv_heads(x_bshd: Tensor, heads: int) -> Tensor:
    """GQA in memory: ``[B, S, Hkv, D]`` -> ``[B, S, heads, D]``, query head ``h`` reading kv head
    ``h // (heads / Hkv)`` (a copy; ``x`` itself when not grouped)."""
    group = heads // x_bshd.shape[2]
    return x_bshd if group == 1 else x_bshd.repeat_interleave(group, dim=2)


def sum_kv_groups(g_bshd: Tensor, kv_heads: int, dtype: torch.dtype | None = None) -> Tensor:
    """Gradient of :func:`expand_kv_heads`: ``[B, S, H, D]`` -> ``[B, S, kv_heads, D]``, the sum
    over each kv head's group of query heads (``g`` itself when not grouped), in ``dtype``
    (default ``g``'s); a 16-bit ``g`` is summed in float32 before rounding to ``dtype``."""
    B, S, H, D = g_bshd.shape
    dtype = dtype or g_bshd.dtype
    if H == kv_heads:
        return g_bshd.to(dtype)
    # [B, S, Hkv, g, D] -> sum over g
    grouped = g_bshd.view(B, S, kv_heads, H // kv_heads, D)
    return grouped.sum(3, dtype=torch.promote_types(g_bshd.dtype, torch.float32)).to(dtype)


def grad_dtype_for(q: Tensor, grad_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype :meth:`AttentionKernel.backward` returns: ``grad_dtype``, by default the
    accumulation dtype of ``q`` (:func:`acc_dtype`)."""
    return acc_dtype(q.dtype) if grad_dtype is None else grad_dtype


@runtime_checkable
class AttentionKernel(Protocol):
    name: str

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Mask,
        q_pos: Positions, k_pos: Positions,
    ) -> tuple[Tensor, Tensor]: ...

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
        scale: float, mask: Mask, q_pos: Positions, k_pos: Positions,
        grad_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]: ...


def check_qkv_tensors(q: Tensor, k: Tensor, v: Tensor) -> None:
    """The checks every attention kernel shares: 4-D ``[B, S, H, D]``, one float dtype, one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be [batch, seq, heads, head_dim] (4-D); got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name} has dtype {t.dtype}; use one of float16, bfloat16, float32, float64"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype} "
            "(cast them with .to(q.dtype))"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device} "
            "(move them with .to(q.device))"
        )


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise a ValueError that says what to change when q/k/v break the contract."""
    check_qkv_tensors(q, k, v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    B, _, H, D = q.shape
    if k.shape[0] != B:
        raise ValueError(
            f"q has batch {B} but k has batch {k.shape[0]}; pass q, k, v of the same batch"
        )
    if k.shape[3] != D:
        raise ValueError(
            f"q has head_dim {D} but k has head_dim {k.shape[3]}; project q and k to one head_dim"
        )
    if k.shape[2] < 1:
        raise ValueError(
            f"k/v have {k.shape[2]} heads; they need at least one (num_kv_heads >= 1, dividing "
            f"the {H} query heads)"
        )
    if H % k.shape[2] != 0:
        raise ValueError(
            f"q has {H} heads, which is not a multiple of the {k.shape[2]} kv heads; "
            "num_heads must be divisible by num_kv_heads (GQA)"
        )


def check_scale(scale: float) -> None:
    """Raise a ValueError unless the softmax ``scale`` is > 0 (NaN is refused too)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (usually head_dim ** -0.5), got {scale}")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The scale a call runs with: ``head_dim ** -0.5`` when None, else ``scale`` if it is a
    finite Python number > 0 (what the public entry accepts; kernels check only > 0).

    Example::

        >>> resolve_scale(None, 64), resolve_scale(0.5, 64)
        (0.125, 0.5)
    """
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(
            f"scale must be a Python float (e.g. head_dim ** -0.5); got {type(scale).__name__}"
        )
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"scale must be a finite number > 0 (the default is head_dim ** -0.5 = "
            f"{head_dim ** -0.5:.4g}); got {scale}"
        )
    return float(scale)


def check_backward_shapes(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor) -> None:
    """Raise a ValueError unless ``dout`` and ``out`` are shaped like ``q [B, Sq, H, D]`` and
    ``lse`` is ``[B, H, Sq]`` (what :meth:`AttentionKernel.backward` takes).

    Example::

        >>> q = torch.zeros(1, 4, 2, 8)
        >>> check_backward_shapes(q, q, q, torch.zeros(1, 2, 4))
        >>> check_backward_shapes(q, q, q, torch.zeros(1, 4, 2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: backward needs ... lse [B, H, Sq] = (1, 2, 4); got ... lse (1, 4, 2)
    """
    B, Sq, H, _ = q.shape
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (B, H, Sq):
        raise ValueError(
            f"backward needs dout and out shaped like q {tuple(q.shape)} and lse [B, H, Sq] = "
            f"{(B, H, Sq)}; got dout {tuple(dout.shape)}, out {tuple(out.shape)}, lse "
            f"{tuple(lse.shape)}"
        )


def default_positions(q: Tensor, k: Tensor, q_pos: Positions | None, k_pos: Positions | None):
    """Contiguous positions from 0 when the caller gives none (plain single-device attention)."""
    q_pos = q_pos if q_pos is not None else Positions.contiguous(0, q.shape[1])
    k_pos = k_pos if k_pos is not None else Positions.contiguous(0, k.shape[1])
    if len(q_pos) != q.shape[1] or len(k_pos) != k.shape[1]:
        raise ValueError(
            f"positions cover {len(q_pos)} queries / {len(k_pos)} keys but q has {q.shape[1]} and "
            f"k has {k.shape[1]} tokens"
        )
    return q_pos, k_pos


_REGISTRY: dict[str, Callable[[], AttentionKernel]] = {}


def register_kernel(name: str, factory: Callable[[], AttentionKernel]) -> None:
    """Make a kernel selectable by name (``kernel="name"`` in :func:`longctx.attention`)."""
    _REGISTRY[name] = factory


def available_kernels() -> list[str]:
    return sorted(_REGISTRY)


def get_kernel(kernel: "str | AttentionKernel") -> AttentionKernel:
    """Resolve a kernel name (or pass an instance through)."""
    if not isinstance(kernel, str):
        if not isinstance(kernel, AttentionKernel):
            raise TypeError(
                f"kernel must be a name ({available_kernels()}) or an object with forward/backward "
                f"per longctx.kernels.AttentionKernel; got {type(kernel).__name__}"
            )
        return kernel
    try:
        return _REGISTRY[kernel]()
    except KeyError:
        raise ValueError(
            f"unknown kernel {kernel!r}; available: {available_kernels()}"
        ) from None


def takes_positions(kernel: AttentionKernel) -> bool:
    """Does the kernel's optional ``unsupported_reason`` look at the call's positions?"""
    fn = getattr(kernel, "unsupported_reason", None)
    return fn is not None and "q_pos" in inspect.signature(fn).parameters


def kernel_unsupported_reason(
    kernel: AttentionKernel, q: Tensor, mask: Mask, q_pos: Positions | None = None,
    k_pos: Positions | None = None, *, kv_heads: int | None = None,
) -> str | None:
    """Why ``kernel`` cannot run a call (None when it can, or when the kernel does not say).

    A kernel may define ``unsupported_reason(q, mask[, q_pos, k_pos, kv_heads])``, returning a
    sentence that says what to change; callers ask it before any work or communication.

    Example::

        >>> import torch
        >>> from longctx.kernels import get_kernel
        >>> kernel_unsupported_reason(get_kernel("reference"), torch.randn(1, 8, 2, 16), Mask())
    """
    fn = getattr(kernel, "unsupported_reason", None)
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "q_pos" in params:
        kwargs.update(q_pos=q_pos, k_pos=k_pos)
    if "kv_heads" in params:
        kwargs["kv_heads"] = kv_heads
    return fn(q, mask, **kwargs)
