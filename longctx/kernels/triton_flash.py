"""Triton flash attention (forward + backward) on the local kernel contract.

Implements :class:`~longctx.kernels.base.AttentionKernel` exactly like
:class:`~longctx.kernels.reference.TorchReference`:

    forward(q, k, v, *, scale, mask, q_pos, k_pos) -> out [B, Sq, H, D] (q.dtype), lse [B, H, Sq]
    backward(dout, q, k, v, out, lse, *, scale, mask, q_pos, k_pos) -> dq, dk, dv (float32)

- ``q [B, Sq, H, D]``, ``k``/``v [B, Sk, Hkv, D]``: GQA is read in place (query head ``h`` uses kv
  head ``h // (H // Hkv)``), K/V are never expanded.
- The mask is evaluated on **global** positions.  Two position paths:

  * *strided* (fast): each side is one :class:`~longctx.kernels.mask.Segment`
    (``start + i * stride``; contiguous, striped).  Positions are computed in the kernel, and each
    query tile derives from its position bounds the exact range of key tiles that hold an allowed
    pair, split into fully-allowed tiles (no mask arithmetic) and boundary tiles (masked).  Tiles
    outside the range are never visited.
  * *index* (general): anything else (several segments, an index tensor).  Positions are passed as
    int32 tensors with per-tile ``(min, max)`` bounds; every tile whose bounds admit no allowed
    pair is skipped, the others are masked element-wise.

- Mask kinds: causal, sliding window, documents (``cu_seqlens``, evaluated as per-token document
  ids) and their combinations.  Block-sparse masks are not implemented here: they run on the
  torch reference (:meth:`TritonFlash.supports` says so, and the dispatcher routes them).
- Numerics: scores in float32 with the softmax in base 2 (``scale * log2(e)`` folded into one
  multiply), LSE returned in natural log.  A row with no allowed key gets ``out = 0`` and
  ``lse = -inf``; no NaN is produced, forward or backward.
- Backward takes the **global** ``out``/``lse`` (a ring step calls it per key block), computes
  ``delta = rowsum(dout * out)`` in a small pre-pass, then one program per key tile accumulates
  ``dk``/``dv`` over the query tiles of every query head of its kv head.  ``dq`` comes either
  from a separate query-major pass (7 matmuls per tile pair, bitwise reproducible) or from float32
  TMA reduce-adds inside the dK/dV pass (5 matmuls, more L2 traffic); the faster one per head dim
  is the default (measured on an H200: separate at hd128, reduce-add at hd64), and
  ``TritonFlashConfig(deterministic=True)`` always takes the separate pass.
- Memory access: Q/K/V/dO tiles are read with TMA descriptors over ``[B, S, heads * D]`` views
  (heads packed; other layouts are copied once), whose zero fill past the sequence end replaces
  bounds masks on loads.

Runs on CUDA GPUs (Hopper-tuned; TMA needs sm_90+), and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``), which the tests use.  The interpreter is chosen per launch, so the
variable may be set at any time before a call, whatever was imported earlier.

Example (on a GPU)::

    >>> import torch
    >>> from longctx.kernels.mask import Mask
    >>> from longctx.kernels.triton_flash import TritonFlash
    >>> q = torch.randn(1, 4096, 16, 128, device="cuda", dtype=torch.bfloat16)
    >>> k = v = torch.randn(1, 4096, 4, 128, device="cuda", dtype=torch.bfloat16)   # GQA 16/4
    >>> kern = TritonFlash()
    >>> out, lse = kern.forward(q, k, v, scale=128 ** -0.5, mask=Mask(causal=True))
    >>> dq, dk, dv = kern.backward(torch.randn_like(out), q, k, v, out, lse,
    ...                            scale=128 ** -0.5, mask=Mask(causal=True))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._triton_common import bwd_delta as _bwd_delta
from ._triton_common import bwd_ready as _bwd_ready
from ._triton_common import rows_desc as _rows_desc
from ._triton_common import tma_ready as _tma_ready
from ._triton_runtime import interpreting as _interpreting
from ._triton_runtime import jit as _jit
from ._triton_runtime import launch as _launch
from ._triton_runtime import tl, triton
from ._triton_runtime import unavailable_reason as _unavailable_reason
from .base import (
    check_backward_shapes,
    check_qkv,
    check_scale,
    default_positions,
    grad_dtype_for,
    register_kernel,
)
from .mask import Mask, Positions

if triton is not None:
    from ._triton_common import allowed as _allowed
    from ._triton_common import key_tile_allowed as _key_tile_allowed
    from ._triton_common import load_lse2 as _load_lse2
    from ._triton_common import load_rows as _load_rows
    from ._triton_common import mm as _mm
    from ._triton_common import store_fwd_rows as _store_fwd_rows

__all__ = ["TileConfig", "TritonFlashConfig", "TritonFlash"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Positions and window sizes are int32 in the kernels; bounds arithmetic adds two of them.
_MAX_POSITION = 2**30
_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    """One kernel's launch shape: a ``block_m x block_n`` (query x key) tile, warps and pipelining.

    ``block_m`` and ``block_n`` must be powers of two >= 16 (16 is the smallest ``tl.dot``).
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {b}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"TileConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"TileConfig.num_stages must be >= 1, got {self.num_stages}")


