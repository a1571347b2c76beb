"""Documents from local files through Hugging Face ``datasets``, offline.

:func:`load_documents` reads jsonl / json, parquet or plain-text files (a file, a folder, a glob,
or a list of them) with the packaged ``datasets`` builders and returns a
:class:`DocumentSource`: an ordered collection of document strings that the packer reads either
by index (a memory-mapped Arrow table, ``streaming=False``) or front to back
(``streaming=True``: nothing is converted or cached, for files too large to copy).

Nothing is downloaded: only packaged builders are used, the paths are checked to be local
files, and the Hub offline flags are switched on *while the loader runs* (and restored after),
never for the whole process.

- jsonl / json: one document per record, text under ``text_field`` (default ``"text"``).
- parquet: one document per row, text in the ``text_field`` column.
- Pre-tokenized data: a ``text_field`` holding lists of token ids is passed through untokenized
  (ids must be below the tokenizer's vocab size; the packer still appends ``<eos>``).
- text: ``text_unit="line"`` (one document per line, the ``datasets`` default),
  ``"paragraph"`` (blank-line separated) or ``"document"`` (one per file).

Example::

    >>> import json, tempfile, pathlib
    >>> from longctx.data.dataset import DatasetConfig, load_documents
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.jsonl").write_text("\\n".join(json.dumps({"text": t}) for t in ["ab", "cd"]))
    >>> docs = load_documents(DatasetConfig(str(d / "a.jsonl"), cache_dir=str(d / "cache")))
    >>> docs.num_documents, docs.get([1, 0])
    (2, ['cd', 'ab'])
    >>> list(load_documents(DatasetConfig(str(d / "a.jsonl"), streaming=True)).iter_from(1))
    ['cd']
"""

from __future__ import annotations

import contextlib
import glob as _glob
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, runtime_checkable

__all__ = [
    "DatasetConfig",
    "Document",
    "DocumentList",
    "DocumentSource",
    "HFDocuments",
    "detect_format",
    "load_documents",
]

Document = str | Sequence[int]
"""A document: text (tokenized by the packer) or already a list of token ids."""

FileFormat = Literal["auto", "jsonl", "json", "parquet", "text"]
TextUnit = Literal["line", "paragraph", "document"]

_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "text": "text"}
_STREAM_ABOVE_BYTES = 1 << 30  # streaming="auto": stream when the files exceed 1 GiB


@runtime_checkable
class DocumentSource(Protocol):
    """An ordered collection of documents.

    ``num_documents`` is their count when known (random access through :meth:`get`), None for
    a stream that can only be read front to back with :meth:`iter_from`.
    """

    @property
    def num_documents(self) -> int | None: ...

    def get(self, indices: Sequence[int]) -> list[Document]: ...

    def iter_from(self, start: int) -> Iterator[Document]: ...


class DocumentList:
    """Documents held in memory (strings or token-id lists): tests, synthetic data, small sets."""

    def __init__(self, docs: Iterable[Document]) -> None:
        self._docs = list(docs)

    @property
    def num_documents(self) -> int:
        return len(self._docs)

    def get(self, indices: Sequence[int]) -> list[Document]:
        return [self._docs[i] for i in indices]

    def iter_from(self, start: int) -> Iterator[Document]:
        return itertools.islice(iter(self._docs), start, None)

    def __len__(self) -> int:
        return len(self._docs)


