"""The data path: tokenizers, local datasets, packing, DP split + resume, CP sharding, synthetic
tasks, and the errors bad data gives."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from longctx.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    DataConfig,
    DatasetConfig,
    PackedDataset,
    PackedSample,
    PackingConfig,
    SyntheticConfig,
    TokenizerConfig,
    answer_accuracy,
    build_packed_dataset,
    check_packed_sample,
    collate,
    concat_samples,
    generate_samples,
    load_documents,
    load_tokenizer,
    pack_documents,
    read_synthetic_dataset,
    shard_sample,
    to_sequence_context,
    unshard_micro_batches,
    write_synthetic_dataset,
)
from longctx.parallel.layout import Layout

BYTE = ByteTokenizer()


def random_docs(n: int, seed: int, max_len: int = 40, min_len: int = 0) -> list[list[int]]:
    """Token-id documents (ids < 256, never the special ids)."""
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def same(a: PackedSample, b: PackedSample) -> bool:
    return (
        torch.equal(a.input_ids, b.input_ids)
        and torch.equal(a.labels, b.labels)
        and torch.equal(a.cu_seqlens, b.cu_seqlens)
    )


def take(it, n):
    return [next(it) for _ in range(n)]


# -- tokenizers ---------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    tok = load_tokenizer(TokenizerConfig())
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    for text in ["", "hello", "héllo wörld ✓ 日本語 🙂", "\n\t\x00 tabs"]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.decode([104, 105, tok.eos_id], skip_special_tokens=False) == "hi<eos>"
    assert tok.encode_batch(["ab", "é"]) == [[97, 98], [195, 169]]
    with pytest.raises(ValueError, match="outside"):
        tok.decode([259])


def _tiny_tokenizer_json(path, with_eos=True):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<pad>": 1, "hello": 3, "world": 4, "long": 5, "context": 6}
    if with_eos:
        vocab["</s>"] = 2
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "<pad>"] + (["</s>"] if with_eos else [])
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return path


def test_tokenizer_json_loading(tmp_path):
    f = _tiny_tokenizer_json(tmp_path / "tokenizer.json")
    for cfg in (TokenizerConfig(path=str(f)), TokenizerConfig(path=str(tmp_path))):
        tok = load_tokenizer(cfg)
        assert tok.vocab_size == 7 and tok.eos_id == 2 and tok.pad_id == 1 and tok.bos_id is None
        assert tok.encode("hello long context") == [3, 5, 6]
        assert tok.encode_batch(["world", "hello zzz"]) == [[4], [3, 0]]
        assert tok.decode([3, 4, 2]) == "hello world"
    # the packer works with it
    samples = pack_documents(
        ["hello world", "long context hello"], tok, PackingConfig(8, shuffle=False)
    )
    assert samples[0].input_ids.tolist() == [3, 4, 2, 5, 6, 3, 2, 1]
    # named special tokens
    assert load_tokenizer(TokenizerConfig(path=str(f), eos_token="<pad>")).eos_id == 1
    with pytest.raises(ValueError, match="no token '<nope>'"):
        load_tokenizer(TokenizerConfig(path=str(f), eos_token="<nope>"))
    # a tokenizer without an end-of-document token must be told which one to use
    g = _tiny_tokenizer_json(tmp_path / "noeos.json", with_eos=False)
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(TokenizerConfig(path=str(g)))


def test_tokenizer_bad_paths(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as e:
        load_tokenizer(TokenizerConfig(path=str(missing)))
    assert "tokenizer.json" in str(e.value) and "byte" in str(e.value)
    with pytest.raises(FileNotFoundError, match="without a tokenizer.json"):
        load_tokenizer(TokenizerConfig(path=str(tmp_path)))
    junk = tmp_path / "junk.json"
    junk.write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="junk.json"):
        load_tokenizer(TokenizerConfig(path=str(junk)))


# -- datasets -----------------------------------------------------------------------------------
TEXTS = ["first doc", "second, longer document", "third ✓", "4th"]


@pytest.mark.parametrize("streaming", [False, True])
def test_load_jsonl_parquet_text(tmp_path, streaming):
    cache = str(tmp_path / "cache")
    jl = write_jsonl(tmp_path / "a.jsonl", [{"body": t, "id": i} for i, t in enumerate(TEXTS)])
    docs = load_documents(
        DatasetConfig(jl, text_field="body", streaming=streaming, cache_dir=cache)
    )
    assert list(docs.iter_from(0)) == TEXTS and list(docs.iter_from(2)) == TEXTS[2:]
    if streaming:
        assert docs.num_documents is None
    else:
        assert docs.num_documents == 4 and docs.get([3, 0]) == [TEXTS[3], TEXTS[0]]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS[:2], "n": [1, 2]}), tmp_path / "p1.parquet")
    pq.write_table(pa.table({"text": TEXTS[2:], "n": [3, 4]}), tmp_path / "p2.parquet")
    for path in (
        str(tmp_path / "p*.parquet"),
        [str(tmp_path / "p1.parquet"), str(tmp_path / "p2.parquet")],
    ):
        docs = load_documents(DatasetConfig(path, streaming=streaming, cache_dir=cache))
        assert list(docs.iter_from(0)) == TEXTS

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "b.txt").write_text("line one\nline two\n\nparagraph two\n")
    cfg = dict(streaming=streaming, cache_dir=cache)
    assert list(load_documents(DatasetConfig(str(tmp_path / "t"), **cfg)).iter_from(0)) == [
        "line one",
        "line two",
        "",
        "paragraph two",
    ]
    para = load_documents(
        DatasetConfig(str(tmp_path / "t" / "b.txt"), text_unit="paragraph", **cfg)
    )
    assert [d.strip() for d in para.iter_from(0)] == ["line one\nline two", "paragraph two"]


def test_loader_offline_flags_are_scoped(tmp_path):
    """The loader runs offline but leaves the process's own Hub setting alone, also when it is
    where ``datasets`` is first imported (hence a fresh interpreter)."""
    jl = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    code = (
        "import os\n"
        "from longctx.data import DatasetConfig, load_documents\n"
        f"cfg = DatasetConfig({jl!r}, streaming=True, cache_dir={str(tmp_path)!r})\n"
        "docs = load_documents(cfg)\n"
        "import datasets, huggingface_hub.constants as hub\n"
        "assert list(docs.iter_from(0)) == ['x']\n"
        "assert datasets.config.HF_HUB_OFFLINE is False and hub.HF_HUB_OFFLINE is False\n"
        "assert 'HF_HUB_OFFLINE' not in os.environ and 'HF_DATASETS_OFFLINE' not in os.environ\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_pre_tokenized_documents(tmp_path):
    jl = write_jsonl(tmp_path / "ids.jsonl", [{"ids": [1, 2, 3]}, {"ids": [4, 5]}])
    docs = load_documents(DatasetConfig(jl, text_field="ids", cache_dir=str(tmp_path / "c")))
    s = pack_documents(docs, BYTE, PackingConfig(8, shuffle=False))
    assert s[0].input_ids.tolist() == [1, 2, 3, BYTE.eos_id, 4, 5, BYTE.eos_id, BYTE.pad_id]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"ids": [1, 2, 300]}])
    docs = load_documents(
        DatasetConfig(bad, text_field="ids", streaming=True, cache_dir=str(tmp_path / "c"))
    )
    with pytest.raises(ValueError, match=r"token id 300, outside the tokenizer's vocab \[0, 259\)"):
        pack_documents(docs, BYTE, PackingConfig(8))


def test_dataset_errors(tmp_path):
    cache = str(tmp_path / "cache")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*empty"):
        load_documents(DatasetConfig(str(empty)))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_documents(DatasetConfig(str(tmp_path / "missing.jsonl")))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_documents(DatasetConfig(str(tmp_path / "*.parquet")))
    odd = tmp_path / "data.csv"
    odd.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"'\.csv'.*known suffixes"):
        load_documents(DatasetConfig(str(odd)))
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        DatasetConfig(str(odd), format="csv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a local path"):
        load_documents(DatasetConfig("hf://datasets/someone/something"))
    jl = write_jsonl(tmp_path / "a.jsonl", [{"content": "x", "meta": 1}])
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"no field 'text'.*\['content', 'meta'\]"):
            load_documents(DatasetConfig(jl, streaming=streaming, cache_dir=cache))
    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "ok"}, {"text": 5}])
    with pytest.raises(ValueError, match=r"b\.jsonl.*(document 1 has text=5|text)"):
        list(load_documents(DatasetConfig(bad, streaming=True, cache_dir=cache)).iter_from(0))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n")
    with pytest.raises(ValueError, match="no documents"):
        ds = PackedDataset(
            load_documents(DatasetConfig(str(blank), cache_dir=cache)), BYTE, PackingConfig(16)
        )
        next(iter(ds))


# -- packing ------------------------------------------------------------------------------------
def check_no_cross_document_labels(sample: PackedSample, pad_id: int) -> None:
    """Independent of check_packed_sample: every label is the next token of the same document."""
    doc = sample.document_ids()
    ids, labels = sample.input_ids, sample.labels
    S = sample.seq_length
    for t in range(S):
        if labels[t] != IGNORE_INDEX:
            assert t + 1 < S and doc[t] == doc[t + 1] and labels[t] == ids[t + 1]
        elif t + 1 < S and doc[t] == doc[t + 1]:
            assert ids[t] == pad_id  # only padding is unlabelled inside a document
    ends = sample.cu_seqlens[1:].long() - 1
    assert bool((labels[ends] == IGNORE_INDEX).all())


@pytest.mark.parametrize("seq_length", [2, 7, 16, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packing_exhaustive(seq_length, seed):
    docs = random_docs(60, seed, max_len=3 * seq_length)
    cfg = PackingConfig(seq_length, shuffle=False)
    samples = pack_documents(docs, BYTE, cfg)
    expected = [t for d in docs if d for t in (*d, BYTE.eos_id)]
    got = []
    for s in samples:
        check_packed_sample(s, pad_id=BYTE.pad_id)
        check_no_cross_document_labels(s, BYTE.pad_id)
        assert s.input_ids.shape == (seq_length,) and s.cu_seqlens.dtype == torch.int32
        got += [t for t in s.input_ids.tolist() if t != BYTE.pad_id]
    assert got == expected  # every token once, in order
    # a document that fits is never cut: it is one cu_seqlens segment; longer ones are cut
    # into pieces of exactly seq_length (the last one shorter)
    pieces = [
        s.input_ids[a:b].tolist()
        for s in samples
        for a, b in zip(s.cu_seqlens[:-1].tolist(), s.cu_seqlens[1:].tolist())
        if s.input_ids[a] != BYTE.pad_id
    ]
    rebuilt, parts = [], []
    for piece in pieces:
        parts.append(piece)
        if piece[-1] == BYTE.eos_id:
            rebuilt.append(parts)
            parts = []
    assert [sum(p, [])[:-1] for p in rebuilt] == [d for d in docs if d]
    for p in rebuilt:
        total = sum(map(len, p))
        assert len(p) == (1 if total <= seq_length else -(-total // seq_length))
        assert all(len(x) == seq_length for x in p[:-1])


def test_packing_layout_and_padding():
    docs = [[1] * 3, [2] * 5, [3] * 2, [4] * 1]
    s = pack_documents(docs, BYTE, PackingConfig(8, shuffle=False))
    eos, pad = BYTE.eos_id, BYTE.pad_id
    assert s[0].input_ids.tolist() == [1, 1, 1, eos, pad, pad, pad, pad]
    assert s[0].cu_seqlens.tolist() == [0, 4, 8]
    assert s[0].labels.tolist() == [1, 1, eos, -100, -100, -100, -100, -100]
    assert s[1].input_ids.tolist() == [2, 2, 2, 2, 2, eos, pad, pad]  # [3, 3, eos] won't fit
    assert s[2].input_ids.tolist() == [3, 3, eos, 4, eos, pad, pad, pad]
    assert s[2].cu_seqlens.tolist() == [0, 3, 5, 8]
    bos = pack_documents([[7, 8]], BYTE, PackingConfig(6, add_bos=True))
    assert bos[0].input_ids.tolist() == [BYTE.bos_id, 7, 8, eos, pad, pad]


def test_long_documents_split_and_error():
    eos = BYTE.eos_id
    docs = [[1, 1], list(range(10, 30)), [2, 2]]  # the middle one: 21 tokens with <eos>
    s = pack_documents(docs, BYTE, PackingConfig(8, shuffle=False, long_documents="split"))
    assert [x.input_ids.tolist() for x in s] == [
        [1, 1, eos, 256, 256, 256, 256, 256],  # the long document starts a fresh sequence
        list(range(10, 18)),
        list(range(18, 26)),
        [26, 27, 28, 29, eos, 2, 2, eos],  # its tail is followed by the next document
    ]
    assert s[1].labels.tolist() == list(range(11, 18)) + [-100]  # no label across sequences
    assert s[3].cu_seqlens.tolist() == [0, 5, 8]
    for x in s:
        check_packed_sample(x, pad_id=BYTE.pad_id)
    with pytest.raises(ValueError, match=r"document 1 .* 21 tokens.*seq_length=8.*'split'"):
        pack_documents(docs, BYTE, PackingConfig(8, shuffle=False, long_documents="error"))
    # a document of exactly seq_length tokens (with <eos>) is fine in "error" mode
    ok = pack_documents([list(range(7))], BYTE, PackingConfig(8, long_documents="error"))
    assert ok[0].input_ids.tolist() == [*range(7), eos]
    with pytest.raises(ValueError, match="long_documents"):
        PackingConfig(8, long_documents="truncate")  # type: ignore[arg-type]


def test_shuffle_is_deterministic_and_a_permutation():
    docs = [[i % 250] * (1 + i % 5) for i in range(200)]
    cfg = PackingConfig(32, seed=7, num_epochs=2)
    a = list(PackedDataset(docs, BYTE, cfg).iter_global())
    b = list(PackedDataset(docs, BYTE, cfg).iter_global())
    assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    c = list(PackedDataset(docs, BYTE, PackingConfig(32, seed=8, num_epochs=2)).iter_global())
    assert not all(same(x, y) for x, y in zip(a, c))
    tokens = sorted(t for s in a for t in s.input_ids.tolist() if t not in (256, 258))
    assert tokens == sorted(t for d in docs * 2 for t in d)  # each epoch: every document once


# -- DP split and resume ------------------------------------------------------------------------
@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_dp_split_covers_every_sample_once(dp_size):
    docs = random_docs(150, seed=dp_size, max_len=30)
    cfg = PackingConfig(24, seed=3, num_epochs=1, drop_last=False)
    full = list(PackedDataset(docs, BYTE, cfg).iter_global())
    per_rank = [
        list(PackedDataset(docs, BYTE, cfg, dp_rank=r, dp_size=dp_size)) for r in range(dp_size)
    ]
    assert sum(map(len, per_rank)) == len(full)
    for g, sample in enumerate(full):
        assert same(per_rank[g % dp_size][g // dp_size], sample)
    # drop_last: every rank takes the same number of steps
    cfg_drop = PackingConfig(24, seed=3, num_epochs=1, drop_last=True)
    counts = {
        len(list(PackedDataset(docs, BYTE, cfg_drop, dp_rank=r, dp_size=dp_size)))
        for r in range(dp_size)
    }
    assert counts == {len(full) // dp_size}


def _round_robin(rank_iters, n):
    """Merge per-rank iterators back into global order: step by step, rank by rank."""
    out = []
    while len(out) < n:
        for it in rank_iters:
            out.append(next(it))
    return out[:n]


@pytest.mark.parametrize("dp_before,dp_after", [(1, 1), (2, 2), (2, 3), (4, 1), (3, 2)])
def test_resume_equals_uninterrupted(dp_before, dp_after):
    docs = random_docs(300, seed=11, max_len=70)  # some longer than seq_length: split
    cfg = PackingConfig(32, seed=5, num_epochs=None)  # epochs roll over
    full = list(itertools.islice(PackedDataset(docs, BYTE, cfg).iter_global(), 120))

    ranks = [PackedDataset(docs, BYTE, cfg, dp_rank=r, dp_size=dp_before) for r in range(dp_before)]
    iters = [iter(ds) for ds in ranks]
    steps = 7
    before = _round_robin(iters, steps * dp_before)
    states = [ds.state_dict() for ds in ranks]
    assert all(s == states[0] for s in states)  # one state for every rank
    assert states[0]["sample_index"] == steps * dp_before
    state = json.loads(json.dumps(states[0]))  # plain data

    resumed = [PackedDataset(docs, BYTE, cfg, dp_rank=r, dp_size=dp_after) for r in range(dp_after)]
    for ds in resumed:
        ds.load_state_dict(state)
    after = _round_robin([iter(ds) for ds in resumed], 60)
    combined = before + after
    assert all(same(a, b) for a, b in zip(combined, full[: len(combined)]))


def test_resume_streamed_source_with_shuffle_window(tmp_path):
    rows = [{"text": f"doc {i} " + "x" * (i % 37)} for i in range(120)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    docs = load_documents(DatasetConfig(path, streaming=True, cache_dir=str(tmp_path / "c")))
    cfg = PackingConfig(48, seed=1, shuffle_window=16, num_epochs=3)
    full = list(PackedDataset(docs, BYTE, cfg).iter_global())
    text = "".join(BYTE.decode(s.input_ids.tolist()) for s in full)
    counts = np.bincount([int(i) for i in re.findall(r"doc (\d+) ", text)], minlength=120)
    assert counts.tolist() == [3] * 120  # three epochs, every document once per epoch
    first = [int(i) for i in re.findall(r"doc (\d+) ", BYTE.decode(full[0].input_ids.tolist()))]
    assert first != sorted(first) and max(first) < 16  # shuffled inside the first window
    ds = PackedDataset(docs, BYTE, cfg, dp_rank=1, dp_size=2)
    it = iter(ds)
    take(it, 5)
    state = ds.state_dict()
    again = PackedDataset(docs, BYTE, cfg, dp_rank=0, dp_size=1)
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(full) - state["sample_index"]
    assert all(same(a, b) for a, b in zip(rest, full[state["sample_index"] :]))


def test_resume_state_checks():
    docs = random_docs(20, seed=0)
    ds = PackedDataset(docs, BYTE, PackingConfig(16, seed=1))
    state = ds.state_dict()
    other = PackedDataset(docs, BYTE, PackingConfig(32, seed=1))
    with pytest.raises(ValueError, match="seq_length: saved 16, now 32"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        ds.load_state_dict({**state, "version": 99})


def test_dataloader_integration(monkeypatch):
    docs = random_docs(40, seed=3)
    ds = PackedDataset(docs, BYTE, PackingConfig(16, seed=0))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=0)
    batch = next(iter(loader))
    assert batch.input_ids.shape == (4, 16) and len(batch.cu_seqlens) == 4
    assert ds.state_dict()["sample_index"] == 4
    # inside a DataLoader worker process (simulated: a real worker takes seconds to shut down)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    with pytest.raises(RuntimeError, match="num_workers=0"):
        iter(ds)


# -- CP sharding --------------------------------------------------------------------------------
LAYOUTS = ["contiguous", "zigzag", "striped", "striped:2"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_shard_sample_round_trip(layout, cp_size):
    S = 48
    sample = pack_documents(random_docs(30, seed=cp_size, max_len=20), BYTE, PackingConfig(S))[1]
    lay = Layout.parse(layout)
    mbs = [shard_sample(sample, layout, cp_size, r) for r in range(cp_size)]
    for r, mb in enumerate(mbs):
        assert mb.input_ids.shape == mb.labels.shape == (1, S // cp_size)
        assert torch.equal(mb.position_ids, lay.positions(S, cp_size, r).materialize())
        assert torch.equal(mb.input_ids[0], sample.input_ids[mb.position_ids])
        assert torch.equal(mb.labels[0], sample.labels[mb.position_ids])  # shifted before sharding
        assert torch.equal(mb.cu_seqlens, sample.cu_seqlens)
        ctx = to_sequence_context(mb, cp_group=None, strategy="ring", kernel="reference")
        assert ctx.layout == str(lay) and torch.equal(ctx.position_ids, mb.position_ids)
        assert ctx.mask.causal and torch.equal(ctx.mask.cu_seqlens, sample.cu_seqlens.long())
        doc_start = sample.cu_seqlens.long()[sample.document_ids()[mb.position_ids]]
        assert torch.equal(ctx.rope_position_ids, mb.position_ids - doc_start)
        free = to_sequence_context(mb, cross_document_attention=True)
        assert free.mask.cu_seqlens is None and free.mask.causal
    back = unshard_micro_batches(mbs)
    assert same(back, sample)
    assert sum(mb.num_label_tokens for mb in mbs) == int((sample.labels != -100).sum())


def test_shard_batch_and_errors():
    samples = pack_documents(random_docs(40, seed=9), BYTE, PackingConfig(24))[:3]
    batch = collate(samples)
    mbs = [shard_sample(batch, "zigzag", 2, r) for r in range(2)]
    assert mbs[0].input_ids.shape == (3, 12)
    back = unshard_micro_batches(mbs)
    assert torch.equal(back.input_ids, batch.input_ids) and torch.equal(back.labels, batch.labels)
    with pytest.raises(ValueError, match="concat_samples"):
        to_sequence_context(mbs[0])
    assert to_sequence_context(mbs[0], cross_document_attention=True).mask.cu_seqlens is None
    flat = concat_samples(samples)
    assert flat.seq_length == 72 and flat.cu_seqlens[-1] == 72
    check_packed_sample(flat, pad_id=BYTE.pad_id)
    to_sequence_context(shard_sample(flat, "zigzag", 2, 0))
    with pytest.raises(ValueError, match=r"seq_length=24 is not a multiple of 32.*'striped:8'"):
        shard_sample(samples[0], "striped:8", 4, 0)
    with pytest.raises(ValueError, match="multiple of 6"):
        shard_sample(pack_documents([[1] * 5], BYTE, PackingConfig(10))[0], "zigzag", 3, 0)
    with pytest.raises(ValueError, match="sharded with the 'zigzag' layout"):
        to_sequence_context(mbs[0], layout="contiguous", cross_document_attention=True)


# -- synthetic tasks ----------------------------------------------------------------------------
def test_synthetic_deterministic_and_fast(tmp_path):
    cfg = SyntheticConfig(num_samples=3000, seed=4, min_length=500, max_length=3000)
    t0 = time.perf_counter()
    a = generate_samples(cfg)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5, f"generating 3000 samples took {elapsed:.1f}s"
    assert a == generate_samples(cfg)
    assert a[:10] == generate_samples(
        SyntheticConfig(num_samples=10, seed=4, min_length=500, max_length=3000)
    )
    assert a[:10] != generate_samples(
        SyntheticConfig(num_samples=10, seed=5, min_length=500, max_length=3000)
    )
    assert {s.task for s in a} == {"passkey", "mqar"}
    lengths = [len(s.text) for s in a]
    assert 450 <= min(lengths) and max(lengths) <= 3100
    p1 = write_synthetic_dataset(
        tmp_path / "one" / "syn.jsonl", SyntheticConfig(num_samples=50, seed=2)
    )
    p2 = write_synthetic_dataset(
        tmp_path / "two" / "syn.jsonl", SyntheticConfig(num_samples=50, seed=2)
    )
    assert p1.read_bytes() == p2.read_bytes()
    assert read_synthetic_dataset(p1) == generate_samples(SyntheticConfig(num_samples=50, seed=2))


def test_synthetic_file_is_rewritten_when_config_or_format_changes(tmp_path, monkeypatch):
    """A cached file is reused only for the same config and the same text format version, so
    an upgrade that changes the text never trains on a stale file."""
    from longctx.data import synthetic
    from longctx.data.pipeline import default_synthetic_path

    cfg = SyntheticConfig(num_samples=5, seed=1)
    path = write_synthetic_dataset(tmp_path / "syn.jsonl", cfg)
    path.write_text("stale\n")  # same config and format: kept as it is
    assert write_synthetic_dataset(path, cfg).read_text() == "stale\n"
    write_synthetic_dataset(path, dataclasses.replace(cfg, seed=2))  # another config
    assert read_synthetic_dataset(path) == generate_samples(dataclasses.replace(cfg, seed=2))
    path.write_text("stale\n")
    before = default_synthetic_path(cfg)
    monkeypatch.setattr(synthetic, "SYNTHETIC_FORMAT", synthetic.SYNTHETIC_FORMAT + 1)
    write_synthetic_dataset(path, dataclasses.replace(cfg, seed=2))  # another format version
    assert read_synthetic_dataset(path) == generate_samples(dataclasses.replace(cfg, seed=2))
    assert default_synthetic_path(cfg) != before


@pytest.mark.parametrize(
    "cfg",
    [
        SyntheticConfig(num_samples=300, seed=0),
        SyntheticConfig(num_samples=100, seed=1, num_pairs=3, num_queries=2, key_length=2,
                        value_digits=4, passkey_digits=3, min_length=60, max_length=700),
    ],
    ids=["default", "small"],
)
def test_synthetic_answers_recoverable_from_text(cfg):
    """The task is solvable in principle: every answer is stated once, earlier in the text,
    exactly at its documented needle offset, in the tokens the model reads."""
    for s in generate_samples(cfg):
        assert s.text.isascii() and len(s.needles) == len(s.answers)
        context = s.text[: s.answers[0][0]]
        if s.task == "passkey":
            (key,) = [s.text[a:b] for a, b in s.answers]
            assert re.fullmatch(rf"\d{{{cfg.passkey_digits}}}", key)
            assert re.findall(r"The pass key is (\d+)\.", context) == [key]
            # the question's '?' is the only one, and the key follows it directly
            assert s.text.endswith(f"\nPass key?{key}.") and s.text.count("?") == 1
            statements = [f"The pass key is {key}."]
        else:
            body, queries = context.split("\nQueries:")
            pairs = re.findall(r"([a-z]+)=(\d+)\.", body)
            assert len(pairs) == cfg.num_pairs == len(dict(pairs))  # keys are distinct
            assert all(len(k) == cfg.key_length and len(v) == cfg.value_digits for k, v in pairs)
            assert len(s.answers) == cfg.num_queries and queries.startswith(" ")
            keys = [s.text[:a].rsplit(" ", 1)[1].rstrip("=") for a, _ in s.answers]
            assert [dict(pairs)[k] for k in keys] == [s.text[a:b] for a, b in s.answers]
            statements = [f"{k}={s.text[a:b]}." for k, (a, b) in zip(keys, s.answers)]
        tokens = BYTE.encode(s.text)
        for (a, b), needle, stated in zip(s.answers, s.needles, statements):
            assert s.text[needle:].startswith(stated) and needle + len(stated) <= a
            # the answer's tokens sit at the end of the statement at the needle (before its ".")
            at = needle + len(stated) - 1 - (b - a)
            assert tokens[at : at + b - a] == tokens[a:b]


def test_default_eval_needs_context_across_cp_ranks():
    """The embedded default run evaluates each held-out sample sharded over its cp ranks as in
    training (padded to the layout's multiple): for most answers the key sits on another rank
    than the position that predicts the answer, so the answer has to come through the ring."""
    from longctx.parallel.layout import Layout
    from longctx.train.config import TrainConfig

    run = TrainConfig()
    cp, layout = run.parallel.cp, Layout.parse(run.parallel.resolved_layout)
    samples = generate_samples(dataclasses.replace(run.data.synthetic, num_samples=200))
    assert all(len(s.text) < run.model.seq_length for s in samples)  # never cut by packing
    multiple = layout.required_multiple(cp)
    across = total = 0
    for s in samples:
        length = len(s.text) + 1  # <bos> first
        padded = -(-length // multiple) * multiple
        owner = torch.empty(padded, dtype=torch.int64)  # the rank holding each position
        for rank in range(cp):
            owner[layout.positions(padded, cp, rank).materialize()] = rank
        for (a, _), needle in zip(s.answers, s.needles):
            # token t + 1 is character t; the answer's first token is predicted at its position - 1
            across += int(owner[needle + 1] != owner[a])
            total += 1
    assert across / total > 0.5, f"only {across}/{total} keys sit on another rank"


def test_answer_accuracy_metric():
    samples = generate_samples(SyntheticConfig(num_samples=40, seed=3, max_length=600))

    def oracle(ids):  # teacher-forced perfect predictions (ids), shape [1, T]
        return torch.cat([ids[:, 1:], ids[:, :1]], dim=1)

    rep = answer_accuracy(samples, oracle)
    assert rep.exact_match == 1.0 and rep.token_accuracy == 1.0
    assert set(rep.by_task) == {"passkey", "mqar"} and rep.chance < 1e-2
    n_answers = sum(len(s.answers) for s in samples)
    assert rep.num_answers == n_answers

    def logits_oracle(ids):  # the same as logits [1, T, V]
        return torch.nn.functional.one_hot(oracle(ids), BYTE.vocab_size).float()

    assert answer_accuracy(samples, logits_oracle).exact_match == 1.0

    def blind(ids):  # always predicts "0"
        return torch.full_like(ids, ord("0"))

    assert answer_accuracy(samples, blind).exact_match < 0.2

    def one_wrong(ids):  # wrong on the last token of the input: the final answer's last digit
        out = oracle(ids).clone()
        out[0, -2] = ord("x")
        return out

    rep = answer_accuracy(samples, one_wrong)
    assert rep.exact_match == pytest.approx(1 - len(samples) / n_answers)
    assert "exact match" in str(rep)


def _context_reader(window: int | None = None):
    """A rule-based next-token function that answers by reading its context (the last
    ``window`` characters only, if given): it shows the metric rewards using the context."""

    def predict(ids):
        text = bytes(ids[0].tolist()).decode()
        seen = text if window is None else text[-window:]
        if m := re.search(r"Pass key\?(\d*)$", text):
            found = re.search(r"The pass key is (\d+)\.", seen)
        elif m := re.search(r" ([a-z]+)=(\d*)$", text):
            found = re.search(rf"(?:^|\s){m.group(1)}=(\d+)\.", seen)
        else:
            found = None
        if found is None:
            return torch.tensor([ord("0")])
        partial = m.groups()[-1]
        return torch.tensor([ord(found.group(1)[len(partial)])])

    return predict


def test_answer_accuracy_next_token_mode_rewards_context_use():
    samples = generate_samples(SyntheticConfig(num_samples=30, seed=8, min_length=400))
    full = answer_accuracy(samples, _context_reader(), next_token_only=True)
    assert full.exact_match == 1.0 and full.token_accuracy == 1.0
    short = answer_accuracy(samples, _context_reader(window=60), next_token_only=True)
    assert short.exact_match < 0.3  # the needle is further back than 60 characters


def test_synthetic_documents_pack_intact(tmp_path):
    cfg = SyntheticConfig(num_samples=30, seed=1, min_length=100, max_length=250)
    path = write_synthetic_dataset(tmp_path / "syn.jsonl", cfg)
    data = DataConfig(
        dataset=DatasetConfig(str(path), cache_dir=str(tmp_path / "c")),
        packing=PackingConfig(256, long_documents="error", num_epochs=1, shuffle=False),
    )
    ds = build_packed_dataset(data)
    texts = {s.text for s in generate_samples(cfg)}
    seen = 0
    for sample in ds:
        cu = sample.cu_seqlens.tolist()
        for a, b in zip(cu, cu[1:]):
            piece = sample.input_ids[a:b].tolist()
            if piece[0] != BYTE.pad_id:
                assert piece[-1] == BYTE.eos_id and BYTE.decode(piece) in texts
                seen += 1
    assert seen == 30


def test_data_config_and_default_dataset(tmp_path):
    cfg = DataConfig.from_dict(
        {
            "packing": {"seq_length": 512, "seed": 3},
            "synthetic": {"num_samples": 20, "max_length": 400},
            "synthetic_path": str(tmp_path / "syn.jsonl"),
        }
    )
    ranks = [build_packed_dataset(cfg, dp_rank=r, dp_size=2) for r in range(2)]
    a, b = next(iter(ranks[0])), next(iter(ranks[1]))
    assert a.input_ids.shape == (512,) and not same(a, b)
    with pytest.raises(ValueError, match=r"data\.packing\.seq_len"):
        DataConfig.from_dict({"packing": {"seq_len": 512}})
    with pytest.raises(ValueError, match=r"unknown data config key\(s\) \['tokeniser'\]"):
        DataConfig.from_dict({"tokeniser": {}})
    with pytest.raises(ValueError, match="data.packing: long_documents"):
        DataConfig.from_dict({"packing": {"seq_length": 8, "long_documents": "drop"}})
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_packed_dataset(
            DataConfig.from_dict({"tokenizer": {"path": str(tmp_path / "nope.json")}})
        )