# Defaults per head dim for Hopper, chosen from the compiler's register report (no spills except
# the hd256 backward) and timings on one H200 (benchmarks/RESULTS.md, issue 3).  ``fwd``: the
# forward; ``bwd_kv``: the dK/dV pass (block_m = query tile, block_n = key tile); ``bwd_q``: the
# separate dQ pass; ``dq_atomic``: accumulate dQ in the dK/dV pass with TMA reduce-add instead
# (fewer matmuls, more L2 traffic: wins at small head dims).
_DEFAULTS: dict[int, dict] = {
    16: dict(fwd=TileConfig(64, 64, 4, 3), bwd_kv=TileConfig(32, 64, 4, 2),
             bwd_q=TileConfig(64, 64, 4, 2), dq_atomic=True),
    32: dict(fwd=TileConfig(64, 64, 4, 3), bwd_kv=TileConfig(32, 64, 4, 2),
             bwd_q=TileConfig(64, 64, 4, 2), dq_atomic=True),
    64: dict(fwd=TileConfig(128, 64, 4, 3), bwd_kv=TileConfig(64, 128, 8, 3),
             bwd_q=TileConfig(128, 64, 8, 3), dq_atomic=True),
    128: dict(fwd=TileConfig(64, 64, 4, 3), bwd_kv=TileConfig(64, 128, 8, 3),
              bwd_q=TileConfig(128, 64, 8, 3), dq_atomic=False),
    256: dict(fwd=TileConfig(64, 64, 8, 2), bwd_kv=TileConfig(16, 64, 8, 2),
              bwd_q=TileConfig(64, 32, 4, 2), dq_atomic=False),
}


@dataclass(frozen=True)
class TritonFlashConfig:
    """Launch configuration of :class:`TritonFlash`.

    Fields left ``None`` come from a per-head-dim table tuned on an H200.

    - ``fwd``, ``bwd_kv``, ``bwd_q``: tiles of the forward, the dK/dV pass and the dQ pass.
    - ``dq_atomic``: accumulate dQ inside the dK/dV pass with TMA reduce-add (float32 atomics;
      summation order varies run to run) instead of a separate query-major pass.
    - ``deterministic=True``: bitwise reproducible gradients (never atomics).

    Example::

        TritonFlashConfig(fwd=TileConfig(128, 64, num_warps=8, num_stages=3), deterministic=True)
    """

    fwd: TileConfig | None = None
    bwd_kv: TileConfig | None = None
    bwd_q: TileConfig | None = None
    dq_atomic: bool | None = None
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.deterministic and self.dq_atomic:
            raise ValueError(
                "dq_atomic=True accumulates dQ with atomics, which is not deterministic; drop "
                "one of dq_atomic=True / deterministic=True"
            )

    def resolve(self, head_dim: int) -> tuple[TileConfig, TileConfig, TileConfig, bool]:
        """``(fwd, bwd_kv, bwd_q, dq_atomic)`` for this head dim."""
        table = _DEFAULTS[head_dim]
        atomic = table["dq_atomic"] if self.dq_atomic is None else self.dq_atomic
        return (
            self.fwd or table["fwd"], self.bwd_kv or table["bwd_kv"],
            self.bwd_q or table["bwd_q"], atomic and not self.deterministic,
        )


# --------------------------------------------------------------------------------------------------
# kernels (one source, compiled for CUDA or run by Triton's interpreter for CPU tensors)
# --------------------------------------------------------------------------------------------------


