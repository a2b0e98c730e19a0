"""Training recipes: typed configs, YAML presets and ``key=value`` overrides.

A run is described by :class:`RunConfig`, five typed sections::

    model    architecture (hidden size, layers, heads, cond dim, dropout, ...)
    method   what is trained: esolm (variant, alpha0, batch_split, low_var) | mdlm | ar | bd3lm
    data     source, tokenizer, sequence length L, pack/pad, validation split, cache
    optim    AdamW, warmup then constant or cosine, gradient clipping, EMA decay
    trainer  global batch, micro batch, devices/nodes/strategy, precision, steps/time, eval/ckpt cadence

Presets live in ``esolm/presets/<name>.yaml`` (only the fields that differ from the defaults below).
Overrides use dotted keys with YAML-typed values, e.g. ``method.alpha0=0.25 trainer.max_steps=2000
optim.schedule=cosine trainer.max_time=00:00:30:00``. Setting ``method.name`` starts a fresh method
section (``method.name=ar`` drops a preset's ``alpha0``). Unknown keys and wrongly typed values are
errors. :meth:`RunConfig.validate` checks everything that can be checked before any work (it raises
:class:`~esolm.config.ConfigError` with a one-line message).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from esolm.config import ModelConfig
from esolm.data.datasets import MODES
from esolm.errors import ConfigError
from esolm.methods import Method, as_method, model_config_for

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class ModelSection:
    """The architecture fields of :class:`~esolm.config.ModelConfig` a recipe chooses (paper-size defaults);
    vocabulary and mask id come from the tokenizer, the length from ``data.length``."""

    hidden_size: int = 768
    n_layers: int = 12
    n_heads: int = 12
    cond_dim: int = 128
    dropout: float = 0.1
    mlp_ratio: int = 4


@dataclass
class MethodSection:
    """The method keys of a recipe; :func:`esolm.methods.as_method` validates them and fills defaults."""

    name: str = "esolm"
    variant: str | None = None
    alpha0: float | None = None
    batch_split: float | None = None
    low_var: bool | None = None
    block_size: int | None = None
    clip: list[float] | None = None
    ignore_bos: bool | None = None

    def to_method(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class DataSection:
    source: str = "wiki"              # wiki | openwebtext | lm1b | wikitext2/103 | ptb | lambada | path
    tokenizer: str = "esolm-bpe-8k"   # gpt2 | bert-base-uncased | esolm-bpe-8k | saved folder
    length: int = 128
    mode: str = "pack"                # pack | pad | pad-eos (esolm.data.datasets.MODES)
    val_fraction: float = 0.02
    split_seed: int = 0
    max_documents: int | None = None
    cache_dir: str | None = None      # default: $ESOLM_CACHE/data or ~/.cache/esolm/data
    num_workers: int = 0


@dataclass
class OptimSection:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 2500
    schedule: str = "constant"        # constant | cosine (to min_lr_ratio * lr at max_steps)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0            # 0 disables
    ema: float = 0.9999               # 0 disables


@dataclass
class TrainerSection:
    out_dir: str = "runs/esolm"
    seed: int = 1
    global_batch: int = 512
    micro_batch: int | None = None    # per device; default global_batch / world size (no accumulation)
    max_steps: int = 1_000_000
    max_time: str | float | None = None  # seconds or "DD:HH:MM:SS"
    accelerator: str = "auto"         # auto | cpu | gpu | cuda | mps
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"            # auto | ddp | fsdp
    precision: str = "bf16-mixed"     # bf16-mixed | 32-true | 16-mixed | bf16-true
    val_every: int = 5000             # optimizer steps; 0 disables validation
    val_batches: int | None = None    # limit validation to this many micro-batches per rank
    ckpt_every: int = 5000
    keep_checkpoints: int = -1        # periodic checkpoints kept (-1: all); last.ckpt is always kept
    log_every: int = 50
    logger: str = "csv"               # csv | tensorboard | wandb | none
    progress: bool = True
    resume: str | None = "auto"       # auto (out_dir/checkpoints/last.ckpt if present) | path | null
    trace: str | None = None          # JSONL per-step trace (global loss, parameter fingerprint per rank)


SECTIONS = {"model": ModelSection, "method": MethodSection, "data": DataSection, "optim": OptimSection,
            "trainer": TrainerSection}
PRECISIONS = ("bf16-mixed", "32-true", "32", "16-mixed", "bf16-true", "64-true")
STRATEGIES = ("auto", "ddp", "fsdp", "ddp_spawn", "ddp_find_unused_parameters_true")
LOGGERS = ("csv", "tensorboard", "wandb", "none")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


@dataclass
class RunConfig:
    preset: str = "custom"
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)

    # -- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        cfg = cls()
        apply_dict(cfg, d)
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -- derived ------------------------------------------------------------------------------------
    def method_spec(self) -> Method:
        """The validated method spec of the ``method`` section."""
        return as_method(self.method.to_method())

    def model_config(self, vocab_size: int, mask_id: int | None) -> ModelConfig:
        return model_config_for(self.method_spec(), vocab_size=vocab_size, mask_id=mask_id,
                                length=self.data.length, **dataclasses.asdict(self.model))

    @property
    def world_size(self) -> int:
        return self.trainer.devices * self.trainer.num_nodes

    @property
    def micro_batch(self) -> int:
        t = self.trainer
        return t.micro_batch if t.micro_batch is not None else t.global_batch // self.world_size

    @property
    def accumulate(self) -> int:
        return self.trainer.global_batch // (self.micro_batch * self.world_size)

    def max_time(self) -> dt.timedelta | None:
        return parse_max_time(self.trainer.max_time)

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        """Check everything checkable without data or a model; raises ConfigError (one line)."""
        def req(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        self.method_spec()  # method name/keys, alpha0 and batch_split ranges, bd3lm block size
        m, d, o, t = self.model, self.data, self.optim, self.trainer
        # a throwaway vocabulary: checks heads | hidden, even head dim, dropout, bd3lm block | length
        self.model_config(vocab_size=8, mask_id=7)
        req(d.length >= 3, f"data.length must be at least 3, got {d.length}")
        req(d.mode in MODES, f"data.mode must be one of {', '.join(MODES)}, got {d.mode!r}")
        req(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
        req(d.max_documents is None or d.max_documents > 0, "data.max_documents must be positive")
        req(d.num_workers >= 0, "data.num_workers must be >= 0")
        req(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
        req(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas invalid: {o.betas}")
        req(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        req(o.schedule in ("constant", "cosine"),
            f"optim.schedule must be constant or cosine, got {o.schedule!r}")
        req(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
        req(o.grad_clip >= 0, "optim.grad_clip must be >= 0")
        req(0.0 <= o.ema < 1.0, f"optim.ema must be in [0, 1), got {o.ema}")
        req(m.dropout >= 0, "model.dropout must be >= 0")
        for k in ("global_batch", "devices", "num_nodes", "max_steps", "log_every"):
            req(getattr(t, k) > 0, f"trainer.{k} must be positive, got {getattr(t, k)}")
        req(t.micro_batch is None or t.micro_batch > 0, "trainer.micro_batch must be positive")
        req(t.val_every >= 0 and t.ckpt_every >= 0, "trainer.val_every / ckpt_every must be >= 0")
        req(t.keep_checkpoints == -1 or t.keep_checkpoints > 0, "trainer.keep_checkpoints must be -1 or > 0")
        req(t.global_batch % (self.micro_batch * self.world_size) == 0 and self.micro_batch > 0,
            f"trainer.global_batch ({t.global_batch}) must be a multiple of micro_batch ({self.micro_batch}) "
            f"x devices x nodes ({self.world_size})")
        req(t.precision in PRECISIONS, f"trainer.precision must be one of {PRECISIONS}, got {t.precision!r}")
        req(t.strategy in STRATEGIES, f"trainer.strategy must be one of {STRATEGIES}, got {t.strategy!r}")
        req(t.logger in LOGGERS, f"trainer.logger must be one of {LOGGERS}, got {t.logger!r}")
        req(t.accelerator in ACCELERATORS,
            f"trainer.accelerator must be one of {ACCELERATORS}, got {t.accelerator!r}")
        td = self.max_time()
        req(td is None or td.total_seconds() > 0, "trainer.max_time must be positive")
        return self


def parse_max_time(v) -> dt.timedelta | None:
    """``trainer.max_time`` as a timedelta: seconds or ``DD:HH:MM:SS`` (ConfigError otherwise)."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return dt.timedelta(seconds=float(v))
    parts = str(v).split(":")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        nums = []
    if not 1 <= len(nums) <= 4:
        raise ConfigError(f"trainer.max_time must be seconds or DD:HH:MM:SS, got {v!r}")
    nums = [0.0] * (4 - len(nums)) + nums
    return dt.timedelta(days=nums[0], hours=nums[1], minutes=nums[2], seconds=nums[3])


