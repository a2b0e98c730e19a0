"""The Eso-LM authors' scaling family ("Scaling Beyond Masked Diffusion Language Models", code
``s-sahoo/scaling-dllms``; Hub ``nvidia/SDLLM-{EsoLM,MDLM,AR}-1.7B-Base``), read as esolm models.

Their backbone (``models/dit.py``: ``DiT``, ``EsoLMDiT``) is the DiT esolm implements, parameter for parameter:
token embedding ``vocab_embed.embedding`` and an output layer ``output_layer.linear`` of its own (never tied:
``tie_word_embeddings: False`` is a config key their code does not read), adaLN from ``sigma_map`` (sigma = 0,
``time_conditioning: False``), rotary positions, LayerNorm without bias, attention without bias. The only
difference from the first paper's family is that their AR baseline keeps adaLN (``algo.adaLN: True``); esolm's
:class:`~esolm.config.ModelConfig` already has that option (``adaln``), so nothing in the backbone changes.

A Hub folder is what ``huggingface_hub.PyTorchModelHubMixin.save_pretrained`` writes: ``model.safetensors``
(or ``pytorch_model.bin``) and a ``config.json`` of the constructor's arguments. Which ``config.json`` depends on
how the model was built, so both are recognised **by content**:

* **full**: the constructor got a plain dict config: the Hydra config (``model``, ``algo``, ``data`` ...) with
  ``vocab_size`` (and ``mask_index`` for ``EsoLMDiT``) at the top;
* **bare**: the constructor got an OmegaConf config (the training path), which the mixin cannot serialise:
  ``{"vocab_size": V, "mask_index": M}`` (``EsoLMDiT``) or ``{"vocab_size": V}`` (``DiT``). The architecture is
  then read from the weights' shapes, the head count from the authors' model table (:data:`HEADS`), the
  length is their 1024, and the method is Eso-LM (B) when ``mask_index`` is stored, else it must be given
  (the repository name ``SDLLM-AR-...`` / ``SDLLM-MDLM-...`` says it).

The mask id: ``mask_index`` when stored; else the tokenizer the config names (``data.tokenizer_name_or_path``):
their 128k tiktoken vocabulary keeps ``<mask>`` at special id 3, their TinyLlama SentencePiece has none and the
mask is appended (the last id); a 131,072-entry vocabulary is the tiktoken one. Everything is overridable
(``mask_index=``, ``config=``, ``method=`` of :func:`esolm.io.load_model`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from esolm.config import ModelConfig
from esolm.errors import CheckpointError, ConfigError
from esolm.io import authors

# their configs/model/*.yaml: (hidden_size, n_blocks) -> n_heads (every one has cond_dim 128, length 1024)
HEADS = {
    (256, 6): 4, (256, 8): 8, (384, 6): 6, (384, 8): 6, (512, 8): 8, (576, 9): 9, (640, 10): 10, (640, 13): 10,
    (640, 16): 8, (768, 12): 12, (768, 15): 12, (768, 18): 12, (896, 14): 14, (896, 16): 14, (896, 18): 14,
    (1024, 16): 16, (1024, 18): 16, (1024, 20): 16, (1024, 24): 16, (1280, 18): 10, (1280, 21): 10,
    (1280, 24): 10, (1408, 18): 11, (1408, 21): 11, (1408, 24): 11, (1536, 19): 12, (1536, 22): 12,
    (1536, 25): 12, (1792, 20): 14, (1792, 24): 14, (2048, 22): 16, (2048, 25): 16, (2176, 28): 17,
}
DEFAULT_LENGTH = 1024  # every model config of theirs
TIKTOKEN_VOCAB = 131_072  # CustomTikTokenizer's vocabulary: 1000 special ids, then the 128k merges
TIKTOKEN_SPECIALS = ("<unk>", "<s>", "</s>", "<mask>")  # ids 0..3; <SPECIAL_4> .. <SPECIAL_999> follow
TIKTOKEN_MASK = TIKTOKEN_SPECIALS.index("<mask>")
BARE_KEYS = {"vocab_size", "mask_index"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.attn_qkv\.weight$")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_scaling_config(meta: dict) -> bool:
    """Whether a ``config.json`` is one the authors' ``PyTorchModelHubMixin`` writes for this family: an integer
    ``vocab_size`` at the top, with the Hydra config beside it (``model.n_blocks`` ...) or nothing but
    ``mask_index``."""
    if not _int(meta.get("vocab_size")):
        return False
    return authors.is_authors_config(meta) or (set(meta) <= BARE_KEYS)


def is_bare(meta: dict) -> bool:
    return set(meta) <= BARE_KEYS


def mask_index_of(meta: dict) -> int:
    """The mask id of a scaling-family config (module docstring)."""
    vocab = meta["vocab_size"]
    stored = meta.get("mask_index")
    if stored is not None:
        if not _int(stored) or not 0 <= stored < vocab:
            raise CheckpointError(f"config.json: mask_index {stored!r} is not an id of the vocabulary [0, {vocab})")
        return stored
    tok = str(authors.get(meta, "data.tokenizer_name_or_path", "") or "").lower()
    if "tinyllama" in tok or tok.endswith(".model"):
        return vocab - 1
    if tok.endswith(".json") or vocab == TIKTOKEN_VOCAB:
        return TIKTOKEN_MASK
    return vocab - 1  # the authors append the mask when the tokenizer has none


def _from_shapes(shapes: dict[str, tuple], vocab: int, where: str) -> dict:
    """hidden_size, n_blocks, cond_dim and adaLN read off the weights' shapes; n_heads from :data:`HEADS`."""
    emb = shapes.get("vocab_embed.embedding")
    if emb is None or len(emb) != 2:
        raise CheckpointError(f"{where}: no 2-d 'vocab_embed.embedding' among the weights (not a scaling-dllms DiT)")
    if emb[0] != vocab:
        raise CheckpointError(f"{where}: config.json says vocab_size {vocab} but the embedding has {emb[0]} rows")
    hidden = emb[1]
    blocks = sorted(int(m.group(1)) for k in shapes if (m := _BLOCK.match(k)))
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"{where}: its blocks.N.attn_qkv.weight are not numbered 0..N-1")
    n_blocks = len(blocks)
    heads = HEADS.get((hidden, n_blocks))
    if heads is None:
        raise CheckpointError(f"{where}: config.json does not give the architecture and hidden size {hidden} with "
                              f"{n_blocks} blocks is none of the authors' model configs, so the number of heads is "
                              "unknown; pass config= (their Hydra config or an esolm ModelConfig)")
    sigma = shapes.get("sigma_map.mlp.0.weight")
    adaln = sigma is not None
    cond = sigma[0] if adaln else 128
    return {"hidden_size": hidden, "n_blocks": n_blocks, "n_heads": heads, "cond_dim": cond,
            "length": DEFAULT_LENGTH, "dropout": 0.0, "adaln": adaln}


