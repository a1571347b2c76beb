"""Pick the fastest correct local kernel for a call, and say why.

Order of preference (measured on an H200, bf16; see ``benchmarks/RESULTS.md``, issue 3):

1. ``sdpa`` (cuDNN, else FlashAttention-2) when the mask on these global positions is full or
   aligned causal and the dtype is float16/bfloat16 (GQA with K/V expanded: still faster than
   the Triton kernel reading groups in place, issue 6);
2. ``triton`` for everything else it covers on a GPU (windows, documents, offset/striped
   positions, float32, ...);
3. ``reference`` (torch) otherwise: CPU tensors, float64, block-sparse masks, unusual head dims.

``select_kernel`` only looks at shapes, dtypes, devices, the mask and the position *descriptions*
(no device work).  The registered kernel ``"auto"`` applies it per call.

Example::

    >>> import torch
    >>> from longctx.kernels.dispatch import select_kernel
    >>> from longctx.kernels.mask import Mask
    >>> q = torch.randn(1, 128, 4, 64)
    >>> kernel, why = select_kernel(q, Mask(causal=True), explain=True)
    >>> kernel.name, why
    ('reference', 'reference: q is on cpu; the fast kernels need CUDA tensors')
"""

from __future__ import annotations

from typing import Literal, overload

from torch import Tensor

from .base import AttentionKernel, default_positions, register_kernel
from .mask import Mask, Positions
from .reference import TorchReference
from .triton_flash import TritonFlash
from .vendor import VendorSDPA, vendor_mask_mode

__all__ = ["AutoKernel", "select_kernel"]

_PREFERRED_ORDER = ("sdpa", "triton", "reference")


def _vendor_reason(q, mask, q_pos, k_pos, kv_heads):
    return VendorSDPA().unsupported_reason(q, mask, q_pos, k_pos, kv_heads=kv_heads)


def _triton_reason(q, mask, requested):
    # automatic choice: GPU only (the interpreter, allowed when requested, is for tests)
    if q.device.type != "cuda" and not requested:
        return f"q is on {q.device}"
    return TritonFlash.unsupported_reason(q, mask)


@overload
def select_kernel(
    q: Tensor, mask: Mask, q_pos: Positions | None = ..., k_pos: Positions | None = ..., *,
    prefer: str | None = ..., kv_heads: int | None = ..., k_len: int | None = ...,
    explain: Literal[False] = ...,
) -> AttentionKernel: ...
@overload
def select_kernel(
    q: Tensor, mask: Mask, q_pos: Positions | None = ..., k_pos: Positions | None = ..., *,
    prefer: str | None = ..., kv_heads: int | None = ..., k_len: int | None = ...,
    explain: Literal[True],
) -> tuple[AttentionKernel, str]: ...


def select_kernel(
    q: Tensor, mask: Mask, q_pos: Positions | None = None, k_pos: Positions | None = None, *,
    prefer: str | None = None, kv_heads: int | None = None, k_len: int | None = None,
    explain: bool = False,
):
    """Choose the local kernel for attention of ``q [B, Sq, H, D]`` under ``mask``.

    Args:
        q: the queries (shape, dtype and device are what matter).
        mask, q_pos, k_pos: the mask and global positions of the call (``None`` positions mean
            contiguous from 0; then ``k_len`` gives the key count, default ``Sq``).
        prefer: a kernel name to use if it supports the call (``"sdpa"``, ``"triton"``,
            ``"reference"``); a ValueError says why when it does not.
        kv_heads: number of K/V heads (GQA); ``None`` means equal to the query heads.
        explain: also return a one-line reason for the choice.

    Returns:
        The kernel, or ``(kernel, reason)`` with ``explain=True``.
    """
    if q_pos is None or k_pos is None:
        n_k = k_len if k_len is not None else q.shape[1]
        q_pos = q_pos if q_pos is not None else Positions.contiguous(0, q.shape[1])
        k_pos = k_pos if k_pos is not None else Positions.contiguous(0, n_k)
    reasons = {
        "sdpa": lambda: _vendor_reason(q, mask, q_pos, k_pos, kv_heads),
        "triton": lambda: _triton_reason(q, mask, requested=prefer == "triton"),
        "reference": lambda: None,
    }
    if prefer is not None:
        if prefer not in reasons:
            raise ValueError(f"prefer must be one of {list(reasons)}, got {prefer!r}")
        why_not = reasons[prefer]()
        if why_not is not None:
            raise ValueError(f"kernel {prefer!r} cannot run this call: {why_not}")
        choice, why = prefer, f"{prefer}: requested with prefer={prefer!r}"
    else:
        refused = []
        for name in _PREFERRED_ORDER:
            why_not = reasons[name]()
            if why_not is None:
                choice = name
                break
            refused.append(f"{name}: {why_not}")
        if choice == "sdpa":
            mode = vendor_mask_mode(mask, q_pos, k_pos)
            why = f"sdpa ({VendorSDPA()._backend_for(q)}): mask is {mode} on these positions"
        elif choice == "triton":
            why = f"triton: the vendor kernels refuse this call ({refused[0]})"
        elif q.device.type != "cuda":
            why = f"reference: q is on {q.device}; the fast kernels need CUDA tensors"
        else:
            why = "reference: " + "; ".join(refused)
    kernel = {"sdpa": VendorSDPA, "triton": TritonFlash, "reference": TorchReference}[choice]()
    return (kernel, why) if explain else kernel


class AutoKernel:
    """The kernel named ``"auto"``: applies :func:`select_kernel` to each call.

    ``last_choice`` holds the reason of the latest selection (for logs).
    """

    name = "auto"

    def __init__(self, prefer: str | None = None):
        self.prefer = prefer
        self.last_choice: str | None = None
        self._cache: dict[str, AttentionKernel] = {}

    def _pick(self, q: Tensor, k: Tensor, mask: Mask, q_pos, k_pos) -> AttentionKernel:
        q_pos, k_pos = default_positions(q, k, q_pos, k_pos)
        chosen, why = select_kernel(
            q, mask, q_pos, k_pos, prefer=self.prefer, kv_heads=k.shape[2], explain=True
        )
        self.last_choice = why
        return self._cache.setdefault(chosen.name, chosen)

    def forward(self, q, k, v, *, scale, mask=Mask(), q_pos=None, k_pos=None):
        kernel = self._pick(q, k, mask, q_pos, k_pos)
        return kernel.forward(q, k, v, scale=scale, mask=mask, q_pos=q_pos, k_pos=k_pos)

    def backward(
        self, dout, q, k, v, out, lse, *, scale, mask=Mask(), q_pos=None, k_pos=None,
        grad_dtype=None,
    ):
        kernel = self._pick(q, k, mask, q_pos, k_pos)
        return kernel.backward(
            dout, q, k, v, out, lse, scale=scale, mask=mask, q_pos=q_pos, k_pos=k_pos,
            grad_dtype=grad_dtype,
        )


register_kernel("auto", AutoKernel)