class HFDocuments:
    """The ``text_field`` column of a ``datasets.Dataset`` (indexed) or ``IterableDataset``.

    Every value must be a string (or a list of token ids: pre-tokenized data); a missing (None)
    or other value raises ValueError naming the document's position and ``description`` (the
    files it came from).
    """

    def __init__(self, dataset: Any, text_field: str, description: str = "dataset") -> None:
        import datasets

        self.text_field = text_field
        self.description = description
        self._streaming = isinstance(dataset, datasets.IterableDataset)
        columns = dataset.column_names
        if columns is not None and text_field not in columns:
            raise ValueError(
                f"{description} has no field {text_field!r}; its fields are {sorted(columns)}. "
                "Set the dataset's text_field to the field holding the document text"
            )
        if self._streaming:
            self._ds = dataset.select_columns([text_field]) if columns else dataset
        else:
            self._ds = dataset.select_columns([text_field])

    @property
    def num_documents(self) -> int | None:
        return None if self._streaming else self._ds.num_rows

    def _check(self, value: Any, position: int) -> Document:
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and (not value or isinstance(value[0], int)):
            return value  # pre-tokenized: token ids, used as they are
        raise ValueError(
            f"{self.description}: document {position} has {self.text_field}={value!r:.60} "
            f"(type {type(value).__name__}); every record needs a string (or a list of token "
            f"ids) in {self.text_field!r}"
        )

    def get(self, indices: Sequence[int]) -> list[Document]:
        if self._streaming:
            raise TypeError(
                f"{self.description} is streamed and can only be read in order (iter_from)"
            )
        indices = [int(i) for i in indices]
        values = self._ds[indices][self.text_field] if indices else []
        return [self._check(v, i) for v, i in zip(values, indices)]

    def iter_from(self, start: int) -> Iterator[Document]:
        if not self._streaming:
            return self._iter_indexed(start)
        return self._iter_stream(start)

    def _iter_indexed(self, start: int, block: int = 1024) -> Iterator[Document]:
        n = self._ds.num_rows
        for lo in range(start, n, block):
            yield from self.get(range(lo, min(lo + block, n)))

    def _iter_stream(self, start: int) -> Iterator[Document]:
        ds = self._ds.skip(start) if start else self._ds
        rows = iter(ds)
        for i in itertools.count(start):
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # a parse error surfaces while streaming
                raise ValueError(
                    f"could not read {self.description} (near document {i}): {e}"
                ) from e
            if self.text_field not in row:
                raise ValueError(
                    f"{self.description}: document {i} has no field {self.text_field!r}; its "
                    f"fields are {sorted(row)}. Set the dataset's text_field"
                )
            yield self._check(row[self.text_field], i)


@dataclass(frozen=True)
class DatasetConfig:
    """Where the training documents come from.

    - ``path``: a file, a folder (every file in it with a known suffix, sorted), a glob
      (``data/*.jsonl``), or a list of these; all must be local and of one format.
    - ``format``: ``"auto"`` (from the suffix: .jsonl/.ndjson/.json, .parquet/.pq,
      .txt/.text/.md, optionally compressed .gz/.bz2/.xz/.zst) or one of ``jsonl``, ``json``,
      ``parquet``, ``text``.
    - ``text_field``: the record field (jsonl/json/parquet) holding the document text.
    - ``text_unit``: how plain text splits into documents: ``line``, ``paragraph``, ``document``.
    - ``streaming``: True reads the files front to back without an Arrow cache (for huge
      files); False converts them once to a memory-mapped Arrow cache (random access, shuffled
      exactly); ``"auto"`` streams above 1 GiB of input.
    - ``cache_dir``: where ``datasets`` keeps its Arrow cache (None: its default,
      ``~/.cache/huggingface/datasets`` or ``$HF_DATASETS_CACHE``).
    """

    path: str | tuple[str, ...] | list[str]
    format: FileFormat = "auto"
    text_field: str = "text"
    text_unit: TextUnit = "line"
    streaming: bool | Literal["auto"] = "auto"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.format not in get_args(FileFormat):
            raise ValueError(
                f"unknown dataset format {self.format!r}; allowed: {list(get_args(FileFormat))}"
            )
        if self.text_unit not in get_args(TextUnit):
            raise ValueError(
                f"unknown text_unit {self.text_unit!r}; allowed: {list(get_args(TextUnit))}"
            )
        if self.streaming not in (True, False, "auto"):
            raise ValueError(f"streaming must be true, false or 'auto', got {self.streaming!r}")
        if not self.text_field:
            raise ValueError("text_field must name the field holding the document text")
        if isinstance(self.path, list):
            object.__setattr__(self, "path", tuple(self.path))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown dataset config key(s) {unknown}; allowed: "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)


def detect_format(path: str | os.PathLike[str]) -> str:
    """File format from the suffix (``x.jsonl.gz`` -> ``jsonl``); ValueError when unknown."""
    name = Path(path).name.lower()
    for comp in _COMPRESSION_SUFFIXES:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    suffix = Path(name).suffix
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its suffix {suffix or '(none)'!r}; "
            f"known suffixes: {sorted(_SUFFIX_FORMATS)} (optionally compressed "
            f"{list(_COMPRESSION_SUFFIXES)}); or set the dataset's format to one of "
            f"{[f for f in get_args(FileFormat) if f != 'auto']}"
        )
    return _SUFFIX_FORMATS[suffix]


