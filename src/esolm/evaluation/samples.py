"""Samples of a trained model, batch by batch: prompts, JSONL rows streamed to disk, a running summary.

* :func:`encode_prompt` — the clean prefix samples continue (plain text, checked);
* :func:`sample_batches` — checks the request, then yields :class:`SampleBatch` es lazily, so any number
  of samples runs in the memory of one batch;
* :class:`JsonlWriter` — rows to a JSONL file as they come, the file appearing atomically at the end;
* :class:`SampleStats` — count, NFE, seconds and quality metrics (unigram entropy, generative perplexity
  under a judge LM, MAUVE) accumulated batch by batch.

A JSONL row holds one sample: ``index``, ``text`` (decoded, special tokens dropped), ``token_ids``, and the
``nfe`` (network calls), ``seconds`` and number of the ``batch`` that produced it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from esolm.data.tokenizers import Tokenizer
from esolm.errors import UserError
from esolm.evaluation import metrics
from esolm.io import atomic_writer, check_writable
from esolm.likelihood import perplexity
from esolm.methods import Method, check_positive_int
from esolm.sampling.api import check_request, generate

DEFAULT_BATCH_SIZE = 64  # samples per generate call when none is given
# line breaks for str.splitlines that json.dumps(ensure_ascii=False) leaves raw: escaped, one row per line
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def check_text(value, what: str) -> str:
    """``value`` as a str that can be written as UTF-8 (undecodable command-line bytes arrive as lone
    surrogates); UserError otherwise."""
    if not isinstance(value, str):
        raise UserError(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = value[e.start]
        where = (f"byte 0x{ch.encode('utf-8', 'surrogateescape').hex()}" if "\udc80" <= ch <= "\udcff"
                 else f"character {ascii(ch)}")
        raise UserError(f"{what} is not valid UTF-8 ({where} at position {e.start})") from None
    return value


def encode_prompt(tokenizer: Tokenizer, text: str, length: int | None = None) -> list[int]:
    """``[BOS] + tokens of text``: the clean prefix that samples of ``length`` tokens continue.

    The prompt is plain text: special-token strings in it (``<|endoftext|>``, ``<|mask|>``, ``[MASK]``
    ...) are encoded as ordinary text, never as special ids. UserError when ``text`` is not valid UTF-8,
    is empty, leaves nothing of ``length`` to generate, or still encodes to the mask id (a tokenizer that
    cannot encode special-token text as text).
    """
    check_text(text, "the prompt")
    if not text:
        raise UserError("the prompt is empty (leave it out to sample without a prompt)")
    backend = tokenizer.backend
    if hasattr(backend, "encode_special_tokens"):  # tokenizers >= 0.15: special-token strings as text
        as_special = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            ids = [tokenizer.bos_id, *tokenizer.encode(text)]
        finally:
            backend.encode_special_tokens = as_special
    else:
        ids = [tokenizer.bos_id, *tokenizer.encode(text)]
    if tokenizer.mask_id in ids:
        raise UserError(f"the prompt encodes to the mask token (id {tokenizer.mask_id}), which the samplers "
                        "read as a position to generate; remove the mask text from the prompt")
    if length is not None and len(ids) >= length:
        raise UserError(f"the prompt is {len(ids)} tokens (with BOS) but samples are {length} tokens long: "
                        "nothing left to generate; shorten the prompt or raise max_length")
    return ids


@dataclass
class SampleBatch:
    """One ``generate`` call's samples: JSONL ``rows``, its network calls and sampling seconds."""

    index: int
    rows: list[dict]
    nfe: int
    seconds: float


