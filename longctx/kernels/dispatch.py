"""Pick the fastest correct local kernel for a call, and say why.

The candidates, in order of preference (:data:`CANDIDATES`; measured on an H200, bf16; see
``benchmarks/RESULTS.md``, issues 3 and 23).  ``kernel="auto"`` runs the first that can run the
call and is not passed over for it:

1. ``fa4`` (FlashAttention-4, when installed) on sm90/sm100 for the cases measured faster than
   the alternatives (:class:`FA4Auto`: bfloat16, head dim 64/128, at least 32k queries, a causal
   mask with or without a sliding window or documents, on positions FA4 can express);
2. ``sdpa`` (cuDNN, else FlashAttention-2) when the mask on these global positions is full or
   aligned causal and the dtype is float16/bfloat16 (GQA with K/V expanded: still faster than
   the Triton kernel reading groups in place, issue 6);
3. ``triton`` for everything else it covers on a GPU (windows, documents, offset/striped
   positions, float32, ...);
4. ``reference`` (torch) otherwise: CPU tensors, float64, block-sparse masks, unusual head dims.

Masks with block-sparse lists go to ``block_sparse`` (:mod:`.block_sparse_triton`) first when
it can run the call (CUDA, contiguous shards starting on block boundaries); the others refuse
such masks, so the reference takes the rest.

A new kernel slots in as one :class:`Candidate` in :data:`CANDIDATES`.  ``select_kernel`` only
looks at shapes, dtypes, devices, the mask and the position *descriptions* (no device work).  The
registered kernel ``"auto"`` applies it per call.

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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
from torch import Tensor

from . import fa4 as _fa4
from .base import AttentionKernel, default_positions, register_kernel
from .block_sparse_triton import BlockSparseTriton
from .mask import Mask, Positions
from .reference import TorchReference
from .triton_flash import TritonFlash
from .vendor import VendorSDPA, vendor_mask_mode

__all__ = ["AutoKernel", "Call", "Candidate", "CANDIDATES", "FA4Auto", "select_kernel"]


@dataclass(frozen=True)
class Call:
    """What the dispatcher looks at: ``q`` (shape, dtype, device), the mask, the global
    positions, the K/V head count and whether the kernel was asked for by name."""

    q: Tensor
    mask: Mask
    q_pos: Positions
    k_pos: Positions
    kv_heads: int | None
    requested: bool


@dataclass(frozen=True)
class FA4Auto:
    """Where ``kernel="auto"`` runs FlashAttention-4: the envelope of issue 23's measurements
    (one H200, bf16, B=1: causal 32k/128k at D 64/128, GQA 32/8, a 4096 window and packed
    documents at 128k, each faster than cuDNN and the Triton kernel).  Outside it (shorter
    calls, float16, other head dims, full or non-causal masks) the other kernels run until a
    measurement says otherwise.

    Example::

        >>> FA4Auto().passed_over(torch.bfloat16, 128, 131072, causal=True, kind="causal")
        >>> FA4Auto().passed_over(torch.bfloat16, 128, 4096, causal=True, kind="causal")
        'fa4 measured faster only from 32768 queries (this call: 4096)'
    """

    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)
    head_dims: tuple[int, ...] = (64, 128)
    min_queries: int = 32768
    archs: tuple[int, ...] = (9, 10)
    masks: frozenset[str] = field(default=frozenset({"causal", "window", "documents"}))

    def passed_over(
        self, dtype: torch.dtype, head_dim: int, queries: int, *, causal: bool, kind: str,
    ) -> str | None:
        """Why auto does not pick FA4 although it can run the call (None: it picks it).
        ``kind``: the mask's case ("causal", "window", "documents" or "full")."""
        if dtype not in self.dtypes:
            return f"fa4 measured faster only in {', '.join(map(str, self.dtypes))}"
        if head_dim not in self.head_dims:
            return f"fa4 measured faster only at head dims {self.head_dims}"
        if queries < self.min_queries:
            return (f"fa4 measured faster only from {self.min_queries} queries "
                    f"(this call: {queries})")
        if not causal or kind not in self.masks:
            return (
                f"fa4 measured faster on causal masks (with or without windows/documents); this "
                f"mask is {kind if causal else 'not causal'}"
            )
        return None


FA4_AUTO = FA4Auto()


def _mask_kind(mask: Mask) -> str:
    """The measured case a mask belongs to: its documents, else its window, else causal/full
    (a block of a causal mask that reduces to full or empty on its positions -- a ring's
    off-diagonal step -- belongs to the causal case)."""
    if mask.cu_seqlens is not None:
        return "documents"
    if mask.window is not None:
        return "window"
    return "causal" if mask.causal else "full"


# -- the candidates --------------------------------------------------------------------------------
def _fa4_cannot(call: Call) -> str | None:
    return _fa4.FlashAttention4.unsupported_reason(
        call.q, call.mask, call.q_pos, call.k_pos, kv_heads=call.kv_heads
    )


