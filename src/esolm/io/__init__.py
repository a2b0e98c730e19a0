"""Weights in and out: esolm's own format, and the paper authors' checkpoints.

Formats ``load_pretrained`` recognises (detected from what is on disk, never from the file name alone):

* **esolm folder** — ``model.safetensors`` + ``config.json`` = ``{"format": "esolm", "version": 1,
  "model": ModelConfig.to_dict(), "method": method dict}``, written by :func:`save_pretrained`.
* **authors' Hugging Face folder / repo** (MDLM and Eso-LM uploads, e.g. ``kuleshov-group/mdlm-owt``,
  ``sahoo-diffusion/Eso-LM-B-alpha-1``): ``config.json`` with ``vocab_size, model_length, cond_dim,
  n_blocks, n_heads, dropout`` and ``hidden_dim`` (MDLM) or ``hidden_size`` (+ ``mask_index``, Eso-LM),
  weights ``model.safetensors`` (possibly sharded) or ``pytorch_model.bin`` with keys ``backbone.*``.
* **authors' Lightning checkpoint** (``.ckpt``): ``state_dict`` with keys ``backbone.*``, EMA weights in
  ``ckpt["ema"]["shadow_params"]`` (used by default), the Hydra config in
  ``ckpt["hyper_parameters"]["config"]`` (a pickled omegaconf ``DictConfig``).
* **fixture-style** ``.pt``: ``{"state_dict": ..., "config": authors' config dict, ...}``; or a bare state
  dict when the caller passes ``config=``.

Safety: nothing here executes code from a checkpoint. Every ``torch.load`` uses ``weights_only=True``;
the non-tensor objects of Lightning checkpoints (omegaconf containers, tokenizers, ``typing.Any`` ...) are
rebuilt as inert :class:`InertObject` records (their class is never imported), and omegaconf configs are
then read back from those records as plain dicts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from esolm.config import ModelConfig
from esolm.errors import CheckpointError
from esolm.methods import Method, as_method
from esolm.model.backbone import DiT

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
FORMAT = "esolm"
FORMAT_VERSION = 1
ROTARY_BUFFER = "rotary_emb.inv_freq"
NON_BACKBONE_PREFIXES = ("noise.", "metrics.", "ema.")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Defaults of the authors' ``configs/algo/esolm.yaml`` / ``mdlm.yaml`` for keys a config may omit.
_AUTHORS_ALGO_DEFAULTS = {"alpha_0": 0.0, "batch_split": 0.0, "loss_type": "elbo"}
_ESOLM_VARIANTS = {"causal": "B", "mixed2": "A"}




_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation of torch.load")


def _one_line(exc: BaseException) -> str:
    """The informative line of an exception (torch's weights_only errors bury it under boilerplate)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_BOILERPLATE)]
    text = (useful or lines or [""])[0]
    return f"{type(exc).__name__}: {text}".rstrip(": ")


# --------------------------------------------------------------------------------------------------
# Safe reading of pickled checkpoints
# --------------------------------------------------------------------------------------------------


class InertObject:
    """Record of a pickled object whose class we refuse to import.

    The restricted unpickler calls ``cls(*args)`` (REDUCE), ``cls.__new__(cls, *args)`` (NEWOBJ) and
    ``obj.__setstate__(state)`` (BUILD); each is recorded here and nothing else happens.
    ``qualname`` is the pickled global (e.g. ``omegaconf.dictconfig.DictConfig``).
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


def _empty_dict(*args, **kwargs) -> dict:
    """Stand-in for ``collections.defaultdict``: the unpickler only fills plain dicts."""
    return {}


def _inert_globals(names: list[str]) -> list[tuple[Any, str]]:
    out = []
    for name in names:
        if name == "collections.defaultdict":
            out.append((_empty_dict, name))
        else:
            out.append((type(name.rsplit(".", 1)[-1], (InertObject,), {"qualname": name}), name))
    return out


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with non-tensor globals rebuilt as inert records.

    omegaconf ``DictConfig``/``ListConfig`` found anywhere in the result are converted to plain
    dicts/lists (interpolations like ``${model.length}`` resolved where they are plain references).
    """
    path = Path(path)
    try:  # a scan of the pickle only (no tensor data): which globals would weights_only refuse?
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - legacy or damaged file: torch.load below reports it
        names = []
    try:
        if names:
            with torch.serialization.safe_globals(_inert_globals(names)):
                obj = torch.load(path, map_location=map_location, weights_only=True)
        else:
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file, blocked global, ...
        raise CheckpointError(
            f"{path}: not a checkpoint that can be read safely with weights_only=True ({_one_line(exc)})"
        ) from None
    return _plain(obj)


def _is_inert(obj: Any, *suffixes: str) -> bool:
    return isinstance(obj, InertObject) and obj.qualname.rsplit(".", 1)[-1] in suffixes


def _omegaconf_value(obj: Any) -> Any:
    """Plain value of a recorded omegaconf container/node (its pickled ``__dict__`` state)."""
    state = obj.state if isinstance(obj.state, dict) else {}
    if _is_inert(obj, "DictConfig", "ListConfig"):
        content = state.get("_content")
        return _plain(content)
    return _plain(state.get("_val"))


def _plain(obj: Any) -> Any:
    if isinstance(obj, InertObject):
        if obj.qualname.startswith("omegaconf.") and _is_inert(obj, *_OMEGACONF_TYPES):
            value = _omegaconf_value(obj)
            return _resolve_interpolations(value) if _is_inert(obj, "DictConfig") else value
        return obj
    if isinstance(obj, dict):
        return type(obj)((k, _plain(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


_OMEGACONF_TYPES = (
    "DictConfig", "ListConfig", "AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
    "EnumNode", "BytesNode", "PathNode", "InterpolationResultNode", "ValueNode",
)
_INTERP = re.compile(r"^\$\{(\.*)([A-Za-z_][\w.]*)\}$")


def _resolve_interpolations(root: Any) -> Any:
    """Resolve omegaconf interpolations that are plain references (``${a.b}``, ``${.x}``, ``${..y}``).

    Anything else (resolvers like ``${oc.env:...}``, string templates) is left as written.
    """
    if not isinstance(root, dict):
        return root

    def lookup(path: list[str]) -> Any:
        node = root
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise KeyError(key)
            node = node[key]
        return node

    def resolve(value: Any, where: list[str], depth: int = 0) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, where + [k]) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, where) for v in value]
        if isinstance(value, str) and depth < 16:
            m = _INTERP.match(value)
            if m:
                dots, ref = len(m.group(1)), m.group(2).split(".")
                base = where[: len(where) - dots] if dots else []
                try:
                    target = lookup(base + ref)
                except KeyError:
                    return value
                return resolve(target, base + ref[:-1], depth + 1)
        return value

    return resolve(root, [])


# --------------------------------------------------------------------------------------------------
# Authors' configs and state dicts
# --------------------------------------------------------------------------------------------------


def _get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _is_authors_ar(cfg: dict) -> bool:
    return bool(_get(cfg, "algo.causal_attention", False)) or _get(cfg, "algo.parameterization") == "ar"


def config_from_authors(cfg: dict, vocab_size: int, mask_index: int | None) -> ModelConfig:
    """ModelConfig from the authors' Hydra config (``model.hidden_size, cond_dim, n_blocks, n_heads,
    length, dropout``; ``algo.causal_attention`` marks the AR baseline, which has no adaLN)."""
    model = _get(cfg, "model")
    if not isinstance(model, dict):
        raise CheckpointError("the authors' config has no 'model' section")
    need = ("hidden_size", "n_blocks", "n_heads", "length")
    missing = [k for k in need if not isinstance(model.get(k), int)]
    if missing:
        raise CheckpointError(f"the authors' config lacks integer model.{', model.'.join(missing)}")
    ar = _is_authors_ar(cfg)
    return ModelConfig(
        vocab_size=int(vocab_size),
        mask_id=None if ar else (None if mask_index is None else int(mask_index)),
        hidden_size=model["hidden_size"],
        cond_dim=int(model.get("cond_dim", 128)),
        n_layers=model["n_blocks"],
        n_heads=model["n_heads"],
        length=model["length"],
        dropout=float(model.get("dropout", 0.1)),
        adaln=not ar,
    )


def method_from_authors(cfg: dict) -> dict:
    """The esolm method dict of an authors' config (Eso-LM variant from ``algo.diffusion_attn_mode``:
    ``causal`` -> B, ``mixed2`` -> A). Keys the config omits take the authors' yaml defaults."""
    algo = _get(cfg, "algo", {}) or {}
    name = algo.get("name")
    if name is None:
        name = "esolm" if "diffusion_attn_mode" in algo else ("ar" if _is_authors_ar(cfg) else "mdlm")
    loss_type = algo.get("loss_type", _AUTHORS_ALGO_DEFAULTS["loss_type"])
    if name == "ar" or _is_authors_ar(cfg):
        return {"name": "ar"}
    if name == "mdlm":
        return {"name": "mdlm", "low_var": loss_type == "low_var"}
    if name == "esolm":
        mode = algo.get("diffusion_attn_mode", "causal")
        if mode not in _ESOLM_VARIANTS:
            raise CheckpointError(
                f"Eso-LM diffusion attention mode {mode!r} is not one esolm implements "
                "(causal -> B, mixed2 -> A)"
            )
        return {
            "name": "esolm",
            "variant": _ESOLM_VARIANTS[mode],
            "alpha0": float(algo.get("alpha_0", _AUTHORS_ALGO_DEFAULTS["alpha_0"])),
            "batch_split": float(algo.get("batch_split", _AUTHORS_ALGO_DEFAULTS["batch_split"])),
            "low_var": loss_type == "low_var",
        }
    raise CheckpointError(f"authors' algorithm {name!r} is not supported (esolm, mdlm, ar)")


def _backbone_state(state_dict: dict) -> dict:
    """Keys of the backbone only: strip ``backbone.``; drop the Lightning module's other parts."""
    if any(k.startswith("backbone.") for k in state_dict):
        return {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    return {k: v for k, v in state_dict.items() if not k.startswith(NON_BACKBONE_PREFIXES)}


def _check_fits(state: dict, model: DiT) -> None:
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state and k != ROTARY_BUFFER)
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        raise CheckpointError(f"checkpoint does not fit the model: {'; '.join(parts)}")
    for key, ref in expected.items():
        if key not in state:
            continue
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"checkpoint entry {key!r} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(ref.shape):
            hint = ""
            emb = state.get("vocab_embed.embedding")
            if isinstance(emb, torch.Tensor) and emb.ndim == 2:
                v, d = emb.shape
                cfg = model.config
                if d != cfg.hidden_size:
                    hint = f" (checkpoint is for hidden_size {d} but config says {cfg.hidden_size})"
                elif v != cfg.vocab_size:
                    hint = f" (checkpoint is for vocab_size {v} but config says {cfg.vocab_size})"
            raise CheckpointError(
                f"tensor {key!r} has shape {list(got.shape)} in the checkpoint but {list(ref.shape)} "
                f"in the model{hint}"
            )


def _short(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_authors_state_dict(state_dict: dict, config: ModelConfig) -> DiT:
    """A DiT for ``config`` holding the authors' weights (``backbone.`` prefix stripped if present,
    non-backbone keys such as ``noise.*`` dropped, everything else strict)."""
    state = _backbone_state(state_dict)
    model = DiT(config)
    _check_fits(state, model)
    model.load_state_dict(state, strict=False)  # strictness checked above; rotary buffer may be absent
    return model


def apply_ema(model: DiT, shadow_params: list) -> None:
    """Copy the authors' EMA weights into ``model``.

    The authors' ``ExponentialMovingAverage`` keeps one tensor per trainable parameter of
    ``chain(backbone.parameters(), noise.parameters())``; the backbone's parameters come first and in
    the same order as this DiT's ``named_parameters()`` (buffers such as ``rotary_emb.inv_freq`` are not
    parameters). Trailing entries (the noise schedule's, if any) are ignored.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not isinstance(shadow_params, (list, tuple)) or len(shadow_params) < len(params):
        n = len(shadow_params) if isinstance(shadow_params, (list, tuple)) else 0
        raise CheckpointError(f"EMA holds {n} tensors but the backbone has {len(params)} parameters")
    with torch.no_grad():
        for (name, p), s in zip(params, shadow_params):
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(p.shape):
                shape = list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise CheckpointError(
                    f"EMA tensor for {name!r} has shape {shape}, the model has {list(p.shape)}"
                )
            p.copy_(s)


# --------------------------------------------------------------------------------------------------
# esolm's own format
# --------------------------------------------------------------------------------------------------


def _unshared_cpu_state(model: DiT) -> dict[str, torch.Tensor]:
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


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _unwrap(model: Any) -> DiT:
    """The DiT inside ``torch.compile`` (``_orig_mod``) and DDP/FSDP-style (``module``) wrappers."""
    seen = 0
    while not isinstance(model, DiT) and seen < 8:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            break
        model, seen = inner, seen + 1
    if not isinstance(model, DiT):
        raise CheckpointError(f"save_pretrained expects an esolm DiT, got {type(model).__name__}")
    return model


def save_pretrained(model: DiT, path: str | os.PathLike, method: Method | dict | None = None) -> None:
    """Write ``path/model.safetensors`` and ``path/config.json``, atomically.

    A new folder is assembled beside ``path`` and renamed into place; an existing folder gets each file
    written to a temporary name and renamed over the old one (weights first, then config). Compiled or
    distributed wrappers are unwrapped, so the keys are always the DiT's own.
    """
    path = Path(path)
    model = _unwrap(model)
    method = as_method(method).to_dict() if method is not None else None
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": model.config.to_dict(), "method": method}
    state = _unshared_cpu_state(model)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            _write_json(tmp / CONFIG_NAME, meta)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    for name, write in ((WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"})),
                        (CONFIG_NAME, lambda p: _write_json(p, meta))):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", dir=path)
        os.close(fd)
        try:
            write(Path(tmp_name))
            os.replace(tmp_name, path / name)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


# --------------------------------------------------------------------------------------------------
# Loading: format detection
# --------------------------------------------------------------------------------------------------


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({_one_line(exc)})") from None


def _read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_NAME).is_file():
        return _read_safetensors(folder / WEIGHTS_NAME)
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        index = _read_json(folder / WEIGHTS_INDEX_NAME)
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise CheckpointError(f"{folder / WEIGHTS_INDEX_NAME}: empty weight_map")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise CheckpointError(f"{folder / WEIGHTS_INDEX_NAME}: shard {shard!r} is outside the folder")
            state.update(_read_safetensors(folder / shard))
        return state
    if (folder / TORCH_WEIGHTS_NAME).is_file():
        state = read_checkpoint(folder / TORCH_WEIGHTS_NAME)
        if not isinstance(state, dict):
            raise CheckpointError(f"{folder / TORCH_WEIGHTS_NAME}: not a state dict")
        return state
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {TORCH_WEIGHTS_NAME}")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable JSON ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def config_from_hf(cfg: dict) -> ModelConfig:
    """ModelConfig of the authors' Hugging Face ``config.json`` (MDLM: ``hidden_dim``; Eso-LM:
    ``hidden_size`` and ``mask_index``; the mask is the last id when not given)."""
    eso = str(cfg.get("model_type", "")).lower() == "esolm"
    order = ("hidden_size", "hidden_dim") if eso else ("hidden_dim", "hidden_size")
    hidden = next((cfg[k] for k in order if isinstance(cfg.get(k), int)), None)
    need = {"vocab_size": cfg.get("vocab_size"), "hidden": hidden, "n_blocks": cfg.get("n_blocks"),
            "n_heads": cfg.get("n_heads"), "model_length": cfg.get("model_length")}
    missing = [k for k, v in need.items() if not isinstance(v, int)]
    if missing:
        raise CheckpointError(f"Hugging Face config.json lacks integer {', '.join(missing)}")
    vocab = cfg["vocab_size"]
    mask = cfg.get("mask_index", vocab - 1)
    return ModelConfig(
        vocab_size=vocab, mask_id=mask, hidden_size=hidden, cond_dim=int(cfg.get("cond_dim", 128)),
        n_layers=cfg["n_blocks"], n_heads=cfg["n_heads"], length=cfg["model_length"],
        dropout=float(cfg.get("dropout", 0.1)),
    )


def method_from_hf(cfg: dict, name_or_path: str = "") -> dict:
    """Method dict of an authors' HF config. Their Eso-LM uploads are variant B and carry alpha0 only in
    the repository name (``Eso-LM-B-alpha-0_25``); without it the authors' default applies."""
    kind = str(cfg.get("model_type", "")).lower()
    if kind == "mdlm":
        return {"name": "mdlm", "low_var": False}
    if kind == "esolm":
        name = f"{name_or_path} {cfg.get('_name_or_path', '')}"  # the name asked for wins
        m = re.search(r"alpha-(\d+(?:[_.]\d+)?)", name)
        alpha0 = float(m.group(1).replace("_", ".")) if m else _AUTHORS_ALGO_DEFAULTS["alpha_0"]
        variant = _ESOLM_VARIANTS.get(cfg.get("diffusion_attn_mode", "causal"), "B")
        if re.search(r"Eso-LM-A\b", name):
            variant = "A"
        return {"name": "esolm", "variant": variant, "alpha0": alpha0, "batch_split": 0.0, "low_var": False}
    raise CheckpointError(f"Hugging Face model_type {cfg.get('model_type')!r} is not supported (EsoLM, mdlm)")


def _user_config(config: Any, vocab_size: int | None, mask_index: int | None) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, dict) and isinstance(config.get("model"), dict) and "n_blocks" in config["model"]:
        if vocab_size is None:
            raise CheckpointError("cannot tell the vocabulary size; pass a ModelConfig")
        mask = mask_index if mask_index is not None else vocab_size - 1
        return config_from_authors(config, vocab_size, mask)
    if isinstance(config, dict):
        return ModelConfig.from_dict(config)
    raise CheckpointError(f"config must be a ModelConfig or a dict, got {type(config).__name__}")


