"""Triton causal linear attention with per-head decay (Lightning Attention-2 style), fwd + bwd.

Implements :class:`~longctx.kernels.linear_reference.LinearAttentionKernel` (same math, layout,
decay, states and documents as :mod:`longctx.kernels.linear_reference`)::

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

Runs on CUDA GPUs and, for tests, on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
read at each launch).  Inputs float16 / bfloat16 / float32 (float32 uses full-precision IEEE dots);
``Dk`` and ``Dv`` up to 256.

Example::

    >>> import torch
    >>> from longctx.kernels.linear_triton import linear_attention_triton
    >>> from longctx.kernels.linear_reference import retnet_log_decay
    >>> q = torch.randn(1, 8192, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    >>> k = torch.randn(1, 8192, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    >>> v = torch.randn(1, 8192, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    >>> out, state = linear_attention_triton(q, k, v, log_decay=retnet_log_decay(16, "cuda"),
    ...                                      return_final_state=True)
    >>> (out.float().square().sum() + state.sum()).backward()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .base import sum_kv_groups
from .linear_reference import (
    LinearArgs,
    LinearKernelFunction,
    LinearShape,
    check_linear_inputs,
    check_state,
)

from ._triton_runtime import unavailable_reason as _unavailable_reason
from ._triton_runtime import jit as _jit
from ._triton_runtime import launch as _launch
from ._triton_runtime import tl, triton

__all__ = [
    "MAX_HEAD_DIM",
    "LinearTritonConfig",
    "LinearBlocks",
    "LinearTriton",
    "linear_attention_triton",
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
            tiles put more of the GPU to work on short-batch, few-head shapes.
        num_warps, num_stages: as in ``triton.Config``; ``state_num_warps`` and
            ``state_num_stages`` for the two sequential kernels.

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
    state_block_v: int = 32
    num_warps: int = 8
    state_num_warps: int = 8
    num_stages: int = 3
    state_num_stages: int = 4

    def __post_init__(self) -> None:
        for name in ("chunk", "block_k", "block_v", "dq_block_k", "state_block_k",
                     "state_block_v"):
            _pow2_at_least_16(name, getattr(self, name))
        for name in ("num_warps", "state_num_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(
                    f"LinearTritonConfig.{name} must be 1, 2, 4, 8 or 16, got {getattr(self, name)}"
                )
        for name in ("num_stages", "state_num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"LinearTritonConfig.{name} must be >= 1, got {getattr(self, name)}"
                )

    def blocks(self, dk: int, dv: int) -> LinearBlocks:
        """The tiles for head dims ``dk``, ``dv`` (never over the padded head dim)."""
        def pad(d: int) -> int:
            return max(16, triton.next_power_of_2(d))

        return LinearBlocks(
            chunk=self.chunk, k=min(self.block_k, pad(dk)), v=min(self.block_v, pad(dv)),
            dq_k=min(self.dq_block_k, pad(dk)), state_k=min(self.state_block_k, pad(dk)),
            state_v=min(self.state_block_v, pad(dv)),
        )


class LinearBlocks(NamedTuple):
    """Tile sizes of one call (:meth:`LinearTritonConfig.blocks`)."""

    chunk: int
    k: int
    v: int
    dq_k: int
    state_k: int
    state_v: int


# --------------------------------------------------------------------------------------------------
# running the same kernels compiled (GPU) or interpreted (CPU tensors, tests)
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
# Tensors: q/k [B, S, heads, DK], v/o [B, S, heads, DV], contiguous; per-chunk state buffers
# [B*H, NT, DK, DV]; states [B, H, DK, DV] float32.  ``bh`` is batch * H + query head.
if triton is not None:

    @_jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        """``acc + a @ b`` in float32 (full-precision products for float32 inputs)."""
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

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
            carry = tl.load(DOC + tl.maximum(t0 - 1, 0))
            carry = tl.where(t0 > 0, carry, 0)  # the initial state belongs to document 0
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
    def _state_fwd_kernel(K, V, G, DOC, H0, HBUF, HT, S, H, GQ, NT,
                          DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_DOCS: tl.constexpr,
                          HAS_H0: tl.constexpr, IEEE: tl.constexpr):
        """Grid ``(cdiv(DK, BK), cdiv(DV, BV), B*H)``: ``HBUF[bh, c]`` = state before chunk c,
        ``HT[bh]`` = state after the last token (float32)."""
        i_k, i_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        hk = h // GQ
        offs_k = i_k * BK + tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        g = _load_g(G, h, HAS_DECAY)
        state = tl.zeros([BK, BV], dtype=tl.float32)
        s_ptrs, s_mask = _state_ptrs(H0, bh.to(tl.int64) * DK * DV, offs_k, offs_v, DK, DV)
        if HAS_H0:
            state = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)
        for c in range(NT):
            t0 = c * BT
            hb_ptrs, hb_mask = _state_ptrs(HBUF, (bh.to(tl.int64) * NT + c) * DK * DV,
                                           offs_k, offs_v, DK, DV)
            tl.store(hb_ptrs, state.to(HBUF.dtype.element_ty), mask=hb_mask)
            _, col, total, _ = _chunk_weights(g, DOC, t0, S, BT, HAS_DECAY, HAS_DOCS)
            offs_t = t0 + tl.arange(0, BT)
            k_ptrs, k_mask = _rows(K, b, offs_t, hk, offs_k, S, H // GQ, DK)
            v_ptrs, v_mask = _rows(V, b, offs_t, hk, offs_v, S, H // GQ, DV)
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
            kw = (k * col[:, None]).to(v.dtype)  # [BT, BK]: k_j * lambda^(L-1-j)
            state = _dot(tl.trans(kw), v, state * total, IEEE)
        ht_ptrs, ht_mask = _state_ptrs(HT, bh.to(tl.int64) * DK * DV, offs_k, offs_v, DK, DV)
        tl.store(ht_ptrs, state, mask=ht_mask)

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
        scores = tl.zeros([BT, BT], dtype=tl.float32)  # q k^T
        acc = tl.zeros([BT, BV], dtype=tl.float32)  # q h_c
        for i_k in range(tl.cdiv(DK, BK)):
            offs_k = i_k * BK + tl.arange(0, BK)
            q_ptrs, q_mask = _rows(Q, b, offs_t, h, offs_k, S, H, DK)
            k_ptrs, k_mask = _rows(K, b, offs_t, hk, offs_k, S, H // GQ, DK)
            q = tl.load(q_ptrs, mask=q_mask, other=0.0)
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)
            scores = _dot(q, tl.trans(k), scores, IEEE)
            hb_ptrs, hb_mask = _state_ptrs(HBUF, (bh.to(tl.int64) * NT + c) * DK * DV,
                                           offs_k, offs_v, DK, DV)
            acc = _dot(q, tl.load(hb_ptrs, mask=hb_mask, other=0.0), acc, IEEE)
        g = _load_g(G, h, HAS_DECAY)
        row, _, _, d = _chunk_weights(g, DOC, t0, S, BT, HAS_DECAY, HAS_DOCS)
        m = _intra_mask(g, d, BT, HAS_DECAY, HAS_DOCS)
        v_ptrs, v_mask = _rows(V, b, offs_t, hk, offs_v, S, H // GQ, DV)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        acc = _dot((scores * m).to(v.dtype), v, acc * row[:, None], IEEE)
        o_ptrs, o_mask = _rows(O, b, offs_t, h, offs_v, S, H, DV)
        tl.store(o_ptrs, (acc * scale).to(O.dtype.element_ty), mask=o_mask)

    # --------------------------------------------------------------------------------- backward
    @_jit
    def _state_bwd_kernel(Q, DO, G, DOC, DHT, DHBUF, DH0, scale, S, H, NT,
                          DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_DOCS: tl.constexpr,
                          HAS_DHT: tl.constexpr, IEEE: tl.constexpr):
        """Grid ``(cdiv(DK, BK), cdiv(DV, BV), B*H)``, chunks in reverse: ``DHBUF[bh, c]`` =
        dL/d(state after chunk c), ``DH0[bh]`` = dL/d(initial state) (float32)."""
        i_k, i_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        offs_k = i_k * BK + tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        g = _load_g(G, h, HAS_DECAY)
        dh = tl.zeros([BK, BV], dtype=tl.float32)
        s_ptrs, s_mask = _state_ptrs(DHT, bh.to(tl.int64) * DK * DV, offs_k, offs_v, DK, DV)
        if HAS_DHT:
            dh = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)
        for cc in range(NT):
            c = NT - 1 - cc
            t0 = c * BT
            db_ptrs, db_mask = _state_ptrs(DHBUF, (bh.to(tl.int64) * NT + c) * DK * DV,
                                           offs_k, offs_v, DK, DV)
            tl.store(db_ptrs, dh.to(DHBUF.dtype.element_ty), mask=db_mask)
            row, _, total, _ = _chunk_weights(g, DOC, t0, S, BT, HAS_DECAY, HAS_DOCS)
            offs_t = t0 + tl.arange(0, BT)
            q_ptrs, q_mask = _rows(Q, b, offs_t, h, offs_k, S, H, DK)
            do_ptrs, do_mask = _rows(DO, b, offs_t, h, offs_v, S, H, DV)
            q = tl.load(q_ptrs, mask=q_mask, other=0.0)
            do = tl.load(do_ptrs, mask=do_mask, other=0.0)
            qw = (q * (row * scale)[:, None]).to(do.dtype)  # [BT, BK]: scale q_i lambda^(i+1)
            dh = _dot(tl.trans(qw), do, dh * total, IEEE)
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
        dov = tl.zeros([BT, BT], dtype=tl.float32)  # do v^T
        do_h = tl.zeros([BT, BK], dtype=tl.float32)  # do h_c^T (state before the chunk)
        v_dh = tl.zeros([BT, BK], dtype=tl.float32)  # v dh_c^T (grad of the state after it)
        state_base = (bh.to(tl.int64) * NT + c) * DK * DV
        for i_v in range(tl.cdiv(DV, BV)):
            offs_v = i_v * BV + tl.arange(0, BV)
            do_ptrs, do_mask = _rows(DO, b, offs_t, h, offs_v, S, H, DV)
            v_ptrs, v_mask = _rows(V, b, offs_t, hk, offs_v, S, H // GQ, DV)
            do = tl.load(do_ptrs, mask=do_mask, other=0.0)
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
            dov = _dot(do, tl.trans(v), dov, IEEE)
            s_ptrs, s_mask = _state_ptrs(HBUF, state_base, offs_k, offs_v, DK, DV)
            do_h = _dot(do, tl.trans(tl.load(s_ptrs, mask=s_mask, other=0.0)), do_h, IEEE)
            s_ptrs, s_mask = _state_ptrs(DHBUF, state_base, offs_k, offs_v, DK, DV)
            v_dh = _dot(v, tl.trans(tl.load(s_ptrs, mask=s_mask, other=0.0)), v_dh, IEEE)
        g = _load_g(G, h, HAS_DECAY)
        row, col, _, d = _chunk_weights(g, DOC, t0, S, BT, HAS_DECAY, HAS_DOCS)
        m = _intra_mask(g, d, BT, HAS_DECAY, HAS_DOCS)
        q_ptrs, q_mask = _rows(Q, b, offs_t, h, offs_k, S, H, DK)
        k_ptrs, k_mask = _rows(K, b, offs_t, hk, offs_k, S, H // GQ, DK)
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)
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
        qk = tl.zeros([BT, BT], dtype=tl.float32)  # q k^T
        k_dh = tl.zeros([BT, BV], dtype=tl.float32)  # k dh_c (grad of the state after the chunk)
        state_base = (bh.to(tl.int64) * NT + c) * DK * DV
        for i_k in range(tl.cdiv(DK, BK)):
            offs_k = i_k * BK + tl.arange(0, BK)
            q_ptrs, q_mask = _rows(Q, b, offs_t, h, offs_k, S, H, DK)
            k_ptrs, k_mask = _rows(K, b, offs_t, hk, offs_k, S, H // GQ, DK)
            q = tl.load(q_ptrs, mask=q_mask, other=0.0)
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)
            qk = _dot(q, tl.trans(k), qk, IEEE)
            s_ptrs, s_mask = _state_ptrs(DHBUF, state_base, offs_k, offs_v, DK, DV)
            k_dh = _dot(k, tl.load(s_ptrs, mask=s_mask, other=0.0), k_dh, IEEE)
        g = _load_g(G, h, HAS_DECAY)
        _, col, _, d = _chunk_weights(g, DOC, t0, S, BT, HAS_DECAY, HAS_DOCS)
        m = _intra_mask(g, d, BT, HAS_DECAY, HAS_DOCS)
        do_ptrs, do_mask = _rows(DO, b, offs_t, h, offs_v, S, H, DV)
        do = tl.load(do_ptrs, mask=do_mask, other=0.0)
        s = qk * m
        dv = _dot(tl.trans(s).to(do.dtype), do, tl.zeros([BT, BV], dtype=tl.float32), IEEE)
        dv = dv * scale + k_dh * col[:, None]
        dv_ptrs, dv_mask = _rows(DVH, b, offs_t, h, offs_v, S, H, DV)
        tl.store(dv_ptrs, dv.to(DVH.dtype.element_ty), mask=dv_mask)

    # ------------------------------------------------------------- an entering state (CP only)
    @_jit
    def _state_apply_kernel(X, ST, W, Y, T, N, H, stride_si, stride_sj,
                            DI: tl.constexpr, DO: tl.constexpr, BT: tl.constexpr,
                            BI: tl.constexpr, BO: tl.constexpr, IEEE: tl.constexpr):
        """Grid ``(cdiv(T, BT), cdiv(DO, BO), B*H)``, in place for tokens ``t < T``:
        ``Y[b, t, h] += W[t, h] * X[b, t, h] @ ST[bh]`` with ``X [B, N, H, DI]``,
        ``Y [B, N, H, DO]``, ``W [T, H]`` float32 and the float32 ``[DI, DO]`` matrix of head
        ``bh`` at ``ST + bh * DI * DO + i * stride_si + j * stride_sj`` (strides give the
        transpose for dq)."""
        c, i_o, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        offs_t = c * BT + tl.arange(0, BT)
        offs_i = tl.arange(0, BI)
        offs_o = i_o * BO + tl.arange(0, BO)
        x_ptrs, x_mask = _rows(X, b, offs_t, h, offs_i, N, H, DI)
        x = tl.load(x_ptrs, mask=x_mask & (offs_t < T)[:, None], other=0.0)
        s_ptrs = (ST + bh.to(tl.int64) * DI * DO + offs_i[:, None] * stride_si
                  + offs_o[None, :] * stride_sj)
        st = tl.load(s_ptrs, mask=(offs_i < DI)[:, None] & (offs_o < DO)[None, :], other=0.0)
        if IEEE:  # float32 / float16 inputs: the product in float32
            x = x.to(tl.float32)
        else:
            st = st.to(x.dtype)
        acc = _dot(x, st, tl.zeros([BT, BO], dtype=tl.float32), IEEE)
        w = tl.load(W + offs_t * H + h, mask=offs_t < T, other=0.0)
        y_ptrs, y_mask = _rows(Y, b, offs_t, h, offs_o, N, H, DO)
        y_mask = y_mask & (offs_t < T)[:, None]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc * w[:, None]).to(Y.dtype.element_ty), mask=y_mask)

    @_jit
    def _state_grad_kernel(Q, DOUT, W, PART, T, N, H, TPS,
                           DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
        """Grid ``(splits, cdiv(DV, BV), B*H)``: ``PART[split, bh] = sum_t (W[t, h] q_t)^T do_t``
        (``[DK, DV]`` float32) over the split's tokens ``[split * TPS, (split + 1) * TPS)``,
        ``t < T``; the host sums the splits (deterministic, no atomics)."""
        sp, i_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        offs_k = tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        acc = tl.zeros([BK, BV], dtype=tl.float32)
        for t0 in range(sp * TPS, tl.minimum((sp + 1) * TPS, T), BT):
            offs_t = t0 + tl.arange(0, BT)
            valid = (offs_t < T)[:, None]
            q_ptrs, q_mask = _rows(Q, b, offs_t, h, offs_k, N, H, DK)
            do_ptrs, do_mask = _rows(DOUT, b, offs_t, h, offs_v, N, H, DV)
            q = tl.load(q_ptrs, mask=q_mask & valid, other=0.0)
            do = tl.load(do_ptrs, mask=do_mask & valid, other=0.0)
            w = tl.load(W + offs_t * H + h, mask=offs_t < T, other=0.0)
            qw = q.to(tl.float32) * w[:, None]  # [BT, BK]
            if IEEE:
                do = do.to(tl.float32)
            else:
                qw = qw.to(do.dtype)
            acc = _dot(tl.trans(qw), do, acc, IEEE)
        p_ptrs, p_mask = _state_ptrs(PART, (sp * tl.num_programs(2) + bh).to(tl.int64) * DK * DV,
                                     offs_k, offs_v, DK, DV)
        tl.store(p_ptrs, acc, mask=p_mask)


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
        """Launch arguments shared by the five kernels (the parallel kernels' tiles)."""
        blocks = self.config.blocks(shape.dk, shape.dv)
        return dict(
            DK=shape.dk, DV=shape.dv, BT=blocks.chunk, BK=blocks.k, BV=blocks.v,
            HAS_DECAY=args.log_decay is not None, HAS_DOCS=args.cu_seqlens is not None,
            IEEE=dtype == torch.float32,
            num_warps=self.config.num_warps, num_stages=self.config.num_stages,
        )

    def _state_meta(self, shape: LinearShape, meta: dict) -> tuple[tuple[int, int, int], dict]:
        """Grid and launch arguments of the two sequential state kernels."""
        blocks = self.config.blocks(shape.dk, shape.dv)
        grid = (triton.cdiv(shape.dk, blocks.state_k), triton.cdiv(shape.dv, blocks.state_v),
                shape.batch * shape.heads)
        return grid, {**meta, "BK": blocks.state_k, "BV": blocks.state_v,
                      "num_warps": self.config.state_num_warps,
                      "num_stages": self.config.state_num_stages}

    def _decay_and_docs(self, args: LinearArgs, shape: LinearShape, dummy: Tensor):
        g = args.log_decay.to(torch.float32).contiguous() if args.log_decay is not None else dummy
        docs = args.doc_ids(shape.seq, dummy.device)
        docs = docs.to(torch.int32).contiguous() if docs is not None else dummy
        return g, docs

    def _states(self, k: Tensor, v: Tensor, g: Tensor, docs: Tensor, h0: Tensor | None,
                shape: LinearShape, meta: dict) -> tuple[Tensor, Tensor]:
        """Run the state kernel: per-chunk states ``[B*H, NT, Dk, Dv]`` and the final state."""
        B, S, H, _, Dk, Dv = shape
        NT = triton.cdiv(S, meta["BT"])
        hbuf = torch.empty(B * H, NT, Dk, Dv, dtype=k.dtype, device=k.device)
        final = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=k.device)
        grid, state_meta = self._state_meta(shape, meta)
        _launch(
            _state_fwd_kernel, grid, k, v, g, docs, h0 if h0 is not None else final, hbuf, final,
            S, H, shape.group, NT, HAS_H0=h0 is not None, **state_meta,
        )
        return hbuf, final

    def forward(self, q: Tensor, k: Tensor, v: Tensor, args: LinearArgs,
                initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``out [B, S, H, Dv]`` (q.dtype), ``final_state [B, H, Dk, Dv]`` (float32)."""
        shape = self._check(q, k, v, initial_state)
        B, S, H, _, _, Dv = shape
        h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
        out = torch.empty(B, S, H, Dv, dtype=q.dtype, device=q.device)
        if S == 0 or B * H == 0:
            final = h0.clone() if h0 is not None else q.new_zeros(shape.state, dtype=torch.float32)
            return out, final
        q, k, v = (t.contiguous() for t in (q, k, v))
        meta = self._meta(shape, args, q.dtype)
        g, docs = self._decay_and_docs(args, shape, out)
        hbuf, final = self._states(k, v, g, docs, h0, shape, meta)
        NT = hbuf.shape[1]
        _launch(
            _out_fwd_kernel, (NT, triton.cdiv(Dv, meta["BV"]), B * H),
            q, k, v, g, docs, hbuf, out, args.scale, S, H, shape.group, NT, **meta,
        )
        return out, final

    def backward(self, dout: Tensor, dfinal: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                 args: LinearArgs, initial_state: Tensor | None = None,
                 grad_dtype: torch.dtype | None = None,
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``dq [B, S, H, Dk]``, ``dk [B, S, H_kv, Dk]``, ``dv [B, S, H_kv, Dv]`` in
        ``grad_dtype`` (default float32; written by the kernels in that dtype, so a 16-bit
        ``grad_dtype`` saves the casts) and float32 ``dinitial [B, H, Dk, Dv]`` (None when
        ``initial_state`` is None)."""
        grad_dtype = grad_dtype or torch.float32
        shape = self._check(q, k, v, initial_state)
        B, S, H, Hkv, Dk, Dv = shape
        out_shape = (B, S, H, Dv)
        if tuple(dout.shape) != out_shape:
            raise ValueError(
                f"dout must be shaped like the output {list(out_shape)}, got {list(dout.shape)}"
            )
        if dfinal is not None and tuple(dfinal.shape) != shape.state:
            raise ValueError(
                f"dfinal must be shaped like the state {list(shape.state)}, got "
                f"{list(dfinal.shape)}"
            )
        f32 = dict(dtype=torch.float32, device=q.device)
        h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
        if S == 0 or B * H == 0:
            dh0 = torch.zeros(shape.state, **f32)
            if dfinal is not None:  # nothing in between: the final state is the initial state
                dh0 = dfinal.to(torch.float32, copy=True)
            grads = (torch.zeros(t.shape, dtype=grad_dtype, device=q.device) for t in (q, k, v))
            return (*grads, dh0 if h0 is not None else None)
        q, k, v = (t.contiguous() for t in (q, k, v))
        dout = dout.to(q.dtype).contiguous()
        meta = self._meta(shape, args, q.dtype)
        g, docs = self._decay_and_docs(args, shape, dout)
        hbuf, _ = self._states(k, v, g, docs, h0, shape, meta)  # recomputed, not kept from forward
        NT = hbuf.shape[1]
        dhbuf = torch.empty_like(hbuf)
        dh0 = torch.empty(shape.state, **f32)
        dht = dfinal.to(torch.float32).contiguous() if dfinal is not None else dh0
        grid, state_meta = self._state_meta(shape, meta)
        _launch(
            _state_bwd_kernel, grid, q, dout, g, docs, dht, dhbuf, dh0, args.scale, S, H, NT,
            HAS_DHT=dfinal is not None, **state_meta,
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
        dk, dv = (sum_kv_groups(g, Hkv).to(grad_dtype) for g in (dk, dv))  # -> [B, S, Hkv, D]
        return dq, dk, dv, (dh0 if h0 is not None else None)

    # -- an entering state applied after the fact (context parallelism) -----------------------
    _STATE_BT = 64

    def apply_state(self, y: Tensor, x: Tensor, state: Tensor, weight: Tensor,
                    transpose: bool = False) -> Tensor:
        """In place, fused: :func:`~longctx.kernels.linear_reference.apply_state_reference`
        (``y [B, n, H, Do]`` contiguous, ``x [B, n, H, Di]``, ``state [B, H, Dk, Dv]``,
        ``weight [T, H]``)."""
        d_in, d_out = x.shape[-1], y.shape[-1]
        self._check_state_call(x, y, weight, in_place=True)
        want = (x.shape[0], x.shape[2], *((d_out, d_in) if transpose else (d_in, d_out)))
        if tuple(state.shape) != want:
            raise ValueError(f"state must be [B, H, Dk, Dv] = {list(want)}, got "
                             f"{list(state.shape)}")
        if weight.shape[0] == 0 or y.numel() == 0:
            return y
        # element (i, j) of the [Di, Do] matrix: state[i, j], or state[j, i] when transposed
        strides = (1, d_in) if transpose else (d_out, 1)
        self._launch_state_apply(x.contiguous(), state, weight, y, d_in, d_out, *strides)
        return y

    def state_grad(self, q: Tensor, dout: Tensor, weight: Tensor) -> Tensor:
        """Fused :func:`~longctx.kernels.linear_reference.state_grad_reference`:
        ``d_state [B, H, Dk, Dv]`` float32."""
        B, n, H, Dk = q.shape
        Dv = dout.shape[-1]
        T = weight.shape[0]
        self._check_state_call(q, dout, weight, in_place=False)
        d_state = torch.zeros(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
        if T == 0 or q.numel() == 0:
            return d_state
        q, dout = q.contiguous(), dout.to(q.dtype).contiguous()
        BT, BK, BV = self._STATE_BT, _pow2(Dk), min(64, _pow2(Dv))
        n_v = triton.cdiv(Dv, BV)
        sms = (torch.cuda.get_device_properties(q.device).multi_processor_count
               if q.device.type == "cuda" else 4)
        chunks = triton.cdiv(T, BT)
        splits = max(1, min(chunks, triton.cdiv(2 * sms, n_v * B * H)))
        tps = triton.cdiv(chunks, splits) * BT  # tokens per split, a multiple of BT
        splits = triton.cdiv(T, tps)
        part = torch.empty(splits, B * H, Dk, Dv, dtype=torch.float32, device=q.device)
        _launch(
            _state_grad_kernel, (splits, n_v, B * H), q, dout,
            weight.to(torch.float32).contiguous(), part, T, n, H, tps,
            DK=Dk, DV=Dv, BT=BT, BK=BK, BV=BV, IEEE=q.dtype != torch.bfloat16, num_warps=8,
        )
        return torch.sum(part, 0, out=d_state.view(B * H, Dk, Dv)).view(B, H, Dk, Dv)

    def _launch_state_apply(self, x: Tensor, state: Tensor, weight: Tensor, y: Tensor,
                            d_in: int, d_out: int, stride_i: int, stride_j: int) -> None:
        B, n, H, _ = x.shape
        T = weight.shape[0]
        BT, BO = self._STATE_BT, min(64, _pow2(d_out))
        _launch(
            _state_apply_kernel, (triton.cdiv(T, BT), triton.cdiv(d_out, BO), B * H),
            x, state.to(torch.float32).contiguous(), weight.to(torch.float32).contiguous(), y,
            T, n, H, stride_i, stride_j, DI=d_in, DO=d_out, BT=BT, BI=_pow2(d_in), BO=BO,
            IEEE=x.dtype != torch.bfloat16, num_warps=4,
        )

    def _check_state_call(self, x: Tensor, y: Tensor, weight: Tensor, *, in_place: bool) -> None:
        """``x [B, n, H, Di]`` and ``y [B, n, H, Do]`` (contiguous when updated in place; else
        any strides) and ``weight [T <= n, H]``."""
        reason = self.unsupported_reason(x, y)
        if reason is not None:
            raise ValueError(reason)
        _, n, H, _ = x.shape
        if y.shape[:3] != x.shape[:3] or (in_place and not y.is_contiguous()):
            raise ValueError(
                f"{'the tensor updated in place must be contiguous and ' if in_place else ''}"
                f"[B, n, H, D] with the leading sizes of {list(x.shape)}, got {list(y.shape)} "
                f"(contiguous: {y.is_contiguous()})"
            )
        if weight.dim() != 2 or weight.shape[0] > n or weight.shape[1] != H:
            raise ValueError(
                f"weight [T <= {n}, {H}] expected (scale * lambda^(t+1) for the first T tokens), "
                f"got {list(weight.shape)}"
            )


def _pow2(d: int) -> int:
    """Block size covering ``d`` columns (a power of two, at least 16 for ``tl.dot``)."""
    return max(16, triton.next_power_of_2(d))


def linear_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, *, log_decay: Tensor | None = None,
    scale: float | None = None, initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None, return_final_state: bool = False,
    config: LinearTritonConfig = LinearTritonConfig(),
):
    """Causal linear attention with per-head decay on the Triton kernel, differentiable.

    Same arguments and result as
    :func:`~longctx.kernels.linear_reference.linear_attention_reference`; the final state is
    float32.
    """
    args = LinearArgs.build(q, k, v, log_decay=log_decay, scale=scale, cu_seqlens=cu_seqlens)
    out, final = LinearKernelFunction.apply(q, k, v, initial_state, LinearTriton(config), args)
    return (out, final) if return_final_state else out
