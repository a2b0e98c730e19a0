"""The paper authors' checkpoints, translated: their configs to :class:`ModelConfig` and method dicts, their
state dicts and EMA to esolm's parameter names.

* Hydra config (Lightning ``hyper_parameters.config``, fixture ``config``): ``model.hidden_size, cond_dim,
  n_blocks, n_heads, length, dropout``; ``algo.name``, ``algo.diffusion_attn_mode`` (``causal`` -> Eso-LM
  B, ``mixed2`` -> A), ``alpha_0``, ``batch_split``, ``loss_type``; ``algo.causal_attention`` marks the AR
  baseline (no adaLN).
* Hugging Face ``config.json`` (``kuleshov-group/mdlm-owt``, ``sahoo-diffusion/Eso-LM-B-alpha-*``):
  ``vocab_size, model_length, cond_dim, n_blocks, n_heads, dropout`` and ``hidden_dim`` (MDLM) or
  ``hidden_size`` + ``mask_index`` (Eso-LM).
* State dicts: keys ``backbone.*`` (the Lightning module's other parts, ``noise.*`` ..., are dropped); EMA
  weights in ``ema.shadow_params``, one tensor per trainable backbone parameter in ``named_parameters``
  order (then the noise schedule's, ignored).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from esolm.config import ModelConfig
from esolm.errors import CheckpointError, ConfigError

NON_BACKBONE_PREFIXES = ("noise.", "metrics.", "ema.")

# Defaults of the authors' ``configs/algo/esolm.yaml`` / ``mdlm.yaml`` for keys a config may omit.
_AUTHORS_ALGO_DEFAULTS = {"alpha_0": 0.0, "batch_split": 0.0, "loss_type": "elbo"}
_ESOLM_VARIANTS = {"causal": "B", "mixed2": "A"}


def get(cfg: Any, dotted: str, default: Any = None) -> Any:
    """``cfg["a"]["b"]`` for ``"a.b"``, or ``default`` where a level is missing or not a dict."""
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _is_authors_ar(cfg: dict) -> bool:
    return bool(get(cfg, "algo.causal_attention", False)) or get(cfg, "algo.parameterization") == "ar"


def is_authors_config(cfg: Any) -> bool:
    """Whether ``cfg`` looks like the authors' Hydra config (a ``model`` section with ``n_blocks``)."""
    return isinstance(get(cfg, "model"), dict) and "n_blocks" in cfg["model"]


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_from_authors(cfg: dict, vocab_size: int, mask_index: int | None) -> ModelConfig:
    """ModelConfig from the authors' Hydra config (``model.hidden_size, cond_dim, n_blocks, n_heads,
    length, dropout``; ``algo.causal_attention`` marks the AR baseline, which has no adaLN unless
    ``algo.adaLN`` says so, as in the scaling family)."""
    model = get(cfg, "model")
    if not isinstance(model, dict):
        raise CheckpointError("the authors' config has no 'model' section")
    need = ("hidden_size", "n_blocks", "n_heads", "length")
    missing = [k for k in need if not _int(model.get(k))]
    if missing:
        raise CheckpointError(f"the authors' config lacks integer model.{', model.'.join(missing)}")
    if not _int(vocab_size):
        raise CheckpointError("cannot tell the vocabulary size of the authors' checkpoint")
    ar = _is_authors_ar(cfg)
    adaln = get(cfg, "algo.adaLN")  # explicit in the scaling family, whose AR baseline keeps adaLN
    return ModelConfig(
        vocab_size=int(vocab_size),
        mask_id=None if ar else (None if mask_index is None else int(mask_index)),
        hidden_size=model["hidden_size"],
        cond_dim=int(model.get("cond_dim", 128)),
        n_layers=model["n_blocks"],
        n_heads=model["n_heads"],
        length=model["length"],
        dropout=float(model.get("dropout", 0.1)),
        adaln=bool(adaln) if isinstance(adaln, bool) else not ar,
    )


