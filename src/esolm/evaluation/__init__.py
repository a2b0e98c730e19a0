"""Likelihood evaluation of a trained model on a dataset (``esolm eval``).

For one model and one token dataset this computes

* the **NELBO perplexity**: ``exp(sum over terms of summed NLL / token count)`` with the model's own
  method dict (alpha0 and batch_split as in training, ELBO weights, never the low-variance training
  loss), aggregated exactly over the whole dataset (:func:`esolm.likelihood.nelbo`). For an AR model it
  is the exact perplexity;
* the **importance-weighted bound** with K generation orders (``--iw-k 1,4,16``; causal Eso-LM (B)
  only): ``-log (1/K) sum_k p(x | order_k)`` per sequence from the single-pass any-order likelihood,
  summed over sequences and divided by the number of tokens. It decreases towards ``-log p(x)`` as K
  grows (METHOD.md section 4).

Datasets: the held-out split of a local source (the embedded Wikipedia corpus by default, no network) or
the paper's zero-shot suite (PTB, WikiText, LM1B, LAMBADA, AG News, PubMed, arXiv; downloaded with
Hugging Face ``datasets`` on first use). Every random choice (diffusion times, masks, orders) comes
from one seeded ``torch.Generator``, so a run is reproducible.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from esolm import data as data_mod
from esolm.data.tokenizers import META_FILE, Tokenizer, get_tokenizer
from esolm.errors import UserError
from esolm.io import load_pretrained
from esolm.likelihood import iw_bound, nelbo
from esolm.methods import Method, as_method, check_alpha0, require_any_order
from esolm.objectives import build_objective
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


# ----------------------------------------------------------------------------------------------------------
# Models, tokenizers and devices


def default_device() -> torch.device:
    """The accelerator torch reports as available, else the CPU."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        return torch.device(acc.current_accelerator())
    return torch.device("cpu")


@dataclass
class LoadedModel:
    """A model ready for evaluation or sampling, with what it was trained with."""

    model: torch.nn.Module
    method: Method
    tokenizer: Tokenizer
    data: dict  # the training recipe's data section ({} when unknown)


def _from_training_checkpoint(path: Path):
    """``training.model_from_checkpoint`` of an esolm ``.ckpt``; None when the file is another kind."""
    if not (path.is_file() and path.suffix == ".ckpt"):
        return None
    from esolm.training import CheckpointError, model_from_checkpoint

    try:
        return model_from_checkpoint(path)
    except CheckpointError as e:
        if "is not an esolm training checkpoint" in str(e):
            return None  # e.g. the authors' Lightning checkpoint: esolm.io reads it
        raise


def load_model(path: str | os.PathLike, tokenizer: str | None = None,
               device: str | torch.device | None = None) -> LoadedModel:
    """Load what ``esolm eval``/``sample`` evaluate: an esolm training checkpoint (``.ckpt``, EMA weights),
    a ``save_pretrained``/``esolm export`` folder, an authors' checkpoint or Hugging Face repo.

    The tokenizer is ``tokenizer`` (a name or folder) when given, else the one saved with the model. The
    training recipe's data section (source, split, length ...) is returned when the model carries it, so
    that evaluation uses the held-out split the model was trained against.
    """
    p = Path(path)
    data: dict = {}
    trained = _from_training_checkpoint(p)
    if trained is not None:
        model, method, tok, cfg = trained
        data = dict(cfg.get("data") or {})
        if device is not None:
            model = model.to(device)
    else:
        model, method = load_pretrained(p, device=device)
        tok = None
        folder = p if p.is_dir() else p.parent
        cfg_file = folder / "training_config.yaml"
        if cfg_file.is_file():
            import yaml

            data = dict((yaml.safe_load(cfg_file.read_text()) or {}).get("data") or {})
    if method is None:
        raise UserError(f"{path} does not say which method it is (no method dict saved with the model)")
    if tokenizer:
        tok = get_tokenizer(tokenizer)
    elif tok is None:
        tok = _saved_tokenizer(p)
    loaded = LoadedModel(model.eval(), as_method(method), tok, data)
    check_tokenizer(loaded.model, tok)
    return loaded


def _saved_tokenizer(path: Path) -> Tokenizer:
    folder = path if path.is_dir() else path.parent
    for d in (folder, folder.parent):
        if (d / META_FILE).is_file():
            return Tokenizer.load(d)
    raise UserError(f"no tokenizer saved with {path}; pass --tokenizer NAME (e.g. esolm-bpe-8k)")


