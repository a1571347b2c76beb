"""Tokenizers: a built-in byte-level tokenizer (the default) and any local ``tokenizer.json``.

Both implement the small :class:`Tokenizer` protocol the packer needs: ``encode`` /
``encode_batch`` / ``decode``, ``vocab_size`` and the special ids ``eos_id`` (ends every packed
document), ``pad_id`` (fills the tail of a packed sequence) and ``bos_id`` (optional, prepended
when ``PackingConfig.add_bos``).

The byte tokenizer needs no files: ids ``0..255`` are the UTF-8 bytes of the text and
``256 <pad>``, ``257 <bos>``, ``258 <eos>`` are the special tokens, so ``vocab_size == 259``
(pad the model's embedding table to a friendlier multiple if you like; ids stay below 259).
One byte is one token, so a character count of ASCII text is its token count.

Example::

    >>> from longctx.data.tokenizer import TokenizerConfig, load_tokenizer
    >>> tok = load_tokenizer(TokenizerConfig())          # path=None: the byte tokenizer
    >>> tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id
    (259, 256, 257, 258)
    >>> ids = tok.encode("hé!")
    >>> ids
    [104, 195, 169, 33]
    >>> tok.decode(ids + [tok.eos_id])
    'hé!'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "TokenizerConfig",
    "load_tokenizer",
]

# Names tried, in order, for a tokenizer.json's special tokens when the config names none.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[CLS]")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data path needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids ``0..255`` plus ``<pad>=256``, ``<bos>=257``, ``<eos>=258``."""

    NUM_BYTES = 256
    SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + len(self.SPECIAL_TOKENS)

    @property
    def pad_id(self) -> int:
        return 256

    @property
    def bos_id(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 258

    def encode(self, text: str) -> list[int]:
        """``str`` -> its UTF-8 bytes as ints (no special tokens added)."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text. Invalid UTF-8 (e.g. a cut multi-byte char) decodes to U+FFFD.

        Special ids are dropped, or rendered as ``<pad>`` / ``<bos>`` / ``<eos>`` with
        ``skip_special_tokens=False``.
        """
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < self.NUM_BYTES:
                run.append(i)
                continue
            if not self.NUM_BYTES <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocab [0, 259)")
            if not skip_special_tokens:
                out.append(run.decode("utf-8", errors="replace"))
                run.clear()
                out.append(self.SPECIAL_TOKENS[i - self.NUM_BYTES])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from a local ``tokenizer.json``.

    ``eos_token`` / ``bos_token`` / ``pad_token`` name special tokens of the file; left as None
    they are looked up among common names (``<|endoftext|>``, ``</s>``, ``<eos>``, ...).  An EOS
    token is required (it separates packed documents); without a pad token the EOS id pads (the
    padding's labels are ignored and it forms its own document, so the choice does not matter).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        try:
            from tokenizers import Tokenizer as _RustTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "loading a tokenizer.json needs the `tokenizers` package: pip install "
                "'tokenizers>=0.20' (or pip install 'longctx[data]')"
            ) from e
        self.path = Path(path)
        try:
            self._tok = _RustTokenizer.from_file(str(self.path))
        except Exception as e:
            raise ValueError(
                f"could not load {self.path} as a Hugging Face tokenizer.json: {e}"
            ) from e
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(
            self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1
        )
        self._eos_id = self._special(eos_token, _EOS_CANDIDATES, "eos_token", required=True)
        self._bos_id = self._special(bos_token, _BOS_CANDIDATES, "bos_token", required=False)
        pad = self._special(pad_token, _PAD_CANDIDATES, "pad_token", required=False)
        self._pad_id = self._eos_id if pad is None else pad

    def _special(
        self, name: str | None, candidates: tuple[str, ...], key: str, required: bool
    ) -> int | None:
        if name is not None:
            i = self._tok.token_to_id(name)
            if i is None:
                raise ValueError(
                    f"tokenizer {self.path} has no token {name!r} (set as {key}); name a token "
                    "that is in its vocabulary"
                )
            return int(i)
        for cand in candidates:
            i = self._tok.token_to_id(cand)
            if i is not None:
                return int(i)
        if required:
            raise ValueError(
                f"tokenizer {self.path} has none of the usual end-of-document tokens "
                f"{list(candidates)}; set TokenizerConfig.{key} to the token that ends a document"
            )
        return None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    def encode(self, text: str) -> list[int]:
        """``str`` -> ids, without the file's post-processor specials (the packer adds EOS)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


@dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer the data path uses.

    - ``path``: None for the built-in byte tokenizer (vocab 259); else a local ``tokenizer.json``
      file, or a folder holding one (e.g. a downloaded model folder).  Nothing is fetched.
    - ``eos_token`` / ``bos_token`` / ``pad_token``: special-token names in that file (looked up
      among common names when None); ignored by the byte tokenizer.
    """

    path: str | None = None
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown tokenizer config key(s) {unknown}; allowed: "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)


def load_tokenizer(config: TokenizerConfig | None = None) -> Tokenizer:
    """Build the tokenizer a :class:`TokenizerConfig` describes.

    Raises FileNotFoundError naming the path when it does not exist or a folder has no
    ``tokenizer.json``; ValueError when the file is not a valid tokenizer.json.
    """
    config = config or TokenizerConfig()
    if config.path is None or config.path == "byte":
        return ByteTokenizer()
    path = Path(config.path).expanduser()
    if path.is_dir():
        candidate = path / "tokenizer.json"
        if not candidate.is_file():
            raise FileNotFoundError(
                f"tokenizer path {str(path)!r} is a folder without a tokenizer.json; point "
                "tokenizer.path at a Hugging Face tokenizer.json file (or a folder holding one), "
                "or leave it unset for the built-in byte tokenizer"
            )
        path = candidate
    elif not path.is_file():
        raise FileNotFoundError(
            f"tokenizer path {str(path)!r} does not exist; expected a local Hugging Face "
            "tokenizer.json file (or a folder holding one), or no path for the built-in byte "
            "tokenizer (nothing is downloaded)"
        )
    return HFTokenizer(path, config.eos_token, config.bos_token, config.pad_token)
