"""Weights checked before a model is built: memory budget, expected names and shapes, safetensors headers,
dtypes and finiteness.

The order is what keeps a hostile or broken file cheap to refuse: the config is checked against the
machine (:func:`check_config`: length, parameter count x 4 bytes against available memory) before
anything is allocated; a safetensors header is read and checked against the expected layout before its
tensors are (:func:`read_safetensors_header`); every tensor is checked (name, shape, floating dtype, all
finite) before the model is built (:func:`check_state`, :func:`build_model`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from esolm import devices
from esolm.config import ModelConfig
from esolm.errors import CheckpointError
from esolm.io.safe_pickle import cause_line
from esolm.model.backbone import DiT

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"


LAYER_OVERHEAD = 64 << 10  # bytes of Python objects per transformer block (measured: ~32-66 KiB)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
ROTARY_BUFFER = "rotary_emb.inv_freq"  # a fixed function of the config: checkpoints may omit it
# safetensors dtype -> (bytes per element, torch dtype if esolm accepts it for weights)
_ST_DTYPES = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16),
    "I64": (8, None), "U64": (8, None), "I32": (4, None), "U32": (4, None), "I16": (2, None), "U16": (2, None),
    "I8": (1, None), "U8": (1, None), "BOOL": (1, None), "F8_E5M2": (1, None), "F8_E4M3": (1, None),
}
WEIGHT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def available_memory() -> int | None:
    """Bytes of host memory available to a new allocation (``MemAvailable``, else psutil); None if unknown."""
    avail = devices.available_memory("cpu")
    if avail is None:
        try:
            import psutil
        except ImportError:
            return None
        avail = int(psutil.virtual_memory().available)
    return avail


@dataclass(frozen=True)
class Layout:
    """What a DiT of a config holds, computed without building it: state-dict names and shapes (in
    ``state_dict`` order) and the trainable parameters' names (in ``named_parameters`` order)."""

    shapes: dict[str, tuple[int, ...]]
    params: list[str]

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(self.shapes[n]) for n in self.params)


def _one_block_layout(cfg: ModelConfig) -> tuple[list[tuple[str, tuple]], list[str]]:
    with torch.device("meta"):
        model = DiT(dataclasses.replace(cfg, n_layers=1))
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    return shapes, params


def _expand(items: list, n_layers: int, name=lambda x: x) -> list:
    """Repeat the ``blocks.0.`` entries of a one-block listing for blocks ``0 .. n_layers-1``, in place."""
    idx = [i for i, x in enumerate(items) if name(x).startswith("blocks.")]
    if not idx:
        return list(items)
    lo, hi = idx[0], idx[-1] + 1

    def renamed(x, i: int):
        if isinstance(x, tuple):
            return (f"blocks.{i}." + x[0][len("blocks.0."):], x[1])
        return f"blocks.{i}." + x[len("blocks.0."):]

    return items[:lo] + [renamed(x, i) for i in range(n_layers) for x in items[lo:hi]] + items[hi:]


def parameter_count(cfg: ModelConfig) -> int:
    """Number of parameters of ``DiT(cfg)``, computed from a one-block model on the meta device."""
    shapes, params = _one_block_layout(cfg)
    size = dict(shapes)
    block = sum(math.prod(size[n]) for n in params if n.startswith("blocks.0."))
    rest = sum(math.prod(size[n]) for n in params if not n.startswith("blocks."))
    return rest + cfg.n_layers * block


def layout(cfg: ModelConfig) -> Layout:
    """The :class:`Layout` of ``DiT(cfg)`` (call :func:`check_config` first: it is linear in n_layers)."""
    shapes, params = _one_block_layout(cfg)
    return Layout(dict(_expand(shapes, cfg.n_layers, name=lambda x: x[0])), _expand(params, cfg.n_layers))


def check_config(cfg: ModelConfig, where: str) -> None:
    """Refuse a config whose model would not fit in the available memory (parameters x 4 bytes, plus the
    Python objects of its blocks), before anything is allocated (``ModelConfig`` itself refuses absurd
    lengths: :data:`esolm.config.MAX_LENGTH`)."""
    params = parameter_count(cfg)
    need = 4 * params + LAYER_OVERHEAD * cfg.n_layers
    avail = available_memory()
    if avail is not None and need > avail:
        raise CheckpointError(
            f"{where}: the model has {params:,} parameters ({cfg.n_layers} blocks of hidden size {cfg.hidden_size}, "
            f"vocabulary {cfg.vocab_size:,}), {_gib(need)} as float32, but only {_gib(avail)} of memory is "
            "available")


