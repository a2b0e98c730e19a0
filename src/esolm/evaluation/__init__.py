"""Evaluation of trained models, one module per job (no command-line code: that is :mod:`esolm.commands`).

* :mod:`.datasets` — held-out / zero-shot documents tokenised as in training, MAUVE reference text;
* :mod:`.perplexity` — :func:`evaluate`: NELBO and importance-weighted perplexity (``esolm eval``);
* :mod:`.samples` — prompts, batched sampling streamed to JSONL, running quality summary (``esolm sample``);
* :mod:`.metrics` — unigram entropy, generative perplexity under a judge LM, MAUVE;
* :mod:`.frontier` — the speed-quality frontier (``esolm bench frontier``).
"""

from esolm.evaluation.datasets import (
    PAD_MODE_SOURCES,
    ZERO_SHOT_SUITE,
    batches,
    eval_texts,
    reference_texts,
    resolve_data,
    token_dataset,
    zero_shot_texts,
)
from esolm.evaluation.perplexity import EvalResult, evaluate, iw_chunk_rows
from esolm.evaluation.samples import JsonlWriter, SampleBatch, SampleStats, sample_batches

__all__ = [
    "PAD_MODE_SOURCES", "ZERO_SHOT_SUITE", "batches", "eval_texts", "reference_texts", "resolve_data",
    "token_dataset", "zero_shot_texts", "EvalResult", "evaluate", "iw_chunk_rows", "JsonlWriter", "SampleBatch",
    "SampleStats", "sample_batches",
]
