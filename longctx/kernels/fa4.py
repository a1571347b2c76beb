"""FlashAttention-4 (``flash-attn-4``, CuTe DSL) on the local kernel contract.

FA4 (``flash_attn.cute``; an optional extra: ``pip install "longctx[fa4]"``) is the fastest
attention kernel on Hopper and Blackwell we know of.  Its private entry points take what the
contract needs: ``_flash_attn_fwd`` returns the log-sum-exp (natural log, float32: ``[B, H, S]``,
or ``[H, total]`` for varlen calls), ``_flash_attn_bwd`` starts from a given ``out``/``lse`` (so
the **global**, merged ``out``/``lse`` of a ring can be passed per key block), and both read GQA
K/V in place.  This module is written against flash-attn-4 4.0.0b36 (the version the extra pins).

**What FA4 can express.**  FA4 knows one mask family, read from its source (``cute/mask.py``):
within one sequence of ``nq`` queries and ``nk`` keys, local query ``i`` may see local key ``j``
iff ``d - window_left <= j - i <= d + window_right`` with ``d = nk - nq`` (the band is aligned at
the bottom-right corner; ``None`` leaves a side open, ``causal`` is ``(None, 0)``); a varlen call
(``cu_seqlens_q``/``cu_seqlens_k``) applies the band inside every sequence of a packed batch.

**How a (query shard, key shard) pair maps onto it** (:func:`plan_call`, pure host code, no
device work).  Positions of one run each, ``q = qs + sq*i``, ``k = ks + sk*j``:

1. With one stride ``s`` on both sides (or a side of one token), causal and windows are a band on
   the local indices: with ``off = qs - ks``, causal (``k <= q``) is ``j - i <= floor(off / s)``;
   a causal window (``q - k < W``) adds ``j - i >= 1 - ceil((W - off) / s)``, a two-sided one
   also ``j - i <= ceil((W + off) / s) - 1``.  Other strides work only where causal/window
   decide nothing (every pair allowed, or none).
2. The call is cropped to the band's support: the rows that see some key and the keys that some
   row sees.  The support's bottom-right corner is always allowed, so in the cropped frame
   ``window_right = hi - d >= 0`` and ``window_left = d - lo >= 0``: never negative, which FA4
   reads as "no window".  A side that cuts nothing inside the crop is left open (``None``).
   Example: the ring step of a 4096-token window onto the previous 32k shard keeps queries
   ``0..4094`` and the last 4095 keys, with ``window_left = 0`` (key ``j >= i``).
3. Documents (``cu_seqlens``) split both shards into per-document index ranges (the count of a
   shard's positions below each global boundary); every document is cropped like 2., and the
   rows/keys it drops become entries with no keys / no queries (FA4 writes ``out = 0``,
   ``lse = -inf`` for them and zero dK/dV), so ``cu_seqlens_q``/``cu_seqlens_k`` still cover
   both shards in order.  One band must serve every document: the call is refused when the
   documents need different windows (e.g. striped positions, whose per-document offsets vary),
   unless splitting the query rows where the key run begins and ends gives parts that each map
   (:class:`FA4Split`: a zigzag rank's adjacent chunks against the first of them); the parts
   are separate calls on disjoint rows.  A single remaining document becomes a plain (cropped,
   non-varlen) call.

Everything else -- index positions, several runs per shard, block-sparse masks, float32/float64,
head dims FA4 lacks, CPU tensors, GPUs other than sm90/sm100 -- gets a reason from
:meth:`FlashAttention4.unsupported_reason`; :func:`longctx.kernels.dispatch.select_kernel` then
routes the call to cuDNN, the Triton kernel or the reference.  ``import longctx`` never imports
``flash_attn``: the package is probed by its distribution metadata and imported on first use.

Example (the mapping needs no GPU)::

    >>> from longctx.kernels.fa4 import plan_call
    >>> from longctx.kernels.mask import Mask, Positions
    >>> diag = Positions.contiguous(0, 4096)
    >>> plan_call(Mask(causal=True), diag, diag).causal            # the ring's diagonal
    True
    >>> prev = Positions.contiguous(32768, 32768); mine = Positions.contiguous(65536, 32768)
    >>> p = plan_call(Mask(causal=True, window=4096), mine, prev)  # window onto the last shard
    >>> p.rows, p.cols, p.window_left, p.window_right
    ((0, 4095), (28673, 32768), 0, None)
"""