def _fa4_passed_over(call: Call) -> str | None:
    arch = _fa4.device_arch(call.q.device)
    if arch not in FA4_AUTO.archs:
        return f"fa4 measured only on sm{FA4_AUTO.archs}"
    return FA4_AUTO.passed_over(
        call.q.dtype, call.q.shape[-1], call.q.shape[1], causal=call.mask.causal,
        kind=_mask_kind(call.mask),
    )


def _fa4_because(call: Call) -> str:
    return (
        f"fa4: {_mask_kind(call.mask)} mask, {call.q.dtype}, D={call.q.shape[-1]}, "
        f"{call.q.shape[1]} queries: FlashAttention-4 measured fastest there (issue 23)"
    )


def _vendor_cannot(call: Call) -> str | None:
    return VendorSDPA().unsupported_reason(
        call.q, call.mask, call.q_pos, call.k_pos, kv_heads=call.kv_heads
    )


def _vendor_because(call: Call) -> str:
    mode = vendor_mask_mode(call.mask, call.q_pos, call.k_pos)
    return f"sdpa ({VendorSDPA()._backend_for(call.q)}): mask is {mode} on these positions"


def _triton_cannot(call: Call) -> str | None:
    # automatic choice: GPU only (the interpreter, allowed when requested, is for tests)
    if call.q.device.type != "cuda" and not call.requested:
        return f"q is on {call.q.device}"
    return TritonFlash.unsupported_reason(call.q, call.mask)


def _block_sparse_cannot(call: Call) -> str | None:
    # block-sparse lists only; automatic choice on GPUs (the interpreter is for tests)
    if call.mask.block_sparse is not None and call.q.device.type != "cuda" and not call.requested:
        return f"q is on {call.q.device}"
    return BlockSparseTriton.unsupported_reason(call.q, call.mask, call.q_pos, call.k_pos)


@dataclass(frozen=True)
class Candidate:
    """One kernel ``kernel="auto"`` may pick.

    Attributes:
        name: the registered kernel name.
        make: builds the kernel.
        cannot_run: why the kernel cannot run the call (None: it can); asked for ``prefer=``.
        passed_over: why auto skips it although it can run the call (measured slower there).
        because: the one-line reason given when it is chosen.
    """

    name: str
    make: Callable[[], AttentionKernel]
    cannot_run: Callable[[Call], str | None]
    passed_over: Callable[[Call], str | None] = lambda call: None
    because: Callable[[Call], str] | None = None


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("block_sparse", BlockSparseTriton, _block_sparse_cannot,
              because=lambda call: "block_sparse: the mask has block-sparse lists"),
    Candidate("fa4", _fa4.FlashAttention4, _fa4_cannot, _fa4_passed_over, _fa4_because),
    Candidate("sdpa", VendorSDPA, _vendor_cannot, because=_vendor_because),
    Candidate("triton", TritonFlash, _triton_cannot),
    Candidate("reference", TorchReference, lambda call: None),
)


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
        prefer: a kernel name to use if it supports the call (``"fa4"``, ``"sdpa"``,
            ``"triton"``, ``"reference"``); a ValueError says why when it does not.
        kv_heads: number of K/V heads (GQA); ``None`` means equal to the query heads.
        explain: also return a one-line reason for the choice.

    Returns:
        The kernel, or ``(kernel, reason)`` with ``explain=True``.
    """
    if q_pos is None or k_pos is None:
        n_k = k_len if k_len is not None else q.shape[1]
        q_pos = q_pos if q_pos is not None else Positions.contiguous(0, q.shape[1])
        k_pos = k_pos if k_pos is not None else Positions.contiguous(0, n_k)
    by_name = {c.name: c for c in CANDIDATES}
    call = Call(q, mask, q_pos, k_pos, kv_heads, requested=prefer is not None)
    if prefer is not None:
        if prefer not in by_name:
            raise ValueError(f"prefer must be one of {list(by_name)}, got {prefer!r}")
        why_not = by_name[prefer].cannot_run(call)
        if why_not is not None:
            raise ValueError(f"kernel {prefer!r} cannot run this call: {why_not}")
        chosen, why = by_name[prefer], f"{prefer}: requested with prefer={prefer!r}"
    else:
        refused: list[str] = []
        for cand in CANDIDATES:
            why_not = cand.cannot_run(call) or cand.passed_over(call)
            if why_not is None:
                chosen = cand
                break
            refused.append(f"{cand.name}: {why_not}")
        why = _because(chosen, call, refused)
    kernel = chosen.make()
    return (kernel, why) if explain else kernel


def _because(chosen: Candidate, call: Call, refused: list[str]) -> str:
    """The explanation of an automatic choice: why this one, and why not the ones before it."""
    fa4_note = next((r for r in refused if r.startswith("fa4:")), None)
    if chosen.because is not None:
        why = chosen.because(call)
    elif chosen.name == "triton":
        vendor = next((r for r in refused if r.startswith("sdpa:")), refused[-1])
        why = f"triton: the vendor kernels refuse this call ({vendor})"
    elif call.q.device.type != "cuda":
        return f"reference: q is on {call.q.device}; the fast kernels need CUDA tensors"
    else:
        return "reference: " + "; ".join(refused)
    return why if fa4_note is None else f"{why} [not {fa4_note}]"


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