def sample_batches(model, method: Method | dict, tokenizer: Tokenizer, *, num_samples: int,
                   batch_size: int | None = None, steps: int | None = None, alpha0: float | None = None,
                   top_p: float | None = None, seed: int = 0, prompt_ids: Sequence[int] | None = None,
                   max_length: int | None = None, sampler: str = "auto", shuffle: bool = False,
                   stop_at_eos: bool = False, repeats: int = 1, speculative: bool | int | None = None
                   ) -> Iterator[SampleBatch]:
    """Check the request now (:func:`esolm.sampling.api.check_request`), then sample lazily, one batch per
    iteration (``batch_size`` samples, default ``min(num_samples, DEFAULT_BATCH_SIZE)``).

    Batch ``b`` uses seed ``seed * 1_000_003 + b``, so its samples do not depend on later batches.
    ``repeats > 1`` re-draws each batch with the same seed (the same samples) and keeps the fastest time:
    robust timings on a shared machine.
    """
    num_samples = check_positive_int(num_samples, "num_samples")
    bs = min(num_samples, DEFAULT_BATCH_SIZE if batch_size is None else check_positive_int(batch_size,
                                                                                            "batch_size"))
    repeats = check_positive_int(repeats, "repeats")
    max_seed = (2**64 - 1 - (num_samples - 1) // bs) // 1_000_003  # every batch seed fits torch's 64 bits
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= max_seed:
        raise UserError(f"seed must be an integer in [0, {max_seed}], got {seed!r}")
    kw = dict(prompt_ids=prompt_ids, steps=steps, alpha0=alpha0, top_p=top_p, max_length=max_length,
              eos_id=tokenizer.eos_id if stop_at_eos else None, bos_id=tokenizer.bos_id, sampler=sampler,
              shuffle=shuffle, speculative=speculative)
    check_request(model, method, num_samples=bs, batch_size=bs, seed=seed, **kw)
    return _batches(model, method, tokenizer, num_samples, bs, seed, repeats, kw)


def _batches(model, method, tokenizer: Tokenizer, num_samples: int, bs: int, seed: int, repeats: int,
             kw: dict) -> Iterator[SampleBatch]:
    for b, start in enumerate(range(0, num_samples, bs)):
        n = min(bs, num_samples - start)
        draw = dict(kw, num_samples=n, batch_size=n, seed=seed * 1_000_003 + b)
        out = generate(model, method, **draw)
        seconds = out.seconds
        for _ in range(repeats - 1):
            seconds = min(seconds, generate(model, method, **draw).seconds)
        seqs = out.sequences()
        rows = [{"index": start + i, "text": text, "token_ids": ids, "nfe": int(out.nfe), "seconds": float(seconds),
                 "batch": b} for i, (ids, text) in enumerate(zip(seqs, tokenizer.decode_batch(seqs)))]
        yield SampleBatch(b, rows, int(out.nfe), float(seconds))


class JsonlWriter:
    """Sample rows to a JSONL file as they come (``"-"``: stdout), flushed per call.

    The path is checked when the writer is made (before any sampling); the file appears only when the
    ``with`` block ends without error (:func:`esolm.io.atomic_writer`).
    """

    def __init__(self, path):
        self.path = None if str(path) == "-" else check_writable(path)
        self.rows = 0
        self._stack = ExitStack()

    def __enter__(self) -> JsonlWriter:
        self._file = sys.stdout if self.path is None else self._stack.enter_context(atomic_writer(self.path, "w"))
        return self

    def write(self, rows: Sequence[dict]) -> None:
        self._file.write("".join(json.dumps(r, ensure_ascii=False).translate(_LINE_BREAKS) + "\n" for r in rows))
        self._file.flush()
        self.rows += len(rows)

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)


class SampleStats:
    """Running summary of sample batches: count, NFE, seconds and the requested quality metrics.

    ``entropy``: mean per-sample unigram entropy (nats); ``judge``: generative perplexity, the exact
    token-level aggregate; ``featurizer`` with ``reference_features``: MAUVE. Memory does not grow with the
    number of samples, except MAUVE's one feature vector per sample.
    """

    def __init__(self, *, entropy: bool = False, judge: metrics.Judge | None = None,
                 featurizer: metrics.Featurizer | None = None, reference_features: np.ndarray | None = None,
                 ignore_ids: Sequence[int] = ()):
        if featurizer is not None and reference_features is None:
            raise UserError("MAUVE needs the reference texts' features")
        self.entropy, self.judge, self.featurizer = entropy, judge, featurizer
        self.reference_features = reference_features
        self.ignore_ids = tuple(ignore_ids)
        self.num_samples = self.nfe = 0
        self.seconds = 0.0
        self._entropy_sum = self._judge_nll = 0.0
        self._judge_tokens = 0
        self._features: list[np.ndarray] = []

    def add(self, batch: SampleBatch) -> None:
        texts = [r["text"] for r in batch.rows]
        self.num_samples += len(batch.rows)
        self.nfe += batch.nfe
        self.seconds += batch.seconds
        if self.entropy:
            self._entropy_sum += sum(metrics.sample_entropies([r["token_ids"] for r in batch.rows],
                                                              self.ignore_ids))
        if self.judge is not None:
            score = self.judge.score(texts)
            self._judge_nll += score.nll
            self._judge_tokens += score.tokens
        if self.featurizer is not None:
            self._features.append(self.featurizer(texts))

    def summary(self) -> dict:
        """``num_samples`` and the metrics asked for: ``entropy``, ``gen_ppl`` (``judge``,
        ``judge_tokens``), ``mauve`` (``mauve_reference_samples``)."""
        if self.num_samples == 0:
            raise UserError("no samples to summarise")
        out: dict = {"num_samples": self.num_samples}
        if self.entropy:
            out["entropy"] = self._entropy_sum / self.num_samples
        if self.judge is not None:
            tokens = self._judge_tokens
            out.update({"gen_ppl": perplexity(self._judge_nll / tokens) if tokens else float("nan"),
                        "judge": self.judge.name, "judge_tokens": tokens})
        if self.featurizer is not None:
            out["mauve"] = metrics.mauve_score(np.concatenate(self._features), self.reference_features)
            out["mauve_reference_samples"] = len(self.reference_features)
        return out