from __future__ import annotations

import bisect
import functools
import importlib.metadata
from dataclasses import dataclass

import torch
from torch import Tensor

from ._device import host_to_device
from .base import check_qkv, default_positions, grad_dtype_for, register_kernel
from .mask import Mask, Positions, Segment

__all__ = [
    "FA4Call",
    "FA4Split",
    "FlashAttention4",
    "INSTALL_HINT",
    "device_arch",
    "fa4_available",
    "fa4_version",
    "plan_call",
]

INSTALL_HINT = 'pip install "longctx[fa4]"'
TESTED_VERSION = "4.0.0b36"
_DISTRIBUTION = "flash-attn-4"
_ARCHS = (9, 10)  # compute capability majors FA4 runs forward and backward on: Hopper, Blackwell
_MAX_POSITION = 2**31 - 1  # window sizes are int32 in the kernel


# -- availability (the seams tests replace) ------------------------------------------------------
@functools.cache
def fa4_version() -> str | None:
    """The installed flash-attn-4 version, or None; reads package metadata, imports nothing."""
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def fa4_available() -> bool:
    """Is flash-attn-4 installed?  (Imports nothing; see :func:`fa4_version`.)"""
    return fa4_version() is not None


def device_arch(device: torch.device) -> int | None:
    """Compute capability major of ``device`` (9: Hopper, 10: Blackwell), None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)[0]


@functools.cache
def _interface():
    """``flash_attn.cute.interface``, imported on first use (it JIT-compiles per shape)."""
    try:
        from flash_attn.cute import interface
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"the FlashAttention-4 kernel needs flash-attn-4 ({exc}); {INSTALL_HINT}"
        ) from exc
    return interface


# -- the mapping: global positions + mask -> FA4 arguments (pure) ---------------------------------
@dataclass(frozen=True)
class FA4Call:
    """FA4's arguments for one (query shard, key shard) call, in local indices.

    Attributes:
        window_left, window_right: FA4's ``window_size_left/right`` (>= 0; None: open side).
            ``(None, 0)`` is FA4's causal, ``(None, None)`` no mask.
        rows, cols: the local queries ``[begin, end)`` and keys the call covers; rows outside
            get ``out = 0``, ``lse = -inf``, keys outside zero gradients.
        seqlens: varlen entries ``(queries, keys)`` in order, covering ``rows`` and ``cols``;
            None: one plain call on ``rows`` x ``cols``.
    """

    window_left: int | None = None
    window_right: int | None = None
    rows: tuple[int, int] = (0, 0)
    cols: tuple[int, int] = (0, 0)
    seqlens: tuple[tuple[int, int], ...] | None = None

    @property
    def empty(self) -> bool:
        """No allowed pair: nothing to call."""
        return self.rows[0] >= self.rows[1] or self.cols[0] >= self.cols[1]

    @property
    def causal(self) -> bool:
        """FA4's own causal mask (bottom-right aligned)."""
        return self.window_left is None and self.window_right == 0

    @property
    def varlen(self) -> bool:
        return self.seqlens is not None

    def cu_seqlens(self) -> tuple[list[int], list[int]]:
        """``cu_seqlens_q``, ``cu_seqlens_k`` of a varlen call (one batch row)."""
        assert self.seqlens is not None
        cu_q, cu_k = [0], [0]
        for nq, nk in self.seqlens:
            cu_q.append(cu_q[-1] + nq)
            cu_k.append(cu_k[-1] + nk)
        return cu_q, cu_k

    def max_seqlens(self) -> tuple[int, int]:
        """``max_seqlen_q``, ``max_seqlen_k`` (FA4 sizes its grid by them)."""
        if self.seqlens is None:
            return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]
        return max(nq for nq, _ in self.seqlens), max(nk for _, nk in self.seqlens)

    def allowed(self, n_q: int, n_k: int) -> Tensor:
        """The pairs FA4 computes with these arguments, as bool ``[n_q, n_k]`` (FA4's mask
        rule, see the module docstring; used to check the mapping against
        :meth:`Mask.allowed <longctx.kernels.mask.Mask.allowed>`)."""
        ok = torch.zeros(n_q, n_k, dtype=torch.bool)
        if self.empty:
            return ok
        if self.seqlens is None:
            entries = [(self.rows[0], self.cols[0], self.rows[1] - self.rows[0],
                        self.cols[1] - self.cols[0])]
        else:
            cu_q, cu_k = self.cu_seqlens()
            entries = [(self.rows[0] + cu_q[b], self.cols[0] + cu_k[b], nq, nk)
                       for b, (nq, nk) in enumerate(self.seqlens)]
        for r, c, nq, nk in entries:
            diff = torch.arange(nk).view(1, -1) - torch.arange(nq).view(-1, 1)  # j - i
            band = torch.ones(nq, nk, dtype=torch.bool)
            if self.window_left is not None:
                band &= diff >= nk - nq - self.window_left
            if self.window_right is not None:
                band &= diff <= nk - nq + self.window_right
            ok[r : r + nq, c : c + nk] = band
        return ok