def read_json_object(file: Path) -> dict:
    """The JSON object in ``file`` (a model folder's config, index or tokenizer metadata); a one-line
    CheckpointError when it cannot be read or is not an object."""
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable JSON ({cause_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def model_config_from_dict(d: object, where: str) -> ModelConfig:
    """A ModelConfig from a stored dict, which must name the architecture and the trained length (no silent
    defaults for them)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: the model config is a {type(d).__name__}, not a dict")
    need = ("vocab_size", "mask_id", "hidden_size", "n_layers", "n_heads", "length")
    missing = [k for k in need if k not in d]
    if missing:
        raise CheckpointError(f"{where}: the model config lacks {', '.join(missing)}")
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid model config ({cause_line(exc)})") from None


# --------------------------------------------------------------------------------------------------
# Checks of names, shapes, dtypes and values
# --------------------------------------------------------------------------------------------------


def _short(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _check_names(names, expected: Layout, where: str) -> None:
    names = set(names)
    missing = [k for k in expected.shapes if k not in names and k != ROTARY_BUFFER]
    unexpected = sorted(str(k) for k in names if k not in expected.shapes)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        raise CheckpointError(f"{where}: checkpoint does not fit the model: {'; '.join(parts)}")


def _check_shape(key: str, shape: tuple, expected: Layout, cfg: ModelConfig, where: str) -> None:
    ref = expected.shapes[key]
    if tuple(shape) == ref:
        return
    hint = ""
    if key == "vocab_embed.embedding" and len(shape) == 2:
        v, d = shape
        if d != cfg.hidden_size:
            hint = f" (checkpoint is for hidden_size {d} but config says {cfg.hidden_size})"
        elif v != cfg.vocab_size:
            hint = f" (checkpoint is for vocab_size {v} but config says {cfg.vocab_size})"
    raise CheckpointError(f"{where}: tensor {key!r} has shape {list(shape)} in the checkpoint but {list(ref)} "
                          f"in the model{hint}")


def _ordered(names) -> list[str]:
    """``vocab_embed.embedding`` first, so that a wrong hidden/vocabulary size is named as such."""
    return sorted(names, key=lambda k: (k != "vocab_embed.embedding", k))


def check_state(state: dict, cfg: ModelConfig, where: str, expected: Layout | None = None) -> None:
    """Every entry of ``state`` is a floating-point tensor of the model's name and shape, with finite
    values; nothing is missing (the rotary buffer may be)."""
    expected = expected or layout(cfg)
    _check_names(state, expected, where)
    for key in _ordered(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: checkpoint entry {key!r} is a {type(t).__name__}, not a tensor")
        _check_shape(key, tuple(t.shape), expected, cfg, where)
    for key in state:
        t = state[key]
        if t.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{where}: tensor {key!r} has dtype {t.dtype}; weights must be float16, "
                                  "bfloat16, float32 or float64")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: tensor {key!r} holds NaN or infinite values")


def build_model(cfg: ModelConfig, state: dict, where: str, expected: Layout | None = None) -> DiT:
    """A DiT for ``cfg`` holding ``state`` (checked first), in the weights' own floating dtype."""
    check_state(state, cfg, where, expected)
    model = DiT(cfg)
    dtype = state["vocab_embed.embedding"].dtype
    if dtype != torch.float32:
        model = model.to(dtype)  # keep the saved precision: the round trip is bit-exact
    model.load_state_dict(state, strict=False)  # strictness checked above; the rotary buffer may be absent
    return model


# --------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------


def read_safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors file's header alone (8-byte length + JSON), after
    checking that it describes the file truthfully: sizes match shapes, offsets lie inside the data and
    do not overlap."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{file}: not a safetensors file, or truncated (header length {n:,} for a "
                                      f"file of {size:,} bytes)")
            meta = json.loads(fh.read(n))
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read it ({cause_line(exc)})") from None
    except ValueError as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header ({cause_line(exc)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    meta.pop("__metadata__", None)
    data_len = size - 8 - n
    out, spans = {}, []
    for name, entry in meta.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {dtype!r} in the header")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{file}: tensor {name!r} has an invalid shape {shape!r} in the header")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise CheckpointError(f"{file}: tensor {name!r} has offsets {offsets!r} outside the file's "
                                  f"{data_len:,} data bytes (truncated or lying header)")
        nbytes = math.prod(shape) * _ST_DTYPES[dtype][0]
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{file}: tensor {name!r} of shape {shape} {dtype} needs {nbytes:,} bytes but the "
                                  f"header gives it {offsets[1] - offsets[0]:,}")
        spans.append((offsets[0], offsets[1], name))
        out[name] = (dtype, tuple(shape))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{file}: tensors {a!r} and {b!r} overlap in the file (lying header)")
    return out


def check_header(header: dict[str, tuple[str, tuple]], cfg: ModelConfig, where: str,
                 expected: Layout) -> None:
    """Names, shapes and dtypes of a safetensors header against the model, before any tensor is read."""
    _check_names(header, expected, where)
    for key in _ordered(header):
        dtype, shape = header[key]
        _check_shape(key, shape, expected, cfg, where)
        if _ST_DTYPES[dtype][1] is None:
            raise CheckpointError(f"{where}: tensor {key!r} has dtype {dtype}; weights must be F16, BF16, F32 "
                                  "or F64")


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CPU), with a one-line error for a damaged file."""
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({cause_line(exc)})") from None


def strip_prefix(state: dict, prefix: str) -> dict:
    """The entries under ``prefix`` (e.g. ``backbone.``), renamed without it."""
    return {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}


def weight_files(folder: Path) -> list[Path] | Path:
    """The safetensors files of a folder (a list), or its pickled state dict (a path)."""
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        index = read_json_object(folder / WEIGHTS_INDEX_NAME)
        weight_map = index.get("weight_map")
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not shards:
            raise CheckpointError(f"{folder / WEIGHTS_INDEX_NAME}: empty weight_map")
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).name != shard or not (folder / shard).is_file():
                raise CheckpointError(f"{folder / WEIGHTS_INDEX_NAME}: shard {shard!r} is not a file in the folder")
        return [folder / s for s in shards]
    if (folder / TORCH_WEIGHTS_NAME).is_file():
        return folder / TORCH_WEIGHTS_NAME
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {TORCH_WEIGHTS_NAME}")


def read_headers(source: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The safetensors headers of one file or of shards (a name in two shards is refused), before any tensor."""
    header: dict = {}
    for file in source:
        part = read_safetensors_header(file)
        twice = sorted(set(part) & set(header))
        if twice:
            raise CheckpointError(f"{file}: tensor {twice[0]!r} is also in another shard")
        header.update(part)
    return header


def check_llama_memory(cfg, dtype: torch.dtype, loaded_bytes: int, where: str) -> None:
    """Refuse an EsoLlama that would not fit (its parameters in ``dtype``, the Python objects of its layers, plus
    ``loaded_bytes`` of weights read to fill it) before anything of its size is allocated."""
    params = cfg.parameter_count()
    need = params * torch.empty((), dtype=dtype).element_size() + LAYER_OVERHEAD * cfg.n_layers + loaded_bytes
    avail = available_memory()
    if avail is not None and need > avail:
        raise CheckpointError(f"{where}: the model has {params:,} parameters ({cfg.n_layers} layers of hidden size "
                              f"{cfg.hidden_size}); building it needs {need / (1 << 30):.1f} GiB but only "
                              f"{avail / (1 << 30):.1f} GiB of memory is available")


__all__ = ["WEIGHTS_NAME", "WEIGHTS_INDEX_NAME", "TORCH_WEIGHTS_NAME", "CONFIG_NAME", "weight_files",
           "read_headers", "check_llama_memory", "Layout", "layout", "parameter_count", "check_config",
           "model_config_from_dict", "check_state",
           "build_model", "read_safetensors_header", "check_header", "read_safetensors", "available_memory",
           "strip_prefix"]
