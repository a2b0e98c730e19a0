"""Samples of a trained model, batch by batch: prompts, JSONL rows streamed to disk, a running summary.

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
from esolm.methods import Method, check_integer
from esolm.sampling.api import check_request, generate, sampling_params
from esolm.sampling.params import SamplingParams, batch_seed, max_run_seed

DEFAULT_BATCH_SIZE = 64  # samples per generate call when none is given
# line breaks for str.splitlines that json.dumps(ensure_ascii=False) leaves raw: escaped, one row per line
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


@dataclass
class SampleBatch:
    """One ``generate`` call's samples: JSONL ``rows``, its network calls and sampling seconds."""

    index: int
    rows: list[dict]
    nfe: int
    seconds: float


def sample_batches(model, method: Method | dict, tokenizer: Tokenizer, *, num_samples: int,
                   batch_size: int | None = None, params: SamplingParams | None = None,
                   prompt_ids: Sequence[int] | None = None, max_length: int | None = None, stop_at_eos: bool = False,
                   repeats: int = 1, **knobs) -> Iterator[SampleBatch]:
    """Check the request now (:func:`esolm.sampling.api.check_request`), then sample lazily, one batch per
    iteration (``batch_size`` samples, default ``min(num_samples, DEFAULT_BATCH_SIZE)``).

    How to decode: ``params`` and/or its fields as keywords. Batch ``b`` uses seed
    :func:`~esolm.sampling.params.batch_seed` ``(seed, b)``, so its samples do not depend on later batches.
    ``repeats > 1`` re-draws each batch with the same seed (the same samples) and keeps the fastest time:
    robust timings on a shared machine.
    """
    num_samples = check_integer(num_samples, "num_samples", 1)
    bs = min(num_samples, DEFAULT_BATCH_SIZE if batch_size is None else check_integer(batch_size, "batch_size",
                                                                                       1))
    repeats = check_integer(repeats, "repeats", 1)
    params = sampling_params(params, **knobs)
    top = max_run_seed(-(-num_samples // bs))
    if params.seed > top:
        raise UserError(f"seed must be an integer in [0, {top}] (every batch's seed below 2**63), got {params.seed}")
    kw = dict(prompt_ids=prompt_ids, max_length=max_length, eos_id=tokenizer.eos_id if stop_at_eos else None,
              bos_id=tokenizer.bos_id)
    params = check_request(model, method, params, num_samples=bs, batch_size=bs, **kw)
    return _batches(model, method, tokenizer, num_samples, bs, params, repeats, kw)


def _batches(model, method, tokenizer: Tokenizer, num_samples: int, bs: int, params: SamplingParams, repeats: int,
             kw: dict) -> Iterator[SampleBatch]:
    for b, start in enumerate(range(0, num_samples, bs)):
        n = min(bs, num_samples - start)
        draw = dict(kw, num_samples=n, batch_size=n, params=params.replace(seed=batch_seed(params.seed, b)))
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
