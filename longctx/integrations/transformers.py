"""Hugging Face transformers adapter: longctx attention implementations and CP batches.

Importing this module registers, through the public ``AttentionInterface.register`` and
``AttentionMaskInterface.register``, the attention implementations ``longctx`` (strategy
``"auto"``), ``longctx_ring``, ``longctx_zigzag``, ``longctx_striped``, ``longctx_allgather``,
``longctx_ulysses`` and ``longctx_hybrid``.  Each takes transformers' ``[B, H, S, D]`` q/k/v and
returns ``[B, S, H, D]``; its mask entry returns no mask tensor: the attention builds a
:class:`~longctx.kernels.mask.Mask` on *global* positions (causal, the model's sliding window,
packed documents), which is what lets one rank score its shard against another's.

The context-parallel group reaches the attention as a model keyword, not a global:
:func:`shard_batch` turns a global batch into this rank's model inputs, ``input_ids``,
``position_ids`` (global positions, sharded: RoPE stays right under any layout),
``labels``/``shift_labels`` (shifted *before* sharding, so no label is lost at shard edges),
``num_items_in_batch`` (the label count of the whole sequence, so each rank's loss is its share of
the global mean) and ``longctx_cp`` (a :class:`CPInfo`: group, layout, global document bounds).
Summing the ranks' losses gives the plain model's loss; summing their gradients over the CP group
(and averaging over data parallel ranks, as usual) gives its gradients.

A model's config may carry ``longctx_cp_size``; a batch whose group has another size is refused.

Needs ``pip install "longctx[transformers]"`` (transformers >=5,<6).

Example (one process; with CP, every rank runs the same lines on its group)::

    import longctx.integrations.transformers as lt
    model = LlamaForCausalLM(LlamaConfig(..., attn_implementation="longctx_zigzag"))
    batch = lt.shard_batch(input_ids, group=cp_group, layout="zigzag")
    loss = model(**batch).loss            # this rank's share; all-reduce it to report
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.mask import Mask
from ..parallel.api import attention
from ..parallel.layout import Layout
from ._deps import require

require("transformers")

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

__all__ = [
    "IMPLEMENTATIONS",
    "CPInfo",
    "attention_forward",
    "cp_all_reduce_grads",
    "document_bounds",
    "register",
    "shard_batch",
]

# attention implementation name -> (longctx strategy, the layout shard_batch uses by default)
IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "longctx": ("auto", "zigzag"),
    "longctx_ring": ("ring", "contiguous"),
    "longctx_zigzag": ("zigzag", "zigzag"),
    "longctx_striped": ("striped", "striped"),
    "longctx_allgather": ("allgather", "contiguous"),
    "longctx_ulysses": ("ulysses", "contiguous"),
    "longctx_hybrid": ("hybrid", "contiguous"),
}
CP_KWARG = "longctx_cp"


@dataclass(frozen=True, eq=False)
class CPInfo:
    """What the attention needs about a context-parallel batch (the ``longctx_cp`` keyword).

    ``group``: the CP ProcessGroup (``HybridGroups`` for ``longctx_hybrid``; None: one process);
    ``layout``: how the batch was sharded; ``cu_seqlens``: global document boundaries
    ``[0, ..., S]`` of a packed row (None: one document per row).
    """

    group: object = None
    layout: Layout = field(default_factory=Layout)
    cu_seqlens: Tensor | None = None

    @property
    def world_size(self) -> int:
        if self.group is None:
            return 1
        if isinstance(self.group, dist.ProcessGroup):
            return dist.get_world_size(self.group)
        return dist.get_world_size(self.group.ulysses) * dist.get_world_size(self.group.ring)


def document_bounds(position_ids: Tensor) -> Tensor | None:
    """Global document boundaries of packed rows from position ids that restart at 0.

    ``position_ids [B, S]`` (or ``[S]``) -> int64 ``cu_seqlens [0, ..., S]``, or None for one
    document per row.  All rows must share one packing (the mask is one for the whole batch).

    Example::

        >>> import torch
        >>> document_bounds(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]]))
        tensor([0, 3, 5, 8])
    """
    pos = position_ids.reshape(-1, position_ids.shape[-1])  # [B, S]
    if bool((pos != pos[:1]).any()):
        raise ValueError(
            "packed rows with different document boundaries in one batch: longctx applies one "
            "document mask per batch; pack with the same boundaries in every row or use batch 1"
        )
    starts = torch.nonzero(pos[0, 1:] == 0).flatten() + 1
    if starts.numel() == 0:
        return None
    S = pos.shape[1]
    return torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), S)]).to(torch.int64)


def _cp_size_of(config) -> int | None:
    size = getattr(config, "longctx_cp_size", None) if config is not None else None
    return int(size) if size is not None else None


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    strategy: str = "ring",
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function face over :func:`longctx.attention`.

    ``query [B, H, S, D]``, ``key/value [B, H_kv, S, D]`` (this rank's shard) ->
    ``(out [B, S, H, D], None)``.  The batch's :class:`CPInfo` arrives as the ``longctx_cp``
    keyword (from :func:`shard_batch`); without it the call is one process over the whole row,
    with documents read from the ``position_ids`` keyword when it is given.
    """
    if attention_mask is not None:
        raise ValueError(
            "longctx attention got a mask tensor; its mask comes from global positions. Pad-free "
            "batches only: pack documents (position_ids restarting at 0) instead of padding"
        )
    if dropout and module.training:
        raise ValueError(
            f"longctx attention has no attention dropout (got {dropout}); set the model config's "
            "attention_dropout=0.0"
        )
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"longctx attention is for training and prefill without a KV cache (q has "
            f"{query.shape[2]} tokens, k {key.shape[2]}); for generation switch the model back "
            "with model.set_attn_implementation('sdpa')"
        )
    cp: CPInfo | None = kwargs.get(CP_KWARG)
    expected = _cp_size_of(getattr(module, "config", None))
    if cp is None:
        if expected not in (None, 1):
            raise ValueError(
                f"the model's config has longctx_cp_size={expected} but the forward call got no "
                f"{CP_KWARG!r} keyword: pass the batch made by "
                "longctx.integrations.transformers.shard_batch(..., group=cp_group)"
            )
        position_ids = kwargs.get("position_ids")
        cp = CPInfo(cu_seqlens=document_bounds(position_ids) if position_ids is not None else None)
    elif expected is not None and cp.world_size != expected:
        raise ValueError(
            f"the model's config has longctx_cp_size={expected} but the batch's CP group has "
            f"{cp.world_size} ranks; shard the batch over the group the model was set up for"
        )
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    mask = Mask(
        causal=bool(getattr(module, "is_causal", True)), window=window, cu_seqlens=cp.cu_seqlens
    )
    q_bshd = query.transpose(1, 2)  # [B, H, S, D] -> [B, S, H, D]
    k_bshd = key.transpose(1, 2)
    v_bshd = value.transpose(1, 2)
    if cp.world_size == 1:
        out = attention(q_bshd, k_bshd, v_bshd, None, mask=mask, scale=scaling)
    else:
        out = attention(
            q_bshd, k_bshd, v_bshd, cp.group, strategy=strategy, layout=cp.layout, mask=mask,
            scale=scaling,
        )
    return out, None  # [B, S, H, D]


