"""Torch reference kernel: the contract of :mod:`longctx.kernels.base`, blocked over keys and queries.

Works on any device and dtype (math in float32, or float64 for float64 inputs).  Queries and keys
are processed in blocks of ``block_q x block_k``, merged by their LSE, so a long shard never holds
an ``Sq x Sk`` score matrix; blocks with no allowed pair are skipped.

Example::

    >>> import torch
    >>> from longctx.kernels import Mask, TorchReference
    >>> q = torch.randn(1, 8, 4, 16, dtype=torch.float64)
    >>> k = v = torch.randn(1, 8, 2, 16, dtype=torch.float64)      # GQA: 2 kv heads
    >>> out, lse = TorchReference().forward(q, k, v, scale=0.25, mask=Mask(causal=True))
    >>> out.shape, lse.shape
    (torch.Size([1, 8, 4, 16]), torch.Size([1, 4, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import acc_dtype, check_qkv, default_positions, grad_dtype_for, register_kernel
from .mask import Mask, Positions
from .merge import merge_into

__all__ = ["ReferenceConfig", "TorchReference"]


@dataclass(frozen=True)
class ReferenceConfig:
    block_q: int = 512
    block_k: int = 512


def _blocks(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class TorchReference:
    """The torch reference implementation of the local kernel contract."""

    name = "reference"

    def __init__(self, config: ReferenceConfig = ReferenceConfig()):
        if config.block_q < 1 or config.block_k < 1:
            raise ValueError(f"block sizes must be >= 1, got {config}")
        self.config = config

    def _tiles(self, mask: Mask, qp: Tensor, kp: Tensor, heads: int, kv_heads: int):
        """Yield ``(qs, qe, ks, ke, allowed)`` for every tile with an allowed pair.

        ``allowed`` is a bool tile ``[Bm, Hkv or 1, G or 1, q, k]`` (``Bm``: 1 or the batch of
        the block-sparse lists), or None when every pair is allowed.
        """
        G = heads // kv_heads
        for qs, qe in _blocks(qp.numel(), self.config.block_q):
            for ks, ke in _blocks(kp.numel(), self.config.block_k):
                if mask.is_full:
                    yield qs, qe, ks, ke, None
                    continue
                ok = mask.allowed(qp[qs:qe], kp[ks:ke], heads=heads, kv_heads=kv_heads)
                if ok.shape[1] == heads:  # [Bm, H, q, k] -> [Bm, Hkv, G, q, k]
                    ok = ok.view(ok.shape[0], kv_heads, G, qe - qs, ke - ks)
                else:  # one mask head for all: [Bm, 1, q, k] -> [Bm, 1, 1, q, k]
                    ok = ok.unsqueeze(2)
                if bool(ok.any()):
                    yield qs, qe, ks, ke, ok

    @staticmethod
    def _scores(q5: Tensor, k: Tensor, scale: float, ok: Tensor | None) -> Tensor:
        """``q5 [B, q, Hkv, G, D]``, ``k [B, k, Hkv, D]`` -> scores ``[B, Hkv, G, q, k]``
        (``ok`` broadcasts against them)."""
        s = torch.einsum("bqhgd,bkhd->bhgqk", q5, k) * scale
        if ok is not None:
            s = s.masked_fill(~ok, float("-inf"))
        return s

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Mask = Mask(),
        q_pos: Positions | None = None, k_pos: Positions | None = None,
    ) -> tuple[Tensor, Tensor]:
        check_qkv(q, k, v)
        q_pos, k_pos = default_positions(q, k, q_pos, k_pos)
        B, Sq, H, D = q.shape
        Hkv = k.shape[2]
        G = H // Hkv
        acc = acc_dtype(q.dtype)
        if mask.block_sparse is not None:
            mask.block_sparse.check_call(B, H, Hkv, q.device)
        qp, kp = q_pos.materialize(q.device), k_pos.materialize(q.device)

        out = torch.zeros(B, Sq, H, D, dtype=acc, device=q.device)
        lse = torch.full((B, H, Sq), float("-inf"), dtype=acc, device=q.device)
        q5 = q.view(B, Sq, Hkv, G, D)  # head h = hkv * G + g uses kv head hkv
        for qs, qe, ks, ke, ok in self._tiles(mask, qp, kp, H, Hkv):
            s = self._scores(q5[:, qs:qe].to(acc), k[:, ks:ke].to(acc), scale, ok)
            tile_lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, q]; -inf for empty rows
            finite = torch.where(torch.isneginf(tile_lse), 0.0, tile_lse)
            p = torch.exp(s - finite.unsqueeze(-1))
            tile_out = torch.einsum("bhgqk,bkhd->bqhgd", p, v[:, ks:ke].to(acc))
            merge_into(
                out[:, qs:qe],
                lse[:, :, qs:qe],
                tile_out.reshape(B, qe - qs, H, D),  # [B, q, Hkv, G, D] -> [B, q, H, D]
                tile_lse.reshape(B, H, qe - qs),  # [B, Hkv, G, q] -> [B, H, q]
            )
        return out.to(q.dtype), lse

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
        scale: float, mask: Mask = Mask(), q_pos: Positions | None = None,
        k_pos: Positions | None = None, grad_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        check_qkv(q, k, v)
        q_pos, k_pos = default_positions(q, k, q_pos, k_pos)
        B, Sq, H, D = q.shape
        Sk, Hkv = k.shape[1], k.shape[2]
        G = H // Hkv
        acc = acc_dtype(q.dtype)
        if mask.block_sparse is not None:
            mask.block_sparse.check_call(B, H, Hkv, q.device)
        qp, kp = q_pos.materialize(q.device), k_pos.materialize(q.device)

        q5 = q.view(B, Sq, Hkv, G, D).to(acc)
        do5 = dout.reshape(B, Sq, Hkv, G, D).to(acc)
        # delta_i = sum_d dout_i * out_i (global out): [B, Sq, H] -> [B, Hkv, G, Sq]
        delta = (dout.to(acc) * out.to(acc)).sum(-1).view(B, Sq, Hkv, G).permute(0, 2, 3, 1)
        lse5 = lse.to(acc).view(B, Hkv, G, Sq)
        lse5 = torch.where(torch.isneginf(lse5), 0.0, lse5)  # empty rows: every p is exp(-inf)

        dq = torch.zeros(B, Sq, Hkv, G, D, dtype=acc, device=q.device)
        dk = torch.zeros(B, Sk, Hkv, D, dtype=acc, device=q.device)
        dv = torch.zeros(B, Sk, Hkv, D, dtype=acc, device=q.device)
        for qs, qe, ks, ke, ok in self._tiles(mask, qp, kp, H, Hkv):
            kb, vb = k[:, ks:ke].to(acc), v[:, ks:ke].to(acc)
            s = self._scores(q5[:, qs:qe], kb, scale, ok)
            p = torch.exp(s - lse5[..., qs:qe].unsqueeze(-1))  # [B, Hkv, G, q, k]
            dp = torch.einsum("bqhgd,bkhd->bhgqk", do5[:, qs:qe], vb)
            ds = p * (dp - delta[..., qs:qe].unsqueeze(-1))
            dq[:, qs:qe] += torch.einsum("bhgqk,bkhd->bqhgd", ds, kb) * scale
            dk[:, ks:ke] += torch.einsum("bhgqk,bqhgd->bkhd", ds, q5[:, qs:qe]) * scale
            dv[:, ks:ke] += torch.einsum("bhgqk,bqhgd->bkhd", p, do5[:, qs:qe])
        dtype = grad_dtype_for(q, grad_dtype)
        return dq.view(B, Sq, H, D).to(dtype), dk.to(dtype), dv.to(dtype)


register_kernel("reference", TorchReference)