EMPTY = FA4Call()


@dataclass(frozen=True)
class FA4Split:
    """Several FA4 calls on disjoint query rows of one shard pair (their keys may overlap).

    A shard pair whose documents need different bands in one call can still split at the rows
    where the key run begins and ends: e.g. a zigzag rank's two adjacent chunks against the
    first one (queries past the keys see them all, the others form a diagonal).
    """

    parts: tuple[FA4Call, ...]

    @property
    def empty(self) -> bool:
        return all(p.empty for p in self.parts)

    def allowed(self, n_q: int, n_k: int) -> Tensor:
        ok = torch.zeros(n_q, n_k, dtype=torch.bool)
        for p in self.parts:
            ok |= p.allowed(n_q, n_k)
        return ok


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _count_below(seg: Segment, bound: float) -> int:
    """How many of the run's positions are ``< bound``."""
    if bound == float("inf"):
        return seg.length
    return min(max(_ceil_div(int(bound) - seg.start, seg.stride), 0), seg.length)


def _band(causal: bool, window: int | None, qs: Segment, ks: Segment):
    """``(lo, hi)`` with ``lo <= j - i <= hi`` (None: open) for runs ``qs``/``ks``, "empty", or
    None when causal/window are no band on these strides."""
    if not causal and window is None:
        return None, None
    strides = {s.stride for s in (qs, ks) if s.length > 1}
    if len(strides) > 1:  # no band; fine only where causal/window decide nothing
        q_lo, q_hi, k_lo, k_hi = qs.start, qs.last, ks.start, ks.last
        everything = (not causal or k_hi <= q_lo) and (
            window is None or (q_hi - k_lo < window and (causal or k_hi - q_lo < window))
        )
        if everything:
            return None, None
        if not Mask(causal=causal, window=window).interval_may_attend(q_lo, q_hi, k_lo, k_hi):
            return "empty"
        return None
    s = strides.pop() if strides else 1
    off = qs.start - ks.start
    lo = hi = None
    if causal:  # k <= q  <=>  s * (j - i) <= off
        hi = off // s
    if window is not None:  # q - k < W  <=>  s * (i - j) < W - off
        lo = 1 - _ceil_div(window - off, s)
        if not causal:  # k - q < W  <=>  s * (j - i) < W + off
            hi = _ceil_div(window + off, s) - 1
    return lo, hi


def _support(lo, hi, r_begin, r_end, c_begin, c_end):
    """The smallest box ``(r0, r1, c0, c1)`` holding every allowed pair of rows
    ``[r_begin, r_end)`` x cols ``[c_begin, c_end)`` under ``lo <= j - i <= hi``; None if none."""
    if r_begin >= r_end or c_begin >= c_end or (lo is not None and hi is not None and lo > hi):
        return None
    r0 = r_begin if hi is None else max(r_begin, c_begin - hi)
    r1 = r_end if lo is None else min(r_end, c_end - lo)
    c0 = c_begin if lo is None else max(c_begin, r_begin + lo)
    c1 = c_end if hi is None else min(c_end, r_end + hi)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, r1, c0, c1


