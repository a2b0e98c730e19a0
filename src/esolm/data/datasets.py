"""Training data: text sources, tokenisation cache, packing, splits and a resumable sampler.

Sources
    * ``wiki`` — the embedded Wikipedia corpus (:mod:`esolm.data.corpus`), no network;
    * ``task:NAME`` — solved instances ``prompt + solution`` of a verifiable task (:mod:`esolm.rl.tasks`):
      ``max_documents`` (default 20,000) training instances and 500 test-split instances for validation;
    * a local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file (one JSON object
      per line with a ``text`` field), or a directory of such files;
    * Hugging Face ``datasets`` corpora used in the paper and its evaluations — ``openwebtext``,
      ``lm1b``, ``wikitext2``, ``wikitext103``, ``ptb``, ``lambada`` (downloaded on first use; needs
      ``pip install datasets`` and network; never used by the tests).

Sequences (as in the authors' code, ``wrap`` mode)
    * ``pack``: documents are tokenised, each followed by EOS, concatenated into one stream and cut
      into chunks of ``L - 2`` tokens; every sequence is ``[BOS] chunk [EOS]``. For GPT-2 BOS = EOS =
      ``<|endoftext|>`` (EOS between documents, OWT style); for BERT it is ``[CLS] ... [SEP]`` with
      ``[SEP]`` between documents (LM1B style). The final partial chunk is kept, padded, with its
      padding marked invalid, so every token of the stream appears exactly once.
    * ``pad``: one document per sequence, ``[BOS] doc [EOS]`` followed by padding; documents longer
      than ``L - 2`` continue in further rows. ``valid`` marks real tokens; objectives ignore the rest.
    * ``pad-eos``: one document per sequence, ``[BOS] doc [EOS] [EOS]...``, every position valid, so the
      model learns to fill the rest of the sequence with EOS (the fixed-length completions of
      :mod:`esolm.rl.tasks`); a document longer than ``L - 2`` is an error.

Splits are by document and deterministic: a document goes to validation when a keyed BLAKE2 hash of
its text falls below ``val_fraction`` (independent of order and of the other documents); OWT uses the
authors' split instead (the last 100,000 documents are validation).

Tokenised sequences are cached as ``.npy`` files (memory-mapped when read) keyed by the corpus content
hash, the tokenizer fingerprint, L and the mode; files are written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from esolm.data.corpus import corpus_fingerprint, wiki_texts
from esolm.data.tokenizers import Tokenizer
from esolm.errors import ConfigError, UserError
from esolm.io.atomic import atomic_writer

MODES = ("pack", "pad", "pad-eos")
TASK_TRAIN, TASK_VALIDATION = 20_000, 500


# -- sequences ---------------------------------------------------------------------------------------

def pack_documents(docs: Sequence[Sequence[int]], length: int, bos_id: int, eos_id: int,
                   pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack documents into ``[N, length]`` sequences ``[BOS] chunk [EOS]`` (see module docstring).

    Returns ``(ids int64 [N, L], valid bool [N, L])``.
    """
    if length < 3:
        raise ConfigError(f"sequence length must be at least 3 for packing, got {length}")
    body = length - 2
    stream = np.concatenate([np.append(np.asarray(d, dtype=np.int64), eos_id) for d in docs]) if docs else \
        np.zeros(0, np.int64)
    n = -(-len(stream) // body)
    ids = np.full((n, length), pad_id, dtype=np.int64)
    valid = np.zeros((n, length), dtype=bool)
    if n == 0:
        return ids, valid
    full = len(stream) // body
    ids[:full, 1:-1] = stream[: full * body].reshape(full, body)
    ids[:full, 0], ids[:full, -1] = bos_id, eos_id
    valid[:full] = True
    rest = stream[full * body:]
    if len(rest):
        ids[full, 0] = bos_id
        ids[full, 1:1 + len(rest)] = rest
        ids[full, 1 + len(rest)] = eos_id
        valid[full, : len(rest) + 2] = True
    return ids, valid


def pad_documents(docs: Sequence[Sequence[int]], length: int, bos_id: int, eos_id: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One document per row: ``[BOS] doc [EOS] PAD...``; long documents continue in further rows."""
    if length < 3:
        raise ConfigError(f"sequence length must be at least 3, got {length}")
    body = length - 2
    rows = []
    for d in docs:
        d = list(d)
        for s in range(0, max(len(d), 1), body):
            rows.append(d[s:s + body])
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    valid = np.zeros((len(rows), length), dtype=bool)
    for i, r in enumerate(rows):
        ids[i, 0] = bos_id
        ids[i, 1:1 + len(r)] = r
        ids[i, 1 + len(r)] = eos_id
        valid[i, : len(r) + 2] = True
    return ids, valid


def pad_eos_documents(docs: Sequence[Sequence[int]], length: int, bos_id: int, eos_id: int,
                      pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One document per row: ``[BOS] doc [EOS] [EOS]...``, all valid (``pad_id`` is unused)."""
    longest = max((len(d) for d in docs), default=0)
    if longest > length - 2:
        raise ConfigError(f"mode pad-eos: a document of {longest} tokens does not fit sequence length {length} "
                          f"(needs {longest + 2})")
    ids, _ = pad_documents(docs, length, bos_id, eos_id, eos_id)
    return ids, np.ones(ids.shape, dtype=bool)


# -- splits --------------------------------------------------------------------------------------------

def is_validation(text: str, val_fraction: float, seed: int = 0) -> bool:
    """Deterministic document-level split: keyed hash of the text below ``val_fraction``."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "little") < val_fraction * 2.0**64


def split_documents(texts: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    train, val = [], []
    for t in texts:
        (val if is_validation(t, val_fraction, seed) else train).append(t)
    return train, val


# -- sources -------------------------------------------------------------------------------------------

HF_CORPORA = {
    # name: (dataset path, config, text column, {split: hf split})
    "openwebtext": ("Skylion007/openwebtext", None, "text", {"train": "train[:-100000]",
                                                             "validation": "train[-100000:]"}),
    "lm1b": ("dvruette/lm1b", None, "text", {"train": "train", "validation": "test"}),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text",
                  {"train": "train", "validation": "test"}),
    "wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "text",
                    {"train": "train", "validation": "test"}),
    "ptb": ("ptb-text-only/ptb_text_only", None, "sentence", {"train": "train", "validation": "test"}),
    "lambada": ("EleutherAI/lambada_openai", "en", "text", {"train": "test", "validation": "test"}),
}


def wikitext_detokenize(s: str) -> str:
    """Undo WikiText's tokenisation artefacts (as in the MDLM/BD3-LM evaluation code)."""
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = s.replace(" : ", ": ").replace(" ; ", "; ").replace(" . ", ". ").replace(" ! ", "! ")
    s = s.replace(" ? ", "? ").replace(" , ", ", ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176)).replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def ptb_detokenize(s: str) -> str:
    s = s.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't").replace(" \n ", "\n")
    s = s.replace("\\/", "/")
    for _ in range(10):
        s = s.replace(" N ", " 1 ")
    return s.replace("$ 1", "$1").replace("# 1", "#1").replace("<unk>", "?")


def lm1b_detokenize(s: str) -> str:
    s = s.replace("http : / / ", "http://").replace("https : / / ", "https://")
    s = re.sub(r" \'(\w+)", r"'\1", s)
    s = re.sub(r" (\w+) \. ", r" \1. ", s)
    s = re.sub(r" (\w+) \.$", r" \1.", s)
    for p in ("?", "!", ",", ":", ";"):
        s = s.replace(f" {p} ", f"{p} ")
    s = s.replace(" n't", "n't").replace(" $ ", " $").replace("( ", "(").replace(" )", ")")
    return s


DETOKENIZERS = {"wikitext2": wikitext_detokenize, "wikitext103": wikitext_detokenize, "ptb": ptb_detokenize,
                "lm1b": lm1b_detokenize}


def load_hf_texts(name: str, split: str) -> list[str]:
    """Documents of a Hugging Face corpus (downloads on first use; requires ``datasets`` and network)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(f"data source '{name}' needs the 'datasets' package (pip install datasets)") from e
    path, config, column, splits = HF_CORPORA[name]
    try:
        ds = datasets.load_dataset(path, config, split=splits[split])
    except Exception as e:  # noqa: BLE001 - network, hub or cache failures: report in one line
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"could not load data source '{name}' ({path}) from the Hugging Face hub: {msg}") from None
    detok = DETOKENIZERS.get(name, lambda s: s)
    texts = [detok(t) for t in ds[column]]
    if name.startswith("wikitext"):
        texts = _join_wikitext_articles(texts)
    return [t for t in texts if t.strip()]


def _join_wikitext_articles(lines: list[str]) -> list[str]:
    """WikiText rows are lines; join them into articles at top-level ' = Title = ' headings."""
    docs, cur = [], []
    for ln in lines:
        if re.match(r"^ ?= [^=].* = ?\n?$", ln) and cur:
            docs.append("".join(cur))
            cur = []
        cur.append(ln)
    if cur:
        docs.append("".join(cur))
    return docs


def read_local_texts(path: str | os.PathLike) -> list[str]:
    """Documents from a ``.txt`` (blank-line separated), ``.jsonl`` (``text`` field) file or a directory."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl"))
        if not files:
            raise UserError(f"no .txt or .jsonl files in {p}")
        return [t for f in files for t in read_local_texts(f)]
    if not p.is_file():
        raise UserError(f"data file not found: {p}")
    if p.suffix == ".jsonl":
        out = []
        with p.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    obj = json.loads(line)
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise UserError(f"{p}:{i}: expected a JSON object with a 'text' string")
                    out.append(obj["text"])
        return out
    if p.suffix == ".txt":
        return [d.strip() for d in re.split(r"\n\s*\n", p.read_text(encoding="utf-8")) if d.strip()]
    raise UserError(f"unsupported data file {p} (use .txt or .jsonl)")


def source_texts(source: str, val_fraction: float, split_seed: int = 0,
                 max_documents: int | None = None) -> tuple[list[str], list[str]]:
    """(train, validation) documents of a data source."""
    if source == "wiki":
        texts = wiki_texts()
    elif source in HF_CORPORA:
        return load_hf_texts(source, "train"), load_hf_texts(source, "validation")
    elif source.startswith("task:"):
        from esolm.rl.tasks import get_task

        task = get_task(source.removeprefix("task:"))
        n = TASK_TRAIN if max_documents is None else max_documents
        val = TASK_VALIDATION if task.test_size is None else min(TASK_VALIDATION, task.test_size)
        return task.texts(n, split_seed, "train"), task.texts(val, split_seed, "test")
    elif Path(source).exists():
        texts = read_local_texts(source)
    else:
        raise ConfigError(f"unknown data source '{source}' (use wiki, {', '.join(HF_CORPORA)}, task:NAME "
                          "or a path)")
    if max_documents is not None:
        texts = texts[:max_documents]
    return split_documents(texts, val_fraction, split_seed)


# -- tokenisation cache ----------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get("ESOLM_CACHE", Path.home() / ".cache" / "esolm")) / "data"


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_writer(path) as fh:
        np.save(fh, arr)


def tokenize_sequences(texts: Sequence[str], tokenizer: Tokenizer, length: int, mode: str = "pack",
                       cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise and pack/pad ``texts``; cached on disk (read back memory-mapped) when ``cache_dir`` is set."""
    if mode not in MODES:
        raise ConfigError(f"data mode must be one of {MODES}, got {mode!r}")
    key = f"{corpus_fingerprint(list(texts))}-{tokenizer.fingerprint}-L{length}-{mode}"
    if cache_dir is not None:
        d = Path(cache_dir)
        f_ids, f_valid = d / f"{key}.ids.npy", d / f"{key}.valid.npy"
        if f_ids.is_file() and f_valid.is_file():
            return np.load(f_ids, mmap_mode="r"), np.load(f_valid, mmap_mode="r")
    docs = tokenizer.encode_batch(texts)
    fn = {"pack": pack_documents, "pad": pad_documents, "pad-eos": pad_eos_documents}[mode]
    ids, valid = fn(docs, length, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    ids = ids.astype(np.int32 if tokenizer.vocab_size < 2**31 else np.int64)
    if cache_dir is not None:
        d.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(f_valid, valid)
        _atomic_save_npy(f_ids, ids)  # ids last: its presence marks a complete entry
    return ids, valid


class SequenceDataset(torch.utils.data.Dataset):
    """Rows of (``input_ids`` long [L], ``valid`` bool [L])."""

    def __init__(self, ids: np.ndarray, valid: np.ndarray):
        assert ids.shape == valid.shape and ids.ndim == 2
        self.ids, self.valid = ids, valid

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(np.asarray(self.ids[i], dtype=np.int64)),
                "valid": torch.from_numpy(np.array(self.valid[i], dtype=bool))}


@dataclass
class DataSplits:
    train: SequenceDataset
    validation: SequenceDataset
    train_tokens: int


def build_datasets(source: str, tokenizer: Tokenizer, length: int, mode: str = "pack",
                   val_fraction: float = 0.02, split_seed: int = 0, max_documents: int | None = None,
                   cache_dir: str | os.PathLike | None = None, min_train_sequences: int = 1) -> DataSplits:
    """Train/validation datasets; raises ``ConfigError`` when L is larger than the data allows."""
    train_texts, val_texts = source_texts(source, val_fraction, split_seed, max_documents)
    if not val_texts:
        raise ConfigError(f"data source '{source}' has no validation documents (raise data.val_fraction)")
    tr = tokenize_sequences(train_texts, tokenizer, length, mode, cache_dir)
    va = tokenize_sequences(val_texts, tokenizer, length, mode, cache_dir)
    n_full = (int(np.asarray(tr[1][:, -1]).sum()) if mode == "pack" else len(tr[1])) if len(tr[1]) else 0
    if n_full < min_train_sequences:
        n_tok = int(np.asarray(tr[1]).sum())
        raise ConfigError(f"sequence length {length} is larger than the data allows: {source} gives "
                          f"{n_full} full training sequences of length {length} ({n_tok} tokens), "
                          f"need at least {min_train_sequences}")
    return DataSplits(SequenceDataset(*tr), SequenceDataset(*va), int(np.asarray(tr[1]).sum()))


# -- resumable sampling ------------------------------------------------------------

class ResumableBatchSampler(torch.utils.data.Sampler):
    """An endless, exactly resumable stream of micro-batches for one rank.

    Data epoch ``e`` is a permutation of the dataset drawn from ``torch.Generator().manual_seed(seed + e)``;
    it is cut into global batches of ``batch_size * world_size`` rows (the tail that does not fill one is
    dropped) and rank ``r`` takes rows ``[r*batch_size, (r+1)*batch_size)`` of each. The stream position is
    the number of micro-batches already consumed (``start``): set it from a checkpoint and iteration resumes
    at exactly the next batch, so no state has to be saved beyond that integer. No ``__len__``: Lightning
    treats the loader as infinite and ``trainer.max_steps`` ends training.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_epoch = n // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ConfigError(f"the training set has {n} sequences, fewer than one global batch of "
                              f"{batch_size * world_size}")

    def batch(self, index: int) -> list[int]:
        """Row indices of micro-batch number ``index`` of the stream (for this rank)."""
        epoch, j = divmod(index, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        g = self.batch_size * self.world_size
        lo = j * g + self.rank * self.batch_size
        return perm[lo:lo + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        index = self.start
        epoch, perm = None, None
        g = self.batch_size * self.world_size
        while True:
            e, j = divmod(index, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))
            lo = j * g + self.rank * self.batch_size
            yield perm[lo:lo + self.batch_size].tolist()
            index += 1
