"""Synthetic long-context tasks: passkey retrieval and multi-query associative recall (MQAR).

Each sample is one document of plain ASCII text (one character = one byte-tokenizer token):

- **passkey**: a random ``passkey_digits``-digit key stated once at a random depth among
  distractor sentences, and asked for at the end; ``?`` appears nowhere else, and the key
  follows it directly::

      The sun is warm today. ... The pass key is 48. A river runs past the old mill. ...
      Pass key?48.

- **mqar**: ``num_pairs`` key-value pairs (``kqz=817``) scattered through distractor sentences,
  then ``num_queries`` of the keys asked again in random order (``Queries: gah=305. kqz=817.``).

The answer spans (character offsets of the key / values after the question) are stored with the
text, so the samples are both training documents (the model learns to copy from far back) and
an evaluation set.  Generation is deterministic given ``seed`` (each sample has its own RNG, so
sample ``i`` does not depend on ``num_samples``) and takes well under a second per thousand
samples.  :func:`write_synthetic_dataset` writes them as jsonl (field ``text``, plus ``task``,
``answers``, ``needles``), which is the embedded default dataset of the tiny CPU run.

**Accuracy protocol** (:func:`answer_accuracy`).  The text up to the end of the last answer is
tokenized segment by segment so every answer's token range is known; the model reads it once,
teacher-forced, and an answer counts as correct when the argmax prediction at each of its
positions (made from the tokens before it) is the answer token.  For greedy decoding this is
exactly the exact-match of generating the answer after its prompt: if every teacher-forced
argmax is right, greedy decoding produces the same tokens; if one is wrong, greedy diverges
there.  A model that ignores its long context can only guess the random digits: exact-match
chance is ``10**-digits`` (reported as ``chance``); accuracy far above it, and staying up as
the distance between needle and question grows (``by_distance``), shows the context is used.

Example::

    >>> from longctx.data.synthetic import SyntheticConfig, generate_samples, answer_accuracy
    >>> samples = generate_samples(SyntheticConfig(task="passkey", num_samples=4, seed=1))
    >>> s = samples[0]
    >>> a, b = s.answers[0]
    >>> s.text[a:b] in s.text[:s.needles[0] + 40]      # the answer is stated earlier
    True
    >>> def oracle(ids):                                # predicts the true next token
    ...     return torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    >>> import torch
    >>> answer_accuracy(samples, oracle).exact_match
    1.0
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from .tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "AccuracyReport",
    "SYNTHETIC_FORMAT",
    "SyntheticConfig",
    "SyntheticSample",
    "answer_accuracy",
    "generate_samples",
    "read_synthetic_dataset",
    "write_synthetic_dataset",
]

SyntheticTask = Literal["passkey", "mqar", "mixed"]

SYNTHETIC_FORMAT = 2
"""Version of the text :func:`generate_samples` makes for a given config: raised whenever the
text changes (2: the short passkey format), so that files written by an older version are
rewritten instead of reused (:func:`write_synthetic_dataset`, the default cache path)."""

# Distractor sentences: no digits, no '=' (so keys and values are unambiguous).
_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is warm today.",
    "Here we go again.",
    "There and back again.",
    "A river runs past the old mill.",
    "The wind moves through the tall trees.",
    "Birds sing in the early morning.",
    "A small boat drifts on the lake.",
    "The road bends toward the hills.",
    "Clouds gather over the quiet town.",
    "The market opens before noon.",
    "Snow covers the distant mountains.",
    "A cat sleeps near the window.",
    "The bell rings at the end of the day.",
    "Leaves fall slowly in the autumn.",
)
_PASSKEY_QUESTION = "\nPass key?"  # the only '?' of a passkey sample; the key follows it
_MQAR_INTRO = "Remember the number after each key.\n"
_MQAR_QUERIES = "\nQueries:"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class SyntheticConfig:
    """What :func:`generate_samples` makes.

    - ``task``: ``"passkey"``, ``"mqar"`` or ``"mixed"`` (each sample picks one at random).
    - ``num_samples`` / ``seed``.
    - ``min_length`` / ``max_length``: target characters per sample (= tokens with the byte
      tokenizer, before ``<eos>``), drawn uniformly; the text is at most that long and short of
      it by less than one distractor sentence (about 40 characters).  Keep
      ``max_length < seq_length`` so packing never cuts a sample.
    - passkey: ``passkey_digits``; mqar: ``num_pairs`` pairs of ``key_length`` letters to
      ``value_digits`` digits, ``num_queries`` of them asked.
    """

    task: SyntheticTask = "mixed"
    num_samples: int = 2000
    seed: int = 0
    min_length: int = 256
    max_length: int = 1000
    passkey_digits: int = 5
    num_pairs: int = 6
    num_queries: int = 3
    key_length: int = 3
    value_digits: int = 3

    def describe(self) -> str:
        """One line: the task and its sizes (``passkey (2 digits), 20000 samples of 40-160
        characters``)."""
        parts = []
        if self.task in ("passkey", "mixed"):
            parts.append(f"passkey ({self.passkey_digits} digits)")
        if self.task in ("mqar", "mixed"):
            parts.append(f"MQAR ({self.num_pairs} pairs of {self.key_length} letters to "
                         f"{self.value_digits} digits, {self.num_queries} asked)")
        return (f"{' + '.join(parts)}, {self.num_samples} samples of "
                f"{self.min_length}-{self.max_length} characters")

    def __post_init__(self) -> None:
        if self.task not in get_args(SyntheticTask):
            raise ValueError(
                f"task must be one of {list(get_args(SyntheticTask))}, got {self.task!r}"
            )
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(
                f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}"
            )
        if self.passkey_digits < 1 or self.value_digits < 1 or self.key_length < 1:
            raise ValueError("passkey_digits, value_digits and key_length must be >= 1")
        if not 1 <= self.num_queries <= self.num_pairs:
            raise ValueError(
                f"need 1 <= num_queries <= num_pairs, got {self.num_queries}, {self.num_pairs}"
            )
        if self.num_pairs > len(_LETTERS) ** self.key_length:
            raise ValueError(
                f"num_pairs={self.num_pairs} distinct keys do not exist with key_length="
                f"{self.key_length}; raise key_length"
            )


@dataclass(frozen=True)
class SyntheticSample:
    """One sample: ``text``; ``answers``: ``(start, end)`` character spans of the answers at
    the end of the text; ``needles``: character offset where each answer's information appears
    earlier in the text (same order as ``answers``)."""

    text: str
    task: str
    answers: tuple[tuple[int, int], ...]
    needles: tuple[int, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "task": self.task,
            "answers": [list(a) for a in self.answers],
            "needles": list(self.needles),
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> SyntheticSample:
        return SyntheticSample(
            text=d["text"],
            task=d["task"],
            answers=tuple((int(a), int(b)) for a, b in d["answers"]),
            needles=tuple(int(n) for n in d.get("needles", ())),
        )


def _filler(rng: random.Random, budget: int) -> list[str]:
    """Random distractor sentences whose lengths plus one separator each fit in ``budget``."""
    out: list[str] = []
    total = 0
    while True:
        s = rng.choice(_FILLER)
        if total + len(s) + 1 > budget:
            return out
        out.append(s)
        total += len(s) + 1


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _passkey(rng: random.Random, cfg: SyntheticConfig, length: int) -> SyntheticSample:
    key = _digits(rng, cfg.passkey_digits)
    needle = f"The pass key is {key}."
    fixed = len(needle) + 1 + len(_PASSKEY_QUESTION) + len(key) + 1
    sentences = _filler(rng, length - fixed)
    depth = rng.randint(0, len(sentences))
    head = " ".join(sentences[:depth]) + (" " if depth else "")
    text = head + " ".join([needle, *sentences[depth:]]) + _PASSKEY_QUESTION
    start = len(text)
    text += key + "."
    return SyntheticSample(text, "passkey", ((start, start + len(key)),), (len(head),))


def _mqar(rng: random.Random, cfg: SyntheticConfig, length: int) -> SyntheticSample:
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < cfg.num_pairs:
        k = "".join(rng.choice(_LETTERS) for _ in range(cfg.key_length))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    values = [_digits(rng, cfg.value_digits) for _ in keys]
    pair_len = cfg.key_length + cfg.value_digits + 3  # "kqz=817. "
    query_len = len(_MQAR_QUERIES) + cfg.num_queries * (pair_len + 1)
    fixed = len(_MQAR_INTRO) + cfg.num_pairs * pair_len + query_len
    sentences = _filler(rng, length - fixed)
    slots = sorted(rng.randint(0, len(sentences)) for _ in keys)
    text, needle_at = _MQAR_INTRO, {}
    # pair i goes just before sentence slots[i] (kind 0 sorts before the sentence, kind 1)
    items = [(j, 1, s) for j, s in enumerate(sentences)] + [
        (slot, 0, str(i)) for i, slot in enumerate(slots)
    ]
    parts: list[str] = []
    at = len(text)
    for _, kind, payload in sorted(items, key=lambda t: (t[0], t[1])):
        if kind == 0:
            i = int(payload)
            needle_at[i] = at
            piece = f"{keys[i]}={values[i]}."
        else:
            piece = payload
        parts.append(piece)
        at += len(piece) + 1
    text += " ".join(parts) + _MQAR_QUERIES
    asked = rng.sample(range(cfg.num_pairs), cfg.num_queries)
    answers, needles = [], []
    for i in asked:
        text += f" {keys[i]}="
        answers.append((len(text), len(text) + len(values[i])))
        needles.append(needle_at[i])
        text += values[i] + "."
    return SyntheticSample(text, "mqar", tuple(answers), tuple(needles))


def generate_samples(config: SyntheticConfig) -> list[SyntheticSample]:
    """``config.num_samples`` samples, sample ``i`` a pure function of ``(seed, i)``."""
    out = []
    for i in range(config.num_samples):
        rng = random.Random(config.seed * 1_000_003 + i)
        task = config.task if config.task != "mixed" else rng.choice(("passkey", "mqar"))
        length = rng.randint(config.min_length, config.max_length)
        make = _passkey if task == "passkey" else _mqar
        out.append(make(rng, config, length))
    return out


def synthetic_fingerprint(config: SyntheticConfig) -> str:
    """The config and :data:`SYNTHETIC_FORMAT` as canonical JSON: what a written file is made
    from (recorded beside it, and hashed into the default cache path)."""
    return json.dumps({**asdict(config), "format": SYNTHETIC_FORMAT}, sort_keys=True)


def write_synthetic_dataset(
    path: str | os.PathLike[str], config: SyntheticConfig | None = None, overwrite: bool = False
) -> Path:
    """Write :func:`generate_samples` as jsonl at ``path``; returns the path.

    The config and :data:`SYNTHETIC_FORMAT` are recorded next to it (``<path>.config.json``); an
    existing file made from the same config by the same format version is kept (so every rank
    of a job may call this), another one is rewritten.  The file is written to a temporary name
    and renamed, so readers never see half a file.
    """
    config = config or SyntheticConfig()
    path = Path(path)
    meta = path.with_name(path.name + ".config.json")
    wanted = synthetic_fingerprint(config)
    if not overwrite and path.is_file() and meta.is_file() and meta.read_text() == wanted:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(s.to_json()) + "\n" for s in generate_samples(config))
    for target, content in ((path, lines), (meta, wanted)):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.replace(tmp, target)
    return path


def read_synthetic_dataset(path: str | os.PathLike[str]) -> list[SyntheticSample]:
    """The samples of a file :func:`write_synthetic_dataset` wrote (for evaluation)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synthetic dataset {str(path)!r} does not exist")
    out = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(SyntheticSample.from_json(json.loads(line)))
                except (KeyError, ValueError, TypeError) as e:
                    raise ValueError(f"{path}:{n} is not a synthetic sample: {e}") from e
    return out