def resolve_data(loaded: LoadedModel, source: str | None = None, val_fraction: float | None = None,
                 split_seed: int | None = None, max_documents: int | None = None,
                 mode: str | None = None) -> dict:
    """Data options: the command line's values, else (for the model's own training source) the training
    recipe's, so the held-out split is the one the model never saw; else esolm's defaults."""
    src = source or loaded.data.get("source") or "wiki"
    same = src == loaded.data.get("source")

    def pick(key, given):
        if given is not None:
            return given
        if same and loaded.data.get(key) is not None:
            return loaded.data[key]
        return getattr(_DATA_DEFAULTS, key)

    return {"source": src, "val_fraction": float(pick("val_fraction", val_fraction)),
            "split_seed": int(pick("split_seed", split_seed)), "max_documents": pick("max_documents", max_documents),
            "mode": pick("mode", mode)}


def check_tokenizer(model, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model's "
                        f"vocabulary is {model.config.vocab_size}; pass the tokenizer it was trained with "
                        "(--tokenizer)")


# ----------------------------------------------------------------------------------------------------------
# Datasets


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
    rows = [r[v].tolist() for r, v in zip(ids, valid)][:n]
    if len(rows) < 2:
        raise UserError(f"the held-out split of {data['source']!r} has too few sequences of length {length} "
                        "for MAUVE")
    return tokenizer.decode_batch(rows)


def batches(ids: np.ndarray, valid: np.ndarray, batch_size: int, device: torch.device,
            max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    n = len(ids)
    for k, s in enumerate(range(0, n, batch_size)):
        if max_batches is not None and k >= max_batches:
            return
        yield (torch.from_numpy(ids[s:s + batch_size]).to(device),
               torch.from_numpy(valid[s:s + batch_size]).to(device))


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalResult:
    """Perplexities of one dataset (all aggregated over tokens, never averaged over batches)."""

    dataset: str
    sequences: int
    tokens: int
    nelbo: float  # nats per token
    perplexity: float  # exp(nelbo)
    terms: dict[str, float] = field(default_factory=dict)  # per-token NLL of each loss term
    iw: dict[int, dict[str, float]] = field(default_factory=dict)  # K -> {"nll": nats/token, "perplexity"}
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["iw"] = {str(k): v for k, v in self.iw.items()}
        return d


@torch.no_grad()
def evaluate(model, method: Method | dict, ids: np.ndarray, valid: np.ndarray, *, dataset: str = "data",
             batch_size: int = 16, iw_ks: Sequence[int] = (), iw_alpha0: float | None = None,
             iw_chunk: int | None = None, seed: int = 0, max_batches: int | None = None) -> EvalResult:
    """NELBO (and importance-weighted) perplexity of ``model`` on token rows ``ids``/``valid``.

    ``iw_alpha0`` is the alpha0 of the order distribution (default: the model's own); ``iw_chunk`` is the
    number of (order, sequence) rows per forward pass of the IW bound.
    """
    method = as_method(method)
    if iw_ks:
        require_any_order(method, "the importance-weighted bound")
    if len(ids) == 0:
        raise UserError(f"dataset {dataset!r} has no sequences")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        res = nelbo(model, build_objective(method), batches(ids, valid, batch_size, device, max_batches), gen)
        n_seq = min(len(ids), batch_size * max_batches) if max_batches is not None else len(ids)
        out = EvalResult(dataset=dataset, sequences=n_seq, tokens=res.tokens, nelbo=res.nelbo,
                         perplexity=res.perplexity, terms=res.terms)
        a0 = (method.alpha0 if iw_alpha0 is None else check_alpha0(iw_alpha0, "iw_alpha0")) if iw_ks else None
        for k in iw_ks:
            gen = torch.Generator(device=device).manual_seed(seed + 1_000_003 * int(k))
            total, count = 0.0, 0
            for x0, v in batches(ids, valid, batch_size, device, max_batches):
                bound = iw_bound(model, x0, int(k), a0, gen, chunk_size=iw_chunk, valid=v, method=method)
                total += float(bound.sum())
                count += int(v.sum())
            out.iw[int(k)] = {"nll": total / count, "perplexity": math.exp(total / count)}
    finally:
        model.train(was_training)
    out.seconds = time.perf_counter() - t0
    return out


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]`` (positive integers)."""
    try:
        vals = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated positive integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise UserError(f"{what} must be comma-separated positive integers, got {text!r}")
    return vals


def parse_float_list(text: str, what: str, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    try:
        vals = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not lo <= v <= hi for v in vals):
        raise UserError(f"{what} must be comma-separated numbers in [{lo}, {hi}], got {text!r}")
    return vals


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON atomically (temporary file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, p)
    return p
