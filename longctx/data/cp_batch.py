"""From a packed sample to one context-parallel rank's micro-batch and its SequenceContext.

Pure functions of ``(sample, layout, cp_size, cp_rank)``.  Labels were shifted on the whole
sequence by the packer, so sharding ``input_ids`` and ``labels`` with the same layout keeps every
(token, label) pair together; each rank computes its loss on its own shard, and the global loss
is the sum over ranks divided by the global count of labels ``!= -100``.

- ``input_ids`` / ``labels``: ``[B, S] -> [B, S / P]`` via :meth:`Layout.shard`.
- ``position_ids [S / P]``: the global position of each local token (the layout's order); RoPE
  uses them (restarted per document by :attr:`SequenceContext.rope_position_ids`).
- ``cu_seqlens``: the global document boundaries, unchanged (masks work on global positions).

Example::

    >>> import torch
    >>> from longctx.data import PackedSample, shard_sample, to_sequence_context
    >>> s = PackedSample(torch.arange(8), torch.arange(1, 9), torch.tensor([0, 3, 8]))
    >>> mb = shard_sample(s, "zigzag", cp_size=2, cp_rank=1)
    >>> mb.input_ids.tolist(), mb.position_ids.tolist()
    ([[2, 3, 4, 5]], [2, 3, 4, 5])
    >>> ctx = to_sequence_context(mb, cp_group=None, strategy="zigzag")
    >>> ctx.layout, ctx.mask.cu_seqlens.tolist(), ctx.rope_position_ids.tolist()
    ('zigzag', [0, 3, 8], [2, 0, 1, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.mask import Mask
from ..models.context import SequenceContext
from ..parallel.layout import Layout
from .packing import IGNORE_INDEX, PackedSample

__all__ = [
    "CPMicroBatch",
    "PackedBatch",
    "check_seq_length",
    "collate",
    "concat_samples",
    "shard_sample",
    "to_sequence_context",
    "unshard_micro_batches",
]


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """``B`` packed samples stacked: ``input_ids`` / ``labels`` ``[B, S]``, one ``cu_seqlens``
    per row (rows have different documents)."""

    input_ids: Tensor
    labels: Tensor
    cu_seqlens: tuple[Tensor, ...]

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[-1])


@dataclass(frozen=True, eq=False)
class CPMicroBatch:
    """One CP rank's share of a packed sample (or batch).

    - ``input_ids`` / ``labels``: int64 ``[B, S / cp_size]`` in the layout's local order.
    - ``position_ids``: int64 ``[S / cp_size]``, global position of each local token.
    - ``cu_seqlens``: global boundaries ``[0, ..., S]`` (a tuple of one per row for a batch).
    - ``seq_length``: the global ``S``; ``layout`` / ``cp_size`` / ``cp_rank``: how it was cut.
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor | tuple[Tensor, ...]
    seq_length: int
    layout: str
    cp_size: int
    cp_rank: int

    @property
    def num_label_tokens(self) -> int:
        """Local tokens that carry a label (``!= -100``); sum over dp x cp for the loss divisor."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CPMicroBatch:
        """Move the token tensors (``cu_seqlens`` stays put: masks keep it on the CPU)."""
        return CPMicroBatch(
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            position_ids=self.position_ids.to(device, non_blocking=non_blocking),
            cu_seqlens=self.cu_seqlens,
            seq_length=self.seq_length,
            layout=self.layout,
            cp_size=self.cp_size,
            cp_rank=self.cp_rank,
        )


def collate(samples: Sequence[PackedSample]) -> PackedBatch:
    """Stack samples of one length into a :class:`PackedBatch` (a DataLoader ``collate_fn``)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    lengths = {s.seq_length for s in samples}
    if len(lengths) != 1:
        raise ValueError(f"samples of different lengths {sorted(lengths)} cannot be stacked")
    return PackedBatch(
        input_ids=torch.stack([s.input_ids for s in samples]),
        labels=torch.stack([s.labels for s in samples]),
        cu_seqlens=tuple(s.cu_seqlens for s in samples),
    )


def concat_samples(samples: Sequence[PackedSample]) -> PackedSample:
    """Lay ``B`` samples of length ``S`` end to end: one sample of ``B*S`` tokens.

    With the document mask this computes exactly what the ``[B, S]`` batch would (no token sees
    another sample, and RoPE restarts per document), as one sequence the CP strategies shard.
    """
    if not samples:
        raise ValueError("concat_samples needs at least one sample")
    cus, offset = [torch.zeros(1, dtype=torch.int64)], 0
    for s in samples:
        cus.append(s.cu_seqlens[1:].to(torch.int64) + offset)
        offset += s.seq_length
    return PackedSample(
        input_ids=torch.cat([s.input_ids for s in samples]),
        labels=torch.cat([s.labels for s in samples]),
        cu_seqlens=torch.cat(cus).to(samples[0].cu_seqlens.dtype),
    )