def _box_windows(lo, hi, box):
    """FA4's windows for one cropped box: ``((left, left_min), (right, right_min))`` where a
    side is either an exact value (``left``, the band cuts the box) or open (None) and then any
    value ``>= *_min`` gives the same pairs."""
    r0, r1, c0, c1 = box
    nq, nk, shift = r1 - r0, c1 - c0, c0 - r0
    d = nk - nq
    if lo is None or lo - shift <= -(nq - 1):
        left = (None, nk - 1)
    else:
        left = (d - (lo - shift), 0)
    if hi is None or hi - shift >= nk - 1:
        right = (None, nq - 1)
    else:
        right = ((hi - shift) - d, 0)
    assert (left[0] is None or left[0] >= 0) and (right[0] is None or right[0] >= 0)
    return left, right


def _one_window(sides) -> tuple[bool, int | None]:
    """One window value serving every box (exact values must agree, open boxes must accept it)."""
    exact = {v for v, _ in sides if v is not None}
    if len(exact) > 1:
        return False, None
    if not exact:
        return True, None
    value = exact.pop()
    return all(v is not None or value >= least for v, least in sides), value


@functools.lru_cache(maxsize=4096)
def _plan(
    causal: bool, window: int | None, boundaries: tuple[int, ...] | None, qs: Segment,
    ks: Segment,
) -> "FA4Call | str":
    band = _band(causal, window, qs, ks)
    if band == "empty":
        return EMPTY
    if band is None:
        return (
            f"causal/window masks between runs of different strides (queries every {qs.stride}, "
            f"keys every {ks.stride} positions) are no band FA4 can express"
        )
    lo, hi = band
    if boundaries is None:
        box = _support(lo, hi, 0, qs.length, 0, ks.length)
        if box is None:
            return EMPTY
        (left, _), (right, _) = _box_windows(lo, hi, box)
        return FA4Call(left, right, rows=box[:2], cols=box[2:])
    ext = boundaries + (float("inf"),)  # positions past the last boundary form one more document
    first = bisect.bisect_right(boundaries, min(qs.start, ks.start)) - 1
    last = bisect.bisect_right(boundaries, max(qs.last, ks.last)) - 1
    entries: list[tuple[int, int]] = []
    boxes: list[tuple[int, int, int, int]] = []
    gap_q = gap_k = 0
    for b in range(max(first, 0), last + 1):
        qa, qb = _count_below(qs, ext[b]), _count_below(qs, ext[b + 1])
        ka, kb = _count_below(ks, ext[b]), _count_below(ks, ext[b + 1])
        box = _support(lo, hi, qa, qb, ka, kb)
        if box is None:
            gap_q, gap_k = gap_q + qb - qa, gap_k + kb - ka
            continue
        r0, r1, c0, c1 = box
        gap_q, gap_k = gap_q + r0 - qa, gap_k + c0 - ka
        entries += [(gap_q, 0)] * (gap_q > 0) + [(0, gap_k)] * (gap_k > 0) + [(r1 - r0, c1 - c0)]
        boxes.append(box)
        gap_q, gap_k = qb - r1, kb - c1
    if not boxes:
        return EMPTY
    entries += [(gap_q, 0)] * (gap_q > 0) + [(0, gap_k)] * (gap_k > 0)
    windows = [_box_windows(lo, hi, box) for box in boxes]
    ok_left, left = _one_window([w[0] for w in windows])
    ok_right, right = _one_window([w[1] for w in windows])
    if not (ok_left and ok_right):
        return (
            "the documents of this call need different FA4 windows (their offsets between query "
            "and key positions differ), which one FA4 call cannot express"
        )
    if len(boxes) == 1:  # one document left: a plain cropped call
        r0, r1, c0, c1 = boxes[0]
        return FA4Call(left, right, rows=(r0, r1), cols=(c0, c1))
    return FA4Call(left, right, rows=(0, qs.length), cols=(0, ks.length), seqlens=tuple(entries))


def _shifted(call: FA4Call, rows: int) -> FA4Call:
    r0, r1 = call.rows
    return FA4Call(call.window_left, call.window_right, (r0 + rows, r1 + rows), call.cols,
                   call.seqlens)