def _vocab_of(state: dict) -> int | None:
    emb = _backbone_state(state).get("vocab_embed.embedding")
    return int(emb.shape[0]) if isinstance(emb, torch.Tensor) and emb.ndim == 2 else None


def _load_pickled(file: Path, config: Any, use_ema: bool, mask_index: int | None) -> tuple[DiT, dict | None]:
    ckpt = read_checkpoint(file)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{file}: expected a dict, got {type(ckpt).__name__}")
    if isinstance(ckpt.get("state_dict"), dict):
        state = ckpt["state_dict"]
        hp = ckpt.get("hyper_parameters")
        authors_cfg = ckpt.get("config")
        if authors_cfg is None and isinstance(hp, dict):
            authors_cfg = hp.get("config", hp if "model" in hp else None)
        hp_vocab = hp.get("vocab_size") if isinstance(hp, dict) else None
        vocab = _vocab_of(state) or ckpt.get("vocab_size") or hp_vocab
        mask = mask_index if mask_index is not None else ckpt.get("mask_index")
        if mask is None and vocab is not None:
            mask = int(vocab) - 1  # the authors append the mask token when the tokenizer has none
        method = None
        own = isinstance(authors_cfg, dict) and "model" not in authors_cfg and "hidden_size" in authors_cfg
        if config is not None:
            cfg = _user_config(config, vocab, mask)
        elif own:  # esolm's own ModelConfig dict (e.g. a training checkpoint)
            cfg = ModelConfig.from_dict(authors_cfg)
        elif isinstance(authors_cfg, dict):
            cfg = config_from_authors(authors_cfg, vocab, mask)
        else:
            raise CheckpointError(
                f"{file}: its config could not be recovered (hyper_parameters unreadable); pass config="
            )
        if own:
            method = ckpt.get("method")
        elif isinstance(authors_cfg, dict):
            method = method_from_authors(authors_cfg)
        model = load_authors_state_dict(state, cfg)
        ema = ckpt.get("ema")
        if use_ema and isinstance(ema, dict) and ema.get("shadow_params") is not None:
            apply_ema(model, ema["shadow_params"])
        return model, method
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if config is None:
            raise CheckpointError(f"{file}: a bare state dict carries no config; pass config=")
        return load_authors_state_dict(ckpt, _user_config(config, _vocab_of(ckpt), mask_index)), None
    raise CheckpointError(f"{file}: neither a Lightning/fixture checkpoint ('state_dict') nor a state dict")


