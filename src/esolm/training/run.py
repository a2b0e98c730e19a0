"""Assembling and running a training run: :func:`prepare` (every check, before any work), :func:`train`.

:func:`prepare` fails with a one-line :class:`~esolm.errors.EsoLMError` on anything checkable up front: the
config, the machine (accelerator and device count), the output folder (a file, read-only), the resume
checkpoint (unreadable, another model/method/data, or overrides that would silently not apply) and the data.
Keys in :data:`RESUME_MAY_CHANGE` may differ from the checkpoint's config on resume; they are applied and
logged, and ``OUT/config.yaml`` always records the config that ran.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from esolm.data import DataSplits, build_datasets, default_cache_dir
from esolm.data.tokenizers import Tokenizer, get_tokenizer
from esolm.errors import CheckpointError, ConfigError, UserError
from esolm.io.atomic import atomic_write, check_writable
from esolm.io.weights import available_memory, parameter_count
from esolm.recipes import RunConfig
from esolm.training.callbacks import EMA, InterruptWatch
from esolm.training.checkpoints import (
    AtomicCheckpointIO,
    Checkpoints,
    checkpoint_dir,
    clean_orphans,
    last_checkpoint,
    read_checkpoint,
)
from esolm.training.datamodule import EsoLMData
from esolm.training.module import LitEsoLM

# Config keys that may differ from the checkpoint's on resume: how long to train, cadence, outputs, logging,
# and where things are; none changes what a step computes (the cosine schedule follows trainer.max_steps).
RESUME_MAY_CHANGE = frozenset({
    "preset", "trainer.out_dir", "trainer.resume", "trainer.max_steps", "trainer.max_time",
    "trainer.val_every", "trainer.val_batches", "trainer.ckpt_every", "trainer.keep_checkpoints",
    "trainer.log_every", "trainer.logger", "trainer.progress", "trainer.trace", "trainer.accelerator",
    "data.cache_dir", "data.num_workers",
})


@dataclass
class Prepared:
    cfg: RunConfig
    tokenizer: Tokenizer
    splits: DataSplits
    ckpt_path: str | None
    changes: dict[str, tuple] = field(default_factory=dict)  # allowed key -> (checkpoint's value, new value)


# -- checks before any work ----------------------------------------------------------------------------------

def available_devices(accelerator: str) -> tuple[str, int]:
    """(kind, count) of the devices ``trainer.accelerator`` would use on this machine (count 0: none)."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = int(torch.backends.mps.is_available())
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda):
        if cuda or accelerator == "cuda":
            return "CUDA GPU", cuda
        return "GPU", mps
    if accelerator == "mps" or (accelerator == "auto" and mps):
        return "MPS GPU", mps
    return "CPU core", os.cpu_count() or 1


TRAINING_COPIES = 5  # weights, gradients, AdamW's two moments, EMA: float32 copies of every parameter


def check_memory(cfg: RunConfig, tokenizer: Tokenizer) -> None:
    """Refuse a model whose float32 training state (weights, gradients, optimizer moments, EMA) cannot fit in
    the available host memory, before anything is allocated (the parameter count comes from the meta device)."""
    mcfg = cfg.model_config(tokenizer.vocab_size, tokenizer.mask_id if cfg.method_spec().is_diffusion else None)
    params = parameter_count(mcfg)
    need = 4 * TRAINING_COPIES * params
    avail = available_memory()
    if avail is not None and need > avail:
        raise ConfigError(
            f"the model has {params:,} parameters: weights, gradients, optimizer state and EMA need "
            f"{need / (1 << 30):.1f} GiB as float32, but only {avail / (1 << 30):.1f} GiB of memory is available")


def check_machine(cfg: RunConfig) -> None:
    """The accelerator exists here and has ``trainer.devices`` devices."""
    t = cfg.trainer
    kind, count = available_devices(t.accelerator)
    if count == 0:
        raise ConfigError(f"trainer.accelerator={t.accelerator} but this machine has no {kind}; "
                          f"use trainer.accelerator=cpu (or auto)")
    if t.devices > count:
        raise ConfigError(f"trainer.devices={t.devices} but this machine has {count} {kind}"
                          f"{'s' if count != 1 else ''} for trainer.accelerator={t.accelerator}")


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """``out_dir`` and its checkpoint folder are (or can be created as) writable folders."""
    for path in (Path(out_dir), checkpoint_dir(out_dir)):
        try:
            check_writable(path, folder=True)
        except UserError as e:
            raise UserError(f"trainer.out_dir: {e}") from None


