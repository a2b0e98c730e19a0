"""Weights in and out, and files written safely.

* :mod:`esolm.io.pretrained` — :func:`load_model`, the one loader of every format (esolm training
  checkpoints and folders, the authors' Lightning / fixture / Hugging Face checkpoints), and
  :func:`save_pretrained`; ``load_pretrained`` and ``DiT.from_pretrained`` are views of it;
* :mod:`esolm.io.safe_pickle` — :func:`read_checkpoint`, the one reader of pickled files: no code runs,
  memory is bounded;
* :mod:`esolm.io.weights` — checks before a model is built (memory, length, names, shapes, dtypes,
  finite values, safetensors headers);
* :mod:`esolm.io.authors` — the authors' configs and state dicts;
* :mod:`esolm.io.atomic` — atomic file and folder writes, and output checks before work starts.
"""

from esolm.errors import CheckpointError
from esolm.io.atomic import atomic_dir, atomic_json, atomic_write, atomic_writer, check_writable
from esolm.io.authors import config_from_authors, config_from_hf, method_from_authors, method_from_hf
from esolm.io.pretrained import (
    LoadedModel,
    is_repo_id,
    load_authors_state_dict,
    load_model,
    load_pretrained,
    save_pretrained,
    shipped_models,
)
from esolm.io.safe_pickle import InertObject, read_checkpoint
from esolm.io.weights import build_model, check_config, layout, parameter_count

__all__ = [
    "CheckpointError", "LoadedModel", "load_model", "load_pretrained", "save_pretrained", "read_checkpoint",
    "InertObject", "config_from_authors", "method_from_authors", "config_from_hf", "method_from_hf",
    "load_authors_state_dict", "build_model", "check_config", "layout", "parameter_count", "is_repo_id",
    "shipped_models",
    "atomic_write", "atomic_json", "atomic_writer", "atomic_dir", "check_writable",
]