# -- accuracy -------------------------------------------------------------------------------------
Predictor = Callable[[Tensor], Tensor]
"""``input_ids [1, T] int64 -> logits [1, T, V]`` (float) or predicted ids ``[1, T]`` (int):
the prediction at position ``t`` is for token ``t + 1``."""


@dataclass(frozen=True)
class AccuracyReport:
    """Answer accuracy over a set of samples (see the module docstring for the protocol).

    - ``exact_match``: fraction of answers with every token predicted.
    - ``token_accuracy``: fraction of answer tokens predicted.
    - ``by_task`` / ``by_distance``: exact match per task and per needle-to-answer distance bin
      (characters, ``"lo-hi"``).
    - ``chance``: exact match of guessing the digits uniformly (the context-blind baseline).
    """

    exact_match: float
    token_accuracy: float
    num_answers: int
    by_task: dict[str, float]
    by_distance: dict[str, float]
    chance: float

    def __str__(self) -> str:
        tasks = ", ".join(f"{k} {v:.1%}" for k, v in self.by_task.items())
        dist = ", ".join(f"{k}: {v:.1%}" for k, v in self.by_distance.items())
        return (
            f"exact match {self.exact_match:.1%} over {self.num_answers} answers "
            f"(chance without the context {100 * self.chance:.3g}%; answer tokens right "
            f"{self.token_accuracy:.1%}); by task: {tasks}; by needle distance: {dist}"
        )


