"""Packing documents into fixed-length training sequences, split over data-parallel ranks.

**Packing.** Every document becomes ``[<bos>] tokens <eos>`` (``<bos>`` only with
``add_bos``) and documents are laid end to end into sequences of exactly ``seq_length`` tokens.
A document is never cut to fill the tail of a sequence: when it does not fit in the room left,
the sequence is closed with padding and the document starts the next one.  A document longer
than ``seq_length`` (with its ``<eos>``) is cut into ``seq_length`` pieces starting at a fresh
sequence (``long_documents="split"``; its last, shorter piece is then followed by the next
documents) or raises ValueError (``long_documents="error"``).  Documents without tokens are
skipped.

Each :class:`PackedSample` records its document boundaries as ``cu_seqlens = [0, e1, ..., S]``
(a piece of a cut document counts as a document, and the padding is one final document).  The
labels are shifted here, on the whole sequence, *before* any context-parallel sharding::

    labels[t] = input_ids[t + 1]   when t and t + 1 are in the same document
    labels[t] = -100               at every document's last token and on padding

so no token is ever trained to predict a token of another document (or another sequence).

**Order, DP split and resumption.** Documents are read in an order fixed by ``seed`` and the
epoch (a full permutation for indexed sources, a permutation within windows of
``shuffle_window`` documents for streamed ones), packed greedily into one *global* stream of
samples ``0, 1, 2, ...``; data-parallel rank ``r`` of ``dp_size`` takes the samples whose index
is ``r (mod dp_size)``.  Every rank packs the whole stream (it must tokenize the documents to
know where samples start) and keeps its own share.

The position in the stream is the index of the next global sample ``G`` plus the packer's cursor
at that sample (epoch, document position, token offset into it): packing is a pure function of
the cursor, so ``load_state_dict`` restarts exactly there without replaying anything.  The state
is the same on every DP rank (ranks advance in lock step, one round of ``dp_size`` samples per
step; a checkpoint stores it once) and does not depend on ``dp_size``: resumed with ``dp_size'``,
rank ``r`` continues with samples ``G + r, G + r + dp_size', ...``, so together the ranks see
exactly the samples ``G, G+1, ...`` an uninterrupted run would have seen.

Example::

    >>> from longctx.data import ByteTokenizer, PackedDataset, PackingConfig
    >>> docs = ["hello", "a", "bigger document"]
    >>> ds = PackedDataset(docs, ByteTokenizer(), PackingConfig(seq_length=8, shuffle=False))
    >>> s = next(iter(ds))
    >>> s.input_ids.tolist(), s.cu_seqlens.tolist()
    ([104, 101, 108, 108, 111, 258, 97, 258], [0, 6, 8])
    >>> s.labels.tolist()
    [101, 108, 108, 111, 258, -100, 258, -100]
    >>> state = ds.state_dict(); state["sample_index"]
    1
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from .dataset import Document, DocumentList, DocumentSource
from .tokenizer import Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "PackedDataset",
    "PackedSample",
    "PackingConfig",
    "check_packed_sample",
    "pack_documents",
]

IGNORE_INDEX = -100
LongDocuments = Literal["split", "error"]
_STATE_VERSION = 1
_TOKENIZE_BLOCK = 64  # documents tokenized per encode_batch call


@dataclass(frozen=True, eq=False)
class PackedSample:
    """One packed training sequence (global: before context-parallel sharding).

    - ``input_ids``: int64 ``[S]``.
    - ``labels``: int64 ``[S]``, next token inside a document, ``-100`` at each document's last
      token and on padding.
    - ``cu_seqlens``: int32 ``[n + 1]``, document boundaries ``[0, e1, ..., S]`` (padding, when
      present, is the last document).
    """

    input_ids: Tensor
    labels: Tensor
    cu_seqlens: Tensor

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def num_documents(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    def document_ids(self) -> Tensor:
        """int64 ``[S]``: index of the document each token belongs to."""
        cu = self.cu_seqlens.to(torch.int64)
        return torch.searchsorted(cu, torch.arange(self.seq_length), right=True) - 1


@dataclass(frozen=True)
class PackingConfig:
    """How documents become training sequences (see the module docstring).

    - ``seq_length``: tokens per packed sequence (the model's global sequence length).
    - ``long_documents``: ``"split"`` cuts a document longer than ``seq_length`` into pieces;
      ``"error"`` raises, naming the document.
    - ``shuffle`` / ``seed``: document order per epoch (deterministic given the seed).
    - ``shuffle_window``: streamed sources are shuffled within windows of this many documents
      (indexed sources get a full permutation).
    - ``num_epochs``: passes over the documents; None repeats forever (the trainer stops).
    - ``drop_last``: with ``num_epochs`` set, stop every DP rank after the last *complete* round
      of ``dp_size`` samples so all ranks take the same number of steps.
    - ``add_bos``: prepend the tokenizer's ``<bos>`` to every document.
    - ``cross_document_attention``: let packed documents attend to each other (no document mask;
      labels still never cross a document boundary); read by
      :func:`longctx.data.to_sequence_context`.
    """

    seq_length: int
    long_documents: LongDocuments = "split"
    shuffle: bool = True
    seed: int = 0
    shuffle_window: int = 10_000
    num_epochs: int | None = None
    drop_last: bool = True
    add_bos: bool = False
    cross_document_attention: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.seq_length, int) or self.seq_length < 2:
            raise ValueError(f"seq_length must be an int >= 2, got {self.seq_length!r}")
        if self.long_documents not in get_args(LongDocuments):
            raise ValueError(
                f"long_documents must be one of {list(get_args(LongDocuments))}, got "
                f"{self.long_documents!r}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {self.shuffle_window}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PackingConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown packing config key(s) {unknown}; allowed: "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)


# -- building one sample ------------------------------------------------------------------------
def _make_sample(pieces: list[np.ndarray], seq_length: int, pad_id: int) -> PackedSample:
    ids = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int64)
    bounds = [0]
    at = 0
    for p in pieces:
        n = len(p)
        ids[at : at + n] = p
        labels[at : at + n - 1] = p[1:]  # the last token of the piece keeps -100
        at += n
        bounds.append(at)
    if at < seq_length:
        bounds.append(seq_length)  # the padding is one more document
    return PackedSample(
        input_ids=torch.from_numpy(ids),
        labels=torch.from_numpy(labels),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
    )


def check_packed_sample(sample: PackedSample, pad_id: int | None = None) -> None:
    """Raise AssertionError unless ``sample`` keeps the packing invariants.

    ``cu_seqlens`` spans ``[0, S]`` strictly increasing, and ``labels`` is the next token inside
    each document and ``-100`` at each document's last token (so no label crosses a boundary);
    with ``pad_id``, documents made only of padding must be all ``-100``.
    """
    S = sample.seq_length
    cu = sample.cu_seqlens.tolist()
    assert sample.input_ids.shape == (S,) and sample.labels.shape == (S,), "shapes differ"
    assert cu[0] == 0 and cu[-1] == S, f"cu_seqlens {cu} must span [0, {S}]"
    assert all(a < b for a, b in zip(cu, cu[1:])), f"cu_seqlens {cu} must increase"
    ids, labels = sample.input_ids, sample.labels
    expected = torch.full_like(labels, IGNORE_INDEX)
    for a, b in zip(cu, cu[1:]):
        if pad_id is None or not bool((ids[a:b] == pad_id).all()):  # padding keeps -100
            expected[a : b - 1] = ids[a + 1 : b]
    assert torch.equal(labels, expected), "labels are not the in-document next tokens"


# -- the global stream ---------------------------------------------------------------------------
@dataclass
class _Cursor:
    epoch: int = 0
    document: int = 0  # position in the epoch's document order
    offset: int = 0  # tokens of that document already packed (long documents only)

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "document": self.document, "offset": self.offset}


@dataclass
class _Doc:
    position: int  # in this epoch's order
    source_index: int  # index in the source
    tokens: np.ndarray = field(repr=False)  # int64 [L], with <bos>/<eos>


class _Packer:
    """Packs the global sample stream from a cursor; a pure function of (source, config, cursor)."""

    def __init__(self, owner: PackedDataset, cursor: _Cursor) -> None:
        self._o = owner
        self.cursor = _Cursor(cursor.epoch, cursor.document, cursor.offset)
        self._docs: Iterator[_Doc] | None = None
        self._current: _Doc | None = None
        self._epoch_had_tokens = False
        self._done = owner.config.num_epochs is not None and cursor.epoch >= owner.config.num_epochs

    def _peek(self) -> _Doc | None:
        """The document at the cursor (skipping empty ones), or None after the last epoch."""
        while self._current is None:
            if self._done:
                return None
            if self._docs is None:
                self._docs = self._o._tokenized(self.cursor.epoch, self.cursor.document)
                if self.cursor.document > 0 or self.cursor.offset > 0:
                    self._epoch_had_tokens = True  # resumed mid-epoch: earlier docs were packed
            doc = next(self._docs, None)
            if doc is None:  # end of the epoch
                if not self._epoch_had_tokens:
                    raise ValueError(
                        f"{self._o.description} produced no documents with tokens in epoch "
                        f"{self.cursor.epoch}; check the files and the text field"
                    )
                self.cursor = _Cursor(self.cursor.epoch + 1, 0, 0)
                self._docs, self._epoch_had_tokens = None, False
                num_epochs = self._o.config.num_epochs
                self._done = num_epochs is not None and self.cursor.epoch >= num_epochs
                continue
            if len(doc.tokens) == 0:
                self.cursor.document = doc.position + 1
                continue
            self._epoch_had_tokens = True
            self._current = doc
        return self._current

    def _advance(self) -> None:
        assert self._current is not None
        self.cursor.document = self._current.position + 1
        self.cursor.offset = 0
        self._current = None

    def next_sample(self) -> PackedSample | None:
        cfg = self._o.config
        S = cfg.seq_length
        pieces: list[np.ndarray] = []
        used = 0
        while used < S:
            doc = self._peek()
            if doc is None:
                break
            L = len(doc.tokens)
            room = S - used
            if L > S:
                if cfg.long_documents == "error":
                    raise ValueError(
                        f"document {doc.source_index} of {self._o.description} has {L} tokens "
                        f"(with its <eos>{'/<bos>' if cfg.add_bos else ''}), more than "
                        f"seq_length={S}; set long_documents='split' to cut long documents "
                        "across sequences, raise seq_length, or remove the document"
                    )
                if self.cursor.offset == 0 and used > 0:
                    break  # a long document starts a fresh sequence
                off = self.cursor.offset
                take = min(room, L - off)
                pieces.append(doc.tokens[off : off + take])
                used += take
                self.cursor.offset = off + take
                if self.cursor.offset == L:
                    self._advance()
            elif L <= room:
                pieces.append(doc.tokens)
                used += L
                self._advance()
            else:
                break  # does not fit: pad this sequence, the document opens the next one
        if not pieces:
            return None
        return _make_sample(pieces, S, self._o.tokenizer.pad_id)


class PackedDataset(torch.utils.data.IterableDataset):
    """Packed samples for one data-parallel rank; deterministic and resumable.

    ``documents``: a :class:`~longctx.data.dataset.DocumentSource` (e.g. from
    :func:`~longctx.data.dataset.load_documents`) or any iterable of strings / token-id lists.
    Iterating yields :class:`PackedSample` (``input_ids``/``labels`` ``[seq_length]``); the
    iterator continues from the current position (the start, or what :meth:`load_state_dict`
    restored), and :meth:`state_dict` reports the position after the samples yielded so far.

    Iterate it in the training process (a ``DataLoader`` with ``num_workers=0``, or directly):
    a worker process would keep the position in its own copy, so workers are refused.
    """

    def __init__(
        self,
        documents: DocumentSource | Iterable[Document],
        tokenizer: Tokenizer,
        config: PackingConfig,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        description: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"dp_size must be an int >= 1, got {dp_size!r}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"dp_rank must satisfy 0 <= dp_rank < dp_size={dp_size}, got {dp_rank!r}"
            )
        if config.add_bos and tokenizer.bos_id is None:
            raise ValueError(
                f"add_bos=True but the tokenizer {tokenizer!r} has no <bos> token; set "
                "TokenizerConfig.bos_token or add_bos=False"
            )
        if not isinstance(documents, DocumentSource):
            documents = DocumentList(documents)
        self.source = documents
        self.tokenizer = tokenizer
        self.config = config
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.description = description or getattr(documents, "description", "the documents")
        self._sample_index = 0
        self._cursor = _Cursor()
        self._order_cache: tuple[int, np.ndarray] | None = None

    # -- document order and tokenization ---------------------------------------------------------
    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, *keys])

    def _order(self, epoch: int, n: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            perm = self._rng(epoch).permutation(n)
            self._order_cache = (epoch, perm.astype(np.int32) if n < 2**31 else perm)
        return self._order_cache[1]

    def _ordered(self, epoch: int, start: int) -> Iterator[tuple[int, int, Document]]:
        """``(position, source index, document)`` of this epoch's order, from ``start``."""
        src, cfg = self.source, self.config
        n = src.num_documents
        if n is not None:
            order = self._order(epoch, n) if cfg.shuffle else None
            block = 1024
            for lo in range(start, n, block):
                hi = min(lo + block, n)
                idx = order[lo:hi].tolist() if order is not None else list(range(lo, hi))
                for j, doc in enumerate(src.get(idx)):
                    yield lo + j, idx[j], doc
            return
        if not cfg.shuffle:
            for i, doc in enumerate(src.iter_from(start), start=start):
                yield i, i, doc
            return
        W = cfg.shuffle_window
        w = start // W
        it = src.iter_from(w * W)
        while True:
            docs = list(itertools.islice(it, W))
            if not docs:
                return
            perm = self._rng(epoch, w + 1).permutation(len(docs))
            for j in range(max(start - w * W, 0), len(docs)):
                yield w * W + j, w * W + int(perm[j]), docs[perm[j]]
            if len(docs) < W:
                return
            w += 1

    def _tokenized(self, epoch: int, start: int) -> Iterator[_Doc]:
        tok, cfg = self.tokenizer, self.config
        prefix = [tok.bos_id] if cfg.add_bos else []
        ordered = self._ordered(epoch, start)
        while True:
            block = list(itertools.islice(ordered, _TOKENIZE_BLOCK))
            if not block:
                return
            texts = [d for _, _, d in block if isinstance(d, str)]
            encoded = iter(tok.encode_batch(texts)) if texts else iter(())
            for pos, index, doc in block:
                ids = next(encoded) if isinstance(doc, str) else doc
                if len(ids) == 0:
                    arr = np.empty(0, dtype=np.int64)
                else:
                    arr = np.asarray([*prefix, *ids, tok.eos_id], dtype=np.int64)
                    if not isinstance(doc, str):  # pre-tokenized: check the ids
                        lo, hi = int(arr.min()), int(arr.max())
                        if lo < 0 or hi >= tok.vocab_size:
                            raise ValueError(
                                f"document {index} of {self.description} holds token id "
                                f"{hi if hi >= tok.vocab_size else lo}, outside the tokenizer's "
                                f"vocab [0, {tok.vocab_size}); pre-tokenized data must use the "
                                "configured tokenizer's ids"
                            )
                yield _Doc(pos, index, arr)

    # -- iteration -------------------------------------------------------------------------------
    def iter_global(self, state: dict[str, Any] | None = None) -> Iterator[PackedSample]:
        """Every sample of the global stream (all DP ranks'), from ``state`` or the start.

        Does not touch this dataset's own position.
        """
        cursor = self._state_cursor(state)[1] if state is not None else _Cursor()
        packer = _Packer(self, cursor)
        while (sample := packer.next_sample()) is not None:
            yield sample

    def __iter__(self) -> Iterator[PackedSample]:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "PackedDataset keeps its resumable position in the process that iterates it; "
                "use DataLoader(num_workers=0) (a worker's copy would lose the position and "
                "several workers would repeat samples)"
            )
        return self._iterate()

    def _iterate(self) -> Iterator[PackedSample]:
        dp, rank, cfg = self.dp_size, self.dp_rank, self.config
        packer = _Packer(self, self._cursor)
        g = self._sample_index
        while True:
            round_: list[PackedSample] = []
            for _ in range(dp):
                sample = packer.next_sample()
                if sample is None:
                    break
                round_.append(sample)
            if len(round_) < dp and (cfg.drop_last or rank >= len(round_)):
                return
            g += len(round_)
            # record the position *before* handing the sample out: once the caller holds it,
            # the whole round counts as consumed (every rank takes its sample of it this step)
            self._sample_index = g
            self._cursor = _Cursor(**packer.cursor.as_dict())
            yield round_[rank]
            if len(round_) < dp:
                return

    # -- state -----------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "seq_length": cfg.seq_length,
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "shuffle_window": cfg.shuffle_window,
            "long_documents": cfg.long_documents,
            "add_bos": cfg.add_bos,
            "num_documents": self.source.num_documents,
            "vocab_size": self.tokenizer.vocab_size,
            "eos_id": self.tokenizer.eos_id,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the samples yielded so far; identical on every DP rank.

        ``{"version", "sample_index": next global sample, "epoch", "document", "offset"}`` plus
        the settings the stream depends on (checked by :meth:`load_state_dict`).  Plain ints and
        strings: safe for ``torch.save`` / torch.distributed.checkpoint / JSON.
        """
        return {
            "version": _STATE_VERSION,
            "sample_index": self._sample_index,
            **self._cursor.as_dict(),
            **self._fingerprint(),
        }

    def _state_cursor(self, state: dict[str, Any]) -> tuple[int, _Cursor]:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"data state version {state.get('version')!r} is not {_STATE_VERSION}; it was "
                "written by another longctx version"
            )
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"cannot restore the data position: the packed stream depends on settings that "
                f"changed ({detail}); use the run's original data settings, or start the data "
                "from the beginning (do not load its state)"
            )
        try:
            g = int(state["sample_index"])
            cursor = _Cursor(int(state["epoch"]), int(state["document"]), int(state["offset"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed data state {state!r}: {e}") from e
        if g < 0 or cursor.epoch < 0 or cursor.document < 0 or cursor.offset < 0:
            raise ValueError(f"malformed data state {state!r}: negative position")
        return g, cursor

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, possibly of another dp_size)."""
        self._sample_index, self._cursor = self._state_cursor(state)


def pack_documents(
    documents: Iterable[Document], tokenizer: Tokenizer, config: PackingConfig
) -> list[PackedSample]:
    """All samples one pass over ``documents`` makes (no shuffle unless ``config`` asks)."""
    cfg = dataclasses.replace(config, num_epochs=1)
    return list(PackedDataset(documents, tokenizer, cfg).iter_global())
