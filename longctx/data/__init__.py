"""The data path: local files -> tokens -> packed sequences -> one CP rank's micro-batch.

- :mod:`.tokenizer`: the byte-level tokenizer (default) and local ``tokenizer.json`` files.
- :mod:`.dataset`: jsonl / json / parquet / text files through Hugging Face ``datasets``,
  offline, indexed or streamed.
- :mod:`.packing`: fixed-length packing with document boundaries (``cu_seqlens``) and labels
  shifted before sharding; a deterministic, resumable, DP-split :class:`PackedDataset`.
- :mod:`.cp_batch`: a packed sample -> this CP rank's :class:`CPMicroBatch` and
  :class:`~longctx.models.context.SequenceContext`.
- :mod:`.synthetic`: passkey / multi-query associative recall data and their accuracy metric.
- :mod:`.pipeline`: :class:`DataConfig` and :func:`build_packed_dataset`.

``datasets`` and ``tokenizers`` are imported only when files or a tokenizer.json are read.

Example (a training step's data on DP rank ``d``, CP rank ``c``)::

    >>> from longctx.data import (ByteTokenizer, PackedDataset, PackingConfig, shard_sample,
    ...                           to_sequence_context)
    >>> docs = ["first document", "second one", "a third, longer document"]
    >>> ds = PackedDataset(docs, ByteTokenizer(), PackingConfig(seq_length=32, seed=0),
    ...                    dp_rank=0, dp_size=1)
    >>> sample = next(iter(ds))                               # input_ids, labels [32]
    >>> mb = shard_sample(sample, "zigzag", cp_size=4, cp_rank=1)   # [1, 8] each
    >>> ctx = to_sequence_context(mb, cp_group=None, strategy="zigzag")
    >>> mb.input_ids.shape, ctx.position_ids.tolist()
    (torch.Size([1, 8]), [4, 5, 6, 7, 24, 25, 26, 27])
"""

from .cp_batch import (
    CPMicroBatch,
    PackedBatch,
    check_seq_length,
    collate,
    concat_samples,
    shard_sample,
    to_sequence_context,
    unshard_micro_batches,
)
from .dataset import (
    DatasetConfig,
    Document,
    DocumentList,
    DocumentSource,
    HFDocuments,
    detect_format,
    load_documents,
)
from .packing import (
    IGNORE_INDEX,
    PackedDataset,
    PackedSample,
    PackingConfig,
    check_packed_sample,
    pack_documents,
)
from .pipeline import DataConfig, build_packed_dataset, default_synthetic_path
from .synthetic import (
    AccuracyReport,
    SyntheticConfig,
    SyntheticSample,
    answer_accuracy,
    generate_samples,
    read_synthetic_dataset,
    write_synthetic_dataset,
)
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, TokenizerConfig, load_tokenizer

__all__ = [
    # tokenizer
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "TokenizerConfig",
    "load_tokenizer",
    # dataset
    "Document",
    "DocumentSource",
    "DocumentList",
    "HFDocuments",
    "DatasetConfig",
    "load_documents",
    "detect_format",
    # packing
    "IGNORE_INDEX",
    "PackedSample",
    "PackingConfig",
    "PackedDataset",
    "pack_documents",
    "check_packed_sample",
    # CP batching
    "PackedBatch",
    "CPMicroBatch",
    "collate",
    "concat_samples",
    "check_seq_length",
    "shard_sample",
    "unshard_micro_batches",
    "to_sequence_context",
    # synthetic tasks
    "SyntheticConfig",
    "SyntheticSample",
    "generate_samples",
    "write_synthetic_dataset",
    "read_synthetic_dataset",
    "AccuracyReport",
    "answer_accuracy",
    # pipeline
    "DataConfig",
    "build_packed_dataset",
    "default_synthetic_path",
]