def _load_folder(folder: Path, config: Any, mask_index: int | None, name: str) -> tuple[DiT, dict | None]:
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}")
    meta = _read_json(folder / CONFIG_NAME)
    if meta.get("format") == FORMAT:
        version = meta.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{folder}: esolm format version {version!r} is not one this esolm reads")
        cfg = _user_config(config, None, None) if config is not None else ModelConfig.from_dict(meta["model"])
        state = _read_folder_weights(folder)
        model = DiT(cfg)
        emb = state.get("vocab_embed.embedding")
        if isinstance(emb, torch.Tensor) and emb.is_floating_point() and emb.dtype != torch.float32:
            model = model.to(emb.dtype)  # keep the saved precision: the round trip is bit-exact
        _check_fits(state, model)
        model.load_state_dict(state, strict=False)
        return model, meta.get("method")
    if "n_blocks" in meta:
        if config is not None:
            cfg = _user_config(config, meta.get("vocab_size"), mask_index)
        else:
            cfg = config_from_hf(meta)
        if mask_index is not None and config is None:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), "mask_id": mask_index})
        method = method_from_hf(meta, name)
        return load_authors_state_dict(_read_folder_weights(folder), cfg), method
    raise CheckpointError(f"{folder / CONFIG_NAME}: neither an esolm nor an authors' Hugging Face config")