def _mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> None:
    """transformers' mask entry for the longctx implementations: no tensor (see the module doc).

    A 2-D padding mask with padded positions is refused; an all-ones one is dropped.
    """
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "longctx attention does not take padding masks: its masks are on global positions. "
            "Pack documents (position_ids restarting at 0, labels -100 on padding) instead"
        )


def _make(name: str, strategy: str):
    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        return attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, strategy=strategy,
            **kwargs,
        )

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"transformers attention implementation {name!r}: strategy {strategy!r}."
    return fn


def register() -> list[str]:
    """Register every name of :data:`IMPLEMENTATIONS` (done on import; idempotent)."""
    for name, (strategy, _) in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _make(name, strategy))
        AttentionMaskInterface.register(name, _mask_interface)
    return list(IMPLEMENTATIONS)


register()


def shard_batch(
    input_ids: Tensor,
    labels: Tensor | None = None,
    position_ids: Tensor | None = None,
    *,
    group=None,
    layout: str | Layout = "zigzag",
    ignore_index: int = -100,
) -> dict:
    """A global batch -> this rank's keyword arguments for a transformers causal LM.

    ``input_ids [B, S]`` (``S`` a multiple of the layout's ``required_multiple(P)``),
    ``labels [B, S]`` (default: ``input_ids``; unshifted, as transformers takes them),
    ``position_ids [B, S]`` (default ``0..S-1``; restarting at 0 marks packed documents).
    Returns ``input_ids``, ``position_ids``, ``labels`` and ``shift_labels`` ``[B, S/P]`` (labels
    shifted by one over the *global* row, then sharded), ``num_items_in_batch`` (the global count
    of labels that are not ``ignore_index``) and ``longctx_cp`` (:class:`CPInfo`).

    Example::

        >>> import torch
        >>> b = shard_batch(torch.arange(8)[None], layout="zigzag")   # one process
        >>> b["shift_labels"].tolist(), int(b["num_items_in_batch"])
        ([[1, 2, 3, 4, 5, 6, 7, -100]], 7)
    """
    layout = Layout.parse(layout)
    B, S = input_ids.shape
    if labels is None:
        labels = input_ids
    if position_ids is None:
        position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
    position_ids = position_ids.expand(B, S)
    shift_labels = torch.cat([labels[:, 1:], labels.new_full((B, 1), ignore_index)], dim=1)
    info = CPInfo(group=group, layout=layout, cu_seqlens=document_bounds(position_ids))
    P = info.world_size
    if P > 1:
        rank = _rank_in(group)
        local = [layout.shard(x, P, rank) for x in (input_ids, position_ids, shift_labels)]
    else:
        local = [input_ids, position_ids.contiguous(), shift_labels]
    return {
        "input_ids": local[0],
        "position_ids": local[1],
        "labels": local[2],  # unused by the loss when shift_labels is given; non-None turns it on
        "shift_labels": local[2],
        "num_items_in_batch": (shift_labels != ignore_index).sum(),
        CP_KWARG: info,
    }


def _rank_in(group) -> int:
    if isinstance(group, dist.ProcessGroup):
        return dist.get_rank(group)
    u = group.ulysses  # HybridGroups: CP rank = ring_rank * U + ulysses_rank
    return dist.get_rank(group.ring) * dist.get_world_size(u) + dist.get_rank(u)


def cp_all_reduce_grads(model: torch.nn.Module, group) -> None:
    """Sum every parameter's gradient over the CP group (each rank's loss is its share)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or group is None:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
