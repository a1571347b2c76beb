"""Triton block-sparse flash attention (forward + backward) on the local kernel contract.

Implements :class:`~longctx.kernels.base.AttentionKernel` for masks with block-sparse lists
(:class:`~longctx.kernels.mask.BlockSparse`), registered as ``"block_sparse"``:

    forward(q, k, v, *, scale, mask, q_pos, k_pos) -> out [B, Sq, H, D] (q.dtype), lse [B, H, Sq]
    backward(dout, q, k, v, out, lse, *, scale, mask, q_pos, k_pos) -> dq, dk, dv (float32)

- One tile is one sparse block: ``q_block x kv_block`` (16 to 128, powers of two; 64 and 128
  are the sizes meant for GPUs).  The forward and the dQ pass loop over the listed key blocks of
  their query block; the dK/dV pass loops over the query blocks that list its key block.
  Nothing else is visited, and no list is read back to the host.
- Causal, window and documents apply inside the listed blocks.  Once per mask (cached on the
  lists, tensor ops on their device) :meth:`~longctx.kernels.mask.BlockSparse.split_lists`
  splits the lists by those conditions into partial blocks (element mask), full blocks (none)
  and dropped ones, and transposes both for the dK/dV pass; so every loop runs without branches
  (Triton pipelines its loads), partial blocks masked, full ones not.
- Global positions: the query and key shards are each one contiguous run (``start .. start+S-1``)
  starting on a block boundary, so a local tile is a global block (``block = start / size +
  tile``).  Per call a batched search on the device finds, for every block, the range of its
  sorted entries inside the other shard (a ring step is one call); a key shard whose last block
  is cut by the end of the keys gets that block masked.
- GQA is read in place (query head ``h`` uses kv head ``h // (H / H_kv)``); the lists may be
  shared by all heads, per query head or per kv head, and shared by the batch or per row.
- A row with no allowed key gets ``out = 0`` and ``lse = -inf``; no NaN, forward or backward.
- Backward takes the **global** ``out``/``lse``; dQ comes from its own query-major pass (no
  atomics: deterministic), dK/dV from a key-major pass over all ``G`` query heads of a kv head.

Runs on CUDA (sm_90+, TMA descriptors) and on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, for tests).

Example (on a GPU)::

    >>> import torch
    >>> from longctx.kernels.mask import Mask
    >>> from longctx.kernels.sparse_patterns import sliding_window_with_sinks
    >>> bs = sliding_window_with_sinks(4096, window=512, sinks=64, block=128,
    ...                                device="cuda")
    >>> mask = Mask(causal=True, block_sparse=bs)
    >>> q = torch.randn(1, 4096, 16, 128, device="cuda", dtype=torch.bfloat16)
    >>> k = v = torch.randn(1, 4096, 4, 128, device="cuda", dtype=torch.bfloat16)
    >>> out, lse = BlockSparseTriton().forward(q, k, v, scale=128 ** -0.5, mask=mask)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._triton_common import bwd_delta as _bwd_delta
from ._triton_common import bwd_ready as _bwd_ready
from ._triton_common import rows_desc as _rows_desc
from ._triton_common import tma_ready as _tma_ready
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

__all__ = ["BlockSparseTritonConfig", "BlockSparseTriton"]

_LOG2E = 1.4426950408889634
_MAX_POSITION = 2**30
_HEAD_DIMS = (16, 32, 64, 128)
_BLOCKS = (16, 32, 64, 128)


def _bwd_kv_sub_m(q_block: int, kv_block: int, head_dim: int) -> int:
    """Rows of the sub-tiles the dK/dV pass walks a listed query block in (a loop, not
    unrolled): whole 128-row blocks spill registers in ptxas' sm_90 report, and so do 64-row
    sub-tiles against 128-key blocks at head dim 128; these sizes do not."""
    return min(q_block, 32 if kv_block * head_dim >= 128 * 128 else 64)


@dataclass(frozen=True)
class BlockSparseTritonConfig:
    """Warps and pipelining of the three kernels (``None``: by tile area and head dim)."""

    fwd_warps: int | None = None
    bwd_warps: int | None = None
    num_stages: int | None = None

    def resolve(self, q_block: int, kv_block: int, head_dim: int) -> tuple[int, int, int]:
        """``(fwd_warps, bwd_warps, num_stages)``."""
        big = q_block * kv_block >= 128 * 128 or head_dim >= 128
        fwd = self.fwd_warps or (8 if big else 4)
        bwd = self.bwd_warps or (8 if q_block * kv_block >= 64 * 128 or head_dim >= 128 else 4)
        stages = self.num_stages or (2 if big else 3)
        for name, w in (("fwd_warps", fwd), ("bwd_warps", bwd)):
            if w not in (1, 2, 4, 8, 16):
                raise ValueError(f"BlockSparseTritonConfig.{name} must be 1, 2, 4, 8 or 16, got {w}")
        if stages < 1:
            raise ValueError(f"BlockSparseTritonConfig.num_stages must be >= 1, got {stages}")
        return fwd, bwd, stages


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
# _mm, _load_rows, _allowed, ...: shared with the dense Triton kernel (_triton_common.py).
if triton is not None:

    @_jit
    def _query_rows(QD, q_start, start_m, Sq, BLOCK_M: tl.constexpr, HAS_DOCS: tl.constexpr):
        """Global positions, validity and document ids of a query tile's rows."""
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < Sq
        qp = q_start + offs_m
        if HAS_DOCS:
            qd = tl.load(QD + offs_m, mask=m_valid, other=-2)
        else:
            qd = qp
        return offs_m, m_valid, qp, qd

    @_jit
    def _fwd_tile(acc, l_i, m_i, q, qp, qd, desc_k, desc_v, b, col_k, start_n, KD, k_start, Sk,
                  window, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_DOCS: tl.constexpr, IEEE: tl.constexpr):
        """One key block of the online softmax of a query block (scores in log2 units)."""
        k = _load_rows(desc_k, b, start_n, col_k, BLOCK_N, HEAD_DIM)
        qk = _mm(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), IEEE)
        qk = qk * qk_scale
        if MASKED:  # contiguous keys: positions k_start + j (KD stands in for KP, never read)
            ok = _key_tile_allowed(qp, qd, KD, KD, start_n, k_start, 1, Sk, window, BLOCK_N,
                                   False, CAUSAL, HAS_WINDOW, HAS_DOCS)
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # rows with nothing allowed yet subtract 0, not -inf (-inf - -inf would be NaN)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(desc_v, b, start_n, col_k, BLOCK_N, HEAD_DIM)
        acc = _mm(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        return acc, l_i, m_new

    @_jit
    def _fwd_kernel(
        desc_q, desc_k, desc_v, desc_o, Lse, PART, FULL, RANGES, QD, KD,
        qk_scale, window, q_start, k_start, q_blk0, k_blk0,
        Sq, Sk, H, G, head_div, s_ib, s_ih, s_rb, s_rh, width,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """Grid ``(cdiv(Sq, BLOCK_M), B * H)``: one query block of one head over its listed key
        blocks in this key shard: partial blocks masked, full ones not, then the shard's last
        block when it is full but cut by the end of the keys (masked)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hm = h // head_div
        col_k = (h // G) * HEAD_DIM
        start_m = pid_m * BLOCK_M
        offs_m, m_valid, qp, qd = _query_rows(QD, q_start, start_m, Sq, BLOCK_M, HAS_DOCS)
        q = _load_rows(desc_q, b, start_m, h * HEAD_DIM, BLOCK_M, HEAD_DIM)

        rng = RANGES + b * s_rb + hm * s_rh + pid_m * 5
        row = b.to(tl.int64) * s_ib + hm.to(tl.int64) * s_ih + (q_blk0 + pid_m).to(tl.int64) * width
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for i in range(tl.load(rng), tl.load(rng + 1)):
            start_n = (tl.load(PART + row + i) - k_blk0) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, qp, qd, desc_k, desc_v, b, col_k, start_n,
                                      KD, k_start, Sk, window, qk_scale, BLOCK_N, HEAD_DIM, True,
                                      CAUSAL, HAS_WINDOW, HAS_DOCS, IEEE)
        for i in range(tl.load(rng + 2), tl.load(rng + 3)):
            start_n = (tl.load(FULL + row + i) - k_blk0) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, qp, qd, desc_k, desc_v, b, col_k, start_n,
                                      KD, k_start, Sk, window, qk_scale, BLOCK_N, HEAD_DIM, False,
                                      CAUSAL, HAS_WINDOW, HAS_DOCS, IEEE)
        for i in range(tl.load(rng + 3), tl.load(rng + 4)):  # at most one: the cut last block
            start_n = (tl.load(FULL + row + i) - k_blk0) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, qp, qd, desc_k, desc_v, b, col_k, start_n,
                                      KD, k_start, Sk, window, qk_scale, BLOCK_N, HEAD_DIM, True,
                                      CAUSAL, HAS_WINDOW, HAS_DOCS, IEEE)

        _store_fwd_rows(desc_o, Lse + pid_bh.to(tl.int64) * Sq, acc, l_i, m_i, b, start_m,
                        h * HEAD_DIM, offs_m, m_valid, BLOCK_M, HEAD_DIM)

    @_jit
    def _bwd_q_tile(dq, q, do, lse2, delta, qp, qd, desc_k, desc_v, b, col_k, start_n, KD,
                    k_start, Sk, window, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_DOCS: tl.constexpr, IEEE: tl.constexpr):
        """One key block's contribution to a query block's dQ."""
        k = _load_rows(desc_k, b, start_n, col_k, BLOCK_N, HEAD_DIM)
        qk = _mm(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), IEEE)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:  # contiguous keys: positions k_start + j (KD stands in for KP, never read)
            ok = _key_tile_allowed(qp, qd, KD, KD, start_n, k_start, 1, Sk, window, BLOCK_N,
                                   False, CAUSAL, HAS_WINDOW, HAS_DOCS)
            p = tl.where(ok, p, 0.0)
        v = _load_rows(desc_v, b, start_n, col_k, BLOCK_N, HEAD_DIM)
        dp = _mm(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        return _mm(ds.to(k.dtype), k, dq, IEEE)

    @_jit
    def _bwd_q_kernel(
        desc_q, desc_k, desc_v, desc_do, desc_dq, Lse, Delta, PART, FULL, RANGES, QD, KD,
        qk_scale, scale, window, q_start, k_start, q_blk0, k_blk0,
        Sq, Sk, H, G, head_div, s_ib, s_ih, s_rb, s_rh, width,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """Grid ``(cdiv(Sq, BLOCK_M), B * H)``: dQ of one query block over its listed key blocks
        (the forward's three loops)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hm = h // head_div
        col_k = (h // G) * HEAD_DIM
        start_m = pid_m * BLOCK_M
        offs_m, m_valid, qp, qd = _query_rows(QD, q_start, start_m, Sq, BLOCK_M, HAS_DOCS)
        q = _load_rows(desc_q, b, start_m, h * HEAD_DIM, BLOCK_M, HEAD_DIM)
        do = _load_rows(desc_do, b, start_m, h * HEAD_DIM, BLOCK_M, HEAD_DIM)
        lse2 = _load_lse2(Lse + pid_bh.to(tl.int64) * Sq, offs_m, m_valid)
        delta = tl.load(Delta + pid_bh.to(tl.int64) * Sq + offs_m, mask=m_valid, other=0.0)

        rng = RANGES + b * s_rb + hm * s_rh + pid_m * 5
        row = b.to(tl.int64) * s_ib + hm.to(tl.int64) * s_ih + (q_blk0 + pid_m).to(tl.int64) * width
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for i in range(tl.load(rng), tl.load(rng + 1)):
            start_n = (tl.load(PART + row + i) - k_blk0) * BLOCK_N
            dq = _bwd_q_tile(dq, q, do, lse2, delta, qp, qd, desc_k, desc_v, b, col_k, start_n,
                             KD, k_start, Sk, window, qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL,
                             HAS_WINDOW, HAS_DOCS, IEEE)
        for i in range(tl.load(rng + 2), tl.load(rng + 3)):
            start_n = (tl.load(FULL + row + i) - k_blk0) * BLOCK_N
            dq = _bwd_q_tile(dq, q, do, lse2, delta, qp, qd, desc_k, desc_v, b, col_k, start_n,
                             KD, k_start, Sk, window, qk_scale, BLOCK_N, HEAD_DIM, False, CAUSAL,
                             HAS_WINDOW, HAS_DOCS, IEEE)
        for i in range(tl.load(rng + 3), tl.load(rng + 4)):
            start_n = (tl.load(FULL + row + i) - k_blk0) * BLOCK_N
            dq = _bwd_q_tile(dq, q, do, lse2, delta, qp, qd, desc_k, desc_v, b, col_k, start_n,
                             KD, k_start, Sk, window, qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL,
                             HAS_WINDOW, HAS_DOCS, IEEE)
        desc_dq.store([b, start_m, h * HEAD_DIM], tl.reshape(dq * scale, [1, BLOCK_M, HEAD_DIM]))

    @_jit
    def _bwd_kv_sub(dk, dv, k, v, kp, kd, desc_q, desc_do, lse_ptr, delta_ptr, QD, b, col_q,
                    start_m, q_start, Sq, window, qk_scale, SUB_M: tl.constexpr,
                    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, IEEE: tl.constexpr):
        """``SUB_M`` query rows' contribution to a key block's dK/dV (transposed scores
        ``[BLOCK_N, SUB_M]``, so dK/dV need no transposes); rows past ``Sq`` add nothing (their
        lse reads as +inf), keys past ``Sk`` are never stored."""
        offs_m, m_valid, qp, qd = _query_rows(QD, q_start, start_m, Sq, SUB_M, HAS_DOCS)
        q = _load_rows(desc_q, b, start_m, col_q, SUB_M, HEAD_DIM)
        lse2 = _load_lse2(lse_ptr, offs_m, m_valid)
        qkT = _mm(k, tl.trans(q), tl.zeros([k.shape[0], SUB_M], dtype=tl.float32), IEEE)
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            okT = _allowed(qp[None, :], kp[:, None], qd[None, :], kd[:, None], window,
                           CAUSAL, HAS_WINDOW, HAS_DOCS)
            pT = tl.where(okT, pT, 0.0)
        do = _load_rows(desc_do, b, start_m, col_q, SUB_M, HEAD_DIM)
        dv = _mm(pT.to(do.dtype), do, dv, IEEE)
        delta = tl.load(delta_ptr + offs_m, mask=m_valid, other=0.0)
        dpT = _mm(v, tl.trans(do), tl.zeros([k.shape[0], SUB_M], dtype=tl.float32), IEEE)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = _mm(dsT, q, dk, IEEE)
        return dk, dv

    @_jit
    def _bwd_kv_kernel(
        desc_q, desc_k, desc_v, desc_do, desc_dk, desc_dv, Lse, Delta, PART_Q, FULL_Q, RANGES,
        QD, KD, qk_scale, scale, window, q_start, k_start, q_blk0,
        Sq, Sk, H, Hkv, G, head_div, s_rb, s_rh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SUB_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_DOCS: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Grid ``(cdiv(Sk, BLOCK_N), B * Hkv)``: dK/dV of one key block, over the query blocks
        of this shard that list it (partial ones masked), for all ``G`` query heads of its kv
        head; each query block in ``SUB_M``-row sub-tiles.  Accumulated in registers."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_valid = offs_n < Sk
        k = _load_rows(desc_k, b, start_n, hk * HEAD_DIM, BLOCK_N, HEAD_DIM)
        v = _load_rows(desc_v, b, start_n, hk * HEAD_DIM, BLOCK_N, HEAD_DIM)
        kp = k_start + offs_n
        if HAS_DOCS:
            kd = tl.load(KD + offs_n, mask=k_valid, other=-1)
        else:
            kd = kp

        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for g in range(0, G):
            h = hk * G + g
            hm = h // head_div
            lse_ptr = Lse + (b * H + h).to(tl.int64) * Sq
            delta_ptr = Delta + (b * H + h).to(tl.int64) * Sq
            rng = RANGES + b * s_rb + hm * s_rh + pid_n * 4
            for i in range(tl.load(rng), tl.load(rng + 1)):
                start_m = (tl.load(PART_Q + i) - q_blk0) * BLOCK_M
                for sub in range(0, BLOCK_M // SUB_M):  # a loop, not unrolled: no spills
                    dk, dv = _bwd_kv_sub(dk, dv, k, v, kp, kd, desc_q, desc_do, lse_ptr,
                                         delta_ptr, QD, b, h * HEAD_DIM, start_m + sub * SUB_M,
                                         q_start, Sq, window, qk_scale, SUB_M, HEAD_DIM, True,
                                         CAUSAL, HAS_WINDOW, HAS_DOCS, IEEE)
            for i in range(tl.load(rng + 2), tl.load(rng + 3)):
                start_m = (tl.load(FULL_Q + i) - q_blk0) * BLOCK_M
                for sub in range(0, BLOCK_M // SUB_M):
                    dk, dv = _bwd_kv_sub(dk, dv, k, v, kp, kd, desc_q, desc_do, lse_ptr,
                                         delta_ptr, QD, b, h * HEAD_DIM, start_m + sub * SUB_M,
                                         q_start, Sq, window, qk_scale, SUB_M, HEAD_DIM, False,
                                         CAUSAL, HAS_WINDOW, HAS_DOCS, IEEE)

        desc_dk.store([b, start_n, hk * HEAD_DIM], tl.reshape(dk * scale, [1, BLOCK_N, HEAD_DIM]))
        desc_dv.store([b, start_n, hk * HEAD_DIM], tl.reshape(dv, [1, BLOCK_N, HEAD_DIM]))


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------
def _contiguous_start(p: Positions) -> int | None:
    """The first position of a single contiguous run (or of an empty shard: 0); else None."""
    if p.index is not None:
        return None
    segs = [s for s in p.segments if s.length]
    if not segs:
        return 0
    if len(segs) != 1 or (segs[0].stride != 1 and segs[0].length > 1):
        return None
    return segs[0].start


class BlockSparseTriton:
    """Triton block-sparse attention on the local kernel contract (see the module docstring).

    Supported: CUDA tensors on Hopper or newer (or CPU tensors with ``TRITON_INTERPRET=1``) in
    float16, bfloat16 or float32, head dims 16 to 128, masks with block-sparse lists of blocks
    16 to 128 (64 and 128 on GPUs) plus any causal / window / documents, contiguous query and
    key shards starting on block boundaries.  :meth:`unsupported_reason` says why a call is
    refused, before calling.
    """

    name = "block_sparse"

    def __init__(self, config: BlockSparseTritonConfig = BlockSparseTritonConfig()):
        self.config = config

    # -- support ----------------------------------------------------------------------------------
    @staticmethod
    def unsupported_reason(
        q: Tensor, mask: Mask, q_pos: Positions | None = None, k_pos: Positions | None = None,
        kv_heads: int | None = None,
    ) -> str | None:
        """Why this kernel cannot run ``q [B, Sq, H, D]`` under ``mask`` at these positions
        (None when it can).  Shapes and descriptions only: no device work."""
        if mask.block_sparse is None:
            return "the mask has no block-sparse lists: use kernel='triton' (dense tile skipping)"
        if (reason := _unavailable_reason(q)) is not None:
            return reason
        if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (9, 0):
            return ("the block-sparse Triton kernel reads tiles with TMA descriptors (sm_90+); "
                    "use kernel='reference'")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return (f"dtype {q.dtype} is not supported by the block-sparse Triton kernel "
                    "(float16, bfloat16, float32); use kernel='reference' for float64")
        if q.shape[-1] not in _HEAD_DIMS:
            return (f"head_dim {q.shape[-1]} is not supported by the block-sparse Triton kernel "
                    f"(supported: {_HEAD_DIMS}); use kernel='reference'")
        bs = mask.block_sparse
        if bs.device != q.device:
            return (f"the block-sparse lists are on {bs.device} but q is on {q.device}; move the "
                    "mask once with mask.to(q.device)")
        for name, size in (("q_block", bs.q_block), ("kv_block", bs.kv_block)):
            if size not in _BLOCKS:
                return (f"the block-sparse Triton kernel needs {name} in {_BLOCKS} (64 or 128 on "
                        f"GPUs), got {size}; rebuild the lists with such blocks or use "
                        "kernel='reference'")
        for name, p, size in (("q_pos", q_pos, bs.q_block), ("k_pos", k_pos, bs.kv_block)):
            if p is None:
                continue
            start = _contiguous_start(p)
            if start is None:
                return (f"{name} is not one contiguous run; the block-sparse Triton kernel takes "
                        "contiguous shards (split striped / zigzag shards per run, or use "
                        "kernel='reference')")
            if start % size:
                return (f"{name} starts at global position {start}, not a multiple of the block "
                        f"size {size}: shards must start on a block boundary (choose shard sizes "
                        "divisible by the block size)")
        return None

    def supports(self, q: Tensor, mask: Mask, q_pos=None, k_pos=None) -> bool:
        return self.unsupported_reason(q, mask, q_pos, k_pos) is None

    def _prepare(self, q, k, v, scale, mask, q_pos, k_pos):
        check_qkv(q, k, v)
        q_pos, k_pos = default_positions(q, k, q_pos, k_pos)
        reason = self.unsupported_reason(q, mask, q_pos, k_pos)
        if reason is not None:
            raise ValueError(reason)
        check_scale(scale)
        B, Sq, H, _ = q.shape
        Sk, Hkv = k.shape[1], k.shape[2]
        bs = mask.block_sparse
        div = bs.check_call(B, H, Hkv, q.device)
        q_start, k_start = _contiguous_start(q_pos), _contiguous_start(k_pos)
        for side, start, n, size, n_blocks in (
            ("query", q_start, Sq, bs.q_block, bs.n_q_blocks),
            ("key", k_start, Sk, bs.kv_block, bs.n_kv_blocks),
        ):
            end = start + n
            if end > n_blocks * size:
                raise ValueError(
                    f"the {side} shard reaches global position {end - 1} but the block-sparse "
                    f"lists cover {n_blocks} {side} blocks of {size} ({n_blocks * size} tokens); "
                    "build the lists for the whole sequence"
                )
            if n % size and end <= (n_blocks - 1) * size:
                raise ValueError(
                    f"the {side} shard [{start}, {end}) holds {n} tokens, not a multiple of the "
                    f"block size {size}, and does not end in the last block: block sizes must "
                    "divide the shard (only the sequence's last block may be partial)"
                )
            if end >= _MAX_POSITION:
                raise ValueError(f"global positions reach {end}; the kernel handles below 2**30")
        docs = mask.cu_seqlens is not None
        qd = kd = None
        if docs:
            qd = mask.document_ids(q_pos.materialize(q.device)).to(torch.int32)
            kd = mask.document_ids(k_pos.materialize(q.device)).to(torch.int32)
        common = dict(
            window=min(mask.window or 1, _MAX_POSITION), q_start=q_start, k_start=k_start,
            q_blk0=q_start // bs.q_block, k_blk0=k_start // bs.kv_block,
        )
        flags = dict(
            CAUSAL=mask.causal, HAS_WINDOW=mask.window is not None, HAS_DOCS=docs,
            IEEE=q.dtype == torch.float32,
        )
        return q_pos, k_pos, bs, div or 1, div == 0, qd, kd, common, flags

    @staticmethod
    def _query_major(bs, mask, shared: bool, common: dict, Sq: int, Sk: int):
        """Launch arguments of the two query-major kernels (forward, dQ): the split lists,
        per local query block the ranges of entries in this key shard
        ``[part_lo, part_hi, full_lo, full_end_of_whole_blocks, full_hi]`` (int32
        ``[Bm, Hm, n_local, 5]``, from a batched search on the device: no host sync), and the
        strides (0 where the lists broadcast)."""
        split = bs.split_lists(mask)
        Bm, Hm, _, width = split.part.shape
        q0, k0 = common["q_blk0"], common["k_blk0"]
        n_loc = -(-Sq // bs.q_block)
        bounds = (k0, k0 + -(-Sk // bs.kv_block), k0, k0 + Sk // bs.kv_block,
                  k0 + -(-Sk // bs.kv_block))
        ranges = []
        for lists, vals in ((split.part, bounds[:2]), (split.full, bounds[2:])):
            rows = lists[:, :, q0:q0 + n_loc].contiguous()  # [Bm, Hm, n_loc, width]
            target = torch.empty(Bm, Hm, n_loc, len(vals), dtype=rows.dtype, device=rows.device)
            for j, val in enumerate(vals):
                target[..., j] = val  # fills on the device
            ranges.append(torch.searchsorted(rows, target))
        ranges = torch.cat(ranges, -1).to(torch.int32).contiguous()
        one_h = Hm == 1 or shared
        return dict(
            lists=(split.part, split.full, ranges),
            strides=(0 if Bm == 1 else Hm * split.part.shape[2] * width,
                     0 if one_h else split.part.shape[2] * width,
                     0 if Bm == 1 else Hm * n_loc * 5, 0 if one_h else n_loc * 5, width),
        )

    @staticmethod
    def _key_major(bs, mask, shared: bool, common: dict, Sq: int, Sk: int):
        """Launch arguments of the dK/dV kernel: the transposed split lists' query blocks and,
        per local key block, the ranges ``[part_lo, part_hi, full_lo, full_hi]`` of the query
        blocks of this shard that list it (int32 ``[Bm, Hm, n_local, 4]``; a search on the
        device)."""
        split = bs.split_lists(mask)
        Bm, Hm, nq, nk = bs.shape
        q0, k0 = common["q_blk0"], common["k_blk0"]
        n_loc = -(-Sk // bs.kv_block)
        dev = split.part.device
        rows = (torch.arange(Bm * Hm, device=dev).view(Bm, Hm, 1) * nk + k0
                + torch.arange(n_loc, device=dev).view(1, 1, n_loc)) * nq  # first key per row
        bounds = torch.stack([rows + q0, rows + q0 + -(-Sq // bs.q_block)], -1)
        ranges = torch.cat([torch.searchsorted(keys, bounds)
                            for keys in (split.part_t_keys, split.full_t_keys)], -1)
        one_h = Hm == 1 or shared
        return dict(
            lists=(split.part_t_q, split.full_t_q, ranges.to(torch.int32).contiguous()),
            strides=(0 if Bm == 1 else Hm * n_loc * 4, 0 if one_h else n_loc * 4),
        )

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Mask = Mask(),
        q_pos: Positions | None = None, k_pos: Positions | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``q [B, Sq, H, D]``, ``k``/``v [B, Sk, Hkv, D]`` -> ``out [B, Sq, H, D]`` (q.dtype),
        ``lse [B, H, Sq]`` (float32, natural log; ``-inf`` for rows with no allowed key)."""
        q_pos, k_pos, bs, div, shared, qd, kd, common, flags = self._prepare(
            q, k, v, scale, mask, q_pos, k_pos)
        q, k, v = (_tma_ready(t) for t in (q, k, v))
        B, Sq, H, D = q.shape
        Sk, Hkv = k.shape[1], k.shape[2]
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
        if Sq == 0 or B * H == 0 or Sk == 0:
            return out.zero_(), lse.fill_(float("-inf"))
        qm = self._query_major(bs, mask, shared, common, Sq, Sk)
        dummy = qm["lists"][2]  # stands in for absent document ids (never read)
        fwd_warps, _, stages = self.config.resolve(bs.q_block, bs.kv_block, D)
        _launch(
            _fwd_kernel, (triton.cdiv(Sq, bs.q_block), B * H),
            _rows_desc(q, bs.q_block), _rows_desc(k, bs.kv_block), _rows_desc(v, bs.kv_block),
            _rows_desc(out, bs.q_block), lse, *qm["lists"],
            qd if qd is not None else dummy, kd if kd is not None else dummy,
            scale * _LOG2E, common["window"], common["q_start"], common["k_start"],
            common["q_blk0"], common["k_blk0"], Sq, Sk, H, H // Hkv, div, *qm["strides"],
            HEAD_DIM=D, BLOCK_M=bs.q_block, BLOCK_N=bs.kv_block, **flags,
            num_warps=fwd_warps, num_stages=stages,
        )
        return out, lse

    # -- backward ---------------------------------------------------------------------------------
    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
        scale: float, mask: Mask = Mask(), q_pos: Positions | None = None,
        k_pos: Positions | None = None, grad_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients from the **global** ``out [B, Sq, H, D]`` / ``lse [B, H, Sq]``: ``dq``,
        ``dk``/``dv`` for this key shard only, in ``grad_dtype`` (default float32)."""
        q_pos, k_pos, bs, div, shared, qd, kd, common, flags = self._prepare(
            q, k, v, scale, mask, q_pos, k_pos)
        B, Sq, H, D = q.shape
        Sk, Hkv = k.shape[1], k.shape[2]
        check_backward_shapes(dout, q, out, lse)
        q, k, v, dout, out, lse = _bwd_ready(q, k, v, dout, out, lse)
        f32 = dict(dtype=torch.float32, device=q.device)
        dq = torch.empty(B, Sq, H, D, **f32)
        dk = torch.empty(B, Sk, Hkv, D, **f32)
        dv = torch.empty(B, Sk, Hkv, D, **f32)
        if Sq == 0 or Sk == 0 or B * H == 0:
            return tuple(g.zero_().to(grad_dtype_for(q, grad_dtype)) for g in (dq, dk, dv))

        delta = _bwd_delta(out, dout, 64)  # rowsum(dout * out) with the global out [B, H, Sq]
        _, bwd_warps, stages = self.config.resolve(bs.q_block, bs.kv_block, D)
        qm = self._query_major(bs, mask, shared, common, Sq, Sk)
        km = self._key_major(bs, mask, shared, common, Sq, Sk)
        qd_t = qd if qd is not None else delta  # dummies for absent document ids (never read)
        kd_t = kd if kd is not None else delta
        _launch(
            _bwd_q_kernel, (triton.cdiv(Sq, bs.q_block), B * H),
            _rows_desc(q, bs.q_block), _rows_desc(k, bs.kv_block), _rows_desc(v, bs.kv_block),
            _rows_desc(dout, bs.q_block), _rows_desc(dq, bs.q_block), lse, delta, *qm["lists"],
            qd_t, kd_t, scale * _LOG2E, scale, common["window"], common["q_start"],
            common["k_start"], common["q_blk0"], common["k_blk0"], Sq, Sk, H, H // Hkv, div,
            *qm["strides"],
            HEAD_DIM=D, BLOCK_M=bs.q_block, BLOCK_N=bs.kv_block, **flags,
            num_warps=bwd_warps, num_stages=stages,
        )
        sub_m = _bwd_kv_sub_m(bs.q_block, bs.kv_block, D)
        _launch(
            _bwd_kv_kernel, (triton.cdiv(Sk, bs.kv_block), B * Hkv),
            _rows_desc(q, sub_m), _rows_desc(k, bs.kv_block), _rows_desc(v, bs.kv_block),
            _rows_desc(dout, sub_m), _rows_desc(dk, bs.kv_block),
            _rows_desc(dv, bs.kv_block), lse, delta, *km["lists"], qd_t, kd_t,
            scale * _LOG2E, scale, common["window"], common["q_start"], common["k_start"],
            common["q_blk0"], Sq, Sk, H, Hkv, H // Hkv, div, *km["strides"],
            HEAD_DIM=D, BLOCK_M=bs.q_block, BLOCK_N=bs.kv_block, SUB_M=sub_m, **flags,
            num_warps=bwd_warps, num_stages=stages,
        )
        return tuple(g.to(grad_dtype_for(q, grad_dtype)) for g in (dq, dk, dv))


register_kernel("block_sparse", BlockSparseTriton)