# -- applying dicts and overrides ----------------------------------------------------------------------------

def _type_ok(value, tp) -> tuple[bool, object]:
    """Check/coerce ``value`` against a dataclass field type (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for x in value:
            ok, v = _type_ok(x, inner)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    return True, value


def set_field(section, name: str, value, where: str) -> None:
    """Set config key ``where`` (``section.name``) to ``value`` after checking it against the field's type
    (ConfigError, one line); shared by the training and RL configs."""
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"unknown config key '{where}' (known in this section: {known})")
    ok, v = _type_ok(value, hints[name])
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(f"config key '{where}' expects {_type_name(hints[name])}, got {shown}")
    setattr(section, name, v)


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def apply_dict(cfg: RunConfig, d: dict, where: str = "") -> RunConfig:
    """Apply a nested dict (a preset file) onto ``cfg``; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(d).__name__}")
    for key, value in d.items():
        if key == "preset":
            cfg.preset = str(value)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{key}' must be a mapping")
            section = getattr(cfg, key)
            if key == "method" and "name" in value:
                section = MethodSection()
                cfg.method = section
            for name, v in value.items():
                set_field(section, name, v, f"{key}.{name}")
        else:
            raise ConfigError(f"unknown config section '{key}' (known: {', '.join(SECTIONS)})")
    return cfg


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if ":" in raw and re.fullmatch(r"[\d:.]+", raw.strip()):
        return key, raw.strip()  # DD:HH:MM:SS stays a string (YAML 1.1 would read it as base 60)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # also integers past Python's digit limit, deep nesting
        value = raw
    if isinstance(value, (dt.date, dt.datetime)):
        value = raw
    return key, value


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars/lists)."""
    parsed = [parse_override(o) for o in overrides]
    # method.name first: it resets the method section, then the other method keys apply on top
    parsed.sort(key=lambda kv: 0 if kv[0] == "method.name" else 1)
    for key, value in parsed:
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"unknown config key '{key}' (use section.key with section in "
                              f"{', '.join(SECTIONS)})")
        section, name = parts
        if section == "method" and name == "name":
            cfg.method = MethodSection()
        set_field(getattr(cfg, section), name, value, key)
    return cfg


def available_presets() -> list[str]:
    """Training presets (the ``rl-*`` files are RL configs, for ``esolm rl``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml") if not p.stem.startswith("rl-"))


def read_yaml(path: Path, what: str) -> dict:
    """A YAML mapping file (empty: {}); ConfigError (one line) when it does not parse."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start})") from None
    except (ValueError, RecursionError) as e:  # integers past Python's digit limit, nesting past the stack
        raise ConfigError(f"{what} {path} cannot be read: {type(e).__name__}: {str(e).split(':')[0][:100]}") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({e.strerror or type(e).__name__})") from None


def load_preset(name_or_path: str) -> RunConfig:
    """A preset by name (``esolm/presets/NAME.yaml``) or a YAML file path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        path = p
    else:
        path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            names = ", ".join(available_presets())
            raise ConfigError(f"unknown preset '{name_or_path}' (available: {names})")
    cfg = apply_dict(RunConfig(), read_yaml(path, "preset"))
    if cfg.preset == "custom":
        cfg.preset = path.stem
    return cfg


def resolve(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Preset + overrides, validated."""
    return apply_overrides(load_preset(preset), list(overrides)).validate()
