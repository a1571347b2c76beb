"""megatron-core adapter: longctx's context-parallel attention as megatron's core attention.

:class:`LongctxCoreAttention` has the constructor and forward of megatron-core's
``DotProductAttention`` / ``TEDotProductAttention`` and runs a longctx strategy over megatron's
context-parallel group (``pg_collection.cp``, else ``parallel_state``'s).  :func:`gpt_layer_spec`
returns megatron's GPT layer spec (local or Transformer Engine) with it in place of the core
attention.

Layouts: megatron's ``get_batch_on_this_cp_rank`` gives CP rank ``r`` the chunks ``r`` and
``2*cp-1-r`` of ``2*cp`` chunks, and its RoPE (``get_pos_emb_on_this_cp_rank``) assumes that
layout: longctx calls it ``"zigzag"``, the default here.  Any other layout is refused under CP
unless ``positions_follow_layout=True`` says the position embedding follows it (e.g. learned
absolute embeddings fed with ``longctx.shard(position_ids, layout, cp, rank)``).

Packed documents: ``packed_seq_params`` in THD (``[t, np, hn]``) or sbhd format gives the global
document boundaries (``cu_seqlens_q_padded``, else ``cu_seqlens_q``).  Under CP, THD batches are
in Transformer Engine's layout (every document zigzag-split over the CP ranks) and run one CP
call per document; sbhd rows are zigzag-sharded whole, under one document mask.

Needs ``pip install "longctx[megatron]"`` (megatron-core >=0.16,<0.18).

Example (a megatron-core model whose attention is longctx's zigzag ring)::

    from megatron.core.models.gpt import GPTModel
    from longctx.integrations.megatron import gpt_layer_spec

    model = GPTModel(config, gpt_layer_spec(strategy="zigzag"), vocab_size, max_seq_len)
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.mask import Mask
from ..parallel.api import attention
from ..parallel.layout import Layout
from ._deps import require

require("megatron.core")

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402

__all__ = ["CP_COMM_STRATEGIES", "LongctxCoreAttention", "LongctxSettings", "gpt_layer_spec"]

# megatron's cp_comm_type -> the longctx strategy that moves the same data.
CP_COMM_STRATEGIES = {"p2p": "zigzag", "a2a": "ulysses", "all_gather": "allgather"}


@dataclass(frozen=True)
class LongctxSettings:
    """How :class:`LongctxCoreAttention` computes attention.

    ``strategy``: a longctx strategy name, or None to follow megatron's ``cp_comm_type``
    (``p2p`` -> ``zigzag``, ``a2a`` -> ``ulysses``, ``all_gather`` -> ``allgather``).
    ``layout``: how the batch was sharded over the CP group (megatron's own: ``"zigzag"``).
    ``positions_follow_layout``: allow a non-zigzag layout under CP (megatron's RoPE would apply
    zigzag positions to it: only for position embeddings you shard yourself).
    """

    strategy: str | None = None
    layout: str = "zigzag"
    kernel: str = "auto"
    positions_follow_layout: bool = False

    def __post_init__(self) -> None:
        Layout.parse(self.layout)


class LongctxCoreAttention(MegatronModule):
    """megatron-core core attention computed by :func:`longctx.attention`.

    ``forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
    packed_seq_params=None)``: ``query [s, b, np, hn]``, ``key/value [s, b, ng, hn]`` (GQA read in
    place, never expanded) -> ``[s, b, np * hn]``; with THD packed sequences (``[t, np, hn]``,
    ``packed_seq_params.cu_seqlens_q``) -> ``[t, np * hn]`` under a document mask.  ``s`` is this
    CP rank's shard in ``settings.layout``.

    Settings come from the keyword ``settings`` or from a subclass made by
    :meth:`with_settings` (what a ModuleSpec needs, since megatron builds core attention from a
    class).
    """

    settings: LongctxSettings = LongctxSettings()

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        settings: LongctxSettings | None = None,
    ):
        super().__init__(config=config)
        self.settings = settings if settings is not None else type(self).settings
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"longctx attention has no attention dropout, but it is {dropout}; set "
                "TransformerConfig(attention_dropout=0.0) (or pass attention_dropout=0.0)"
            )
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"longctx attention computes the vanilla softmax; config.softmax_type is "
                f"{config.softmax_type!r}"
            )
        self.window = _window(config, self.layer_number, attn_mask_type)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            self.cp_group = pg_collection.cp
        else:
            self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        if cp_size != config.context_parallel_size:
            raise ValueError(
                f"megatron's config says context_parallel_size={config.context_parallel_size} but "
                f"the CP group has {cp_size} ranks; build the model with the CP group that matches "
                "TransformerConfig.context_parallel_size (pg_collection.cp or "
                "parallel_state.initialize_model_parallel(context_parallel_size=...))"
            )
        self.cp_size = cp_size
        strategy = self.settings.strategy
        if strategy is None:
            comm = cp_comm_type or "p2p"
            if comm not in CP_COMM_STRATEGIES:
                raise ValueError(
                    f"cp_comm_type={comm!r} has no longctx counterpart here; use one of "
                    f"{sorted(CP_COMM_STRATEGIES)} or name a strategy: "
                    "LongctxSettings(strategy='ring' | 'zigzag' | 'ulysses' | 'allgather' | ...)"
                )
            strategy = CP_COMM_STRATEGIES[comm]
        self.strategy = strategy
        layout = Layout.parse(self.settings.layout)
        if cp_size > 1 and layout.kind != "zigzag" and not self.settings.positions_follow_layout:
            raise ValueError(
                f"layout {str(layout)!r} under context parallelism: megatron's "
                "get_batch_on_this_cp_rank and its RoPE (get_pos_emb_on_this_cp_rank) put chunks "
                "r and 2*cp-1-r on CP rank r, longctx's 'zigzag' layout. Use layout='zigzag' "
                "(strategies 'zigzag', 'ring', 'allgather' and 'ulysses' all run on it), or, if your "
                "position embedding follows your own sharding, set positions_follow_layout=True"
            )
        if self.strategy == "zigzag" and layout.kind != "zigzag":
            raise ValueError(
                f"strategy 'zigzag' needs layout 'zigzag', got {str(layout)!r}; use "
                "strategy='ring' for other layouts"
            )
        self.layout = layout

    @classmethod
    def with_settings(cls, **settings: Any) -> type[LongctxCoreAttention]:
        """A subclass whose instances use ``LongctxSettings(**settings)`` (for a ModuleSpec)."""
        return type(cls.__name__, (cls,), {"settings": LongctxSettings(**settings)})

    def _mask(self, attn_mask_type, attention_mask: Tensor | None, cu_seqlens: Tensor | None):
        kind = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if kind in (AttnMaskType.causal, AttnMaskType.padding_causal):
            causal = True
        elif kind in (AttnMaskType.no_mask, AttnMaskType.padding):
            causal = False
        else:
            raise ValueError(
                f"attn_mask_type {kind} is not supported by longctx attention; use causal or "
                "no_mask (packed documents: packed_seq_params with cu_seqlens)"
            )
        # megatron passes its materialised causal mask along with the causal type; like TE's
        # attention we follow the type. Padding masks are arbitrary: not expressible here.
        if attention_mask is not None and kind in (AttnMaskType.padding, AttnMaskType.padding_causal):
            raise ValueError(
                "longctx attention takes masks on global positions, not a padding attention_mask; "
                "pack the documents and pass packed_seq_params (cu_seqlens) instead"
            )
        return Mask(causal=causal, window=self.window, cu_seqlens=cu_seqlens)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type=None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("longctx attention takes no attention_bias; leave it None")
        cu_seqlens = None
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed_seq_params is not None:
            cu_seqlens = _global_cu_seqlens(packed_seq_params)
            _check_padding(packed_seq_params, attn_mask_type or self.attn_mask_type)
        if thd:  # [t, np, hn] -> [1, t, np, hn]
            q_bshd, k_bshd, v_bshd = (x.unsqueeze(0) for x in (query, key, value))
        else:  # [s, b, h, d] -> [b, s, h, d]
            q_bshd, k_bshd, v_bshd = (x.transpose(0, 1) for x in (query, key, value))
        q_bshd, k_bshd, v_bshd = (x.contiguous() for x in (q_bshd, k_bshd, v_bshd))
        if thd and self.cp_size > 1:
            out_bshd = self._thd_per_document(q_bshd, k_bshd, v_bshd, attn_mask_type, cu_seqlens)
        else:
            mask = self._mask(attn_mask_type, attention_mask, cu_seqlens)
            out_bshd = self._attend(q_bshd, k_bshd, v_bshd, mask, self.layout)
        b, s, h, d = out_bshd.shape
        if thd:
            return out_bshd.reshape(s, h * d)  # [1, t, np, hn] -> [t, np * hn]
        return out_bshd.transpose(0, 1).reshape(s, b, h * d)  # [b, s, h, d] -> [s, b, h * d]

    def _attend(self, q, k, v, mask: Mask, layout) -> Tensor:
        cp = self.cp_size > 1
        return attention(
            q, k, v, self.cp_group if cp else None,
            strategy=self.strategy if cp else "ring", layout=layout if cp else None,
            mask=mask, kernel=self.settings.kernel, scale=self.softmax_scale,
        )

    def _thd_per_document(self, q, k, v, attn_mask_type, cu_seqlens: Tensor) -> Tensor:
        """THD under CP: megatron (Transformer Engine's layout) gives each CP rank chunks ``r``
        and ``2*cp-1-r`` of *every* document (padded to a multiple of ``2*cp``), i.e. a zigzag
        layout per document: one CP attention call per document, every rank in the same order.
        ``q [1, t_local, np, hn]`` -> ``[1, t_local, np, hn]``."""
        if self.strategy not in ("zigzag", "ring", "allgather", "ulysses"):
            raise ValueError(
                f"THD batches under CP run per document on the zigzag layout; strategy "
                f"{self.strategy!r} does not run on it (use zigzag, ring, allgather or ulysses)"
            )
        P = self.cp_size
        bounds = [int(c) for c in cu_seqlens.tolist()]
        lengths = [hi - lo for lo, hi in itertools.pairwise(bounds)]
        if any(n % (2 * P) for n in lengths) or bounds[-1] != q.shape[1] * P:
            raise ValueError(
                f"THD under CP={P} needs cu_seqlens_q_padded whose documents are multiples of "
                f"2*cp={2 * P} tokens and whose total is cp x the local tokens ({q.shape[1]} x "
                f"{P}); got document lengths {lengths}. Pad each document (megatron's packed "
                "data pads them: pass cu_seqlens_q_padded)"
            )
        mask = self._mask(attn_mask_type, None, None)
        outs = []
        for lo, hi in itertools.pairwise(bounds):
            if hi == lo:
                continue
            sl = slice(lo // P, hi // P)  # this document's local tokens: [chunk r, chunk 2P-1-r]
            outs.append(self._attend(q[:, sl], k[:, sl], v[:, sl], mask, Layout("zigzag")))
        return torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, layout={str(self.layout)!r}, cp={self.cp_size}"


def _window(config, layer_number: int, attn_mask_type) -> int | None:
    """megatron's ``window_size=(left, right)`` for this layer as a longctx window (or None).

    megatron allows key ``k`` for query ``q`` when ``-left <= k - q <= right``: causal with
    ``right = 0`` is longctx's ``Mask(causal=True, window=left + 1)``; a symmetric window
    (``left == right``) without a causal mask is ``Mask(window=left + 1)``.
    """
    from megatron.core.transformer.utils import is_layer_window_attention

    window_size = getattr(config, "window_size", None)
    skip = getattr(config, "window_attn_skip_freq", None)
    if not is_layer_window_attention(window_size, skip, layer_number):
        return None
    left, right = (int(w) for w in window_size)
    if left < 0:  # -1: unbounded to the left
        return None
    causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
    if (causal and right == 0) or (not causal and right == left):
        return left + 1
    raise ValueError(
        f"window_size={tuple(window_size)} with attn_mask_type {attn_mask_type}: longctx takes "
        "causal windows (left, 0) or, without a causal mask, symmetric ones (w, w)"
    )


def _global_cu_seqlens(packed_seq_params) -> Tensor:
    """The document boundaries of ``packed_seq_params`` (padded ones when megatron gives them)."""
    cu_q = packed_seq_params.cu_seqlens_q_padded
    if cu_q is None:
        cu_q = packed_seq_params.cu_seqlens_q
    cu_kv = packed_seq_params.cu_seqlens_kv_padded
    if cu_kv is None:
        cu_kv = packed_seq_params.cu_seqlens_kv
    if cu_q is None:
        raise ValueError("packed_seq_params has no cu_seqlens_q: pass the document boundaries")
    if cu_kv is not None and not torch.equal(cu_q.cpu(), cu_kv.cpu()):
        raise ValueError(
            "longctx attention is self-attention: cu_seqlens_q and cu_seqlens_kv must be equal"
        )
    return cu_q


def _check_padding(packed_seq_params, attn_mask_type) -> None:
    """Padded documents (``cu_seqlens_q_padded``) are only safe under a causal mask: padding
    sits at each document's end, where no real token looks."""
    cu, padded = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_q_padded
    if cu is None or padded is None or torch.equal(cu.cpu(), padded.cpu()):
        return
    if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
        raise ValueError(
            "padded packed documents (cu_seqlens_q_padded != cu_seqlens_q) need a causal mask: "
            "without it real tokens would attend to the padding"
        )


def gpt_layer_spec(
    *,
    transformer_engine: bool = False,
    strategy: str | None = None,
    layout: str = "zigzag",
    kernel: str = "auto",
    positions_follow_layout: bool = False,
    **spec_kwargs: Any,
):
    """megatron-core's GPT layer spec with :class:`LongctxCoreAttention` as core attention.

    ``transformer_engine=False``: ``get_gpt_layer_local_spec(**spec_kwargs)``; True:
    ``get_gpt_layer_with_transformer_engine_spec(**spec_kwargs)`` (needs Transformer Engine).
    The other arguments are :class:`LongctxSettings`.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_engine:
        if not getattr(gpt_layer_specs, "HAVE_TE", False):
            raise ImportError(
                "gpt_layer_spec(transformer_engine=True) needs Transformer Engine, which megatron "
                "could not import; install transformer-engine or use transformer_engine=False"
            )
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**spec_kwargs)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(**spec_kwargs)
    core = LongctxCoreAttention.with_settings(
        strategy=strategy, layout=layout, kernel=kernel,
        positions_follow_layout=positions_follow_layout,
    )
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    if not dataclasses.is_dataclass(attn.submodules) or not hasattr(
        attn.submodules, "core_attention"
    ):
        raise ValueError(
            "this megatron layer spec has no self_attention.submodules.core_attention to replace "
            f"(got {type(attn.submodules).__name__}); multi-latent attention is not supported"
        )
    attn.submodules = dataclasses.replace(attn.submodules, core_attention=core)
    return spec
