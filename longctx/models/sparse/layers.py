"""MoBA and NSA attention layers: the same projections as :class:`~longctx.models.llama.Attention`,
a trainable sparse core.

**MoBA** (:class:`MobaAttention`). Keys are mean-pooled per block of ``block_size`` global
positions; each query block (``query_block`` tokens) scores the pooled keys of the earlier blocks
of its own document with its first query, per head, and attends to the ``top_k - 1`` best plus
its own block (causal inside it). Scoring with the first query keeps the choice causal for every
query of the block (a pooled query would let later tokens choose for earlier ones, a leak of
the labels); ``query_block=1`` is per-token MoBA exactly. The selection is not differentiated
(as in the paper); gradients reach the attended keys and values. Documents: a block is a candidate when it holds
tokens of the query block's first document, and the attention itself applies the document mask.

**NSA** (:class:`NSAAttention`). Three branches on the same q/k/v, mixed per head by learned
sigmoid gates of the layer input: (1) *compressed*: keys/values of blocks of ``compress_block``
tokens every ``compress_stride`` are compressed by a small MLP with an intra-block position
embedding (:class:`BlockCompressor`) and attended causally (a compressed token is visible once
its whole block is in the past, inside the document); (2) *selected*: the compressed attention
probabilities of the first query of each query block, summed over the query heads of a kv group
and mapped onto blocks of ``select_block`` tokens, pick the ``top_n`` best earlier blocks plus the
own block, shared by the kv group and the query block (causal, as for MoBA; ``query_block=1``
is the paper's per-token selection); (3) *window*: causal sliding-window attention.

The selected attention runs through the block-sparse kernel path (per-head lists on global
positions, :func:`~longctx.parallel.strategies.sparse_fetch.selection_mask`); the compressed
branch through a kernel of the contract on the compressed tokens' positions; the window branch
through :func:`longctx.attention`. The selection makes no host sync.

Context parallelism (``seq.cp_group``): ring-family strategies (``ring``, ``zigzag``,
``striped``, ``allgather``) use :mod:`~longctx.parallel.strategies.sparse_fetch` (summaries
all-reduced, selected blocks fetched); ``ulysses`` moves q/k/v to whole sequences of a subset of
heads and runs the layer there.

Example::

    >>> import torch
    >>> from longctx.models import ModelConfig, SequenceContext
    >>> from longctx.models.sparse.layers import MobaAttention, NSAAttention
    >>> cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
    ...                   attention_kinds=("moba",), moba={"block_size": 8, "top_k": 2,
    ...                   "query_block": 4}, nsa={"compress_block": 4, "compress_stride": 2,
    ...                   "select_block": 8, "top_n": 1, "window": 8, "query_block": 4})
    >>> seq = SequenceContext.single_device(32)
    >>> x = torch.randn(1, 32, 32)
    >>> from longctx.models.attention import rope_cos_sin
    >>> rope = rope_cos_sin(torch.arange(32), 8, 10000.0)
    >>> MobaAttention(cfg)(x, rope, seq).shape, NSAAttention(cfg)(x, rope, seq).shape
    (torch.Size([1, 32, 32]), torch.Size([1, 32, 32]))
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernels.base import acc_dtype
from ...kernels.mask import Mask, Positions
from ...parallel.api import attention as cp_attention
from ...parallel.strategies.sparse_fetch import (
    SparseCP,
    SparseSelection,
    all_reduce_sum,
    block_key_means,
    heads_to_seq,
    kernel_attention,
    selected_attention,
    seq_to_heads,
)
from ..attention import Attention
from ..config import ModelConfig
from ..context import SequenceContext
from .config import MobaConfig, NSAConfig

__all__ = [
    "BlockCompressor",
    "MobaAttention",
    "NSAAttention",
    "kernel_kv_block",
    "moba_select",
    "nsa_importance",
    "top_blocks",
]

RING_FAMILY = ("ring", "zigzag", "striped", "allgather", "auto")


def kernel_kv_block(block: int) -> int:
    """The block-sparse kernel's key tile for selection blocks of ``block`` tokens: 128 or 64
    when they divide it (the Triton kernel's sizes), else the block itself."""
    return next((t for t in (128, 64) if block % t == 0), block)


# -- selection (no gradient, no host sync) ---------------------------------------------------------
def _first_doc_block(first_pos: Tensor, mask: Mask, block: int) -> Tensor:
    """Block holding the start of the document of each position ``first_pos [nq]``."""
    if mask.cu_seqlens is None:
        return torch.zeros_like(first_pos)
    starts = mask.cu_seqlens_on(first_pos.device)[mask.document_ids(first_pos)]
    return starts // block


@torch.no_grad()
def top_blocks(
    scores: Tensor, first_pos: Tensor, block: int, query_block: int, k_other: int, mask: Mask
) -> SparseSelection:
    """The own block plus the ``k_other`` best earlier blocks of the document, per list.

    ``scores [B, Hs, nq, nblk]`` (any float), ``first_pos [nq]``: global position of each query
    block's first token. A block ``j`` is a candidate when ``j < own`` and it holds tokens of
    the document of ``first_pos`` (the later documents of a query block start inside its own
    block). Returns a :class:`SparseSelection` with the own block first.
    """
    B, Hs, nq, nblk = scores.shape
    first_pos = first_pos.contiguous()
    own = first_pos // block  # [nq]
    lo = _first_doc_block(first_pos, mask, block)
    j = torch.arange(nblk, device=scores.device)
    candidate = (j[None, :] < own[:, None]) & (j[None, :] >= lo[:, None])  # [nq, nblk]
    own_idx = own.view(1, 1, nq, 1).expand(B, Hs, nq, 1)
    k_other = min(k_other, nblk)
    if k_other <= 0:
        num = torch.ones(B, Hs, nq, dtype=torch.int32, device=scores.device)
        return SparseSelection(block, query_block, num, own_idx.to(torch.int32))
    masked = scores.masked_fill(~candidate, float("-inf"))
    top_v, top_i = masked.topk(k_other, dim=-1)  # descending: the candidates come first
    num = 1 + torch.isfinite(top_v).sum(-1)
    idx = torch.cat([own_idx, top_i], dim=-1)  # [B, Hs, nq, 1 + k_other]
    return SparseSelection(block, query_block, num.to(torch.int32), idx.to(torch.int32))


@torch.no_grad()
def moba_select(
    q: Tensor, key_means: Tensor, q_pos: Tensor, config: MobaConfig, mask: Mask
) -> SparseSelection:
    """MoBA's gate: per head and query block, the ``top_k`` blocks (own block included).

    ``q [B, S_local, H, D]`` at global positions ``q_pos [S_local]``; ``key_means
    [B, nblk, Hkv, D]`` (:func:`~longctx.parallel.strategies.sparse_fetch.block_key_means`).
    A query block scores block ``j`` by ``q_first . mean(k_j)``, ``q_first`` its first query
    (at or before every query of the block: the choice never depends on later tokens).
    """
    H = q.shape[2]
    qb = config.query_block
    acc = acc_dtype(q.dtype)
    q_first = q[:, ::qb].to(acc)  # [B, nq, H, D]
    k_h = key_means.to(acc).repeat_interleave(H // key_means.shape[2], dim=2)  # [B, nblk, H, D]
    scores = torch.einsum("bqhd,bnhd->bhqn", q_first, k_h)  # [B, H, nq, nblk]
    return top_blocks(scores, q_pos[::qb], config.block_size, qb, config.top_k - 1, mask)


@torch.no_grad()
def nsa_importance(
    q: Tensor, k_cmp: Tensor, lse_cmp: Tensor, q_pos: Tensor, config: NSAConfig, mask: Mask,
    scale: float, num_blocks: int,
) -> Tensor:
    """NSA's block importance ``[B, Hkv, nq, num_blocks]`` from the compressed attention.

    For the first query ``t`` of each query block (causal for the whole block),
    ``p[t, i] = exp(q_t . k_cmp_i * scale - lse_cmp[t])`` over the visible compressed tokens,
    summed over the query heads of each kv group, then over the compressed tokens that overlap
    each selection block.
    """
    B, S, H, D = q.shape
    ncmp, Hkv = k_cmp.shape[1], k_cmp.shape[2]
    G = H // Hkv
    l, d = config.compress_block, config.compress_stride
    ls, qb = config.select_block, config.query_block
    acc = acc_dtype(q.dtype)
    cmp_pos = (l - 1) + torch.arange(ncmp, device=q.device) * d  # a compressed token's last key
    nq = S // qb
    q_first = q[:, ::qb].to(acc).view(B, nq, Hkv, G, D)
    s = torch.einsum("bqhgd,bnhd->bhgqn", q_first, k_cmp.to(acc)) * scale  # [B, Hkv, G, nq, ncmp]
    lse = lse_cmp.view(B, Hkv, G, S)[..., ::qb, None].to(acc)  # [B, Hkv, G, nq, 1]
    ok = mask.allowed(q_pos[::qb].contiguous(), cmp_pos) & torch.isfinite(lse)
    p = torch.where(ok, torch.exp(s - torch.where(ok, lse, 0.0)), 0.0).sum(2)  # [B, Hkv, nq, ncmp]
    i = torch.arange(ncmp, device=q.device)
    j = torch.arange(num_blocks, device=q.device)
    first_key, last_key = i[:, None] * d, i[:, None] * d + l - 1  # [ncmp, 1]
    overlap = (first_key <= (j[None, :] + 1) * ls - 1) & (last_key >= j[None, :] * ls)
    return p @ overlap.to(acc)  # [B, Hkv, nq, num_blocks]


# -- NSA's compression -----------------------------------------------------------------------------
class BlockCompressor(nn.Module):
    """NSA's ``phi``: a block of ``l`` keys (or values) ``[l, D]`` -> one ``[D]`` token,
    ``w_out(silu(w_in(flatten(x + pe))))``; shared by the kv heads.

    The first layer is linear in the block's tokens, so each rank applies it to the tokens it
    holds (:meth:`partials`) and the partial sums are added over the ranks before the rest
    (:meth:`finish`). Inside a packed sequence, a block's tokens from an earlier document than
    its last token count as absent, so a compressed token never mixes documents.
    """

    def __init__(self, config: NSAConfig, head_dim: int, device=None, dtype=None):
        super().__init__()
        self.config = config
        l, hidden = config.compress_block, config.compress_hidden or head_dim
        kw = {"device": device, "dtype": dtype}
        self.pe = nn.Parameter(torch.zeros(l, head_dim, **kw))
        self.w_in = nn.Linear(l * head_dim, hidden, bias=False, **kw)
        self.w_out = nn.Linear(hidden, head_dim, bias=False, **kw)

    def partials(self, x: Tensor, cp: SparseCP, mask: Mask) -> Tensor:
        """``x [B, S_local, Hkv, D]`` (this rank's tokens) -> this rank's part of the first
        layer's output ``[B, ncmp, Hkv, hidden]`` for every compressed token."""
        cfg = self.config
        l, d = cfg.compress_block, cfg.compress_stride
        B, _, Hkv, D = x.shape
        ncmp = cfg.num_compressed(cp.seq_len)
        out = x.new_zeros(B, ncmp, Hkv, self.w_in.out_features)
        if ncmp == 0:
            return out
        pos_all = cp.positions_on(cp.rank, x.device)
        for lb, le, run in cp.local_positions.local_runs():
            bounds = list(run.bounds())
            lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
            i_lo, i_hi = max(0, -(-(lo - l + 1) // d)), min(ncmp - 1, hi // d)
            if i_lo > i_hi:
                continue
            base, L = i_lo * d, (i_hi - i_lo) * d + l  # the window of compressed tokens i_lo..i_hi
            rel = (pos_all[lb:le] - base).clamp(max=L)  # tokens past the window go to slot L
            buf = x.new_zeros(B, L + 1, Hkv, D).index_copy(1, rel, x[:, lb:le])
            here = torch.zeros(L + 1, dtype=torch.bool, device=x.device).index_fill(0, rel, True)
            n_i = i_hi - i_lo + 1
            blocks = buf[:, :L].unfold(1, l, d).permute(0, 1, 4, 2, 3)  # [B, n_i, l, Hkv, D]
            valid = here[:L].unfold(0, l, d)  # [n_i, l]
            if mask.cu_seqlens is not None:
                win = base + torch.arange(L, device=x.device)
                last = base + torch.arange(n_i, device=x.device) * d + l - 1
                valid = valid & (
                    mask.document_ids(win).unfold(0, l, d) == mask.document_ids(last)[:, None]
                )
            keep = valid[None, :, :, None, None].to(x.dtype)  # [1, n_i, l, 1, 1]
            xb = (blocks + self.pe[None, None, :, None, :]) * keep
            h = self.w_in(xb.permute(0, 1, 3, 2, 4).flatten(3))  # [B, n_i, Hkv, l*D] -> hidden
            out = out.index_add(1, torch.arange(i_lo, i_hi + 1, device=x.device), h)
        return out

    def finish(self, h: Tensor) -> Tensor:
        """Summed first-layer outputs ``[B, ncmp, Hkv, hidden]`` -> tokens ``[B, ncmp, Hkv, D]``."""
        return self.w_out(F.silu(h))


# -- layers ---------------------------------------------------------------------------------------
def _group(cp_group):
    if cp_group is None or isinstance(cp_group, dist.ProcessGroup):
        return cp_group
    if hasattr(cp_group, "get_group") and getattr(cp_group, "ndim", None) == 1:
        return cp_group.get_group()
    raise ValueError(
        "MoBA/NSA layers take a context-parallel ProcessGroup or a 1-D DeviceMesh (strategies "
        f"ring, zigzag, striped, allgather or ulysses), got {type(cp_group).__name__}"
    )


def _ring(strategy: str) -> str:
    """The ring-family strategy that runs the selected branch when fetching moves more."""
    return strategy if strategy in ("ring", "zigzag", "striped", "allgather") else "ring"


@functools.lru_cache(maxsize=64)
def _sparse_cp(seq_len: int, group, layout: str) -> SparseCP:
    return SparseCP.build(seq_len, group, layout)


def _base_mask(seq: SequenceContext, kind: str) -> Mask:
    m = seq.mask
    if not m.causal or m.window is not None or m.block_sparse is not None:
        raise ValueError(
            f"{kind} layers are causal with optional documents; the sequence's mask is {m}. Drop "
            "the window / block-sparse / non-causal mask, or make the layer softmax"
        )
    return Mask(causal=True, cu_seqlens=m.cu_seqlens)


class _SparseAttention(Attention):
    """Shared: where the core runs (one process, the ring family's shards, Ulysses' heads)."""

    kind = "sparse"

    def forward(self, x_bsh: Tensor, rope: tuple[Tensor, Tensor], seq: SequenceContext) -> Tensor:
        return self.project_out(self.core(*self.qkv(x_bsh, rope), seq))

    def _run(self, seq: SequenceContext, body, q: Tensor, k: Tensor, v: Tensor, *extra: Tensor):
        group = _group(seq.cp_group)
        world = group.size() if group is not None else 1
        seq_len = q.shape[1] * world
        base = _base_mask(seq, self.kind)
        if world > 1 and seq.strategy == "ulysses":
            outer = _sparse_cp(seq_len, group, str(seq.layout))
            H = q.shape[2]
            q_h = seq_to_heads(q, outer)
            k_h, v_h = seq_to_heads(k, outer, H), seq_to_heads(v, outer, H)
            extra_h = [seq_to_heads(e, outer) for e in extra]
            whole = _sparse_cp(seq_len, None, "contiguous")
            self._check(whole, q_h, k_h)
            out = body(q_h, k_h, v_h, *extra_h, cp=whole, base=base, window_group=None,
                       strategy="ring", layout="contiguous", kernel=seq.kernel)
            return heads_to_seq(out, outer)
        if world > 1 and seq.strategy not in RING_FAMILY:
            raise ValueError(
                f"{self.kind} layers run under the strategies {list(RING_FAMILY)} and 'ulysses', "
                f"not {seq.strategy!r}"
            )
        cp = _sparse_cp(seq_len, group, str(seq.layout))
        self._check(cp, q, k)
        return body(q, k, v, *extra, cp=cp, base=base, window_group=seq.cp_group,
                    strategy=seq.strategy, layout=seq.layout, kernel=seq.kernel)

    def _check(self, cp: SparseCP, q: Tensor, k: Tensor) -> None:
        raise NotImplementedError


class MobaAttention(_SparseAttention):
    """MoBA attention (module docstring); ``forward(x, rope, seq) -> [B, S, hidden]`` as
    :class:`~longctx.models.llama.Attention`, same weights (``wq wk wv wo``).

    ``stats`` (a list or None): :class:`~longctx.parallel.strategies.sparse_fetch.FetchStats`
    of every call are appended to it (tests, benchmarks).
    """

    kind = "moba"

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__(config, device, dtype)
        self.moba: MobaConfig = config.sparse_config("moba")
        self.stats: list | None = None

    def _check(self, cp: SparseCP, q: Tensor, k: Tensor) -> None:
        cp.check_blocks(self.moba.block_size, "MobaConfig.block_size")
        cp.check_blocks(self.moba.query_block, "MobaConfig.query_block")

    def core(self, q: Tensor, k: Tensor, v: Tensor, seq: SequenceContext) -> Tensor:
        """MoBA on local shards: ``[B, S, H_local, D]``."""
        return self._run(seq, self._body, q, k, v)

    def _body(self, q, k, v, *, cp: SparseCP, base: Mask, strategy, kernel, **_):
        cfg = self.moba
        scale = q.shape[-1] ** -0.5
        means = block_key_means(k.detach(), cp, cfg.block_size)  # [B, nblk, Hkv, D]
        q_pos = cp.positions_on(cp.rank, q.device)
        sel = moba_select(q.detach(), means, q_pos, cfg, base)
        return selected_attention(
            q, k, v, cp, sel, base, scale=scale, kernel=kernel,
            kv_block=kernel_kv_block(cfg.block_size), fallback=_ring(strategy), stats=self.stats,
        )


class NSAAttention(_SparseAttention):
    """NSA attention (module docstring); ``forward(x, rope, seq) -> [B, S, hidden]``.

    Weights: ``wq wk wv wo`` as :class:`~longctx.models.llama.Attention`, ``w_gate`` (hidden ->
    3 gates per head), ``compress_k`` / ``compress_v`` (:class:`BlockCompressor`). :meth:`qkv`
    returns ``(q, k, v, gates)``; the gates are ``[B, S, H, 3]`` (compressed, selected, window).
    """

    kind = "nsa"

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__(config, device, dtype)
        self.nsa: NSAConfig = config.sparse_config("nsa")
        D, H = config.kv_channels, config.num_attention_heads
        self.w_gate = nn.Linear(config.hidden_size, 3 * H, bias=False, device=device, dtype=dtype)
        self.compress_k = BlockCompressor(self.nsa, D, device, dtype)
        self.compress_v = BlockCompressor(self.nsa, D, device, dtype)
        self.group_size = H // config.num_query_groups  # query heads sharing a selection
        self.stats: list | None = None

    def qkv(self, x_bsh: Tensor, rope: tuple[Tensor, Tensor]):
        q, k, v = super().qkv(x_bsh, rope)
        B, S, _ = x_bsh.shape
        gates = torch.sigmoid(self.w_gate(x_bsh)).view(B, S, -1, 3)  # [B, S, H, 3]
        return q, k, v, gates

    def _check(self, cp: SparseCP, q: Tensor, k: Tensor) -> None:
        if q.shape[2] != k.shape[2] * self.group_size:
            raise ValueError(
                f"NSA shares a selection over the {self.group_size} query heads of a kv group, "
                f"but this rank holds {q.shape[2]} query heads over {k.shape[2]} kv heads (Ulysses "
                "split a group): use a ring-family strategy, or a CP degree dividing the kv heads"
            )
        cp.check_blocks(self.nsa.select_block, "NSAConfig.select_block")
        cp.check_blocks(self.nsa.query_block, "NSAConfig.query_block")

    def core(self, q: Tensor, k: Tensor, v: Tensor, gates: Tensor, seq: SequenceContext) -> Tensor:
        """NSA on local shards: ``[B, S, H_local, D]``."""
        if gates.shape[2] != q.shape[2]:
            raise ValueError(
                f"NSA gates cover {gates.shape[2]} heads but q has {q.shape[2]}: NSA layers do "
                "not run under tensor parallelism yet (tp=1, or use moba/softmax layers)"
            )
        return self._run(seq, self._body, q, k, v, gates)

    def _body(self, q, k, v, gates, *, cp: SparseCP, base: Mask, window_group, strategy, layout,
              kernel):
        cfg = self.nsa
        B, S, H, D = q.shape
        scale = D ** -0.5
        ncmp = cfg.num_compressed(cp.seq_len)
        q_pos = cp.positions_on(cp.rank, q.device)
        # (1) compressed branch: partial first layers summed over the ranks
        k_cmp = self.compress_k.finish(all_reduce_sum(self.compress_k.partials(k, cp, base), cp))
        v_cmp = self.compress_v.finish(all_reduce_sum(self.compress_v.partials(v, cp, base), cp))
        if ncmp:
            out_c, lse_c = kernel_attention(
                q, k_cmp, v_cmp, q_pos=cp.local_positions,
                k_pos=Positions.strided(cfg.compress_block - 1, ncmp, cfg.compress_stride),
                mask=base, kernel=kernel, scale=scale,
            )
        else:
            out_c = torch.zeros_like(q)
            lse_c = torch.full((B, H, S), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
        # (2) selected branch: importance from the compressed probabilities, shared by a kv group
        nsel = -(-cp.seq_len // cfg.select_block)
        imp = nsa_importance(q.detach(), k_cmp.detach(), lse_c, q_pos, cfg, base, scale, nsel)
        sel = top_blocks(imp, q_pos[:: cfg.query_block], cfg.select_block, cfg.query_block,
                         cfg.top_n, base)
        out_s = selected_attention(q, k, v, cp, sel, base, scale=scale, kernel=kernel,
                                   kv_block=kernel_kv_block(cfg.select_block),
                                   fallback=_ring(strategy), stats=self.stats)
        # (3) sliding window
        window = Mask(causal=True, window=cfg.window, cu_seqlens=base.cu_seqlens)
        out_w = cp_attention(q, k, v, window_group, strategy=strategy, layout=layout, mask=window,
                             kernel=kernel)
        g = gates.to(q.dtype)
        return g[..., 0:1] * out_c + g[..., 1:2] * out_s + g[..., 2:3] * out_w