def resolve_resume(cfg: RunConfig) -> str | None:
    r = cfg.trainer.resume
    if r is None or r == "none":
        return None
    if r == "auto":
        last = last_checkpoint(cfg.trainer.out_dir)
        return str(last) if last.is_file() else None
    if not Path(r).is_file():
        raise CheckpointError(f"checkpoint to resume from not found: {r}")
    return r


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(ckpt_path: str, cfg: RunConfig, *, may_change: frozenset[str] = RESUME_MAY_CHANGE,
                   what: str = "an esolm training checkpoint",
                   fresh: str = "trainer.resume=null or another trainer.out_dir") -> dict[str, tuple]:
    """The config keys that differ from the checkpoint's, all in ``may_change`` (else ConfigError).

    ``cfg`` is any config with ``to_dict`` and a ``from_dict`` class method (:class:`RunConfig`, or
    :class:`esolm.training.adapt.AdaptConfig` with ``what``/``fresh`` naming its own kind and flags)."""
    ckpt = read_checkpoint(ckpt_path)
    try:
        old = type(cfg).from_dict(ckpt["hyper_parameters"]["config"])
        int(ckpt["esolm"]["consumed"])
    except (KeyError, TypeError, ConfigError):
        raise CheckpointError(f"{ckpt_path} is not {what}") from None
    a, b = _flat(old.to_dict()), _flat(cfg.to_dict())
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    refused = [f"{k}: {o!r} -> {n!r}" for k, (o, n) in changed.items() if k not in may_change]
    if refused:
        raise ConfigError(f"cannot resume from {ckpt_path} with a different config ({', '.join(refused)}); "
                          f"drop these overrides, or start a fresh run ({fresh})")
    return changed


def prepare(cfg: RunConfig) -> Prepared:
    """Everything that can fail on user input, before any training work: config, machine, output folder,
    resume checkpoint, data."""
    cfg.validate()
    if cfg.trainer.strategy == "fsdp" and cfg.optim.ema > 0:
        raise ConfigError("EMA (optim.ema > 0) is not supported with strategy=fsdp; set optim.ema=0")
    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(cfg.trainer.logger, ())
    if needs and not any(importlib.util.find_spec(m) for m in needs):
        raise ConfigError(f"trainer.logger={cfg.trainer.logger} needs 'pip install {needs[0]}'")
    check_machine(cfg)
    check_out_dir(cfg.trainer.out_dir)
    ckpt_path = resolve_resume(cfg)
    changes = resume_changes(ckpt_path, cfg) if ckpt_path is not None else {}
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    check_memory(cfg, tokenizer)
    cache = cfg.data.cache_dir or default_cache_dir()
    need = cfg.micro_batch * cfg.world_size
    splits = build_datasets(cfg.data.source, tokenizer, cfg.data.length, cfg.data.mode, cfg.data.val_fraction,
                            cfg.data.split_seed, cfg.data.max_documents, cache, min_train_sequences=need)
    return Prepared(cfg, tokenizer, splits, ckpt_path, changes)


# -- the trainer ---------------------------------------------------------------------------------------------

def build_loggers(cfg: RunConfig) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    out, kind = cfg.trainer.out_dir, cfg.trainer.logger
    if kind == "none":
        return []
    loggers = [CSVLogger(out, name="logs")]  # logs/version_N: a resumed run gets its own file
    if kind == "tensorboard":
        loggers.append(TensorBoardLogger(out, name="tb"))
    elif kind == "wandb":
        loggers.append(WandbLogger(project="esolm", name=cfg.preset, save_dir=out))
    return loggers