def method_from_authors(cfg: dict) -> dict:
    """The esolm method dict of an authors' config (Eso-LM variant from ``algo.diffusion_attn_mode``:
    ``causal`` -> B, ``mixed2`` -> A). Keys the config omits take the authors' yaml defaults."""
    algo = get(cfg, "algo", {}) or {}
    algo_name = algo.get("name")  # the authors' config field
    if algo_name is None:
        algo_name = "esolm" if "diffusion_attn_mode" in algo else ("ar" if _is_authors_ar(cfg) else "mdlm")
    loss_type = algo.get("loss_type", _AUTHORS_ALGO_DEFAULTS["loss_type"])
    if algo_name == "ar" or _is_authors_ar(cfg):
        return {"name": "ar"}
    if algo_name == "mdlm":
        return {"name": "mdlm", "low_var": loss_type == "low_var"}
    if algo_name == "esolm":
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
    raise CheckpointError(f"authors' algorithm {algo_name!r} is not supported (esolm, mdlm, ar)")


def config_from_hf(cfg: dict) -> ModelConfig:
    """ModelConfig of the authors' Hugging Face ``config.json`` (MDLM: ``hidden_dim``; Eso-LM:
    ``hidden_size`` and ``mask_index``; the mask is the last id when not given)."""
    eso = str(cfg.get("model_type", "")).lower() == "esolm"
    order = ("hidden_size", "hidden_dim") if eso else ("hidden_dim", "hidden_size")
    hidden = next((cfg[k] for k in order if _int(cfg.get(k))), None)
    need = {"vocab_size": cfg.get("vocab_size"), "hidden": hidden, "n_blocks": cfg.get("n_blocks"),
            "n_heads": cfg.get("n_heads"), "model_length": cfg.get("model_length")}
    missing = [k for k, v in need.items() if not _int(v)]
    if missing:
        raise CheckpointError(f"Hugging Face config.json lacks integer {', '.join(missing)}")
    vocab = cfg["vocab_size"]
    mask = cfg.get("mask_index", vocab - 1)
    try:
        return ModelConfig(
            vocab_size=vocab, mask_id=mask, hidden_size=hidden, cond_dim=int(cfg.get("cond_dim", 128)),
            n_layers=cfg["n_blocks"], n_heads=cfg["n_heads"], length=cfg["model_length"],
            dropout=float(cfg.get("dropout", 0.1)),
        )
    except ConfigError as e:
        raise CheckpointError(f"Hugging Face config.json: {e}") from None


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


def backbone_state(state_dict: dict) -> dict:
    """Keys of the backbone only: strip ``backbone.``; drop the Lightning module's other parts."""
    if any(isinstance(k, str) and k.startswith("backbone.") for k in state_dict):
        return {k[len("backbone."):]: v for k, v in state_dict.items()
                if isinstance(k, str) and k.startswith("backbone.")}
    return {k: v for k, v in state_dict.items() if not (isinstance(k, str) and k.startswith(NON_BACKBONE_PREFIXES))}


def vocab_of(state: dict) -> int | None:
    """The vocabulary size the state dict's token embedding was trained with."""
    emb = backbone_state(state).get("vocab_embed.embedding")
    return int(emb.shape[0]) if isinstance(emb, torch.Tensor) and emb.ndim == 2 else None


def ema_state(shadow_params: Any, param_names: list[str]) -> dict:
    """``{parameter name: EMA tensor}`` from the authors' ``shadow_params`` (one per trainable backbone
    parameter, in ``named_parameters`` order; trailing entries belong to the noise schedule)."""
    if not isinstance(shadow_params, (list, tuple)) or len(shadow_params) < len(param_names):
        n = len(shadow_params) if isinstance(shadow_params, (list, tuple)) else 0
        raise CheckpointError(f"EMA holds {n} tensors but the backbone has {len(param_names)} parameters")
    return dict(zip(param_names, shadow_params))


__all__ = ["config_from_authors", "method_from_authors", "config_from_hf", "method_from_hf", "backbone_state",
           "ema_state", "vocab_of", "is_authors_config", "get"]