def _resolve_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        if "://" in raw or raw.startswith("hf:"):
            raise ValueError(
                f"dataset path {raw!r} is not a local path; this loader reads local files only "
                "(download the data first and point the dataset's path at it)"
            )
        p = Path(raw).expanduser()
        if any(ch in raw for ch in "*?["):
            matched = sorted(Path(m) for m in _glob.glob(str(p), recursive=True))
            matched = [m for m in matched if m.is_file()]
            if not matched:
                raise FileNotFoundError(f"dataset glob {raw!r} matches no files")
            files += matched
        elif p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            known = [f for f in inside if _has_known_suffix(f)]
            if not known:
                raise FileNotFoundError(
                    f"dataset folder {raw!r} holds no files with a known suffix "
                    f"{sorted(_SUFFIX_FORMATS)}"
                )
            files += known
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(
                f"dataset path {raw!r} does not exist; expected a local file, folder or glob of "
                "jsonl / json / parquet / text files"
            )
    return files


def _has_known_suffix(path: Path) -> bool:
    try:
        detect_format(path)
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def _offline_hub() -> Iterator[None]:
    """Switch the Hub offline flags on for the duration of the block, then restore them.

    ``datasets`` / ``huggingface_hub`` read ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` once,
    at import: they are imported first (so the process keeps its own setting afterwards), then
    the module attributes they consult and the environment variables (for any subprocess) are
    set, and all are restored on exit.  Progress bars are silenced likewise.
    """
    import datasets
    import datasets.config as ds_config
    import datasets.utils.logging as ds_logging

    modules: list[Any] = [ds_config]
    try:
        import huggingface_hub.constants as hub_constants

        modules.append(hub_constants)
    except ImportError:  # pragma: no cover
        pass
    env_keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved_attrs = [
        (mod, attr, getattr(mod, attr))
        for mod in modules
        for attr in env_keys
        if hasattr(mod, attr)
    ]
    bars_were_on = ds_logging.is_progress_bar_enabled()
    try:
        for k in env_keys:
            os.environ[k] = "1"
        for mod, attr, _ in saved_attrs:
            setattr(mod, attr, True)
        datasets.disable_progress_bars()
        yield
    finally:
        for mod, attr, value in saved_attrs:
            setattr(mod, attr, value)
        if bars_were_on:
            datasets.enable_progress_bars()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_documents(config: DatasetConfig) -> HFDocuments:
    """Open the files ``config`` names as a :class:`DocumentSource` (see the module docstring).

    Raises FileNotFoundError for a missing path; ValueError for an empty file, a file with no
    documents, an unknown or mixed format, or records without ``text_field``.
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading dataset files needs Hugging Face `datasets`: pip install 'datasets>=3.0' "
            "(or pip install 'longctx[data]')"
        ) from e

    paths = [config.path] if isinstance(config.path, str) else list(config.path)
    if not paths:
        raise ValueError("the dataset path list is empty; name at least one file")
    files = _resolve_files(paths)
    for f in files:
        if f.stat().st_size == 0:
            raise ValueError(f"dataset file {str(f)!r} is empty (0 bytes); remove it or fill it")
    if config.format == "auto":
        formats = {detect_format(f) for f in files}
        if len(formats) > 1:
            raise ValueError(
                f"dataset files mix formats {sorted(formats)}; use one format per dataset "
                f"(files: {[str(f) for f in files][:5]})"
            )
        fmt = formats.pop()
    else:
        fmt = config.format
    total = sum(f.stat().st_size for f in files)
    streaming = total > _STREAM_ABOVE_BYTES if config.streaming == "auto" else config.streaming
    description = f"dataset {str(files[0])!r}" + (
        f" (+{len(files) - 1} more files)" if len(files) > 1 else ""
    )

    kwargs: dict[str, Any] = {}
    if fmt == "text":
        kwargs["sample_by"] = config.text_unit
    with _offline_hub():
        try:
            ds = datasets.load_dataset(
                _BUILDERS[fmt],
                data_files=[str(f.resolve()) for f in files],
                split="train",
                streaming=streaming,
                cache_dir=config.cache_dir,
                **kwargs,
            )
        except Exception as e:
            raise ValueError(f"could not read {description} as {fmt}: {e}") from e
        if fmt == "text":
            field = "text"
            if config.text_field != "text":
                raise ValueError(
                    f"{description} is plain text, whose documents are in the field 'text'; "
                    f"text_field={config.text_field!r} only applies to jsonl/json/parquet"
                )
        else:
            field = config.text_field
        docs = HFDocuments(ds, field, description)
        if streaming:
            try:
                first = next(iter(docs.iter_from(0)), None)
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(f"could not read {description} as {fmt}: {e}") from e
            empty = first is None
        else:
            empty = docs.num_documents == 0
    if empty:
        raise ValueError(f"{description} contains no documents")
    return docs
