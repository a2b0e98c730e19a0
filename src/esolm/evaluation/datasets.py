"""What evaluation reads: held-out or zero-shot documents, tokenised into rows exactly as training does.

Datasets: the held-out split of a local source (the embedded Wikipedia corpus by default, no network) or
the paper's zero-shot suite (PTB, WikiText, LM1B, LAMBADA, AG News, PubMed, arXiv; downloaded with
Hugging Face ``datasets`` on first use).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from esolm import data as data_mod
from esolm.data.tokenizers import Tokenizer
from esolm.errors import UserError
from esolm.recipes import DataSection

Tensor = torch.Tensor

_DATA_DEFAULTS = DataSection()

# The paper's zero-shot suite. Sources known to esolm.data are loaded there; the others are read here:
# name -> (dataset path, config, text column, split)
EXTRA_ZERO_SHOT = {
    "ag_news": ("fancyzhx/ag_news", None, "text", "test"),
    "pubmed": ("ccdv/pubmed-summarization", None, "article", "test"),
    "arxiv": ("ccdv/arxiv-summarization", None, "article", "test"),
}
ZERO_SHOT_SUITE = ("ptb", "wikitext2", "wikitext103", "lm1b", "lambada", "ag_news", "pubmed", "arxiv")
# LAMBADA passages are scored one per sequence (padded), as in the MDLM/Eso-LM evaluations
PAD_MODE_SOURCES = ("lambada",)


def resolve_data(trained_data: Mapping | None = None, source: str | None = None, val_fraction: float | None = None,
                 split_seed: int | None = None, max_documents: int | None = None,
                 mode: str | None = None) -> dict:
    """Data options: the given values, else (for the model's own training source) those of its training
    recipe's data section ``trained_data`` (:attr:`esolm.io.LoadedModel.data`), so the held-out split is the
    one the model never saw; else esolm's defaults."""
    recipe = trained_data or {}
    src = source or recipe.get("source") or "wiki"
    same = src == recipe.get("source")

    def pick(key, given):
        if given is not None:
            return given
        if same and recipe.get(key) is not None:
            return recipe[key]
        return getattr(_DATA_DEFAULTS, key)

    return {"source": src, "val_fraction": float(pick("val_fraction", val_fraction)),
            "split_seed": int(pick("split_seed", split_seed)), "max_documents": pick("max_documents", max_documents),
            "mode": pick("mode", mode)}


def zero_shot_texts(name: str) -> list[str]:
    """Test documents of a zero-shot dataset (network and the ``datasets`` package on first use)."""
    if name in data_mod.HF_CORPORA:
        return data_mod.load_hf_texts(name, "validation")
    if name not in EXTRA_ZERO_SHOT:
        raise UserError(f"unknown zero-shot dataset {name!r} (choose from {', '.join(ZERO_SHOT_SUITE)})")
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"zero-shot dataset {name!r} needs the datasets package "
                        "(pip install datasets)") from e
    path, config, column, split = EXTRA_ZERO_SHOT[name]
    ds = datasets.load_dataset(path, config, split=split)
    return [t for t in ds[column] if t and t.strip()]


def eval_texts(source: str, split: str = "validation", val_fraction: float = _DATA_DEFAULTS.val_fraction,
               split_seed: int = _DATA_DEFAULTS.split_seed, max_documents: int | None = None) -> list[str]:
    """Documents of ``split`` (``validation``/``train``) of a training source, or of a zero-shot set."""
    if source in EXTRA_ZERO_SHOT:
        texts = zero_shot_texts(source)
    else:
        train, val = data_mod.source_texts(source, val_fraction, split_seed, max_documents)
        texts = val if split == "validation" else train
    if max_documents is not None:
        texts = texts[:max_documents]
    if not texts:
        raise UserError(f"data source {source!r} has no {split} documents")
    return texts


def token_dataset(texts: Sequence[str], tokenizer: Tokenizer, length: int,
                  mode: str = "pack") -> tuple[np.ndarray, np.ndarray]:
    """``(ids, valid)`` [N, L] arrays: packed (or padded) sequences exactly as training builds them."""
    ids, valid = data_mod.tokenize_sequences(list(texts), tokenizer, length, mode)
    return np.asarray(ids, dtype=np.int64), np.asarray(valid, dtype=bool)


def reference_texts(data: dict, tokenizer: Tokenizer, length: int, n: int) -> list[str]:
    """Up to ``n`` held-out sequences of ``length`` tokens (packed as in training), decoded: the human
    text MAUVE compares samples with. ``data`` comes from :func:`resolve_data`."""
    texts = eval_texts(data["source"], "validation", data["val_fraction"], data["split_seed"], data["max_documents"])
    ids, valid = token_dataset(texts, tokenizer, length, "pack")
    rows = [r[v].tolist() for r, v in zip(ids[:n], valid[:n])]
    if len(rows) < 2:
        raise UserError(f"the held-out split of {data['source']!r} has too few sequences of length {length} "
                        "for MAUVE")
    return tokenizer.decode_batch(rows)


def batches(ids: np.ndarray, valid: np.ndarray, batch_size: int, device: torch.device,
            max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """``(ids, valid)`` tensors on ``device``, ``batch_size`` rows at a time (the first ``max_batches``)."""
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    n = len(ids)
    for k, s in enumerate(range(0, n, batch_size)):
        if max_batches is not None and k >= max_batches:
            return
        yield (torch.from_numpy(ids[s:s + batch_size]).to(device),
               torch.from_numpy(valid[s:s + batch_size]).to(device))
