"""Triton causal linear attention with per-head decay (Lightning Attention-2 style), fwd + bwd.

Implements :class:`~longctx.kernels.linear.base.LinearAttentionKernel` (same math, layout,
decay, states and documents as :mod:`longctx.kernels.linear.reference`), registered as
``"triton"``::

    forward(q, k, v, args, initial_state) -> out [B, S, H, Dv] (q.dtype), final_state [B, H, Dk, Dv] f32
    backward(dout, dfinal, q, k, v, args, initial_state, grad_dtype) -> dq, dk, dv, dinitial
                                 (grads in grad_dtype, default float32; dinitial float32)

The sequence is cut into chunks of ``C`` tokens.  Inside a chunk the output is the quadratic form
with the decay mask ``lambda^(i-j)`` (zero across documents); across chunks it goes through the
running state ``[Dk, Dv]``, kept in float32 registers.  Five kernels, each parallel over
``(batch, head)`` and blocks of ``Dk`` / ``Dv``:

============ ================================= ==========================================================
kernel        grid                              work
============ ================================= ==========================================================
state fwd     ``(Dk/BK, Dv/BV, B*H)``           walk the chunks, store the state at each chunk start
output fwd    ``(chunks, Dv/BV, B*H)``          ``o = scale * (q * lambda^(i+1)) @ h_c + (q k^T * M) @ v``
state bwd     ``(Dk/BK, Dv/BV, B*H)``           walk the chunks backwards, store dL/d(state at chunk end)
dq, dk        ``(chunks, Dk/BK, B*H)``          intra (``do v^T * M``) + through the stored states
dv            ``(chunks, Dv/BV, B*H)``          intra (``q k^T * M``) + through the stored state grads
============ ================================= ==========================================================

The per-chunk states are stored in the input dtype (they feed ``tl.dot`` in that dtype anyway),
``B * H * ceil(S / C) * Dk * Dv`` elements; the backward recomputes them instead of keeping them.
Decay factors are always ``exp(g * n)`` with ``n >= 0`` (no overflow); the no-decay variant
compiles without them.  GQA: k/v are read in place; dk/dv are accumulated per query head in float32
and summed over each kv head's group on the host.  Documents (``cu_seqlens``) are evaluated from
per-token document ids inside the kernels, so chunks need not align with documents.

Context parallelism (``forward_exchange`` / ``backward_exchange``): the exchange needs the
shard's final state before the state walk (and, backward, the entering state's gradient before the
backward walk), so a sixth kernel, ``state sum`` (grid ``(Dk/BK, Dv/BV, segments * B*H)``), sums
``lambda^e_t k_t^T v_t`` (or ``scale lambda^(t+1) q_t^T do_t``) over segments of tokens in
parallel, with no chunk-to-chunk dependency, and a seventh, ``state scan`` (grid ``(B*H, Dk*Dv /
1024)``), chains the segment sums: the state entering every segment from a zero initial state and
the factor of the initial state in it (backward: the gradients, from the end).  What the exchange
returns, the entering state or the final-state gradient, then completes those starts, and each
segment is walked by its own programs (grid ``(Dk/BK, Dv/BV, segments * B*H)``), so the walks
are shorter than on one device and the output and dq/dk/dv kernels run exactly as there.

Runs on CUDA GPUs and, for tests, on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
read at each launch).  Inputs float16 / bfloat16 / float32 (float32 uses full-precision IEEE dots);
``Dk`` and ``Dv`` up to 256.

Example::

    >>> import torch
    >>> from longctx.kernels.linear import linear_attention_triton, retnet_log_decay
    >>> q = torch.randn(1, 8192, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    >>> k = torch.randn(1, 8192, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    >>> v = torch.randn(1, 8192, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    >>> out, state = linear_attention_triton(q, k, v, log_decay=retnet_log_decay(16, "cuda"),
    ...                                      return_final_state=True)
    >>> (out.float().square().sum() + state.sum()).backward()
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._triton_runtime import interpreting as _interpreting
from .._triton_runtime import jit as _jit
from .._triton_runtime import launch as _launch
from .._triton_runtime import tl, triton
from .._triton_runtime import unavailable_reason as _unavailable_reason
from ..base import sum_kv_groups
from .base import (
    LinearArgs,
    LinearKernelFunction,
    LinearShape,
    StateExchange,
    check_linear_inputs,
    check_state,
    register_linear_kernel,
    resolve_state,
)

__all__ = [
    "MAX_HEAD_DIM",
    "LinearTritonConfig",
    "LinearBlocks",
    "LinearTriton",
    "linear_attention_triton",
    "weighted_state_sum",
]

MAX_HEAD_DIM = 256  # Dk and Dv: one [BK, BV] state block per program, Dk/Dv loops in the kernels


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
def _pow2_at_least_16(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"LinearTritonConfig.{name} must be a power of two >= 16, got {value}")


@dataclass(frozen=True)
class LinearTritonConfig:
    """Launch shape of :class:`LinearTriton`.

    Attributes:
        chunk: tokens per chunk ``C`` (the intra-chunk quadratic block and the state stride).
        block_k: ``Dk`` block ``BK`` of one program's state tile (clipped to the head dim).
        block_v: ``Dv`` block ``BV`` (clipped to the head dim).
        dq_block_k: ``Dk`` block of the dq/dk kernel, which holds three ``[C, BK]`` float32
            accumulators besides ``do v^T`` (clipped to the head dim).
        state_block_k, state_block_v: the state tile of the two sequential kernels (state
            forward and backward), which walk every chunk of a ``(batch, head)`` one after the
            other.  Their grid has only ``B * H * (Dk / BK) * (Dv / BV)`` programs, so smaller
            tiles put more of the GPU to work on short-batch, few-head shapes; but each k (v)
            tile is read by ``Dv / BV`` (``Dk / BK``) programs, so smaller tiles also read more.
            The default, 32 x 64, is the fastest of the tiles swept at head dim 128 and H = 16
            (``bench_linear.py --sweep``; ``benchmarks/RESULTS.md``, "Linear attention").  Under
            context parallelism its programs (one wave at H = 16) slow down when an all-gather
            waiting for its peers holds SMs at the same time.
        num_warps, num_stages: as in ``triton.Config``; ``state_num_warps`` and
            ``state_num_stages`` for the two sequential kernels.
        segment, sum_block, sum_num_stages: context parallelism needs a shard's final state
            (and, backward, the entering state's gradient) before the sequential kernels.  It
            sums them in parallel over segments of ``segment`` tokens (a multiple of ``chunk``;
            None: as many segments as give every SM one program of the sum), chains the segment
            sums with a small scan, and then walks every segment in parallel from its chained
            start.  ``[sum_block, sum_block]`` is the sum's state tile (clipped to the head
            dims), ``sum_num_stages`` its pipeline depth.  One program of the sum per SM, and
            walks cut into several segments, measured fastest ("Linear CP efficiency" in
            ``benchmarks/RESULTS.md``).  The segments are chained in a fixed order, so the
            result is deterministic on a given GPU model.  The one-device forward and backward walk in one segment.

    All blocks are powers of two >= 16 (the smallest ``tl.dot``).  The defaults come from timing
    on an H200 at head dim 128 (``benchmarks/bench_linear.py --sweep``, ``benchmarks/RESULTS.md``);
    ``dq_block_k=64`` spills a few registers in the dq/dk kernel (``ptxas -v``) and is still
    faster than 32, which recomputes ``do v^T`` for twice as many Dk blocks.  Example::

        LinearTritonConfig(chunk=64, block_k=64, block_v=64, state_block_k=32, num_warps=8)
    """

    chunk: int = 64
    block_k: int = 64
    block_v: int = 64
    dq_block_k: int = 64
    state_block_k: int = 32
    state_block_v: int = 64
    num_warps: int = 8
    state_num_warps: int = 8
    num_stages: int = 3
    state_num_stages: int = 4
    sum_block: int = 128
    segment: int | None = None
    sum_num_stages: int = 4

    def __post_init__(self) -> None:
        for name in ("chunk", "block_k", "block_v", "dq_block_k", "state_block_k",
                     "state_block_v", "sum_block"):
            _pow2_at_least_16(name, getattr(self, name))
        if self.segment is not None and (self.segment < self.chunk or self.segment % self.chunk):
            raise ValueError(
                f"LinearTritonConfig.segment must be a multiple of chunk={self.chunk}, "
                f"got {self.segment}"
            )
        for name in ("num_warps", "state_num_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(
                    f"LinearTritonConfig.{name} must be 1, 2, 4, 8 or 16, got {getattr(self, name)}"
                )
        for name in ("num_stages", "state_num_stages", "sum_num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"LinearTritonConfig.{name} must be >= 1, got {getattr(self, name)}"
                )

    def blocks(self, dk: int, dv: int) -> LinearBlocks:
        """The tiles for head dims ``dk``, ``dv`` (never over the padded head dim)."""
        def pad(d: int) -> int:  # the next power of two, at least 16 (plain ints: host-cheap)
            return max(16, 1 << (d - 1).bit_length())

        return LinearBlocks(
            chunk=self.chunk, k=min(self.block_k, pad(dk)), v=min(self.block_v, pad(dv)),
            dq_k=min(self.dq_block_k, pad(dk)), state_k=min(self.state_block_k, pad(dk)),
            state_v=min(self.state_block_v, pad(dv)), sum_k=min(self.sum_block, pad(dk)),
            sum_v=min(self.sum_block, pad(dv)),
        )


class LinearBlocks(NamedTuple):
    """Tile sizes of one call (:meth:`LinearTritonConfig.blocks`)."""

    chunk: int
    k: int
    v: int
    dq_k: int
    state_k: int
    state_v: int
    sum_k: int
    sum_v: int


# --------------------------------------------------------------------------------------------------
# running the same kernels compiled (GPU) or interpreted (CPU tensors, tests)
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
# Tensors: q/k [B, S, heads, DK], v/o [B, S, heads, DV], contiguous; per-chunk state buffers
# [B*H, NT, DK, DV]; states [B, H, DK, DV] float32.  ``bh`` is batch * H + query head.
if triton is not None:

    from .._triton_common import mm as _dot  # acc + a @ b in float32 (IEEE: exact products)

    @_jit
    def _rows(X, b, offs_t, head, offs_d, S, heads, D: tl.constexpr):
        """Pointers and mask of the ``[T, BD]`` tile (tokens ``offs_t``, columns ``offs_d``) of
        ``X [B, S, heads, D]``."""
        row = (b.to(tl.int64) * S + offs_t) * heads + head  # [T]
        ptrs = X + row[:, None] * D + offs_d[None, :]
        mask = (offs_t < S)[:, None] & (offs_d < D)[None, :]
        return ptrs, mask

    @_jit
    def _state_ptrs(X, base, offs_k, offs_v, DK: tl.constexpr, DV: tl.constexpr):
        """Pointers and mask of a ``[BK, BV]`` block of the ``[DK, DV]`` matrix at ``X + base``."""
        ptrs = X + base + offs_k[:, None] * DV + offs_v[None, :]
        mask = (offs_k < DK)[:, None] & (offs_v < DV)[None, :]
        return ptrs, mask

    @_jit
    def _load_tile(X, b, offs_t, head, offs_d, S, heads, D: tl.constexpr):
        """The :func:`_rows` tile of ``X``, zeros outside it."""
        ptrs, mask = _rows(X, b, offs_t, head, offs_d, S, heads, D)
        return tl.load(ptrs, mask=mask, other=0.0)

    @_jit
    def _load_state(X, base, offs_k, offs_v, DK: tl.constexpr, DV: tl.constexpr):
        """The :func:`_state_ptrs` block of ``X``, zeros outside it."""
        ptrs, mask = _state_ptrs(X, base, offs_k, offs_v, DK, DV)
        return tl.load(ptrs, mask=mask, other=0.0)

    @_jit
    def _entering_doc(DOC, t0):
        """The document of the state that enters at token ``t0``: that of token ``t0 - 1``, and
        document 0 (the initial state's) at ``t0 = 0``."""
        return tl.where(t0 > 0, tl.load(DOC + tl.maximum(t0 - 1, 0)), 0)

    @_jit
    def _chunk_weights(g, DOC, t0, S, BT: tl.constexpr, HAS_DECAY: tl.constexpr,
                       HAS_DOCS: tl.constexpr):
        """Decay weights of the chunk starting at token ``t0`` (local index ``i``):

        ``row[i] = lambda^(i+1)`` if token i sees the state before the chunk (its document),
        ``col[i] = lambda^(L-1-i)`` if token i reaches the state after the chunk (last document),
        ``total = lambda^L`` if the state before the chunk reaches its end (else 0), and the
        document ids ``d`` (``[BT]``, -1 past the end; the positions without documents).
        """
        offs_t = t0 + tl.arange(0, BT)
        valid = offs_t < S
        i = tl.arange(0, BT)
        L = tl.minimum(S - t0, BT)  # tokens in this chunk
        if HAS_DECAY:
            row = tl.exp(g * (i + 1).to(tl.float32))
            col = tl.exp(g * tl.maximum(L - 1 - i, 0).to(tl.float32))
            total = tl.exp(g * L.to(tl.float32))
        else:
            row = tl.full([BT], 1.0, tl.float32)
            col = tl.full([BT], 1.0, tl.float32)
            total = (L * 0 + 1).to(tl.float32)
        if HAS_DOCS:
            d = tl.load(DOC + offs_t, mask=valid, other=-1)
            carry = _entering_doc(DOC, t0)
            d_last = tl.load(DOC + t0 + L - 1)
            row = tl.where(d == carry, row, 0.0)
            col = tl.where(d == d_last, col, 0.0)
            total = tl.where(d_last == carry, total, 0.0)
        else:
            d = offs_t
        row = tl.where(valid, row, 0.0)
        col = tl.where(valid, col, 0.0)
        return row, col, total, d

    @_jit
    def _intra_mask(g, d, BT: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_DOCS: tl.constexpr):
        """``M[i, j] = lambda^(i-j)`` for ``j <= i`` in the same document, else 0 (``[BT, BT]``)."""
        i = tl.arange(0, BT)
        diff = i[:, None] - i[None, :]
        ok = diff >= 0
        if HAS_DOCS:
            ok = ok & (d[:, None] == d[None, :])
        if HAS_DECAY:
            m = tl.where(ok, tl.exp(g * tl.maximum(diff, 0).to(tl.float32)), 0.0)
        else:
            m = tl.where(ok, 1.0, 0.0)
        return m

    @_jit
    def _load_g(G, h, HAS_DECAY: tl.constexpr):
        if HAS_DECAY:
            g = tl.load(G + h).to(tl.float32)
        else:
            g = 0.0
        return g

    # ---------------------------------------------------------------------------------- forward
    @_jit
    def _state_fwd_kernel(K, V, G, DOC, H0, HBUF, HT, BASE, COEF, S, H, GQ, NT, SEG_NT, BH,
                          DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_DOCS: tl.constexpr,
                          HAS_H0: tl.constexpr, FROM_BASE: tl.constexpr, IEEE: tl.constexpr):
        """Grid ``(cdiv(DK, BK), cdiv(DV, BV), segments * B*H)``: ``HBUF[bh, c]`` = state before
        chunk c, ``HT[bh]`` = state after the last token (float32).

        A program walks the ``SEG_NT`` chunks of its segment ``seg``, starting from ``H0[bh]``
        (one segment; zeros without HAS_H0) or, with FROM_BASE, from ``BASE[seg, bh] +
        COEF[seg, h] * H0[bh]`` (:func:`_state_scan_kernel`'s states, float32)."""
        i_k, i_v, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seg, bh = pid // BH, pid % BH
        b, h = bh // H, bh % H
        hk = h // GQ
        offs_k = i_k * BK + tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        g = _load_g(G, h, HAS_DECAY)
        state = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_H0:
            state = _load_state(H0, bh.to(tl.int64) * DK * DV, offs_k, offs_v, DK, DV)
            state = state.to(tl.float32)
        if FROM_BASE:
            state = (_load_state(BASE, (seg * BH + bh).to(tl.int64) * DK * DV, offs_k, offs_v,
                                 DK, DV)
                     + tl.load(COEF + seg * H + h) * state)
        c_end = tl.minimum(seg * SEG_NT + SEG_NT, NT)
        for c in range(seg * SEG_NT, c_end):
            t0 = c * BT
            hb_ptrs, hb_mask = _state_ptrs(HBUF, (bh.to(tl.int64) * NT + c) * DK * DV,
                                           offs_k, offs_v, DK, DV)
            tl.store(hb_ptrs, state.to(HBUF.dtype.element_ty), mask=hb_mask)
            _, col, total, _ = _chunk_weights(g, DOC, t0, S, BT, HAS_DECAY, HAS_DOCS)
            offs_t = t0 + tl.arange(0, BT)
            k = _load_tile(K, b, offs_t, hk, offs_k, S, H // GQ, DK)
            v = _load_tile(V, b, offs_t, hk, offs_v, S, H // GQ, DV)
            kw = (k * col[:, None]).to(v.dtype)  # [BT, BK]: k_j * lambda^(L-1-j)
            state = _dot(tl.trans(kw), v, state * total, IEEE)
        if c_end == NT:  # the last segment
            ht_ptrs, ht_mask = _state_ptrs(HT, bh.to(tl.int64) * DK * DV, offs_k, offs_v, DK, DV)
            tl.store(ht_ptrs, state, mask=ht_mask)

    @_jit
    def _segment_decay(g, DOC, s0, S, SEG, HAS_DECAY: tl.constexpr, HAS_DOCS: tl.constexpr):
        """The factor by which a state entering the segment ``[s0, s0 + SEG)`` reaches its end:
        ``lambda^L``, or 0 when a document starts in it (as ``total`` of :func:`_chunk_weights`)."""
        L = tl.minimum(S - s0, SEG)
        if HAS_DECAY:
            a = tl.exp(g * L.to(tl.float32))
        else:
            a = (L * 0 + 1).to(tl.float32)
        if HAS_DOCS:
            a = tl.where(tl.load(DOC + s0 + L - 1) == _entering_doc(DOC, s0), a, 0.0)
        return a

    @_jit
    def _state_sum_kernel(A, B, G, DOC, OUT, mult, S, H, GQ, BH, SEG,
                          DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_DOCS: tl.constexpr,
                          FROM_END: tl.constexpr, IEEE: tl.constexpr):
        """Grid ``(cdiv(DK, BK), cdiv(DV, BV), cdiv(S, SEG) * BH)``: ``OUT[seg, bh]`` (float32),
        what the tokens of segment ``seg`` (``SEG`` tokens from ``s0``, to ``s1``) add, with no
        sequential dependency:

        - FROM_END, to the state after the segment: ``sum_t mult * lambda^(s1-1-t) a_t^T b_t``
          over the tokens of the segment's last document (``a, b = k, v``);
        - else, to the gradient of the state entering it: ``sum_t mult * lambda^(t-s0+1)
          a_t^T b_t`` over the tokens that see that state (``a, b = q, dout``).

        ``a_t``, ``b_t`` are the rows of head ``h // GQ`` of ``A [B, S, H / GQ, DK]`` and
        ``B [B, S, H / GQ, DV]``."""
        i_k, i_v, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seg, bh = pid // BH, pid % BH
        b, h = bh // H, bh % H
        offs_k = i_k * BK + tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        g = _load_g(G, h, HAS_DECAY)
        s0 = seg * SEG
        s1 = tl.minimum(s0 + SEG, S)
        if HAS_DOCS:  # the document whose tokens count
            if FROM_END:
                ref = tl.load(DOC + s1 - 1)
            else:
                ref = _entering_doc(DOC, s0)
        acc = tl.zeros([BK, BV], dtype=tl.float32)
        for i in range(0, SEG, BT):
            offs_t = s0 + i + tl.arange(0, BT)
            inside = offs_t < s1
            if HAS_DOCS:
                inside = inside & (tl.load(DOC + offs_t, mask=inside, other=-1) == ref)
            if HAS_DECAY:
                if FROM_END:
                    w = tl.exp(g * (s1 - 1 - offs_t).to(tl.float32)) * mult
                else:
                    w = tl.exp(g * (offs_t - s0 + 1).to(tl.float32)) * mult
            else:
                w = tl.full([BT], 1.0, tl.float32) * mult
            w = tl.where(inside, w, 0.0)
            row = (b.to(tl.int64) * S + offs_t) * (H // GQ) + h // GQ  # [BT]
            # a read as its transpose [BK, BT]: the weighted tile is the dot's left operand as is
            a_t = tl.load(A + row[None, :] * DK + offs_k[:, None],
                          mask=(offs_k < DK)[:, None] & inside[None, :], other=0.0)
            x = tl.load(B + row[:, None] * DV + offs_v[None, :],
                        mask=inside[:, None] & (offs_v < DV)[None, :], other=0.0)
            aw_t = (a_t * w[None, :]).to(x.dtype)  # [BK, BT]
            acc = _dot(aw_t, x, acc, IEEE)
        o_ptrs, o_mask = _state_ptrs(OUT, pid.to(tl.int64) * DK * DV, offs_k, offs_v, DK, DV)
        tl.store(o_ptrs, acc, mask=o_mask)

    @_jit
    def _state_scan_kernel(X, G, DOC, OUT, COEF, S, SEG, NSEG, H, BH, N,
                           HAS_DECAY: tl.constexpr, HAS_DOCS: tl.constexpr,
                           REVERSE: tl.constexpr, BLOCK: tl.constexpr):
        """Grid ``(BH, cdiv(N, BLOCK))``: the segment sums ``X [NSEG, BH, N]`` (``N = DK*DV``,
        float32, from :func:`_state_sum_kernel`) chained through the segments, ``a_s`` being
        :func:`_segment_decay` of segment ``s``:

        - forward: ``OUT[s]`` = the state entering segment ``s`` from a zero initial state
          (``OUT[0] = 0``, ``OUT[NSEG]`` = the final state), ``COEF[s, h] = prod_{s' < s} a_s'``,
          the factor of the initial state in it;
        - REVERSE: ``OUT[s]`` = the gradient of the state entering segment ``s`` with a zero
          final-state gradient (``OUT[NSEG] = 0``), ``COEF[s, h] = prod_{s' >= s} a_s'``, the
          factor of the final-state gradient in it.

        ``COEF`` is written by the programs of batch row 0, block 0."""
        bh, blk = tl.program_id(0), tl.program_id(1)
        h = bh % H
        g = _load_g(G, h, HAS_DECAY)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        write_coef = (bh < H) & (blk == 0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        coef = 1.0
        # the zero start: before segment 0 (forward) or after the last segment (REVERSE)
        start = NSEG if REVERSE else 0
        tl.store(OUT + (start * BH + bh).to(tl.int64) * N + offs, acc, mask=mask)
        if write_coef:
            tl.store(COEF + start * H + h, coef)
        for i in range(NSEG):
            s = NSEG - 1 - i if REVERSE else i
            a = _segment_decay(g, DOC, s * SEG, S, SEG, HAS_DECAY, HAS_DOCS)
            x = tl.load(X + (s * BH + bh).to(tl.int64) * N + offs, mask=mask, other=0.0)
            acc = a * acc + x  # through segment s: entering s + 1 (forward) or entering s
            coef = coef * a
            at = s if REVERSE else s + 1
            tl.store(OUT + (at * BH + bh).to(tl.int64) * N + offs, acc, mask=mask)
            if write_coef:
                tl.store(COEF + at * H + h, coef)

    @_jit
    def _weighted_sum_kernel(W, X, OUT, P, H, BH, N, sw_r, sw_p, sw_h, BLOCK: tl.constexpr):
        """Grid ``(R, BH, cdiv(N, BLOCK))``: ``OUT[r, bh] = sum_j W[r, j, h] X[j, bh]`` over the
        ``P`` states ``X [P, BH, N]`` (float32; ``W`` strided)."""
        r, bh, blk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        h = bh % H
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(P):
            w = tl.load(W + r * sw_r + j * sw_p + h * sw_h)
            acc += w * tl.load(X + (j * BH + bh).to(tl.int64) * N + offs, mask=mask, other=0.0)
        tl.store(OUT + (r * BH + bh).to(tl.int64) * N + offs, acc, mask=mask)

    @_jit
    def _out_fwd_kernel(Q, K, V, G, DOC, HBUF, O, scale, S, H, GQ, NT,
                        DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_DOCS: tl.constexpr,
                        IEEE: tl.constexpr):
        """Grid ``(NT, cdiv(DV, BV), B*H)``: one ``[BT, BV]`` output tile."""
        c, i_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        hk = h // GQ
        t0 = c * BT
        offs_t = t0 + tl.arange(0, BT)
        offs_v = i_v * BV + tl.arange(0, BV)
        g = _load_g(G, h, HAS_DECAY)
        scores = tl.zeros([BT, BT], dtype=tl.float32)  # q k^T
        acc = tl.zeros([BT, BV], dtype=tl.float32)  # q h_c
        for i_k in range(tl.cdiv(DK, BK)):
            offs_k = i_k * BK + tl.arange(0, BK)
            q = _load_tile(Q, b, offs_t, h, offs_k, S, H, DK)
            k = _load_tile(K, b, offs_t, hk, offs_k, S, H // GQ, DK)
            scores = _dot(q, tl.trans(k), scores, IEEE)
            hb = _load_state(HBUF, (bh.to(tl.int64) * NT + c) * DK * DV, offs_k, offs_v, DK, DV)
            acc = _dot(q, hb, acc, IEEE)
        row, _, _, d = _chunk_weights(g, DOC, t0, S, BT, HAS_DECAY, HAS_DOCS)
        m = _intra_mask(g, d, BT, HAS_DECAY, HAS_DOCS)
        v = _load_tile(V, b, offs_t, hk, offs_v, S, H // GQ, DV)
        acc = _dot((scores * m).to(v.dtype), v, acc * row[:, None], IEEE)
        o_ptrs, o_mask = _rows(O, b, offs_t, h, offs_v, S, H, DV)
        tl.store(o_ptrs, (acc * scale).to(O.dtype.element_ty), mask=o_mask)

    # --------------------------------------------------------------------------------- backward
    @_jit
    def _state_bwd_kernel(Q, DO, G, DOC, DHT, DHBUF, DH0, BASE, COEF, scale, S, H, NT, SEG_NT,
                          BH, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr,
                          HAS_DOCS: tl.constexpr, HAS_DHT: tl.constexpr, FROM_BASE: tl.constexpr,
                          IEEE: tl.constexpr):
        """Grid ``(cdiv(DK, BK), cdiv(DV, BV), segments * B*H)``, chunks in reverse:
        ``DHBUF[bh, c]`` = dL/d(state after chunk c), ``DH0[bh]`` = dL/d(initial state)
        (float32).

        A program walks the ``SEG_NT`` chunks of its segment ``seg`` backwards, starting from
        ``DHT[bh]`` (the final-state gradient; one segment; zeros without HAS_DHT) or, with
        FROM_BASE, from ``BASE[seg + 1, bh] + COEF[seg + 1, h] * DHT[bh]`` (the reverse
        :func:`_state_scan_kernel`'s gradients, float32)."""
        i_k, i_v, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seg, bh = pid // BH, pid % BH
        b, h = bh // H, bh % H
        offs_k = i_k * BK + tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        g = _load_g(G, h, HAS_DECAY)
        dh = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_DHT:
            dh = _load_state(DHT, bh.to(tl.int64) * DK * DV, offs_k, offs_v, DK, DV)
            dh = dh.to(tl.float32)
        if FROM_BASE:
            dh = (_load_state(BASE, ((seg + 1) * BH + bh).to(tl.int64) * DK * DV, offs_k, offs_v,
                              DK, DV)
                  + tl.load(COEF + (seg + 1) * H + h) * dh)
        c_end = tl.minimum(seg * SEG_NT + SEG_NT, NT)
        for cc in range(seg * SEG_NT, c_end):
            c = c_end - 1 - (cc - seg * SEG_NT)
            t0 = c * BT
            db_ptrs, db_mask = _state_ptrs(DHBUF, (bh.to(tl.int64) * NT + c) * DK * DV,
                                           offs_k, offs_v, DK, DV)
            tl.store(db_ptrs, dh.to(DHBUF.dtype.element_ty), mask=db_mask)
            row, _, total, _ = _chunk_weights(g, DOC, t0, S, BT, HAS_DECAY, HAS_DOCS)
            offs_t = t0 + tl.arange(0, BT)
            q = _load_tile(Q, b, offs_t, h, offs_k, S, H, DK)
            do = _load_tile(DO, b, offs_t, h, offs_v, S, H, DV)
            qw = (q * (row * scale)[:, None]).to(do.dtype)  # [BT, BK]: scale q_i lambda^(i+1)
            dh = _dot(tl.trans(qw), do, dh * total, IEEE)
        if seg == 0:
            h0_ptrs, h0_mask = _state_ptrs(DH0, bh.to(tl.int64) * DK * DV, offs_k, offs_v, DK, DV)
            tl.store(h0_ptrs, dh, mask=h0_mask)

    @_jit
    def _dqk_bwd_kernel(Q, K, V, DO, G, DOC, HBUF, DHBUF, DQ, DKH, scale, S, H, GQ, NT,
                        DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_DOCS: tl.constexpr,
                        IEEE: tl.constexpr):
        """Grid ``(NT, cdiv(DK, BK), B*H)``: ``[BT, BK]`` tiles of dq and of dk per query head."""
        c, i_k, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        hk = h // GQ
        t0 = c * BT
        offs_t = t0 + tl.arange(0, BT)
        offs_k = i_k * BK + tl.arange(0, BK)
        g = _load_g(G, h, HAS_DECAY)
        dov = tl.zeros([BT, BT], dtype=tl.float32)  # do v^T
        do_h = tl.zeros([BT, BK], dtype=tl.float32)  # do h_c^T (state before the chunk)
        v_dh = tl.zeros([BT, BK], dtype=tl.float32)  # v dh_c^T (grad of the state after it)
        state_base = (bh.to(tl.int64) * NT + c) * DK * DV
        for i_v in range(tl.cdiv(DV, BV)):
            offs_v = i_v * BV + tl.arange(0, BV)
            do = _load_tile(DO, b, offs_t, h, offs_v, S, H, DV)
            v = _load_tile(V, b, offs_t, hk, offs_v, S, H // GQ, DV)
            dov = _dot(do, tl.trans(v), dov, IEEE)
            hb = _load_state(HBUF, state_base, offs_k, offs_v, DK, DV)
            do_h = _dot(do, tl.trans(hb), do_h, IEEE)
            dhb = _load_state(DHBUF, state_base, offs_k, offs_v, DK, DV)
            v_dh = _dot(v, tl.trans(dhb), v_dh, IEEE)
        row, col, _, d = _chunk_weights(g, DOC, t0, S, BT, HAS_DECAY, HAS_DOCS)
        m = _intra_mask(g, d, BT, HAS_DECAY, HAS_DOCS)
        q = _load_tile(Q, b, offs_t, h, offs_k, S, H, DK)
        k = _load_tile(K, b, offs_t, hk, offs_k, S, H // GQ, DK)
        ds = dov * m  # [BT(i), BT(j)]
        dq = _dot(ds.to(k.dtype), k, do_h * row[:, None], IEEE) * scale
        dk = _dot(tl.trans(ds).to(q.dtype), q, tl.zeros([BT, BK], dtype=tl.float32), IEEE)
        dk = dk * scale + v_dh * col[:, None]
        dq_ptrs, dq_mask = _rows(DQ, b, offs_t, h, offs_k, S, H, DK)
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=dq_mask)
        dk_ptrs, dk_mask = _rows(DKH, b, offs_t, h, offs_k, S, H, DK)
        tl.store(dk_ptrs, dk.to(DKH.dtype.element_ty), mask=dk_mask)

    @_jit
    def _dv_bwd_kernel(Q, K, DO, G, DOC, DHBUF, DVH, scale, S, H, GQ, NT,
                       DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_DOCS: tl.constexpr,
                       IEEE: tl.constexpr):
        """Grid ``(NT, cdiv(DV, BV), B*H)``: ``[BT, BV]`` tiles of dv per query head."""
        c, i_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        hk = h // GQ
        t0 = c * BT
        offs_t = t0 + tl.arange(0, BT)
        offs_v = i_v * BV + tl.arange(0, BV)
        g = _load_g(G, h, HAS_DECAY)
        qk = tl.zeros([BT, BT], dtype=tl.float32)  # q k^T
        k_dh = tl.zeros([BT, BV], dtype=tl.float32)  # k dh_c (grad of the state after the chunk)
        state_base = (bh.to(tl.int64) * NT + c) * DK * DV
        for i_k in range(tl.cdiv(DK, BK)):
            offs_k = i_k * BK + tl.arange(0, BK)
            q = _load_tile(Q, b, offs_t, h, offs_k, S, H, DK)
            k = _load_tile(K, b, offs_t, hk, offs_k, S, H // GQ, DK)
            qk = _dot(q, tl.trans(k), qk, IEEE)
            dhb = _load_state(DHBUF, state_base, offs_k, offs_v, DK, DV)
            k_dh = _dot(k, dhb, k_dh, IEEE)
        _, col, _, d = _chunk_weights(g, DOC, t0, S, BT, HAS_DECAY, HAS_DOCS)
        m = _intra_mask(g, d, BT, HAS_DECAY, HAS_DOCS)
        do = _load_tile(DO, b, offs_t, h, offs_v, S, H, DV)
        s = qk * m
        dv = _dot(tl.trans(s).to(do.dtype), do, tl.zeros([BT, BV], dtype=tl.float32), IEEE)
        dv = dv * scale + k_dh * col[:, None]
        dv_ptrs, dv_mask = _rows(DVH, b, offs_t, h, offs_v, S, H, DV)
        tl.store(dv_ptrs, dv.to(DVH.dtype.element_ty), mask=dv_mask)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------
class LinearTriton:
    """Triton linear attention on the kernel contract (see the module docstring).

    Args:
        config: chunk and block sizes, warps (:class:`LinearTritonConfig`).

    Supported: CUDA tensors (or CPU tensors with ``TRITON_INTERPRET=1``) in float16, bfloat16 or
    float32; ``Dk``, ``Dv <= 256``.  :meth:`unsupported_reason` says why not, before calling.
    """

    name = "triton"

    def __init__(self, config: LinearTritonConfig = LinearTritonConfig()):
        self.config = config

    @staticmethod
    def unsupported_reason(q: Tensor, v: Tensor) -> str | None:
        """Why this kernel cannot run ``q``/``v`` (None when it can)."""
        if (reason := _unavailable_reason(q)) is not None:
            return reason
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return (
                f"dtype {q.dtype} is not supported by the Triton kernel (float16, bfloat16, "
                "float32); use kernel='reference' for float64"
            )
        for name, d in (("Dk", q.shape[-1]), ("Dv", v.shape[-1])):
            if d > MAX_HEAD_DIM:
                return (
                    f"head dim {name}={d} is over the Triton kernel's limit of {MAX_HEAD_DIM}; "
                    f"split the head (more heads of <= {MAX_HEAD_DIM}) or use kernel='reference'"
                )
        return None

    def _check(self, q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None) -> LinearShape:
        shape = check_linear_inputs(q, k, v)
        check_state(initial_state, shape, q.device)
        reason = self.unsupported_reason(q, v)
        if reason is not None:
            raise ValueError(reason)
        return shape

    def _meta(self, shape: LinearShape, args: LinearArgs, dtype: torch.dtype) -> dict:
        """Launch arguments shared by the kernels (the parallel kernels' tiles)."""
        blocks = self.config.blocks(shape.dk, shape.dv)
        return dict(
            DK=shape.dk, DV=shape.dv, BT=blocks.chunk, BK=blocks.k, BV=blocks.v,
            HAS_DECAY=args.log_decay is not None, HAS_DOCS=args.cu_seqlens is not None,
            IEEE=dtype == torch.float32,
            num_warps=self.config.num_warps, num_stages=self.config.num_stages,
        )

    def _state_meta(self, shape: LinearShape, meta: dict, chained: _Chained | None = None,
                    ) -> tuple[tuple[int, int, int], dict]:
        """Grid and launch arguments of the two sequential state kernels (a program per
        segment of ``chained``)."""
        blocks = self.config.blocks(shape.dk, shape.dv)
        segments = chained.segments.count if chained is not None else 1
        grid = (triton.cdiv(shape.dk, blocks.state_k), triton.cdiv(shape.dv, blocks.state_v),
                segments * shape.batch * shape.heads)
        return grid, {**meta, "BK": blocks.state_k, "BV": blocks.state_v,
                      "num_warps": self.config.state_num_warps,
                      "num_stages": self.config.state_num_stages}

    def _decay_and_docs(self, args: LinearArgs, shape: LinearShape, dummy: Tensor):
        g = args.log_decay.to(torch.float32).contiguous() if args.log_decay is not None else dummy
        docs = args.doc_ids(shape.seq, dummy.device)
        docs = docs.to(torch.int32).contiguous() if docs is not None else dummy
        return g, docs

    def _prepare(self, q: Tensor, k: Tensor, v: Tensor, args: LinearArgs, shape: LinearShape):
        """What every call starts with: contiguous ``q, k, v``, the launch arguments of the
        parallel kernels, the float32 decays and the int32 document ids."""
        q, k, v = (t.contiguous() for t in (q, k, v))
        g, docs = self._decay_and_docs(args, shape, q)
        return q, k, v, self._meta(shape, args, q.dtype), g, docs

    def _states(self, k: Tensor, v: Tensor, g: Tensor, docs: Tensor, h0: Tensor | None,
                shape: LinearShape, meta: dict, chained: _Chained | None = None,
                ) -> tuple[Tensor, Tensor]:
        """Run the state kernel: per-chunk states ``[B*H, NT, Dk, Dv]`` and the final state;
        segment by segment in parallel from ``chained`` (with ``h0`` as the initial state) when
        given, else one walk from ``h0``."""
        B, S, H, _, Dk, Dv = shape
        NT = triton.cdiv(S, meta["BT"])
        hbuf = torch.empty(B * H, NT, Dk, Dv, dtype=k.dtype, device=k.device)
        final = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=k.device)
        grid, state_meta = self._state_meta(shape, meta, chained)
        base, coef, seg_nt = _chain_args(chained, final, NT)
        _launch(
            _state_fwd_kernel, grid, k, v, g, docs, h0 if h0 is not None else final, hbuf, final,
            base, coef, S, H, shape.group, NT, seg_nt, B * H, HAS_H0=h0 is not None,
            FROM_BASE=chained is not None, **state_meta,
        )
        return hbuf, final

    def _chain(self, a: Tensor, b: Tensor, g: Tensor, docs: Tensor, args: LinearArgs,
               shape: LinearShape, meta: dict, *, forward: bool) -> _Chained:
        """The parallel state sums of context parallelism, segment by segment, chained by the
        scan kernel: forward (``a, b = k, v``) the state entering each segment and the final
        state from a zero initial state; backward (``a, b = q, dout``) the gradient of the state
        entering each segment from the outputs alone (``base[0]``: the call's entering state's).
        ``[segments + 1, B*H, Dk, Dv]`` float32 and the factors ``[segments + 1, H]`` of the
        initial state (final-state gradient) in them: the starts of the segment walks."""
        B, S, H, _, Dk, Dv = shape
        blocks = self.config.blocks(Dk, Dv)
        tiles = (triton.cdiv(Dk, blocks.sum_k), triton.cdiv(Dv, blocks.sum_v))
        segments = self._segments(S, meta["BT"], B * H * tiles[0] * tiles[1], a.device)
        n = segments.count
        partial = torch.empty(n, B * H, Dk, Dv, dtype=torch.float32, device=a.device)
        _launch(_state_sum_kernel, (*tiles, n * B * H), a, b, g, docs, partial,
                1.0 if forward else args.scale, S, H, shape.group if forward else 1, B * H,
                segments.tokens, FROM_END=forward, **{**meta, "BK": blocks.sum_k,
                                                     "BV": blocks.sum_v,
                                                     "num_stages": self.config.sum_num_stages})
        base = torch.empty(n + 1, B * H, Dk, Dv, dtype=torch.float32, device=a.device)
        coef = torch.empty(n + 1, H, dtype=torch.float32, device=a.device)
        block = min(1024, triton.next_power_of_2(Dk * Dv))
        _launch(_state_scan_kernel, (B * H, triton.cdiv(Dk * Dv, block)), partial, g, docs, base,
                coef, S, segments.tokens, n, H, B * H, Dk * Dv, HAS_DECAY=meta["HAS_DECAY"],
                HAS_DOCS=meta["HAS_DOCS"], REVERSE=not forward, BLOCK=block, num_warps=4)
        return _Chained(base, coef, segments)

    def _segments(self, seq: int, chunk: int, programs: int, device: torch.device) -> _Segments:
        """The segments of a call: ``config.segment`` tokens, or (None) the fewest that give
        every SM one program of the sums (``programs`` per segment; 2048 tokens off the GPU)."""
        whole = triton.cdiv(seq, chunk) * chunk
        if self.config.segment is not None:
            tokens = min(self.config.segment, whole)
        elif device.type != "cuda":
            tokens = min(2048, whole)
        else:
            count = max(1, _sm_count(device) // programs)
            tokens = triton.cdiv(triton.cdiv(seq, count), chunk) * chunk
        return _Segments(tokens, triton.cdiv(seq, tokens), tokens // chunk)

    def _output(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, docs: Tensor,
                h0: Tensor | None, args: LinearArgs, shape: LinearShape, meta: dict,
                chained: _Chained | None = None) -> tuple[Tensor, Tensor]:
        """The state kernel from ``h0`` (and ``chained``), then the output kernel: ``out`` and
        the final state."""
        B, S, H, _, _, Dv = shape
        out = torch.empty(B, S, H, Dv, dtype=q.dtype, device=q.device)
        hbuf, final = self._states(k, v, g, docs, h0, shape, meta, chained)
        NT = hbuf.shape[1]
        _launch(
            _out_fwd_kernel, (NT, triton.cdiv(Dv, meta["BV"]), B * H),
            q, k, v, g, docs, hbuf, out, args.scale, S, H, shape.group, NT, **meta,
        )
        return out, final

    def forward(self, q: Tensor, k: Tensor, v: Tensor, args: LinearArgs,
                initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``out [B, S, H, Dv]`` (q.dtype), ``final_state [B, H, Dk, Dv]`` (float32)."""
        shape = self._check(q, k, v, initial_state)
        h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
        if _empty(shape):
            return q.new_empty(*shape[:3], shape.dv), _empty_final(h0, shape, q.device)
        q, k, v, meta, g, docs = self._prepare(q, k, v, args, shape)
        return self._output(q, k, v, g, docs, h0, args, shape, meta)

    def forward_exchange(self, q: Tensor, k: Tensor, v: Tensor, args: LinearArgs,
                         initial_state: Tensor | None, exchange: StateExchange,
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Fused :func:`~longctx.kernels.linear.exchange.forward_with_exchange`: the final state
        from ``initial_state``, summed in parallel over segments of tokens and chained through
        them (:meth:`_chain`), then ``exchange(final)``, then the state kernel from
        ``initial_state + entering``, every segment walked in parallel from its chained start,
        and the one-device output kernel."""
        shape = self._check(q, k, v, initial_state)
        h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
        if _empty(shape):
            final = _empty_final(h0, shape, q.device)
            entering = _checked_state(resolve_state(exchange(final)), "entering state", shape,
                                      q.device)
            return q.new_empty(*shape[:3], shape.dv), final, entering
        q, k, v, meta, g, docs = self._prepare(q, k, v, args, shape)
        chained = self._chain(k, v, g, docs, args, shape, meta, forward=True)
        final = chained.base[-1].view(shape.state)  # from a zero initial state
        if h0 is not None:  # h0 reaches the end decayed by lambda^S, unless a document starts
            final = final + chained.coef[-1][:, None, None] * h0
        entering = _checked_state(resolve_state(exchange(final)), "entering state", shape,
                                  q.device)
        out, _ = self._output(q, k, v, g, docs, _plus(h0, entering), args, shape, meta, chained)
        return out, final, entering

    def backward(self, dout: Tensor, dfinal: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                 args: LinearArgs, initial_state: Tensor | None = None,
                 grad_dtype: torch.dtype | None = None,
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``dq [B, S, H, Dk]``, ``dk [B, S, H_kv, Dk]``, ``dv [B, S, H_kv, Dv]`` in
        ``grad_dtype`` (default float32; written by the kernels in that dtype, so a 16-bit
        ``grad_dtype`` saves the casts) and float32 ``dinitial [B, H, Dk, Dv]`` (None when
        ``initial_state`` is None)."""
        return self._backward(dout, q, k, v, args, initial_state, None, dfinal, None,
                              grad_dtype)

    def backward_exchange(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, args: LinearArgs,
                          initial_state: Tensor | None, entering: Tensor | None,
                          exchange: StateExchange, grad_dtype: torch.dtype | None = None,
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Fused :func:`~longctx.kernels.linear.exchange.backward_with_exchange`: the entering
        state's gradient through the outputs, summed in parallel over segments of tokens and
        chained through them (:meth:`_chain`), goes to ``exchange``, which may run while the
        chunk states are recomputed (from ``initial_state + entering``); the final-state
        gradient it returns then starts the backward state kernel, every segment walked in
        parallel from its chained start, and the dq/dk/dv kernels are the one-device ones."""
        return self._backward(dout, q, k, v, args, initial_state, entering, None, exchange,
                              grad_dtype)

    def _backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, args: LinearArgs,
                  initial_state: Tensor | None, entering: Tensor | None,
                  dfinal: Tensor | None, exchange: StateExchange | None,
                  grad_dtype: torch.dtype | None,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """:meth:`backward` (``dfinal`` given) and :meth:`backward_exchange` (``exchange``
        gives ``dfinal`` from the entering state's gradient)."""
        grad_dtype = grad_dtype or torch.float32
        shape = self._check(q, k, v, initial_state)
        entering = _checked_state(entering, "entering state", shape, q.device)
        B, S, H, Hkv, Dk, Dv = shape
        out_shape = (B, S, H, Dv)
        if tuple(dout.shape) != out_shape:
            raise ValueError(
                f"dout must be shaped like the output {list(out_shape)}, got {list(dout.shape)}"
            )
        f32 = dict(dtype=torch.float32, device=q.device)
        h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
        if _empty(shape):
            if exchange is not None:
                dfinal = resolve_state(exchange(torch.zeros(shape.state, **f32)))
            dfinal = _checked_state(dfinal, "dfinal", shape, q.device)
            dh0 = torch.zeros(shape.state, **f32)
            if dfinal is not None:  # nothing in between: the final state is the initial state
                dh0 = dfinal.to(torch.float32, copy=True)
            grads = (torch.zeros(t.shape, dtype=grad_dtype, device=q.device) for t in (q, k, v))
            return (*grads, dh0 if h0 is not None else None)
        q, k, v, meta, g, docs = self._prepare(q, k, v, args, shape)
        dout = dout.to(q.dtype).contiguous()
        chained = None
        if exchange is not None:
            chained = self._chain(q, dout, g, docs, args, shape, meta, forward=False)
            # a pending exchange runs while the chunk states are recomputed
            pending = exchange(chained.base[0].view(shape.state))
        hbuf, _ = self._states(k, v, g, docs, _plus(h0, entering), shape, meta)  # recomputed
        if exchange is not None:
            dfinal = resolve_state(pending)
        dfinal = _checked_state(dfinal, "dfinal", shape, q.device)
        dht = dfinal.to(torch.float32).contiguous() if dfinal is not None else None
        NT = hbuf.shape[1]
        dhbuf = torch.empty(B * H, NT, Dk, Dv, dtype=k.dtype, device=k.device)
        dh0 = torch.empty(shape.state, **f32)  # through the outputs and the final state
        grid, state_meta = self._state_meta(shape, meta, chained)
        base, coef, seg_nt = _chain_args(chained, dh0, NT)
        _launch(
            _state_bwd_kernel, grid, q, dout, g, docs, dht if dht is not None else dh0, dhbuf,
            dh0, base, coef, args.scale, S, H, NT, seg_nt, B * H, HAS_DHT=dht is not None,
            FROM_BASE=chained is not None, **state_meta,
        )
        # dk/dv per query head, summed over GQA groups below (in float32 when there are groups)
        per_head = grad_dtype if shape.group == 1 else torch.float32
        dq = torch.empty(B, S, H, Dk, dtype=grad_dtype, device=q.device)
        dk = torch.empty(B, S, H, Dk, dtype=per_head, device=q.device)
        dv = torch.empty(B, S, H, Dv, dtype=per_head, device=q.device)
        dq_bk = self.config.blocks(Dk, Dv).dq_k
        _launch(
            _dqk_bwd_kernel, (NT, triton.cdiv(Dk, dq_bk), B * H),
            q, k, v, dout, g, docs, hbuf, dhbuf, dq, dk, args.scale, S, H, shape.group, NT,
            **{**meta, "BK": dq_bk},
        )
        _launch(
            _dv_bwd_kernel, (NT, triton.cdiv(Dv, meta["BV"]), B * H),
            q, k, dout, g, docs, dhbuf, dv, args.scale, S, H, shape.group, NT, **meta,
        )
        dk, dv = (sum_kv_groups(x, Hkv, grad_dtype) for x in (dk, dv))  # -> [B, S, Hkv, D]
        return dq, dk, dv, dh0 if h0 is not None else None


class _Segments(NamedTuple):
    """How a call is cut for the parallel state sums and the segment walks."""

    tokens: int  # per segment, a multiple of the chunk
    count: int
    chunks: int  # per segment


class _Chained(NamedTuple):
    """:meth:`LinearTriton._chain`'s segment starts."""

    base: Tensor  # [count + 1, B*H, Dk, Dv] float32
    coef: Tensor  # [count + 1, H] float32
    segments: _Segments


def _chain_args(chained: _Chained | None, dummy: Tensor, chunks: int) -> tuple:
    """``BASE, COEF, SEG_NT`` of the state kernels: one segment of all ``chunks`` without
    ``chained`` (the pointers then unused)."""
    if chained is None:
        return dummy, dummy, chunks
    return chained.base, chained.coef, chained.segments.chunks


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _empty(shape: LinearShape) -> bool:
    """A call with no tokens or no heads: the kernels have nothing to run."""
    return shape.seq == 0 or shape.batch * shape.heads == 0


def _empty_final(h0: Tensor | None, shape: LinearShape, device: torch.device) -> Tensor:
    """The final state of a call without tokens: the initial state (float32)."""
    if h0 is not None:
        return h0.clone()
    return torch.zeros(shape.state, dtype=torch.float32, device=device)


def _plus(h0: Tensor | None, entering: Tensor | None) -> Tensor | None:
    """``h0 + entering`` (float32, contiguous), either of which may be None."""
    if entering is None:
        return h0
    entering = entering.to(torch.float32).contiguous()
    return entering if h0 is None else h0 + entering


def _checked_state(state: Tensor | None, name: str, shape: LinearShape,
                   device: torch.device) -> Tensor | None:
    """``state`` as given, after :func:`check_state` (None passes)."""
    check_state(state, shape, device, name)
    return state


def weighted_state_sum(weights: Tensor, states: Tensor) -> Tensor:
    """``sum_j weights[..., j, h] * states[j, b, h]``: ``weights [..., P, H]`` and
    ``states [P, B, H, Dk, Dv]`` -> ``[..., B, H, Dk, Dv]`` (how context parallelism combines
    gathered states).  One Triton kernel for float32 CUDA tensors (and in the interpreter);
    elsewhere a torch product and sum, which are two kernels and write the ``[..., P, B, H, Dk,
    Dv]`` product.

    Example::

        >>> import torch
        >>> w, x = torch.rand(2, 3, 4), torch.randn(3, 1, 4, 8, 8)
        >>> weighted_state_sum(w, x).shape
        torch.Size([2, 1, 4, 8, 8])
    """
    P, B, H, Dk, Dv = states.shape
    if tuple(weights.shape[-2:]) != (P, H):
        raise ValueError(f"weights must end in [P, H] = [{P}, {H}] to combine states "
                         f"{list(states.shape)}, got {list(weights.shape)}")
    if triton is None or states.dtype != torch.float32 or not (states.is_cuda or _interpreting()):
        return (weights[..., None, :, None, None] * states).sum(-5)  # [..., P, B, H, Dk, Dv]
    lead = weights.shape[:-2]
    w = weights.to(states.dtype).reshape(-1, P, H)  # [R, P, H]
    x = states.contiguous()
    out = torch.empty(w.shape[0], B, H, Dk, Dv, dtype=states.dtype, device=states.device)
    n = Dk * Dv
    block = min(2048, triton.next_power_of_2(n))
    _launch(_weighted_sum_kernel, (w.shape[0], B * H, triton.cdiv(n, block)), w, x, out, P, H,
            B * H, n, *w.stride(), BLOCK=block, num_warps=4)
    return out.view(*lead, B, H, Dk, Dv)


def linear_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, *, log_decay: Tensor | None = None,
    scale: float | None = None, initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None, return_final_state: bool = False,
    config: LinearTritonConfig = LinearTritonConfig(),
):
    """Causal linear attention with per-head decay on the Triton kernel, differentiable.

    Same arguments and result as
    :func:`~longctx.kernels.linear.reference.linear_attention_reference`; the final state is
    float32.
    """
    args = LinearArgs.build(q, k, v, log_decay=log_decay, scale=scale, cu_seqlens=cu_seqlens)
    out, final = LinearKernelFunction.apply(q, k, v, initial_state, LinearTriton(config), args)
    return (out, final) if return_final_state else out


register_linear_kernel("triton", LinearTriton)