def _segment_ids(
    sample: SyntheticSample, tok: Tokenizer, prefix: list[int]
) -> tuple[list[int], list[tuple[int, int]]]:
    ids = list(prefix)
    spans = []
    at = 0
    for a, b in sample.answers:
        ids += tok.encode(sample.text[at:a])
        answer = tok.encode(sample.text[a:b])
        spans.append((len(ids), len(ids) + len(answer)))
        ids += answer
        at = b
    return ids, spans


def answer_accuracy(
    samples: Sequence[SyntheticSample],
    predict: Predictor,
    tokenizer: Tokenizer | None = None,
    *,
    add_bos: bool = False,
    next_token_only: bool = False,
    distance_bins: Sequence[int] = (64, 128, 256, 1024, 4096, 16384, 65536),
) -> AccuracyReport:
    """Teacher-forced exact-match accuracy of ``predict`` on the answers of ``samples``.

    ``predict`` sees each sample once, as ``input_ids [1, T]`` ending with its last answer
    (tokenized like training with ``tokenizer``, byte-level by default, with ``<bos>`` first when
    ``add_bos``), and returns logits ``[1, T, V]`` or predicted ids ``[1, T]``.  With a longctx
    model on one device, e.g.::

        predict = lambda ids: model(ids, SequenceContext.single_device(ids.shape[1]))

    (under ``torch.no_grad()``).  With ``next_token_only=True``, ``predict`` is instead a
    next-token function (an inference engine): it gets each prompt ``[1, j]`` that precedes an
    answer token and returns the next token's logits (``[V]`` / ``[1, V]``) or id; this costs
    one call per answer token and gives the same numbers.  Returns an :class:`AccuracyReport`.
    """
    tok = tokenizer or ByteTokenizer()
    prefix = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    hits = tokens_ok = tokens = 0
    per_task: dict[str, list[int]] = {}
    edges = [0, *sorted(distance_bins)]
    per_bin: dict[str, list[int]] = {}
    chance_sum, n_answers = 0.0, 0
    for sample in samples:
        if not sample.answers:
            continue
        ids, spans = _segment_ids(sample, tok, prefix)
        x = torch.tensor(ids, dtype=torch.int64)[None]
        if spans[0][0] == 0:
            raise ValueError("an answer at position 0 has no context to be predicted from")
        if next_token_only:
            pred = torch.full((x.shape[1],), -1, dtype=torch.int64)
            for a, b in spans:
                for j in range(a, b):  # the token at j, predicted from x[:, :j]
                    out = torch.as_tensor(predict(x[:, :j]))
                    out = out.argmax(-1) if out.is_floating_point() else out
                    pred[j - 1] = int(out.reshape(-1)[-1])
        else:
            out = predict(x)
            pred = out.argmax(-1) if out.is_floating_point() else out
            if pred.shape[:2] != x.shape:
                raise ValueError(
                    f"predict returned shape {tuple(out.shape)} for input {tuple(x.shape)}; "
                    "expected logits [1, T, V] or predicted ids [1, T] (or pass "
                    "next_token_only=True for a next-token function)"
                )
            pred = pred[0].to("cpu", torch.int64)
        for k, (a, b) in enumerate(spans):
            ok = pred[a - 1 : b - 1] == x[0, a:b]
            correct = bool(ok.all())
            hits += correct
            tokens_ok += int(ok.sum())
            tokens += b - a
            n_answers += 1
            answer_text = sample.text[sample.answers[k][0] : sample.answers[k][1]]
            chance_sum += 10.0 ** -len(answer_text)
            per_task.setdefault(sample.task, []).append(correct)
            if k < len(sample.needles):
                dist = sample.answers[k][0] - sample.needles[k]
                i = next((j for j in range(1, len(edges)) if dist < edges[j]), len(edges))
                label = f"{edges[i - 1]}-{edges[i]}" if i < len(edges) else f">={edges[-1]}"
                per_bin.setdefault(label, []).append(correct)
    if n_answers == 0:
        raise ValueError("answer_accuracy needs samples with answers")
    order = {f"{edges[i - 1]}-{edges[i]}": i for i in range(1, len(edges))}
    return AccuracyReport(
        exact_match=hits / n_answers,
        token_accuracy=tokens_ok / max(tokens, 1),
        num_answers=n_answers,
        by_task={k: sum(v) / len(v) for k, v in sorted(per_task.items())},
        by_distance={
            k: sum(v) / len(v)
            for k, v in sorted(per_bin.items(), key=lambda kv: order.get(kv[0], len(order) + 1))
        },
        chance=chance_sum / n_answers,
    )