@functools.lru_cache(maxsize=4096)
def _plan_rows(
    causal: bool, window: int | None, boundaries: tuple[int, ...] | None, qs: Segment,
    ks: Segment,
) -> "FA4Call | FA4Split | str":
    """:func:`_plan`, and when the documents need different bands, the query rows split where
    the key run begins and ends (each part planned on its own)."""
    whole = _plan(causal, window, boundaries, qs, ks)
    if not isinstance(whole, str) or boundaries is None:
        return whole
    cuts = sorted({0, qs.length, _count_below(qs, ks.start), _count_below(qs, ks.last + 1)})
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        part = _plan(causal, window, boundaries, Segment(qs.start + a * qs.stride, b - a,
                                                          qs.stride), ks)
        if isinstance(part, str):
            return whole
        if not part.empty:
            parts.append(_shifted(part, a))
    if len(parts) <= 1:
        return parts[0] if parts else EMPTY
    return FA4Split(tuple(parts))


def _single_run(pos: Positions) -> "Segment | str | None":
    if pos.index is not None:
        return "index positions (an explicit position tensor) have no FA4 form"
    runs = [s for s in pos.segments if s.length]
    if len(runs) > 1:
        return "positions of several runs per shard have no FA4 form (one run per call)"
    if runs and runs[0].last > _MAX_POSITION:
        return f"positions up to {runs[0].last} exceed FA4's int32 windows"
    return runs[0] if runs else None


def plan_call(mask: Mask, q_pos: Positions, k_pos: Positions) -> "FA4Call | FA4Split | str":
    """FA4's arguments for ``mask`` on these global positions, or why FA4 cannot express it.

    Pure host code (cached on the runs and the document boundaries); see the module docstring.

    Example::

        >>> from longctx.kernels.mask import Mask, Positions
        >>> # striped causal, keys of the next rank: query i sees keys j < i
        >>> p = plan_call(Mask(causal=True), Positions.strided(0, 8, 4), Positions.strided(1, 8, 4))
        >>> p.rows, p.cols, p.causal
        ((1, 8), (0, 7), True)
        >>> index = Positions.from_index(torch.arange(4))
        >>> plan_call(Mask(causal=True), index, Positions.contiguous(0, 4))
        'index positions (an explicit position tensor) have no FA4 form'
    """
    if mask.block_sparse is not None:
        return (
            "block-sparse masks are not mapped onto FA4's block-sparse tensors (not measured "
            "against the alternatives yet)"
        )
    qs, ks = _single_run(q_pos), _single_run(k_pos)
    for run in (qs, ks):
        if isinstance(run, str):
            return run
    if qs is None or ks is None:
        return EMPTY
    boundaries = mask._boundaries if mask.cu_seqlens is not None else None
    return _plan_rows(mask.causal, mask.window, boundaries, qs, ks)


# -- the kernel ------------------------------------------------------------------------------------
def _head_dim_reason(D: int, arch: int) -> str | None:
    """FA4's head-dim rule (``_validate_head_dims``): multiples of 8; sm90: 8-256, sm100: 8-128
    or 256."""
    ok = D % 8 == 0 and (8 <= D <= 256 if arch == 9 else (8 <= D <= 128 or D == 256))
    if ok:
        return None
    allowed = "8 to 256" if arch == 9 else "8 to 128 or 256"
    return (f"head_dim {D} is not supported by FlashAttention-4 on sm{arch}0 (multiples of 8, "
            f"{allowed})")