def _download(repo_id: str, revision: str | None, cache_dir: Any, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            repo_id=repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            allow_patterns=["*.json", "*.safetensors", TORCH_WEIGHTS_NAME],
        ))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, HTTP errors: all one line
        raise CheckpointError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub (offline or not found?): {_one_line(exc)}"
        ) from None


def load_pretrained(
    path_or_repo: str | os.PathLike,
    *,
    config: Any = None,
    use_ema: bool = True,
    mask_index: int | None = None,
    device: Any = None,
    revision: str | None = None,
    cache_dir: Any = None,
    local_files_only: bool = False,
) -> tuple[DiT, Method | None]:
    """Load a model from any supported format; returns ``(model, method spec or None)`` in eval mode.

    ``path_or_repo``: an esolm folder, an authors' HF folder, a ``.ckpt``/``.pt`` file, a
    ``model.safetensors`` inside either kind of folder, or a Hugging Face repo id (downloaded with
    ``huggingface_hub``; a local path always wins). ``config`` overrides the stored one (ModelConfig, its
    dict, or an authors' Hydra dict); ``use_ema`` picks the EMA weights of Lightning checkpoints;
    ``mask_index`` overrides the authors' default mask id (last vocabulary id).
    """
    path = Path(path_or_repo)
    if not path.exists():
        text = str(path_or_repo)
        if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
            raise CheckpointError(f"no such file or folder: {text}")
        path = _download(text, revision, cache_dir, local_files_only)
    name = str(path_or_repo)
    if path.is_dir():
        model, method = _load_folder(path, config, mask_index, name)
    elif path.suffix == ".safetensors":
        model, method = _load_folder(path.parent, config, mask_index, name)
    else:
        model, method = _load_pickled(path, config, use_ema, mask_index)
    if device is not None:
        model = model.to(device)
    return model.eval(), (as_method(method) if method is not None else None)


def from_pretrained(path_or_repo: str | os.PathLike, **kwargs) -> DiT:
    """Like :func:`load_pretrained`, returning only the model."""
    return load_pretrained(path_or_repo, **kwargs)[0]
