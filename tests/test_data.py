"""Embedded corpus, text ingestion, the token cache, and the batch loaders."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seekling.data import dataset as ds
from seekling.data.corpus import VAL_WORKS, WORK_SEPARATOR, corpus_documents, corpus_split, load_corpus
from seekling.data.dataset import (
    TokenShards,
    TrainLoader,
    ValLoader,
    bits_per_byte,
    iter_documents,
    prepare_tokens,
    read_documents,
)
from seekling.tokenizer import SeeklingTokenizer, load_default_tokenizer


@pytest.fixture(scope="module")
def tok() -> SeeklingTokenizer:
    return load_default_tokenizer()


@pytest.fixture(scope="module")
def corpus_shards(tok, tmp_path_factory) -> TokenShards:
    return prepare_tokens(None, tok, cache_dir=tmp_path_factory.mktemp("cache"))


def _reference_stream(tok, texts):
    """The obvious way: BOS ids EOS per document, concatenated."""
    out = []
    for text in texts:
        out += [tok.bos_id, *tok.encode(text), tok.eos_id]
    return out


def _arange_shards(root, n_tokens, shard_tokens, val_tokens=0) -> TokenShards:
    """A hand-written cache whose token at position p is p, so every window reveals its start."""
    root.mkdir(parents=True, exist_ok=True)
    tokens = np.arange(n_tokens, dtype=np.uint16)
    shards = []
    for i, lo in enumerate(range(0, n_tokens, shard_tokens)):
        name = f"tokens_{i:06d}.bin"
        tokens[lo : lo + shard_tokens].tofile(root / name)
        shards.append([name, len(tokens[lo : lo + shard_tokens])])
    np.ones(n_tokens, dtype=np.int32).tofile(root / "token_bytes.bin")
    split = n_tokens - val_tokens
    index = {
        "format": ds.FORMAT_VERSION, "dtype": "uint16", "vocab_size": n_tokens, "tokenizer_sha256": "x",
        "source": "arange", "documents": 1, "shards": shards,
        "splits": {"train": {"start": 0, "end": split, "bytes": split},
                   "val": {"start": split, "end": n_tokens, "bytes": val_tokens}},
    }
    (root / "index.json").write_text(json.dumps(index))
    return TokenShards.open(root)


# --- embedded corpus -------------------------------------------------------------------------


def test_corpus_contents():
    works = load_corpus()
    assert len(works) == 42
    assert sum(map(len, works.values())) == 5_053_039
    assert works["Hamlet"].startswith("HAMLET, PRINCE OF DENMARK")
    assert "To be, or not to be" in works["Hamlet"]
    for title, text in works.items():
        assert text == text.strip("\n") and "\r" not in text, title
        assert "\n\n\n\n" not in text and not re.search(r"[ \t]+\n", text), title
        assert "project gutenberg" not in text.lower(), title


def test_corpus_split_by_whole_works():
    works = load_corpus()
    train, val = corpus_documents("train"), corpus_documents("val")
    train_titles, val_titles = {t for t, _ in train}, {t for t, _ in val}
    assert val_titles == set(VAL_WORKS) and not train_titles & val_titles
    assert train_titles | val_titles == set(works)
    train_text, val_text = corpus_split()
    assert val_text == WORK_SEPARATOR.join(works[t] for t in VAL_WORKS)
    assert corpus_split() == (train_text, val_text)  # deterministic
    # Famous lines of each held-out play must not leak into training.
    for line in ["Double, double, toil and trouble", "We are such stuff", "DROMIO OF SYRACUSE"]:
        assert line in val_text and line not in train_text
    frac = len(val_text) / (len(train_text) + len(val_text))
    assert 0.04 < frac < 0.07
    with pytest.raises(ValueError, match="'train' or 'val'"):
        corpus_documents("test")


# --- ingestion and its errors ----------------------------------------------------------------


def test_ingestion_formats(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbffirst\r\nline\r\n")
    (tmp_path / "b" / "c.md").write_text("# heading\n")
    (tmp_path / "b" / "d.jsonl").write_text('{"text": "one"}\n\n{"text": "two\\u2028still two", "id": 3}\n{"text": "  "}\n')
    (tmp_path / "notes.csv").write_text("ignored in a directory")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    docs = read_documents(tmp_path)
    assert [d.text for d in docs] == ["first\nline\n", "# heading\n", "one", "two\u2028still two"]
    assert [d.source for d in docs][2:] == [f"{tmp_path / 'b' / 'd.jsonl'}:1", f"{tmp_path / 'b' / 'd.jsonl'}:3"]


@pytest.mark.parametrize(
    "files, target, exc, pattern",
    [
        ({}, "missing.txt", FileNotFoundError, r"missing\.txt does not exist; pass a \.txt, \.md or \.jsonl file"),
        ({"data.csv": b"a,b"}, "data.csv", ValueError, r"data\.csv has unsupported extension '\.csv'"),
        ({"sub/x.pdf": b"%PDF"}, ".", ValueError, r"holds no \.txt, \.md or \.jsonl files"),
        ({"latin.txt": b"caf\xe9 au lait"}, "latin.txt", ValueError,
         r"latin\.txt is not valid UTF-8: invalid continuation byte at byte offset 3 \(bytes e9 20 61 75\); re-save it as UTF-8"),
        ({"d.jsonl": b'{"text": "ok"}\n{"body": "x"}\n'}, "d.jsonl", ValueError, r'd\.jsonl:2: no "text" field'),
        ({"d.jsonl": b'{"text": "ok"}\n\n{"text": 5}\n'}, "d.jsonl", ValueError, r'd\.jsonl:3: "text" must be a string, got int'),
        ({"d.jsonl": b'{"text": "ok"}\n{text: bad}\n'}, "d.jsonl", ValueError, r"d\.jsonl:2: not valid JSON"),
        ({"e.txt": b"  \n\n"}, "e.txt", ValueError, r"e\.txt contains no text"),
        ({"a.txt": b"", "b.jsonl": b"\n"}, ".", ValueError, r"contains no text"),
    ],
)
def test_ingestion_errors(tmp_path, files, target, exc, pattern):
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with pytest.raises(exc, match=pattern):
        list(iter_documents(tmp_path / target))


# --- tokenizing into the cache ---------------------------------------------------------------


def test_chunks_encode_like_the_whole(tok):
    for _, text in corpus_documents("val"):
        pieces = ds._chunks(text, max_chars=3000)
        assert len(pieces) > 10 and "".join(pieces) == text
        assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.sampled_from("ab \n\t.'é"), max_size=300))
def test_chunks_safe_cuts(tok, text):
    pieces = ds._chunks(text, max_chars=20)
    assert "".join(pieces) == text and all(pieces[:-1])
    cuts = np.cumsum([len(p) for p in pieces[:-1]])
    if all(ds._SAFE_CUT.match(text, c) for c in cuts):
        assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def _user_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir(parents=True)
    (data / "a.txt").write_text("Once more unto the breach, dear friends.\nOnce more!\n" * 30)
    (data / "b.jsonl").write_text("\n".join(json.dumps({"text": f"Document {i}: ünïcödé ✓ {i * 7}"}) for i in range(20)))
    return data


def test_prepare_user_data_matches_reference(tok, tmp_path):
    data = _user_dir(tmp_path)
    shards = prepare_tokens(data, tok, cache_dir=tmp_path / "cache", shard_tokens=100, val_fraction=0.1)
    texts = [d.text for d in read_documents(data)]
    expected = _reference_stream(tok, texts)
    assert len(shards.shards) == math.ceil(len(expected) / 100) > 3 and shards.dtype == "uint16"
    assert shards.read(0, shards.n_tokens).tolist() == expected
    assert shards.documents == 21 and not shards.from_cache
    train, val = shards.split("train"), shards.split("val")
    assert val.n_tokens == round(len(expected) * 0.1) and train.n_tokens + val.n_tokens == len(expected)
    assert train.n_bytes + val.n_bytes == sum(len(t.encode("utf-8")) for t in texts)
    lengths = tok.token_byte_lengths()
    assert val.n_bytes == sum(lengths[i] for i in expected[train.n_tokens :])
    assert val.read(0, val.n_tokens).tolist() == expected[train.n_tokens :]


def test_prepare_corpus_splits_by_works(tok, corpus_shards):
    train, val = corpus_shards.split("train"), corpus_shards.split("val")
    val_texts = [text for _, text in corpus_documents("val")]
    assert val.read(0, val.n_tokens).tolist() == _reference_stream(tok, val_texts)
    assert val.n_bytes == sum(map(len, val_texts)) == 289_911
    assert train.n_bytes == 4_763_128
    assert corpus_shards.documents == 42 and train.n_tokens == 1_550_835 + 2 * 39


def test_cache_reuse(tok, tmp_path, monkeypatch):
    data = _user_dir(tmp_path)
    first = prepare_tokens(data, tok, cache_dir=tmp_path / "cache")
    mtime = (first.root / "index.json").stat().st_mtime_ns
    calls = []
    original = SeeklingTokenizer.encode_batch
    monkeypatch.setattr(SeeklingTokenizer, "encode_batch", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    second = prepare_tokens(data, tok, cache_dir=tmp_path / "cache")
    assert second.from_cache and second.root == first.root and calls == []
    assert (second.root / "index.json").stat().st_mtime_ns == mtime
    # Changing any input byte (or the split setting) is a different cache entry.
    (data / "a.txt").write_text("changed\n")
    third = prepare_tokens(data, tok, cache_dir=tmp_path / "cache")
    assert not third.from_cache and third.root != first.root and calls
    assert prepare_tokens(data, tok, cache_dir=tmp_path / "cache", val_fraction=0.2).root != third.root


def test_cache_dir_from_env(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("SEEKLING_CACHE", str(tmp_path / "env"))
    shards = prepare_tokens(_user_dir(tmp_path), tok)
    assert shards.root.parent == tmp_path / "env" / "tokens"


def test_failed_build_leaves_nothing(tok, tmp_path, monkeypatch):
    data = _user_dir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setattr(ds, "_ENCODE_BATCH_CHARS", 100)  # many flushes, so the crash is mid-way
    calls = []
    original = SeeklingTokenizer.encode_batch

    def crash_on_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the harshest interruption short of a kill
        return original(self, *a, **k)

    monkeypatch.setattr(SeeklingTokenizer, "encode_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(data, tok, cache_dir=cache, shard_tokens=50)
    assert len(calls) == 3 and list(cache.iterdir()) == []
    monkeypatch.setattr(SeeklingTokenizer, "encode_batch", original)
    shards = prepare_tokens(data, tok, cache_dir=cache, shard_tokens=50)
    assert [p.name for p in cache.iterdir()] == [shards.root.name] and not shards.from_cache


def test_damaged_cache_is_reported(tok, tmp_path):
    shards = prepare_tokens(_user_dir(tmp_path), tok, cache_dir=tmp_path / "cache", shard_tokens=100)
    with open(shards.root / shards.shards[-1][0], "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="is damaged .*delete it and rerun"):
        prepare_tokens(_user_dir(tmp_path / "again"), tok, cache_dir=tmp_path / "cache", shard_tokens=100)


def test_large_vocab_uses_uint32(tok, tmp_path):
    class Wide:  # the real tokenizer, claiming a vocabulary that does not fit uint16
        vocab_size, sha256, bos_id, eos_id = 70_000, "wide" + tok.sha256, tok.bos_id, tok.eos_id
        encode_batch = staticmethod(tok.encode_batch)
        token_byte_lengths = staticmethod(lambda: tok.token_byte_lengths() + [0] * (70_000 - tok.vocab_size))

    data = _user_dir(tmp_path)
    wide = prepare_tokens(data, Wide(), cache_dir=tmp_path / "cache")
    narrow = prepare_tokens(data, tok, cache_dir=tmp_path / "cache")
    assert (wide.dtype, narrow.dtype) == ("uint32", "uint16")
    assert os.path.getsize(wide.root / wide.shards[0][0]) == 2 * os.path.getsize(narrow.root / narrow.shards[0][0])
    assert wide.read(0, wide.n_tokens).tolist() == narrow.read(0, narrow.n_tokens).tolist()


def test_prepare_rejects_bad_settings(tok, tmp_path):
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        prepare_tokens(None, tok, cache_dir=tmp_path, val_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_tokens(tmp_path / "nope", tok, cache_dir=tmp_path)


# --- loaders ---------------------------------------------------------------------------------


def test_read_across_shards(tmp_path):
    shards = _arange_shards(tmp_path / "s", 100, 7)
    assert shards.read(5, 10).tolist() == list(range(5, 15))
    assert shards.read(0, 100).tolist() == list(range(100))


def test_train_epoch_covers_each_window_once(tmp_path):
    n, T, B = 1000, 16, 4
    data = _arange_shards(tmp_path / "s", n, 64).split("train")
    loader = TrainLoader(data=data, batch_size=B, seq_len=T, seed=3)
    W = loader.windows_per_epoch
    assert W == (n - 1) // T == 62
    starts = []
    for step in range(math.ceil(2 * W / B)):
        x, y = loader.batch(step)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
        starts += x[:, 0].tolist()
    for epoch in starts[:W], starts[W : 2 * W]:
        offset = min(epoch) % T
        assert sorted(epoch) == [offset + k * T for k in range(W)]
        assert max(epoch) + T + 1 <= n
    assert starts[:W] != starts[W : 2 * W]  # reshuffled per epoch
    # Golden: the sampler is part of the resume contract, so its output must not drift.
    assert starts[:6] == [304, 432, 480, 48, 736, 128]


def test_train_batches_are_pure_in_seed_and_step(tmp_path):
    data = _arange_shards(tmp_path / "s", 5000, 999).split("train")
    run = TrainLoader(data=data, batch_size=3, seq_len=32, seed=11)
    history = [run.batch(step) for step in range(200)]
    # "Resume" at step 150 with a fresh loader that only knows (seed, step).
    resumed = TrainLoader(data=data, batch_size=3, seq_len=32, seed=11)
    for step in [150, 151, 199, 0, 150]:
        assert all(torch.equal(a, b) for a, b in zip(resumed.batch(step), history[step]))
    other = TrainLoader(data=data, batch_size=3, seq_len=32, seed=12)
    assert not torch.equal(other.batch(0)[0], history[0][0])


def test_ranks_partition_the_global_batch(tmp_path):
    data = _arange_shards(tmp_path / "s", 3000, 500).split("train")
    single = TrainLoader(data=data, batch_size=4, seq_len=8, seed=0)
    ranks = [TrainLoader(data=data, batch_size=2, seq_len=8, seed=0, rank=r, world_size=2) for r in range(2)]
    for step in [0, 7, 40]:
        x = torch.cat([r.batch(step)[0] for r in ranks])
        assert torch.equal(x, single.batch(step)[0])


def test_val_loader_is_fixed_and_tiles_the_split(tmp_path):
    shards = _arange_shards(tmp_path / "s", 1000, 128, val_tokens=300)
    val = shards.split("val")
    loader = ValLoader(data=val, batch_size=4, seq_len=16)
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(((300 - 1) // 16) / 4) == 5
    assert [b[0].shape[0] for b in batches] == [4, 4, 4, 4, 2]
    x = torch.cat([b[0] for b in batches]).flatten()
    assert x.tolist() == list(range(700, 700 + 18 * 16))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, list(loader)))
    assert loader.n_target_tokens == loader.n_target_bytes == 18 * 16
    assert len(ValLoader(data=val, batch_size=4, seq_len=16, max_batches=2)) == 2


def test_val_target_bytes_on_corpus(tok, corpus_shards):
    loader = ValLoader(data=corpus_shards.split("val"), batch_size=8, seq_len=256)
    ys = torch.cat([y.flatten() for _, y in loader]).tolist()
    lengths = tok.token_byte_lengths()
    assert loader.n_target_tokens == len(ys)
    assert loader.n_target_bytes == sum(lengths[i] for i in ys)


def test_loader_errors(tmp_path):
    shards = _arange_shards(tmp_path / "s", 100, 64, val_tokens=10)
    with pytest.raises(ValueError, match=r"val split of arange has 10 tokens, fewer than seq_len \+ 1 = 17; .*raise val_fraction"):
        ValLoader(data=shards.split("val"), batch_size=1, seq_len=16)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        TrainLoader(data=shards.split("train"), batch_size=1, seq_len=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size and seq_len must be positive"):
        TrainLoader(data=shards.split("train"), batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="split must be one of"):
        shards.split("test")


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), 100, 100) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 1000, 2830) == pytest.approx(2.0 * 1000 / (2830 * math.log(2)))
    with pytest.raises(ValueError, match="positive byte count"):
        bits_per_byte(1.0, 10, 0)