def build_trainer(cfg: RunConfig, callbacks: list | tuple = ()) -> pl.Trainer:
    t, o = cfg.trainer, cfg.optim
    keep = t.keep_checkpoints
    cbs = [Checkpoints(dirpath=checkpoint_dir(t.out_dir), filename="step{step:08d}", auto_insert_metric_name=False,
                       every_n_train_steps=t.ckpt_every or None, save_last=True,
                       save_top_k=-1 if keep == -1 else keep, monitor=None if keep == -1 else "step",
                       mode="max", save_on_train_epoch_end=False, enable_version_counter=False)]
    if o.ema > 0:
        cbs.append(EMA(o.ema))
    if t.progress:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, min(t.log_every, 10))))
    cbs.extend(callbacks)
    val = t.val_every > 0
    return pl.Trainer(
        default_root_dir=t.out_dir, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=t.strategy, precision=t.precision, max_steps=t.max_steps, max_time=cfg.max_time(),
        max_epochs=-1, accumulate_grad_batches=cfg.accumulate,
        gradient_clip_val=o.grad_clip if o.grad_clip > 0 else None,
        val_check_interval=(t.val_every * cfg.accumulate) if val else None, check_val_every_n_epoch=None,
        limit_val_batches=(t.val_batches if t.val_batches is not None else 1.0) if val else 0,
        num_sanity_val_steps=0, log_every_n_steps=t.log_every, logger=build_loggers(cfg) or False,
        callbacks=cbs, plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,
        enable_progress_bar=t.progress, enable_model_summary=t.progress,
    )


def write_text(path: Path, text: str) -> None:
    try:
        atomic_write(path, text)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e})") from None


def fit(cfg: RunConfig, module: LitEsoLM, splits: DataSplits, ckpt_path: str | None,
        changes: dict[str, tuple] | None = None, callbacks: list | tuple = (), config_yaml: str | None = None,
        ) -> tuple[pl.Trainer, dict]:
    """Train (or resume) ``module`` on ``splits``, then validate once more (EMA weights): the loop of
    :func:`train`, shared with ``esolm adapt``. Writes ``OUT/config.yaml`` (``config_yaml``, default
    ``cfg.to_yaml()``) and removes orphaned checkpoint temporaries first. Returns the trainer and the final
    metrics (``step``, ``tokens_seen``, ``fit_seconds``, ``val_*``). Ctrl-C stops training with
    KeyboardInterrupt (the checkpoints on disk stay complete)."""
    watch = InterruptWatch()
    trainer = build_trainer(cfg, [*callbacks, watch])
    out = Path(cfg.trainer.out_dir)
    if trainer.is_global_zero:
        for key, (old, new) in (changes or {}).items():
            rank_zero_info(f"resuming {ckpt_path} with {key} changed: {old!r} -> {new!r}")
        for orphan in clean_orphans(checkpoint_dir(out)):
            rank_zero_info(f"removed {orphan}, left by a checkpoint writer that was killed")
        write_text(out / "config.yaml", config_yaml if config_yaml is not None else cfg.to_yaml())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")
        data = EsoLMData(cfg, splits)
        t0, on_sigint = time.perf_counter(), signal.getsignal(signal.SIGINT)
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        except SystemExit:
            if watch.interrupted:  # Lightning ignores SIGINT from then on and turns Ctrl-C into sys.exit(1)
                signal.signal(signal.SIGINT, on_sigint)
                raise KeyboardInterrupt from None
            raise
        elapsed = time.perf_counter() - t0
        final = {"step": trainer.global_step, "tokens_seen": module.consumed * cfg.micro_batch * cfg.world_size
                 * cfg.data.length, "fit_seconds": round(elapsed, 1)}
        if cfg.trainer.val_every > 0:
            metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
            final.update({k.replace("/", "_"): float(v) for k, v in metrics.items()})
    return trainer, final


def train(cfg: RunConfig, callbacks: list | tuple = (), prepared: Prepared | None = None) -> LitEsoLM:
    """Train (or resume) a run, then validate once more (EMA weights) and write ``OUT/final_metrics.json``.

    Returns the module (raw weights; the EMA weights are in the checkpoints). Ctrl-C stops training with
    KeyboardInterrupt (the checkpoints on disk stay complete)."""
    p = prepared or prepare(cfg)
    pl.seed_everything(cfg.trainer.seed, verbose=False)  # initial weights
    module = LitEsoLM(cfg.to_dict(), p.tokenizer.vocab_size, p.tokenizer.mask_id if cfg.method_spec().is_diffusion
                      else None, p.tokenizer.backend.to_str(), p.tokenizer.meta())
    trainer, final = fit(cfg, module, p.splits, p.ckpt_path, p.changes, callbacks)
    if trainer.is_global_zero:
        write_text(Path(cfg.trainer.out_dir) / "final_metrics.json", json.dumps(final, indent=2) + "\n")
        if "val_nelbo" in final:
            print(f"final validation (EMA weights) at step {final['step']}: NELBO {final['val_nelbo']:.4f} "
                  f"nats/token, perplexity <= {final['val_ppl']:.2f}")
    return module