def _ready(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


class FlashAttention4:
    """FlashAttention-4 (CuTe DSL) behind the local kernel contract; see the module docstring.

    Raises ModuleNotFoundError naming the extra when flash-attn-4 is not installed.
    Float16/bfloat16 CUDA tensors on sm90/sm100, GQA read in place, gradients in ``grad_dtype``
    (default float32: FA4's bfloat16 gradients cast, as the other vendor kernel does).
    """

    name = "fa4"

    def __init__(self) -> None:
        if not fa4_available():
            raise ModuleNotFoundError(
                f"kernel 'fa4' needs FlashAttention-4 (the flash-attn-4 package, tested with "
                f"{TESTED_VERSION}), which is not installed: {INSTALL_HINT}"
            )
        self._cu_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    # -- support ----------------------------------------------------------------------------------
    @staticmethod
    def unsupported_reason(
        q: Tensor, mask: Mask, q_pos: Positions | None = None, k_pos: Positions | None = None,
        kv_heads: int | None = None,
    ) -> str | None:
        """Why FA4 cannot run this call (None when it can).  Without positions only the
        position-free checks run.  ``kv_heads``: any divisor of the heads is read in place."""
        if not fa4_available():
            return f"flash-attn-4 is not installed ({INSTALL_HINT})"
        arch = device_arch(q.device)
        if arch is None:
            return f"FlashAttention-4 needs CUDA tensors; q is on {q.device}"
        if arch not in _ARCHS:
            return (f"FlashAttention-4 runs on sm90 (Hopper) and sm100 (Blackwell); this GPU is "
                    f"sm{arch}x")
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"FlashAttention-4 takes float16/bfloat16; got {q.dtype}"
        if (reason := _head_dim_reason(q.shape[-1], arch)) is not None:
            return reason
        if mask.block_sparse is not None:
            return plan_call(mask, Positions(), Positions())
        if q_pos is None or k_pos is None:
            return None
        strided = any(s.stride > 1 and s.length > 1 for p in (q_pos, k_pos) for s in p.segments)
        if strided and mask.cu_seqlens is not None and (mask.causal or mask.window is not None):
            # refused on every pair (the diagonal too), so a strategy's up-front check predicts
            # its other steps, whose per-document offsets differ
            return (
                "documents on strided positions with causal/window masks need a different band "
                "per document; use the Triton kernel"
            )
        plan = plan_call(mask, q_pos, k_pos)
        return plan if isinstance(plan, str) else None

    def supports(self, q: Tensor, mask: Mask) -> bool:
        return self.unsupported_reason(q, mask) is None

    def _prepare(self, q, k, v, mask, q_pos, k_pos) -> tuple[FA4Call, ...]:
        """The calls to make (none for an empty pair), after the contract's checks."""
        check_qkv(q, k, v)
        q_pos, k_pos = default_positions(q, k, q_pos, k_pos)
        reason = self.unsupported_reason(q, mask, q_pos, k_pos, kv_heads=k.shape[2])
        if reason is not None:
            raise ValueError(f"kernel 'fa4' cannot run this call: {reason}")
        plan = plan_call(mask, q_pos, k_pos)
        if q.shape[0] * q.shape[2] == 0:
            return ()
        calls = plan.parts if isinstance(plan, FA4Split) else (plan,)
        return tuple(c for c in calls if not c.empty)

    def _varlen_args(self, call: FA4Call, batch: int, device: torch.device) -> dict:
        """``cu_seqlens_q/k`` (int32, on ``device``, ``batch`` copies end to end) and the maxima;
        copied to the device once per call description."""
        key = (call, batch, device)
        if key not in self._cu_cache:
            cu_q, cu_k = call.cu_seqlens()
            n_q, n_k = cu_q[-1], cu_k[-1]
            flat_q = [b * n_q + c for b in range(batch) for c in cu_q[:-1]] + [batch * n_q]
            flat_k = [b * n_k + c for b in range(batch) for c in cu_k[:-1]] + [batch * n_k]
            if len(self._cu_cache) > 64:
                self._cu_cache.clear()
            self._cu_cache[key] = tuple(
                host_to_device(torch.tensor(cu, dtype=torch.int32), device)
                for cu in (flat_q, flat_k)
            )
        cu_q, cu_k = self._cu_cache[key]
        max_q, max_k = call.max_seqlens()
        return dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)

    def _call_args(self, call: FA4Call, q: Tensor, k: Tensor, v: Tensor, *rows: Tensor):
        """The tensors of one call (its rows of ``q`` and ``rows``, its keys of ``k``/``v``;
        flattened ``[B*S, H, D]`` for varlen) and its keyword arguments."""
        (r0, r1), (c0, c1) = call.rows, call.cols
        kw = dict(causal=False, window_size_left=call.window_left,
                  window_size_right=call.window_right)
        qs, ks = [_ready(t[:, r0:r1]) for t in (q, *rows)], [_ready(t[:, c0:c1]) for t in (k, v)]
        if call.varlen:
            B = q.shape[0]
            # [B, S, H, D] -> [B*S, H, D]: the batch rows become consecutive packed sequences
            qs, ks = [t.view(-1, *t.shape[2:]) for t in qs], [t.view(-1, *t.shape[2:]) for t in ks]
            kw.update(self._varlen_args(call, B, q.device))
        return qs, ks, kw

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Mask = Mask(),
        q_pos: Positions | None = None, k_pos: Positions | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``q [B, Sq, H, D]``, ``k``/``v [B, Sk, H_kv, D]`` -> ``out [B, Sq, H, D]``,
        ``lse [B, H, Sq]`` (float32, natural log; ``-inf`` for rows with no allowed key)."""
        calls = self._prepare(q, k, v, mask, q_pos, k_pos)
        B, Sq, H, D = q.shape
        out = lse = None
        for call in calls:
            (qc,), (kc, vc), kw = self._call_args(call, q, k, v)
            o, l = _interface()._flash_attn_fwd(qc, kc, vc, softmax_scale=scale, return_lse=True,
                                                **kw)[:2]
            n = call.rows[1] - call.rows[0]
            if call.varlen:  # o [B*n, H, D] -> [B, n, H, D]; l [H, B*n] -> [B, H, n]
                o, l = o.view(B, n, H, D), l.view(H, B, n).transpose(0, 1)
            if len(calls) == 1 and call.rows == (0, Sq):
                return o, l.contiguous()
            if out is None:
                out = torch.zeros_like(q)
                lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
            out[:, call.rows[0] : call.rows[1]] = o
            lse[:, :, call.rows[0] : call.rows[1]] = l
        if out is None:  # no allowed pair
            out = torch.zeros_like(q)
            lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
        return out, lse

    # -- backward ---------------------------------------------------------------------------------
    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
        scale: float, mask: Mask = Mask(), q_pos: Positions | None = None,
        k_pos: Positions | None = None, grad_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients from the global ``out``/``lse`` (see the contract), in ``grad_dtype``
        (default float32); ``grad_dtype=q.dtype`` returns FA4's own gradients uncast when one
        call covers every row and key."""
        calls = self._prepare(q, k, v, mask, q_pos, k_pos)
        dtype = grad_dtype_for(q, grad_dtype)
        B, Sq, H, _ = q.shape
        Sk = k.shape[1]
        dout, out, lse = dout.to(q.dtype), out.to(q.dtype), lse.to(torch.float32)
        # several calls share keys: their dK/dV are summed in float32
        kv_dtype = dtype if len(calls) <= 1 else torch.promote_types(dtype, torch.float32)
        dq = dk = dv = None
        for call in calls:
            (r0, r1), (c0, c1) = call.rows, call.cols
            (qc, oc, doc), (kc, vc), kw = self._call_args(call, q, k, v, out, dout)
            lc = lse[:, :, r0:r1]
            # lse [B, H, n] -> [H, B*n] for varlen
            lc = lc.transpose(0, 1).reshape(H, -1) if call.varlen else lc
            dq_c, dk_c, dv_c = _interface()._flash_attn_bwd(
                qc, kc, vc, oc, doc, lc.contiguous(), softmax_scale=scale, **kw
            )[:3]
            dq_c, dk_c, dv_c = (g.view(B, -1, *g.shape[-2:]) for g in (dq_c, dk_c, dv_c))
            if len(calls) == 1 and (r0, r1, c0, c1) == (0, Sq, 0, Sk):
                return dq_c.to(dtype), dk_c.to(dtype), dv_c.to(dtype)
            if dq is None:
                dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
                dk = torch.zeros(k.shape, dtype=kv_dtype, device=k.device)
                dv = torch.zeros(v.shape, dtype=kv_dtype, device=v.device)
            dq[:, r0:r1] = dq_c
            dk[:, c0:c1] += dk_c
            dv[:, c0:c1] += dv_c
        if dq is None:  # no allowed pair
            z = lambda t: torch.zeros(t.shape, dtype=dtype, device=t.device)  # noqa: E731
            return z(q), z(k), z(v)
        return dq, dk.to(dtype), dv.to(dtype)


register_kernel("fa4", FlashAttention4)