def config_from_scaling(meta: dict, shapes: dict[str, tuple], where: str,
                        mask_index: int | None = None) -> ModelConfig:
    """esolm's ModelConfig of a scaling-family folder (``shapes``: the weights' names and shapes, for a bare
    config)."""
    vocab = meta["vocab_size"]
    mask = mask_index if mask_index is not None else mask_index_of(meta)
    try:
        if is_bare(meta):
            arch = _from_shapes(shapes, vocab, where)
            return ModelConfig(vocab_size=vocab, mask_id=mask, hidden_size=arch["hidden_size"],
                               cond_dim=arch["cond_dim"], n_layers=arch["n_blocks"], n_heads=arch["n_heads"],
                               length=arch["length"], dropout=arch["dropout"], adaln=arch["adaln"])
        cfg = authors.config_from_authors(meta, vocab, mask)
        # the AR baseline's vocabulary holds the mask token too (their sampler suppresses its logit): keep it
        return dataclasses.replace(cfg, mask_id=mask)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def method_from_scaling(meta: dict, name_or_path: str = "") -> dict | None:
    """The esolm method dict of a scaling-family config, ``None`` when it cannot be told (a bare ``DiT``
    config, AR and MDLM alike, with no telling repository name)."""
    if not is_bare(meta):
        return authors.method_from_authors(meta)
    if meta.get("mask_index") is not None:  # only EsoLMDiT stores mask_index; theirs is B, alpha_0 = 1
        return {"name": "esolm", "variant": "B", "alpha0": 1.0, "batch_split": 1.0, "low_var": True}
    name = name_or_path.lower()
    if re.search(r"(^|[-_/])ar([-_/]|$)", name):
        return {"name": "ar"}
    if re.search(r"(^|[-_/])mdlm([-_/]|$)", name):
        return {"name": "mdlm", "low_var": False}
    return None


__all__ = ["HEADS", "TIKTOKEN_MASK", "TIKTOKEN_SPECIALS", "TIKTOKEN_VOCAB", "is_scaling_config", "mask_index_of",
           "config_from_scaling", "method_from_scaling"]
