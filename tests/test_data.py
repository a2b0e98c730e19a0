"""Data: packing keeps every token once, padding, splits, cache, local files, resumable sampler."""

import json

import numpy as np
import pytest
import torch

from esolm.config import ConfigError
from esolm.data import (
    ResumableBatchSampler,
    build_datasets,
    pack_documents,
    pad_documents,
    read_local_texts,
    split_documents,
    tokenize_sequences,
)
from esolm.data.corpus import corpus_stats, wiki_documents
from esolm.data.tokenizers import bpe8k
from esolm.errors import UserError

BOS, EOS, PAD = 90, 91, 92


def random_docs(seed, n=13, hi=40):
    g = np.random.default_rng(seed)
    return [list(g.integers(0, 80, size=g.integers(0, hi))) for _ in range(n)]


@pytest.mark.parametrize("length", [3, 5, 8, 17])
def test_packing_keeps_every_token_exactly_once(length):
    docs = random_docs(length)
    ids, valid = pack_documents(docs, length, BOS, EOS, PAD)
    stream = [t for d in docs for t in (*d, EOS)]
    # every row: [BOS] body [EOS], padding only in the last row and marked invalid
    assert (ids[:, 0] == BOS).all() and valid[:, 0].all()
    inner = []
    for row, v in zip(ids, valid):
        n = int(v.sum())
        assert v[:n].all() and not v[n:].any() and (row[n:] == PAD).all()
        assert row[n - 1] == EOS
        inner.extend(row[1:n - 1].tolist())
    assert inner == stream
    assert valid[:-1].all()  # only the last row can be partial


def test_padding_mode_one_document_per_row():
    docs = [[1, 2, 3], [], list(range(10))]
    ids, valid = pad_documents(docs, 6, BOS, EOS, PAD)
    assert ids.tolist() == [[BOS, 1, 2, 3, EOS, PAD], [BOS, EOS, PAD, PAD, PAD, PAD],
                            [BOS, 0, 1, 2, 3, EOS], [BOS, 4, 5, 6, 7, EOS], [BOS, 8, 9, EOS, PAD, PAD]]
    assert valid.sum(1).tolist() == [5, 2, 6, 6, 4]
    assert ((ids == PAD) == ~valid).all()


def test_split_is_deterministic_by_document():
    texts = [f"document number {i}" for i in range(2000)]
    tr, va = split_documents(texts, 0.1, seed=3)
    assert 140 < len(va) < 260 and len(tr) + len(va) == 2000 and not set(tr) & set(va)
    tr2, va2 = split_documents(list(reversed(texts)), 0.1, seed=3)  # order does not matter
    assert set(va2) == set(va)
    assert set(split_documents(texts, 0.1, seed=4)[1]) != set(va)


def test_embedded_corpus_is_real_text():
    s = corpus_stats()
    assert s["documents"] > 9000 and s["bytes_utf8"] > 4_000_000
    doc = wiki_documents()[0]
    assert doc.title and len(doc.text.split()) > 20


def test_cache_is_written_atomically_and_reused(tmp_path):
    tok = bpe8k()
    texts = [d.text for d in wiki_documents()[:30]]
    ids, valid = tokenize_sequences(texts, tok, 32, "pack", cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and not any(".tmp" in f for f in files)
    ids2, valid2 = tokenize_sequences(texts, tok, 32, "pack", cache_dir=tmp_path)
    assert isinstance(ids2, np.memmap)
    assert (np.asarray(ids2) == ids).all() and (np.asarray(valid2) == valid).all()
    # decoding the packed stream gives the documents back
    flat = [t for r, v in zip(ids, valid) for t in r[v][1:-1].tolist()]
    assert tok.decode(flat[: flat.index(tok.eos_id)]) == texts[0]
    # a different length is a different cache entry
    tokenize_sequences(texts, tok, 16, "pack", cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 4


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    lines = [json.dumps({"text": "third"}), "", json.dumps({"text": "4th"})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    assert read_local_texts(tmp_path) == ["first doc\nline two", "second doc", "third", "4th"]
    (tmp_path / "bad.jsonl").write_text('{"title": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_local_texts(tmp_path / "bad.jsonl")
    with pytest.raises(UserError):
        read_local_texts(tmp_path / "missing.txt")


def test_build_datasets_and_length_too_large(tmp_path):
    tok = bpe8k()
    splits = build_datasets("wiki", tok, 32, max_documents=60, val_fraction=0.2, cache_dir=tmp_path)
    item = splits.train[0]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (32,)
    assert len(splits.validation) > 0
    with pytest.raises(ConfigError, match="larger than the data allows"):
        build_datasets("wiki", tok, 100_000, max_documents=5, val_fraction=0.5, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown data source"):
        build_datasets("no-such-corpus", tok, 32)


def test_resumable_sampler_shards_and_resumes():
    n, b, w = 23, 3, 2
    samplers = [ResumableBatchSampler(n, b, seed=5, rank=r, world_size=w) for r in range(w)]
    its = [iter(s) for s in samplers]
    per_epoch = n // (b * w)
    epoch0 = [[next(it) for _ in range(per_epoch)] for it in its]
    rows = [i for r in range(w) for batch in epoch0[r] for i in batch]
    assert len(rows) == len(set(rows)) == per_epoch * b * w  # disjoint across ranks, no repeats in an epoch
    nxt = [next(it) for it in its]  # epoch 1 reshuffles
    assert nxt[0] != epoch0[0][0] or nxt[1] != epoch0[1][0]
    # resuming at position k reproduces the stream from k
    stream = [next(iter(ResumableBatchSampler(n, b, seed=5, rank=1, world_size=w, start=k)))
              for k in range(9)]
    it = iter(ResumableBatchSampler(n, b, seed=5, rank=1, world_size=w))
    assert stream == [next(it) for _ in range(9)]
    assert stream[4] == samplers[1].batch(4)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        ResumableBatchSampler(5, 3, world_size=2)