def check_seq_length(seq_length: int, layout: str | Layout, cp_size: int) -> None:
    """Raise ValueError unless ``seq_length`` splits evenly under ``layout`` over ``cp_size``."""
    lay = Layout.parse(layout)
    multiple = lay.required_multiple(cp_size)
    if seq_length % multiple:
        up = -(-seq_length // multiple) * multiple
        down = seq_length // multiple * multiple
        hint = f"{up}" if down == 0 else f"{down} or {up}"
        raise ValueError(
            f"seq_length={seq_length} is not a multiple of {multiple}, which the {str(lay)!r} "
            f"layout over cp_size={cp_size} ranks requires (contiguous: cp, zigzag: 2*cp, "
            f"striped:w: w*cp); set seq_length to a multiple of {multiple}, e.g. {hint}"
        )


def shard_sample(
    sample: PackedSample | PackedBatch, layout: str | Layout, cp_size: int, cp_rank: int
) -> CPMicroBatch:
    """This CP rank's micro-batch of ``sample`` (``[S]`` or a ``[B, S]`` batch).

    ``input_ids`` / ``labels`` ``[S]`` or ``[B, S]`` -> ``[1 or B, S / cp_size]``; raises
    ValueError when ``S`` is not a multiple of the layout's required multiple.
    """
    lay = Layout.parse(layout)
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"need 0 <= cp_rank < cp_size, got cp_rank={cp_rank} cp_size={cp_size}")
    ids, labels = sample.input_ids, sample.labels
    if ids.dim() == 1:
        ids, labels = ids[None], labels[None]
    if ids.dim() != 2 or ids.shape != labels.shape:
        raise ValueError(
            f"expected input_ids and labels of one shape [S] or [B, S], got "
            f"{tuple(sample.input_ids.shape)} and {tuple(sample.labels.shape)}"
        )
    S = int(ids.shape[1])
    check_seq_length(S, lay, cp_size)
    cus = sample.cu_seqlens if isinstance(sample.cu_seqlens, tuple) else (sample.cu_seqlens,)
    for cu in cus:
        if int(cu[0]) != 0 or int(cu[-1]) != S:
            raise ValueError(
                f"cu_seqlens must span the global sequence [0, {S}], got {cu.tolist()[:8]}..."
            )
    return CPMicroBatch(
        input_ids=lay.shard(ids, cp_size, cp_rank, dim=1),
        labels=lay.shard(labels, cp_size, cp_rank, dim=1),
        position_ids=lay.local_index(S, cp_size, cp_rank),
        cu_seqlens=sample.cu_seqlens,
        seq_length=S,
        layout=str(lay),
        cp_size=cp_size,
        cp_rank=cp_rank,
    )


def unshard_micro_batches(micro_batches: Sequence[CPMicroBatch]) -> PackedSample | PackedBatch:
    """Inverse of :func:`shard_sample`: the micro-batches of ranks ``0..P-1`` -> the sample.

    Returns a :class:`PackedSample` when the micro-batches hold one row, else a PackedBatch.
    """
    if not micro_batches:
        raise ValueError("unshard_micro_batches needs one micro-batch per CP rank")
    first = micro_batches[0]
    ranks = [mb.cp_rank for mb in micro_batches]
    if ranks != list(range(first.cp_size)) or any(
        mb.layout != first.layout or mb.cp_size != first.cp_size for mb in micro_batches
    ):
        raise ValueError(
            f"need the micro-batches of ranks 0..{first.cp_size - 1} in order, cut with one "
            f"layout; got ranks {ranks}"
        )
    lay = Layout.parse(first.layout)
    ids = lay.unshard([mb.input_ids for mb in micro_batches], dim=1)
    labels = lay.unshard([mb.labels for mb in micro_batches], dim=1)
    if isinstance(first.cu_seqlens, tuple):
        return PackedBatch(ids, labels, first.cu_seqlens)
    return PackedSample(ids[0], labels[0], first.cu_seqlens)


def to_sequence_context(
    mb: CPMicroBatch,
    cp_group: object = None,
    strategy: str = "ring",
    layout: str | Layout | None = None,
    kernel: str = "reference",
    *,
    cross_document_attention: bool = False,
    window: int | None = None,
) -> SequenceContext:
    """The :class:`SequenceContext` the model gets for ``mb``.

    ``mask = Mask(causal=True, cu_seqlens=mb.cu_seqlens, window=window)``: tokens attend only
    inside their document, unless ``cross_document_attention`` (then causal over the whole
    sequence).  ``layout`` defaults to the one ``mb`` was cut with; another one is an error.
    A ``[B, S]`` micro-batch needs one document mask for all rows: its rows must share
    ``cu_seqlens`` (else lay them end to end with :func:`concat_samples`, or allow
    cross-document attention).
    """
    if layout is not None and str(Layout.parse(layout)) != mb.layout:
        raise ValueError(
            f"the micro-batch was sharded with the {mb.layout!r} layout but the context asks for "
            f"{str(Layout.parse(layout))!r}; shard with the layout the CP strategy uses"
        )
    cu: Tensor | None = None
    if not cross_document_attention:
        if isinstance(mb.cu_seqlens, tuple):
            first = mb.cu_seqlens[0]
            if any(not torch.equal(c.cpu(), first.cpu()) for c in mb.cu_seqlens[1:]):
                raise ValueError(
                    f"the {len(mb.cu_seqlens)} rows of this micro-batch have different "
                    "documents, but attention takes one document mask per call; use "
                    "concat_samples(...) to make one [1, B*S] sequence, micro-batch size 1, "
                    "or cross_document_attention=True"
                )
            cu = first
        else:
            cu = mb.cu_seqlens
    return SequenceContext(
        position_ids=mb.position_ids,
        mask=Mask(causal=True, window=window, cu_seqlens=cu),
        cp_group=cp_group,
        strategy=strategy,
        layout=mb.layout,
        kernel=kernel,
    )
