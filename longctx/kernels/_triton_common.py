"""Pieces shared by the Triton attention kernels (dense :mod:`~longctx.kernels.triton_flash`,
block-sparse :mod:`~longctx.kernels.block_sparse_triton`; ``mm`` also by the linear kernels).

Jit helpers, inlined into the kernels that call them (compiled or in Triton's interpreter, see
:mod:`~longctx.kernels._triton_runtime`):

- ``mm``: ``acc + a @ b`` in float32;
- ``load_rows``: a ``[ROWS, HEAD_DIM]`` tile of one head through a TMA descriptor;
- ``allowed``: the element mask from global positions / document ids; ``key_tile_allowed``
  builds it for a key tile against a query tile's rows;
- ``load_lse2``: a tile's LSE in log2 units, with empty rows at ``+inf`` (every ``p`` exactly 0);
- ``store_fwd_rows``: the forward's epilogue (normalise, LSE in natural log, store).

Host side: :func:`tma_ready` / :func:`rows_desc` (TMA descriptors over ``[B, S, heads * D]``
views), :func:`bwd_ready` (the tensors the backward kernels read) and :func:`bwd_delta` (the
``rowsum(dout * out)`` pre-pass).

Example (the host helpers; no GPU needed)::

    >>> import torch
    >>> q_bshd = torch.randn(2, 8, 4, 16)
    >>> tma_ready(q_bshd) is q_bshd
    True
    >>> q_bhsd = torch.randn(2, 4, 8, 16)
    >>> tma_ready(q_bhsd.transpose(1, 2)).is_contiguous()  # [B, S, H, D] view, heads not packed
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton_runtime import jit, launch, tl, triton

if triton is not None:
    from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = [
    "allowed", "bwd_delta", "bwd_delta_kernel", "bwd_ready", "key_tile_allowed", "load_lse2",
    "load_rows", "mm", "rows_desc", "store_fwd_rows", "tma_ready",
]

if triton is not None:

    @jit
    def mm(a, b, acc, IEEE: tl.constexpr):
        """``acc + a @ b`` in float32 (full-precision float32 products when ``IEEE``)."""
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    # Tensors are read through TMA descriptors over 3-D views ``[B, S, heads * D]`` with blocks
    # ``[1, rows, D]``: a tile of head ``h`` starts at column ``h * D``; rows past the end of a
    # sequence read as zeros (and are clipped on store), so only the element mask ever looks at
    # the sequence end.
    @jit
    def load_rows(desc, b, row, col, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
        """``[ROWS, HEAD_DIM]`` tile at (batch ``b``, token ``row``, column ``col``)."""
        return tl.reshape(desc.load([b, row, col]), [ROWS, HEAD_DIM])

    @jit
    def allowed(qp, kp, qd, kd, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_DOCS: tl.constexpr):
        """Element mask from broadcastable global positions / doc ids (``[M,1]`` x ``[1,N]`` or
        transposed); returns a bool tile."""
        ok = (qp >= 0) & (kp >= 0)  # always true: gives the tile its full shape
        if CAUSAL:
            ok = ok & (kp <= qp)
        if HAS_WINDOW:
            ok = ok & (qp - kp < window)
            if not CAUSAL:
                ok = ok & (kp - qp < window)
        if HAS_DOCS:
            ok = ok & (qd == kd)
        return ok

    @jit
    def key_tile_allowed(qp, qd, KP, KD, start_n, k_start, k_stride, Sk, window,
                         BLOCK_N: tl.constexpr, POS_INDEX: tl.constexpr, CAUSAL: tl.constexpr,
                         HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
        """``[M, BLOCK_N]`` mask of the key tile at ``start_n`` against query rows at positions
        ``qp`` / docs ``qd`` (``[M]``); keys past ``Sk`` are never allowed.  Key positions are
        ``KP[j]`` (``POS_INDEX``) or ``k_start + j * k_stride``; docs ``KD[j]``."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_valid = offs_n < Sk
        if POS_INDEX:
            kp = tl.load(KP + offs_n, mask=k_valid, other=0)
        else:
            kp = k_start + offs_n * k_stride
        if HAS_DOCS:
            kd = tl.load(KD + offs_n, mask=k_valid, other=-1)
        else:
            kd = kp
        return allowed(qp[:, None], kp[None, :], qd[:, None], kd[None, :], window,
                       CAUSAL, HAS_WINDOW, HAS_DOCS) & k_valid[None, :]

    @jit
    def load_lse2(lse_ptr, offs_m, m_valid):
        """LSE of rows ``offs_m`` in log2 units; an empty row (-inf) and rows past the end
        become +inf, so every ``exp2(score - lse2)`` there is exactly 0."""
        lse = tl.load(lse_ptr + offs_m, mask=m_valid, other=float("inf"))
        return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)

    @jit
    def store_fwd_rows(desc_o, lse_ptr, acc, l_i, m_i, b, start_m, col, offs_m, m_valid,
                       BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Forward epilogue of a query tile: ``out = acc / l`` at (``b``, ``start_m``, ``col``)
        and the natural-log LSE at ``lse_ptr + offs_m``; rows with nothing allowed (``l = 0``)
        get ``out = 0``, ``lse = -inf``."""
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        desc_o.store([b, start_m, col], tl.reshape(out.to(desc_o.dtype), [1, BLOCK_M, HEAD_DIM]))
        tl.store(lse_ptr + offs_m, lse, mask=m_valid)

    @jit
    def bwd_delta_kernel(Out, DOut, Delta, s_ob, s_os, s_oh, s_db, s_ds, s_dh, Sq, H,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """``delta[b, h, i] = sum_d dout[b, i, h, d] * out[b, i, h, d]`` (float32)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        m_valid = offs_m < Sq
        rows = offs_m[:, None].to(tl.int64)
        o = tl.load(Out + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + rows * s_os
                    + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        do = tl.load(DOut + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh + rows * s_ds
                     + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + pid_bh.to(tl.int64) * Sq + offs_m, delta, mask=m_valid)


def tma_ready(t: Tensor) -> Tensor:
    """``t [B, S, heads, D]`` with heads packed (stride D, unit last stride), 16-byte aligned:
    what a TMA descriptor over the ``[B, S, heads * D]`` view needs; copies only if not."""
    item = t.element_size()
    ok = (
        t.stride(3) == 1 and t.stride(2) == t.shape[3]
        and (t.stride(0) * item) % 16 == 0 and (t.stride(1) * item) % 16 == 0
        and t.data_ptr() % 16 == 0
    )
    return t if ok else t.contiguous()


def rows_desc(t: Tensor, rows: int) -> "TensorDescriptor":
    """TMA descriptor over ``t [B, S, heads, D]`` seen as ``[B, S, heads * D]``, blocks
    ``[1, rows, D]`` (a tile of ``rows`` tokens of one head); rows past ``S`` read as zeros."""
    B, S, heads, D = t.shape
    return TensorDescriptor(t, [B, S, heads * D], [t.stride(0), t.stride(1), 1], [1, rows, D])


def bwd_ready(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, out: Tensor, lse: Tensor):
    """``(q, k, v, dout, out, lse)`` as the backward kernels read them: q/k/v/dout (dout in
    q's dtype) through :func:`tma_ready`, ``out`` with a unit last stride, ``lse`` float32
    contiguous; copies only what is not so already."""
    q, k, v, dout = (tma_ready(t) for t in (q, k, v, dout.to(q.dtype)))
    out = out if out.stride(-1) == 1 else out.contiguous()
    return q, k, v, dout, out, lse.to(torch.float32).contiguous()


def bwd_delta(out: Tensor, dout: Tensor, block_m: int) -> Tensor:
    """``delta [B, H, Sq]`` = ``rowsum(dout * out)`` (float32) of ``out``/``dout [B, Sq, H, D]``
    (unit last stride), one program per ``block_m`` rows of one head."""
    B, Sq, H, D = out.shape
    delta = torch.empty(B, H, Sq, dtype=torch.float32, device=out.device)
    launch(
        bwd_delta_kernel, (triton.cdiv(Sq, block_m), B * H),
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), Sq, H,
        HEAD_DIM=D, BLOCK_M=block_m,
    )
    return delta