if triton is not None:
    # _mm, _allowed, _load_rows, ...: shared with the block-sparse kernel (_triton_common.py)

    @_jit
    def _partner_tiles(lo, hi, d_lo, d_hi, CU, p_first, p_last, p_start, p_stride, p_len, window,
                       BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_DOCS: tl.constexpr, PARTNER_IS_KEY: tl.constexpr):
        """Tile ranges of the partner side for a tile spanning global positions ``[lo, hi]``.

        The partner side (keys of a query tile, or queries of a key tile) has positions
        ``p_start + j * p_stride``, ``j < p_len``.  Returns tile indices
        ``t_lo <= f_lo <= f_hi <= t_hi``: tiles in ``[t_lo, t_hi)`` may hold an allowed pair,
        those in ``[f_lo, f_hi)`` are allowed for every pair (no mask needed), all others have
        no allowed pair and are never visited.
        """
        any_lo = p_first + 0 * lo  # partners allowed for SOME token of the tile: [any_lo, any_hi]
        any_hi = p_last + 0 * lo
        all_lo = p_first + 0 * lo  # partners allowed for EVERY token of the tile: [all_lo, all_hi]
        all_hi = p_last + 0 * lo
        if CAUSAL:
            if PARTNER_IS_KEY:  # key <= query
                any_hi = tl.minimum(any_hi, hi)
                all_hi = tl.minimum(all_hi, lo)
            else:  # query >= key
                any_lo = tl.maximum(any_lo, lo)
                all_lo = tl.maximum(all_lo, hi)
        if HAS_WINDOW:
            if PARTNER_IS_KEY or not CAUSAL:  # partner below: partner > self - window
                any_lo = tl.maximum(any_lo, lo - window + 1)
                all_lo = tl.maximum(all_lo, hi - window + 1)
            if (not PARTNER_IS_KEY) or (not CAUSAL):  # partner above: partner < self + window
                any_hi = tl.minimum(any_hi, hi + window - 1)
                all_hi = tl.minimum(all_hi, lo + window - 1)
        if HAS_DOCS:
            doc_lo_start = tl.load(CU + d_lo)
            any_lo = tl.maximum(any_lo, doc_lo_start)
            any_hi = tl.minimum(any_hi, tl.load(CU + d_hi + 1) - 1)
            all_lo = tl.maximum(all_lo, doc_lo_start)
            all_hi = tl.minimum(all_hi, tl.load(CU + d_lo + 1) - 1)
            # a tile spanning several documents has no fully-allowed partner tile
            all_hi = tl.where(d_lo == d_hi, all_hi, all_lo - 1)
        # position intervals -> partner indices [j_lo, j_hi) -> tiles
        j_lo = tl.cdiv(tl.maximum(any_lo - p_start, 0), p_stride)
        j_hi = tl.minimum(tl.maximum(any_hi - p_start + p_stride, 0) // p_stride, p_len)
        t_lo = j_lo // BLOCK
        t_hi = tl.where(j_lo < j_hi, tl.cdiv(j_hi, BLOCK), t_lo)
        jf_lo = tl.cdiv(tl.maximum(all_lo - p_start, 0), p_stride)
        jf_hi = tl.minimum(tl.maximum(all_hi - p_start + p_stride, 0) // p_stride, p_len)
        f_lo = tl.maximum(tl.cdiv(jf_lo, BLOCK), t_lo)
        f_hi = tl.minimum(jf_hi // BLOCK, t_hi)
        has_full = f_lo < f_hi
        f_lo = tl.where(has_full, f_lo, t_hi)
        f_hi = tl.where(has_full, f_hi, t_hi)
        return t_lo, f_lo, f_hi, t_hi

    @_jit
    def _tile_visible(lo, hi, d_lo, d_hi, TB, t, window, CAUSAL: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                      PARTNER_IS_KEY: tl.constexpr):
        """Index path: may tile ``t`` of the partner side (bounds ``TB[t] = (pmin, pmax, dmin,
        dmax)``) hold an allowed pair with the tile ``[lo, hi]`` (docs ``[d_lo, d_hi]``)?"""
        p_lo = tl.load(TB + 4 * t)
        p_hi = tl.load(TB + 4 * t + 1)
        if PARTNER_IS_KEY:
            q_lo, q_hi, k_lo, k_hi = lo, hi, p_lo, p_hi
        else:
            q_lo, q_hi, k_lo, k_hi = p_lo, p_hi, lo, hi
        ok = p_lo <= p_hi
        if CAUSAL:
            ok = ok & (k_lo <= q_hi)
        if HAS_WINDOW:
            ok = ok & (q_lo - k_hi < window)
            if not CAUSAL:
                ok = ok & (k_lo - q_hi < window)
        if HAS_DOCS:
            pd_lo = tl.load(TB + 4 * t + 2)
            pd_hi = tl.load(TB + 4 * t + 3)
            ok = ok & (pd_lo <= d_hi) & (d_lo <= pd_hi)
        return ok

    @_jit
    def _tile_positions(P, D, TB, t, start, S, p_start, p_stride, BLOCK: tl.constexpr,
                        DOC_PAD: tl.constexpr, POS_INDEX: tl.constexpr, HAS_DOCS: tl.constexpr):
        """Tile ``t`` (rows ``start .. start + BLOCK``) of one side (queries or keys):
        ``(offs, valid, pos, lo, hi, doc, d_lo, d_hi)``, the rows, which are ``< S``, their
        global positions (``P[j]`` on the index path, else ``p_start + j * p_stride``) with
        bounds ``[lo, hi]`` (``TB[t]`` on the index path), and their document ids (``D[j]``;
        ``DOC_PAD`` past ``S``, distinct per side) with bounds, or the positions without
        documents."""
        offs = start + tl.arange(0, BLOCK)
        valid = offs < S
        last = tl.minimum(start + BLOCK, S) - 1
        if POS_INDEX:
            pos = tl.load(P + offs, mask=valid, other=0)
            lo = tl.load(TB + 4 * t)
            hi = tl.load(TB + 4 * t + 1)
        else:
            pos = p_start + offs * p_stride
            lo = p_start + start * p_stride
            hi = p_start + last * p_stride
        if HAS_DOCS:
            doc = tl.load(D + offs, mask=valid, other=DOC_PAD)
            if POS_INDEX:
                d_lo = tl.load(TB + 4 * t + 2)
                d_hi = tl.load(TB + 4 * t + 3)
            else:
                d_lo = tl.load(D + start)
                d_hi = tl.load(D + last)
        else:
            doc = pos
            d_lo = lo
            d_hi = hi
        return offs, valid, pos, lo, hi, doc, d_lo, d_hi

    # ---------------------------------------------------------------------------------- forward
    # Tensors are read through TMA descriptors over 3-D views ``[B, S, heads * D]`` (see
    # _triton_common.load_rows): rows past the end of a sequence read as zeros, so only the
    # element mask ever looks at the sequence end.
    @_jit
    def _fwd_tile(acc, l_i, m_i, q, qp, qd, desc_k, desc_v, b, col_k, start_n, KP, KD, k_start,
                  k_stride, Sk, window, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MASKED: tl.constexpr, POS_INDEX: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, IEEE: tl.constexpr):
        """One key tile of the online softmax of a query tile (scores in log2 units)."""
        k = _load_rows(desc_k, b, start_n, col_k, BLOCK_N, HEAD_DIM)
        qk = _mm(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), IEEE)
        if MASKED:
            ok = _key_tile_allowed(qp, qd, KP, KD, start_n, k_start, k_stride, Sk, window,
                                   BLOCK_N, POS_INDEX, CAUSAL, HAS_WINDOW, HAS_DOCS)
            qk = tl.where(ok, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # rows with nothing allowed yet: subtract 0, not -inf (-inf - -inf would be NaN)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(desc_v, b, start_n, col_k, BLOCK_N, HEAD_DIM)
        acc = _mm(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        return acc, l_i, m_new

    @_jit
    def _fwd_span(acc, l_i, m_i, q, qp, qd, desc_k, desc_v, b, col_k, t_lo, t_hi, KP, KD,
                  k_start, k_stride, Sk, window, qk_scale, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, IEEE: tl.constexpr):
        """Key tiles ``[t_lo, t_hi)`` of the strided path."""
        for t in range(t_lo, t_hi):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, qp, qd, desc_k, desc_v, b, col_k,
                                      t * BLOCK_N, KP, KD, k_start, k_stride, Sk, window,
                                      qk_scale, BLOCK_N, HEAD_DIM, MASKED, False, CAUSAL,
                                      HAS_WINDOW, HAS_DOCS, IEEE)
        return acc, l_i, m_i

    @_jit
    def _fwd_kernel(
        desc_q, desc_k, desc_v, desc_o, Lse,
        QP, KP, QD, KD, CU, QTB, KTB,
        qk_scale, window,
        q_start, q_stride, k_start, k_stride, k_first, k_last,
        Sq, Sk, H, G, n_k_tiles,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        POS_INDEX: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_DOCS: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Grid ``(cdiv(Sq, BLOCK_M), B * H)``; the last query tiles (most causal work) go first."""
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        col_k = (h // G) * HEAD_DIM
        start_m = pid_m * BLOCK_M
        # global positions / documents of the query tile
        offs_m, m_valid, qp, q_lo, q_hi, qd, qd_lo, qd_hi = _tile_positions(
            QP, QD, QTB, pid_m, start_m, Sq, q_start, q_stride, BLOCK_M, -2, POS_INDEX, HAS_DOCS)
        q = _load_rows(desc_q, b, start_m, h * HEAD_DIM, BLOCK_M, HEAD_DIM)

        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        if POS_INDEX:
            for t in range(0, n_k_tiles):
                if _tile_visible(q_lo, q_hi, qd_lo, qd_hi, KTB, t, window,
                                 CAUSAL, HAS_WINDOW, HAS_DOCS, True):
                    acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, qp, qd, desc_k, desc_v, b, col_k,
                                              t * BLOCK_N, KP, KD, k_start, k_stride, Sk, window,
                                              qk_scale, BLOCK_N, HEAD_DIM, True, True, CAUSAL,
                                              HAS_WINDOW, HAS_DOCS, IEEE)
        else:
            t_lo, f_lo, f_hi, t_hi = _partner_tiles(
                q_lo, q_hi, qd_lo, qd_hi, CU, k_first, k_last, k_start, k_stride, Sk, window,
                BLOCK_N, CAUSAL, HAS_WINDOW, HAS_DOCS, True)
            # boundary tiles below the fully-allowed span, the span, boundary tiles above it
            acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, qp, qd, desc_k, desc_v, b, col_k, t_lo,
                                      f_lo, KP, KD, k_start, k_stride, Sk, window, qk_scale,
                                      BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_DOCS, IEEE)
            acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, qp, qd, desc_k, desc_v, b, col_k, f_lo,
                                      f_hi, KP, KD, k_start, k_stride, Sk, window, qk_scale,
                                      BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_DOCS, IEEE)
            acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, qp, qd, desc_k, desc_v, b, col_k, f_hi,
                                      t_hi, KP, KD, k_start, k_stride, Sk, window, qk_scale,
                                      BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_DOCS, IEEE)

        _store_fwd_rows(desc_o, Lse + pid_bh.to(tl.int64) * Sq, acc, l_i, m_i, b, start_m,
                        h * HEAD_DIM, offs_m, m_valid, BLOCK_M, HEAD_DIM)

    # --------------------------------------------------------------------------------- backward
    @_jit
    def _bwd_kv_tile(dk, dv, k, v, kp, kd, k_valid, desc_q, desc_do, desc_dq, b, col_q, lse_ptr,
                     delta_ptr, start_m, full, QP, QD, q_start, q_stride, Sq, window, qk_scale,
                     scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                     POS_INDEX: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_DOCS: tl.constexpr, ATOMIC_DQ: tl.constexpr, IEEE: tl.constexpr,
                     INTERPRETED: tl.constexpr):
        """One query tile's contribution to a key tile's dK/dV (and, with TMA reduce-add, to dQ).

        Works on transposed scores ``[BLOCK_N, BLOCK_M]`` so dK/dV need no transposes.  With
        ``MASKED`` the element mask is computed and applied only when the runtime flag ``full`` is
        false (one loop over all tiles with a branch keeps register pressure below spilling,
        where separate masked/unmasked loops as in the forward spill; faster than masking every
        tile: benchmarks/RESULTS.md, "Local dense kernels").
        """
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < Sq
        q = _load_rows(desc_q, b, start_m, col_q, BLOCK_M, HEAD_DIM)
        lse2 = _load_lse2(lse_ptr, offs_m, m_valid)
        qkT = _mm(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), IEEE)
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            if full == 0:
                if POS_INDEX:
                    qp = tl.load(QP + offs_m, mask=m_valid, other=0)
                else:
                    qp = q_start + offs_m * q_stride
                if HAS_DOCS:
                    qd = tl.load(QD + offs_m, mask=m_valid, other=-2)
                else:
                    qd = qp
                okT = _allowed(qp[None, :], kp[:, None], qd[None, :], kd[:, None], window,
                               CAUSAL, HAS_WINDOW, HAS_DOCS) & k_valid[:, None]
                pT = tl.where(okT, pT, 0.0)
        do = _load_rows(desc_do, b, start_m, col_q, BLOCK_M, HEAD_DIM)
        dv = _mm(pT.to(do.dtype), do, dv, IEEE)
        delta = tl.load(delta_ptr + offs_m, mask=m_valid, other=0.0)
        dpT = _mm(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), IEEE)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = _mm(dsT, q, dk, IEEE)
        if ATOMIC_DQ:
            dq = _mm(tl.trans(dsT), k, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), IEEE)
            dq = tl.reshape(dq * scale, [1, BLOCK_M, HEAD_DIM])
            if INTERPRETED:  # programs run one by one there, and TMA reduce is not emulated
                desc_dq.store([b, start_m, col_q], desc_dq.load([b, start_m, col_q]) + dq)
            else:
                desc_dq.atomic_add([b, start_m, col_q], dq)  # TMA reduce-add into float32 dQ
        return dk, dv

    @_jit
    def _bwd_kv_span(dk, dv, k, v, kp, kd, k_valid, desc_q, desc_do, desc_dq, b, col_q, lse_ptr,
                     delta_ptr, t_lo, f_lo, f_hi, t_hi, QP, QD, q_start, q_stride, Sq, window,
                     qk_scale, scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                     MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_DOCS: tl.constexpr, ATOMIC_DQ: tl.constexpr, IEEE: tl.constexpr,
                     INTERPRETED: tl.constexpr):
        """Query tiles ``[t_lo, t_hi)`` of the strided path; those in ``[f_lo, f_hi)`` unmasked."""
        for t in range(t_lo, t_hi):
            dk, dv = _bwd_kv_tile(dk, dv, k, v, kp, kd, k_valid, desc_q, desc_do, desc_dq, b,
                                  col_q, lse_ptr, delta_ptr, t * BLOCK_M, (t >= f_lo) & (t < f_hi),
                                  QP, QD, q_start, q_stride, Sq, window, qk_scale, scale, BLOCK_M,
                                  HEAD_DIM, MASKED, False, CAUSAL, HAS_WINDOW, HAS_DOCS, ATOMIC_DQ,
                                  IEEE, INTERPRETED)
        return dk, dv

    @_jit
    def _bwd_kv_kernel(
        desc_q, desc_k, desc_v, desc_do, desc_dq, desc_dk, desc_dv, Lse, Delta,
        QP, KP, QD, KD, CU, QTB, KTB,
        qk_scale, scale, window,
        q_start, q_stride, k_start, k_stride, q_first, q_last,
        Sq, Sk, H, Hkv, G, n_q_tiles,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        POS_INDEX: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_DOCS: tl.constexpr, ATOMIC_DQ: tl.constexpr, IEEE: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        """Grid ``(cdiv(Sk, BLOCK_N), B * Hkv)``: one key tile, all ``G`` query heads of its kv
        head.

        dK/dV are accumulated in registers (deterministic) and stored in float32.
        """
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        start_n = pid_n * BLOCK_N
        _, k_valid, kp, k_lo, k_hi, kd, kd_lo, kd_hi = _tile_positions(
            KP, KD, KTB, pid_n, start_n, Sk, k_start, k_stride, BLOCK_N, -1, POS_INDEX, HAS_DOCS)
        k = _load_rows(desc_k, b, start_n, hk * HEAD_DIM, BLOCK_N, HEAD_DIM)
        v = _load_rows(desc_v, b, start_n, hk * HEAD_DIM, BLOCK_N, HEAD_DIM)

        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        if POS_INDEX:
            for g in range(0, G):
                h = hk * G + g
                lse_ptr = Lse + (b * H + h).to(tl.int64) * Sq
                delta_ptr = Delta + (b * H + h).to(tl.int64) * Sq
                for t in range(0, n_q_tiles):
                    if _tile_visible(k_lo, k_hi, kd_lo, kd_hi, QTB, t, window,
                                     CAUSAL, HAS_WINDOW, HAS_DOCS, False):
                        dk, dv = _bwd_kv_tile(  # k_lo < 0 is False: always apply the mask
                            dk, dv, k, v, kp, kd, k_valid, desc_q, desc_do, desc_dq, b,
                            h * HEAD_DIM, lse_ptr, delta_ptr, t * BLOCK_M, k_lo < 0, QP, QD,
                            q_start, q_stride, Sq, window, qk_scale, scale, BLOCK_M, HEAD_DIM, True,
                            True, CAUSAL, HAS_WINDOW, HAS_DOCS, ATOMIC_DQ, IEEE, INTERPRETED)
        else:
            t_lo, f_lo, f_hi, t_hi = _partner_tiles(
                k_lo, k_hi, kd_lo, kd_hi, CU, q_first, q_last, q_start, q_stride, Sq, window,
                BLOCK_M, CAUSAL, HAS_WINDOW, HAS_DOCS, False)
            for g in range(0, G):
                h = hk * G + g
                lse_ptr = Lse + (b * H + h).to(tl.int64) * Sq
                delta_ptr = Delta + (b * H + h).to(tl.int64) * Sq
                dk, dv = _bwd_kv_span(dk, dv, k, v, kp, kd, k_valid, desc_q, desc_do, desc_dq, b,
                                      h * HEAD_DIM, lse_ptr, delta_ptr, t_lo, f_lo, f_hi, t_hi,
                                      QP, QD, q_start, q_stride, Sq, window, qk_scale, scale,
                                      BLOCK_M, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                      ATOMIC_DQ, IEEE, INTERPRETED)

        desc_dk.store([b, start_n, hk * HEAD_DIM], tl.reshape(dk * scale, [1, BLOCK_N, HEAD_DIM]))
        desc_dv.store([b, start_n, hk * HEAD_DIM], tl.reshape(dv, [1, BLOCK_N, HEAD_DIM]))

    @_jit
    def _bwd_q_tile(dq, q, do, lse2, delta, qp, qd, desc_k, desc_v, b, col_k, start_n, full, KP,
                    KD, k_start, k_stride, Sk, window, qk_scale, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, POS_INDEX: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                    IEEE: tl.constexpr):
        """One key tile's contribution to a query tile's dQ (separate dQ pass); the element mask
        is computed and applied only when the runtime flag ``full`` is false."""
        k = _load_rows(desc_k, b, start_n, col_k, BLOCK_N, HEAD_DIM)
        qk = _mm(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), IEEE)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED and (full == 0):
            ok = _key_tile_allowed(qp, qd, KP, KD, start_n, k_start, k_stride, Sk, window,
                                   BLOCK_N, POS_INDEX, CAUSAL, HAS_WINDOW, HAS_DOCS)
            p = tl.where(ok, p, 0.0)
        v = _load_rows(desc_v, b, start_n, col_k, BLOCK_N, HEAD_DIM)
        dp = _mm(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        return _mm(ds.to(k.dtype), k, dq, IEEE)

    @_jit
    def _bwd_q_span(dq, q, do, lse2, delta, qp, qd, desc_k, desc_v, b, col_k, t_lo, f_lo, f_hi,
                    t_hi, KP, KD, k_start, k_stride, Sk, window, qk_scale, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_DOCS: tl.constexpr, IEEE: tl.constexpr):
        """Key tiles ``[t_lo, t_hi)`` of the strided path; those in ``[f_lo, f_hi)`` unmasked."""
        for t in range(t_lo, t_hi):
            dq = _bwd_q_tile(dq, q, do, lse2, delta, qp, qd, desc_k, desc_v, b, col_k,
                             t * BLOCK_N, (t >= f_lo) & (t < f_hi), KP, KD, k_start, k_stride, Sk,
                             window, qk_scale, BLOCK_N, HEAD_DIM, True, False, CAUSAL, HAS_WINDOW,
                             HAS_DOCS, IEEE)
        return dq

    @_jit
    def _bwd_q_kernel(
        desc_q, desc_k, desc_v, desc_do, desc_dq, Lse, Delta,
        QP, KP, QD, KD, CU, QTB, KTB,
        qk_scale, scale, window,
        q_start, q_stride, k_start, k_stride, k_first, k_last,
        Sq, Sk, H, G, n_k_tiles,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        POS_INDEX: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_DOCS: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Grid ``(cdiv(Sq, BLOCK_M), B * H)``: dQ of one query tile, no atomics."""
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        col_k = (h // G) * HEAD_DIM
        start_m = pid_m * BLOCK_M
        offs_m, m_valid, qp, q_lo, q_hi, qd, qd_lo, qd_hi = _tile_positions(
            QP, QD, QTB, pid_m, start_m, Sq, q_start, q_stride, BLOCK_M, -2, POS_INDEX, HAS_DOCS)
        q = _load_rows(desc_q, b, start_m, h * HEAD_DIM, BLOCK_M, HEAD_DIM)
        do = _load_rows(desc_do, b, start_m, h * HEAD_DIM, BLOCK_M, HEAD_DIM)
        lse2 = _load_lse2(Lse + pid_bh.to(tl.int64) * Sq, offs_m, m_valid)
        delta = tl.load(Delta + pid_bh.to(tl.int64) * Sq + offs_m, mask=m_valid, other=0.0)

        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if POS_INDEX:
            for t in range(0, n_k_tiles):
                if _tile_visible(q_lo, q_hi, qd_lo, qd_hi, KTB, t, window,
                                 CAUSAL, HAS_WINDOW, HAS_DOCS, True):
                    dq = _bwd_q_tile(dq, q, do, lse2, delta, qp, qd, desc_k, desc_v, b, col_k,
                                     t * BLOCK_N, q_lo < 0, KP, KD,  # q_lo < 0: False, masked
                                     k_start, k_stride, Sk, window, qk_scale,
                                     BLOCK_N, HEAD_DIM, True, True, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                     IEEE)
        else:
            t_lo, f_lo, f_hi, t_hi = _partner_tiles(
                q_lo, q_hi, qd_lo, qd_hi, CU, k_first, k_last, k_start, k_stride, Sk, window,
                BLOCK_N, CAUSAL, HAS_WINDOW, HAS_DOCS, True)
            dq = _bwd_q_span(dq, q, do, lse2, delta, qp, qd, desc_k, desc_v, b, col_k, t_lo, f_lo,
                             f_hi, t_hi, KP, KD, k_start, k_stride, Sk, window, qk_scale, BLOCK_N,
                             HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_DOCS, IEEE)

        desc_dq.store([b, start_m, h * HEAD_DIM], tl.reshape(dq * scale, [1, BLOCK_M, HEAD_DIM]))


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------
class _Side(NamedTuple):
    """Kernel arguments describing the global positions of one side (queries or keys)."""

    start: int  # strided path: position of token 0 ...
    stride: int  # ... and the step between tokens
    first: int  # smallest / largest position (strided path)
    last: int
    pos: Tensor | None  # index path: int32 [S]
    docs: Tensor | None  # int32 [S] document id per token (document masks only)


class _Plan(NamedTuple):
    """Everything the kernels need to evaluate ``mask`` on ``(q_pos, k_pos)``."""

    pos_index: bool
    q: _Side
    k: _Side
    cu: Tensor | None  # int32 [n_docs + 2]: document boundaries, then a sentinel
    window: int
    causal: bool
    has_window: bool
    has_docs: bool

    def tensors(self, dummy: Tensor) -> tuple[Tensor, ...]:
        """``(QP, KP, QD, KD, CU)`` kernel arguments; ``dummy`` (never read) for unused ones."""
        return tuple(
            t if t is not None else dummy
            for t in (self.q.pos, self.k.pos, self.q.docs, self.k.docs, self.cu)
        )

    def flags(self, dtype: torch.dtype) -> dict[str, bool]:
        """The constexpr switches that select the kernel variant."""
        return dict(
            POS_INDEX=self.pos_index, CAUSAL=self.causal, HAS_WINDOW=self.has_window,
            HAS_DOCS=self.has_docs, IEEE=dtype == torch.float32,
        )


def _tile_bounds(pos: Tensor, docs: Tensor | None, block: int) -> Tensor:
    """Per-tile ``(pos_min, pos_max, doc_min, doc_max)`` as int32 ``[cdiv(S, block) * 4]``."""
    n = pos.numel()
    n_tiles = -(-n // block)
    pad = n_tiles * block - n
    cols = [pos] if docs is None else [pos, docs]
    out = []
    for c in cols:
        c = torch.cat([c, c[-1:].expand(pad)]) if pad else c  # repeat the last: min/max unchanged
        c = c.view(n_tiles, block)  # [S_padded] -> [tiles, block]
        out += [c.amin(1), c.amax(1)]
    if docs is None:
        out += [out[0], out[1]]  # unused doc bounds
    return torch.stack(out, 1).to(torch.int32).reshape(-1).contiguous()  # [tiles, 4] -> flat


class TritonFlash:
    """Triton flash attention on the local kernel contract (see the module docstring).

    Args:
        config: tiles, warps, pipelining and the deterministic-backward switch
            (:class:`TritonFlashConfig`).

    Supported: CUDA tensors on Hopper or newer (or CPU tensors with ``TRITON_INTERPRET=1``) in
    float16, bfloat16 or float32, head dims 16, 32, 64, 128, 256; masks made of causal / window /
    documents.  :meth:`unsupported_reason` says why a call is refused, before calling.
    """

    name = "triton"

    def __init__(self, config: TritonFlashConfig = TritonFlashConfig()):
        self.config = config

    # -- support ----------------------------------------------------------------------------------
    @staticmethod
    def unsupported_reason(q: Tensor, mask: Mask) -> str | None:
        """Why this kernel cannot run ``q`` under ``mask`` (None when it can)."""
        if (reason := _unavailable_reason(q)) is not None:
            return reason
        if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (9, 0):
            return (
                "the Triton kernel reads tiles with TMA descriptors and is built for Hopper "
                f"(sm_90+); {torch.cuda.get_device_name(q.device)} is older: use kernel='sdpa' "
                "for full/causal masks or kernel='reference'"
            )
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return (
                f"dtype {q.dtype} is not supported by the Triton kernel (float16, bfloat16, "
                "float32); use kernel='reference' for float64"
            )
        if q.shape[-1] not in _SUPPORTED_HEAD_DIMS:
            return (
                f"head_dim {q.shape[-1]} is not supported by the Triton kernel (supported: "
                f"{_SUPPORTED_HEAD_DIMS}); pad the head dim to one of these or use "
                "kernel='reference'"
            )
        if mask.block_sparse is not None:
            return (
                "block-sparse masks run on their own kernel: use kernel='block_sparse' (or "
                "kernel='auto', which routes them there; kernel='reference' on CPU)"
            )
        return None

    def supports(self, q: Tensor, mask: Mask) -> bool:
        return self.unsupported_reason(q, mask) is None

    def _check(self, q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Mask) -> None:
        check_qkv(q, k, v)
        reason = self.unsupported_reason(q, mask)
        if reason is not None:
            raise ValueError(reason)
        check_scale(scale)

    # -- positions --------------------------------------------------------------------------------
    @staticmethod
    def _plan(mask: Mask, q_pos: Positions, k_pos: Positions, device: torch.device) -> _Plan:
        strided = (
            q_pos.index is None and len(q_pos.segments) == 1
            and k_pos.index is None and len(k_pos.segments) == 1
        )
        docs = mask.cu_seqlens is not None
        for name, p in (("q_pos", q_pos), ("k_pos", k_pos)):
            if len(p) and p.max() >= _MAX_POSITION:
                raise ValueError(
                    f"{name} reaches global position {p.max()}; the Triton kernel handles "
                    f"positions below 2**30"
                )
        sides = []
        for p in (q_pos, k_pos):
            pos = p.materialize(device) if (docs or not strided) else None  # int64 [S]
            doc = mask.document_ids(pos).to(torch.int32) if docs else None
            if strided:
                s = p.segments[0]
                sides.append(_Side(s.start, s.stride, s.start, max(s.last, s.start), None, doc))
            else:
                sides.append(_Side(0, 1, 0, 0, pos.to(torch.int32), doc))
        cu = None
        if docs:
            end = torch.full((1,), _MAX_POSITION, dtype=torch.int64, device=device)
            cu = torch.cat([mask.cu_seqlens_on(device), end]).to(torch.int32)
        window = mask.window if mask.window is not None else 1
        return _Plan(
            pos_index=not strided, q=sides[0], k=sides[1], cu=cu,
            window=min(window, _MAX_POSITION), causal=mask.causal,
            has_window=mask.window is not None, has_docs=docs,
        )

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Mask = Mask(),
        q_pos: Positions | None = None, k_pos: Positions | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``q [B, Sq, H, D]``, ``k``/``v [B, Sk, Hkv, D]`` -> ``out [B, Sq, H, D]`` (q.dtype),
        ``lse [B, H, Sq]`` (float32, natural log; ``-inf`` for rows with no allowed key)."""
        self._check(q, k, v, scale, mask)
        q_pos, k_pos = default_positions(q, k, q_pos, k_pos)
        q, k, v = (_tma_ready(t) for t in (q, k, v))
        B, Sq, H, D = q.shape
        Sk, Hkv = k.shape[1], k.shape[2]
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
        if Sq == 0 or B * H == 0 or Sk == 0:
            return out.zero_(), lse.fill_(float("-inf"))
        tile = self.config.resolve(D)[0]
        plan = self._plan(mask, q_pos, k_pos, q.device)
        dummy = lse  # never read: stands in for unused tensor arguments
        qtb = ktb = dummy
        if plan.pos_index:
            qtb = _tile_bounds(plan.q.pos, plan.q.docs, tile.block_m)
            ktb = _tile_bounds(plan.k.pos, plan.k.docs, tile.block_n)
        _launch(
            _fwd_kernel, (triton.cdiv(Sq, tile.block_m), B * H),
            _rows_desc(q, tile.block_m), _rows_desc(k, tile.block_n), _rows_desc(v, tile.block_n),
            _rows_desc(out, tile.block_m), lse,
            *plan.tensors(dummy), qtb, ktb,
            scale * _LOG2E, plan.window,
            plan.q.start, plan.q.stride, plan.k.start, plan.k.stride, plan.k.first, plan.k.last,
            Sq, Sk, H, H // Hkv, triton.cdiv(Sk, tile.block_n),
            HEAD_DIM=D, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **plan.flags(q.dtype),
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )
        return out, lse

    # -- backward ---------------------------------------------------------------------------------
    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
        scale: float, mask: Mask = Mask(), q_pos: Positions | None = None,
        k_pos: Positions | None = None, grad_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients from the **global** ``out [B, Sq, H, D]`` / ``lse [B, H, Sq]``.

        Returns ``dq [B, Sq, H, D]``, ``dk``/``dv [B, Sk, Hkv, D]`` for this key block only, in
        ``grad_dtype`` (default float32, ready to be summed over ring steps).
        """
        self._check(q, k, v, scale, mask)
        q_pos, k_pos = default_positions(q, k, q_pos, k_pos)
        B, Sq, H, D = q.shape
        Sk, Hkv = k.shape[1], k.shape[2]
        check_backward_shapes(dout, q, out, lse)
        q, k, v, dout, out, lse = _bwd_ready(q, k, v, dout, out, lse)
        _, kv, qt, atomic = self.config.resolve(D)
        f32 = dict(dtype=torch.float32, device=q.device)
        dq = torch.zeros(B, Sq, H, D, **f32) if atomic else torch.empty(B, Sq, H, D, **f32)
        dk = torch.empty(B, Sk, Hkv, D, **f32)
        dv = torch.empty(B, Sk, Hkv, D, **f32)
        if Sq == 0 or Sk == 0 or B * H == 0:
            return tuple(g.zero_().to(grad_dtype_for(q, grad_dtype)) for g in (dq, dk, dv))

        delta = _bwd_delta(out, dout, 64 if D <= 128 else 32)  # with the global out [B, H, Sq]

        plan = self._plan(mask, q_pos, k_pos, q.device)
        qtb = ktb = delta  # dummies unless the index path needs tile bounds
        if plan.pos_index:
            qtb = _tile_bounds(plan.q.pos, plan.q.docs, kv.block_m)
            ktb = _tile_bounds(plan.k.pos, plan.k.docs, kv.block_n)
        _launch(
            _bwd_kv_kernel, (triton.cdiv(Sk, kv.block_n), B * Hkv),
            _rows_desc(q, kv.block_m), _rows_desc(k, kv.block_n), _rows_desc(v, kv.block_n),
            _rows_desc(dout, kv.block_m), _rows_desc(dq, kv.block_m),
            _rows_desc(dk, kv.block_n), _rows_desc(dv, kv.block_n), lse, delta,
            *plan.tensors(delta), qtb, ktb,
            scale * _LOG2E, scale, plan.window,
            plan.q.start, plan.q.stride, plan.k.start, plan.k.stride, plan.q.first, plan.q.last,
            Sq, Sk, H, Hkv, H // Hkv, triton.cdiv(Sq, kv.block_m),
            HEAD_DIM=D, BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, ATOMIC_DQ=atomic,
            INTERPRETED=_interpreting(), **plan.flags(q.dtype), num_warps=kv.num_warps,
            num_stages=kv.num_stages,
        )
        if not atomic:
            if plan.pos_index:
                qtb = _tile_bounds(plan.q.pos, plan.q.docs, qt.block_m)
                ktb = _tile_bounds(plan.k.pos, plan.k.docs, qt.block_n)
            _launch(
                _bwd_q_kernel, (triton.cdiv(Sq, qt.block_m), B * H),
                _rows_desc(q, qt.block_m), _rows_desc(k, qt.block_n), _rows_desc(v, qt.block_n),
                _rows_desc(dout, qt.block_m), _rows_desc(dq, qt.block_m), lse, delta,
                *plan.tensors(delta), qtb, ktb,
                scale * _LOG2E, scale, plan.window,
                plan.q.start, plan.q.stride, plan.k.start, plan.k.stride, plan.k.first,
                plan.k.last, Sq, Sk, H, H // Hkv, triton.cdiv(Sk, qt.block_n),
                HEAD_DIM=D, BLOCK_M=qt.block_m, BLOCK_N=qt.block_n, **plan.flags(q.dtype),
                num_warps=qt.num_warps, num_stages=qt.num_stages,
            )
        return tuple(g.to(grad_dtype_for(q, grad_dtype)) for g in (dq, dk, dv))


register_kernel("triton", TritonFlash)
