"""Offline datasets of the esolm lm-eval task pack, built in Python from the held-out documents of the
embedded Wikipedia corpus (``custom_dataset: !function utils.<fn>``; the task's ``metadata`` are the
keyword arguments: ``num_docs``, ``val_fraction``, ``seed``, ...)."""

from __future__ import annotations

import random

import datasets

from esolm.data.datasets import source_texts
from esolm.errors import UserError


def held_out(num_docs: int, val_fraction: float = 0.1, min_words: int = 0) -> list[list[str]]:
    """The first ``num_docs`` held-out documents with at least ``min_words`` words, as word lists (the
    split is per-document hashing, so it is the held-out split of every model trained on ``wiki``)."""
    _, val = source_texts("wiki", float(val_fraction))
    docs = [d.split() for d in val if len(d.split()) >= min_words]
    return docs[:int(num_docs)]


def _split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def wiki_ppl(num_docs: int = 16, val_fraction: float = 0.1, max_words: int = 80, **_) -> datasets.DatasetDict:
    """Documents (their first ``max_words`` words) for rolling perplexity."""
    return _split([{"text": " ".join(d[:int(max_words)])} for d in held_out(num_docs, val_fraction, 1)])


def wiki_choice(num_docs: int = 16, val_fraction: float = 0.1, context_words: int = 12, choice_words: int = 6,
                seed: int = 0, **_) -> datasets.DatasetDict:
    """Pick the true continuation: a document's first ``context_words`` words, then its next
    ``choice_words`` words against the same span of 3 other held-out documents (order shuffled by seed)."""
    c, k = int(context_words), int(choice_words)
    docs = held_out(int(num_docs) + 3, val_fraction, c + k)
    if len(docs) < 4:
        raise UserError("esolm_wiki_choice needs at least 4 held-out documents")
    rng = random.Random(int(seed))
    rows = []
    for i in range(min(int(num_docs), len(docs))):
        others = [docs[(i + j) % len(docs)] for j in (1, 2, 3)]
        choices = [" ".join(d[c:c + k]) for d in [docs[i], *others]]
        label = rng.randrange(4)
        choices[0], choices[label] = choices[label], choices[0]
        rows.append({"context": " ".join(docs[i][:c]), "choices": choices, "label": label})
    return _split(rows)


def wiki_next(num_docs: int = 8, val_fraction: float = 0.1, context_words: int = 12, **_) -> datasets.DatasetDict:
    """A document's first ``context_words`` words; the target is the next word."""
    c = int(context_words)
    docs = held_out(num_docs, val_fraction, c + 1)
    return _split([{"context": " ".join(d[:c]), "next_word": d[c]} for d in docs])


def next_word_acc(doc: dict, results: list[str]) -> dict:
    """1 when the first word of the generation is the document's next word."""
    words = results[0].split()
    return {"next_word_acc": float(bool(words) and words[0] == doc["next_word"])}
