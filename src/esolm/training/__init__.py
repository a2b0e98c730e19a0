"""Lightning training for every esolm objective (Eso-LM A/B, MDLM, AR, BD3-LM).

The pieces, in the order a run uses them (:func:`train`):

* data — :func:`esolm.data.build_datasets` (tokenised, cached, packed) and :class:`EsoLMData`, whose
  training loader is an endless :class:`~esolm.data.ResumableBatchSampler` stream: the position in the
  stream is the number of micro-batches consumed, saved in every checkpoint, so resuming continues with
  exactly the next batch;
* :class:`LitEsoLM` — the backbone and ``build_objective(method)``; AdamW with linear warmup then a
  constant or cosine learning rate; the training loss is ``LossOutput.loss`` (per-token NELBO, low-var
  where the method asks for it); validation is the exact dataset NELBO (``LossOutput.merge`` over batches,
  summed over ranks) with ELBO weights, evaluated on the EMA weights;
* randomness is a function of position: micro-batch ``k`` draws its noise from a generator seeded with
  ``(seed, k)`` — the same on every rank, as antithetic time sampling over the global batch requires — and
  dropout from the global RNG seeded with ``(seed, k, rank)``. Resume is therefore exact without storing
  RNG states;
* :class:`EMA` — Lightning's weight-averaging callback with an exponential moving average; the EMA
  weights are used for validation, stored as the checkpoint's ``state_dict`` (the raw weights as
  ``current_model_state``) and exported;
* :class:`AtomicCheckpointIO` — checkpoints are written to a temporary file, fsynced and renamed, and
  always read with ``torch.load(weights_only=True)``; everything saved is plain tensors, numbers and
  strings. A non-finite loss stops training with :class:`NonFiniteLossError` before the bad step is
  applied, so the last checkpoint is the last good state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from esolm.data import DataSplits, ResumableBatchSampler, build_datasets, default_cache_dir
from esolm.data.tokenizers import Tokenizer, get_tokenizer
from esolm.errors import CheckpointError, ConfigError, NonFiniteLossError, UserError
from esolm.methods import Method, as_method
from esolm.model.backbone import DiT
from esolm.objectives import LossOutput, build_objective
from esolm.recipes import RunConfig

TERM_NAMES = ("ar", "mdm")




def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs, processes and platforms)."""
    h = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


# -- checkpoints ---------------------------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` with a one-line error for missing/truncated/corrupted files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means a bad file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({msg[:160]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an esolm training checkpoint")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``.NAME.tmp<pid>`` in the same folder, fsync, ``os.replace``; load with weights_only=True.

    (Lightning's own writer goes through an fsspec transaction: for a local path fsspec writes a temporary
    file in the *system* temp directory and ``shutil.move``s it into place — a non-atomic copy when that
    directory is on another filesystem — and never fsyncs. This one stays in the target folder, so the
    rename is atomic, and fsyncs file and folder: the old file is intact until the new one is complete.)
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path)


class EMA(WeightAveraging):
    """Exponential moving average of the weights after every optimizer step (foreach update)."""

    def __init__(self, decay: float):
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay

    def should_update(self, step_idx=None, epoch_idx=None) -> bool:
        return step_idx is not None

    def on_train_end(self, trainer, pl_module) -> None:
        """Keep the raw weights in the module at the end of ``fit``: the final ``last.ckpt`` (written after
        this hook) must hold them as ``current_model_state`` to stay resumable. Validation and checkpoints
        still swap in the EMA weights."""


class Checkpoints(ModelCheckpoint):
    """Periodic ``stepNNNNNNNN.ckpt`` plus ``last.ckpt``, and ``last.ckpt`` again when training ends at a
    step that was not saved yet (``max_time``, ``max_steps`` between two periodic saves)."""

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# -- the LightningModule -------------------------------------------------------------------------------------

def lr_factor(step: int, warmup: int, schedule: str, max_steps: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then constant or cosine decay to ``min_ratio`` at ``max_steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def reduce_loss(out: LossOutput, strategy) -> LossOutput:
    """Sum every term's (NLL, tokens) over all ranks (exact global aggregation)."""
    extra = sorted(set(out.terms) - set(TERM_NAMES))
    if extra:
        raise UserError(f"unexpected loss terms {extra}")
    vec = torch.zeros(2 * len(TERM_NAMES), dtype=torch.float64)
    for i, k in enumerate(TERM_NAMES):
        if k in out.terms:
            nll, n = out.terms[k]
            vec[2 * i], vec[2 * i + 1] = float(nll), float(n)
    if strategy is not None and strategy.world_size > 1:
        vec = strategy.reduce(vec.to(strategy.root_device), reduce_op="sum").cpu()
    return LossOutput({k: (vec[2 * i], vec[2 * i + 1].round().long()) for i, k in enumerate(TERM_NAMES)
                       if vec[2 * i + 1] > 0})


class LitEsoLM(pl.LightningModule):
    """One backbone + one objective; hyper-parameters are the plain-dict run config."""

    def __init__(self, config: dict, vocab_size: int, mask_id: int | None, tokenizer_json: str = "",
                 tokenizer_meta: dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer_json"])
        self.cfg = RunConfig.from_dict(config)
        self.method = self.cfg.method_spec()
        self.model = DiT(self.cfg.model_config(vocab_size, mask_id))
        self.objective = build_objective(self.method)
        self.tokenizer_json, self.tokenizer_meta = tokenizer_json, tokenizer_meta or {}
        self.consumed = 0            # micro-batches consumed (= position in the training stream)
        self._acc = LossOutput.zero()  # this optimizer step's loss terms (over accumulation)
        self._val = LossOutput.zero()
        self._tick: tuple[float, int] | None = None
        self._trace = None
        self._batch_sum = 0  # token-id checksum of this rank's micro-batches since the last step (trace)

    # training -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        k = self.consumed
        self.consumed += 1
        seed = self.cfg.trainer.seed
        torch.manual_seed(step_seed(seed, k, self.global_rank, 1))  # dropout (per rank)
        gen = torch.Generator(device=self.device).manual_seed(step_seed(seed, k, 0))  # same on every rank
        self.objective.train()
        out = self.objective(self.model, batch["input_ids"], batch["valid"], generator=gen,
                             rank=self.global_rank, world_size=self.trainer.world_size)
        loss = out.loss
        # One all-reduce: each term's token count over all ranks, and a non-finite flag. Normalising every
        # term by its global count (times world size, as DDP averages gradients) makes the gradient that of
        # the per-token loss of the whole global batch, padding included, exactly as in one process.
        world = self.trainer.world_size
        stats = torch.tensor([float(out.terms[k][1]) if k in out.terms else 0.0 for k in TERM_NAMES]
                             + [0.0 if torch.isfinite(loss.detach()).item() else 1.0], dtype=torch.float64)
        if world > 1:
            stats = self.trainer.strategy.reduce(stats.to(self.device), reduce_op="sum").cpu()
        if stats[-1].item() > 0:
            last = Path(self.cfg.trainer.out_dir) / "checkpoints" / "last.ckpt"
            kept = f"last good checkpoint kept: {last}" if last.is_file() else "no checkpoint was written yet"
            raise NonFiniteLossError(f"non-finite training loss ({float(loss.detach())}) at step "
                                     f"{self.global_step + 1}; training stopped, the step was not applied; {kept}")
        if world > 1:
            loss = sum(out.terms[k][0] * (world / max(float(stats[i]), 1.0))
                       for i, k in enumerate(TERM_NAMES) if k in out.terms)
        self._acc = self._acc.merge(out.detach())
        self._batch_sum += int(batch["input_ids"].sum())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.consumed % self.cfg.accumulate:
            return
        glob = reduce_loss(self._acc, self.trainer.strategy)
        self._acc = LossOutput.zero()
        loss = float(glob.loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, rank_zero_only=True)
        for k, (nll, n) in glob.terms.items():
            self.log(f"train/{k}_nll", float(nll) / max(int(n), 1), on_step=True, rank_zero_only=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, rank_zero_only=True)
        now, tokens = time.perf_counter(), self.cfg.trainer.global_batch * self.cfg.data.length
        if self._tick is not None:
            dt, steps = now - self._tick[0], self.global_step - self._tick[1]
            if dt > 0 and steps > 0:
                self.log("tok_s", tokens * steps / dt, prog_bar=True, on_step=True, rank_zero_only=True)
        self._tick = (now, self.global_step)
        if self.cfg.trainer.trace:
            self._write_trace({"step": self.global_step, "consumed": self.consumed, "loss": loss,
                               "params": self.param_fingerprint(), "batch_sum": self._batch_sum})
        self._batch_sum = 0

    def param_fingerprint(self) -> str:
        h = hashlib.sha1()
        for p in self.model.parameters():
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def _write_trace(self, rec: dict) -> None:
        if self._trace is None:
            path = Path(f"{self.cfg.trainer.trace}.rank{self.global_rank}")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._trace = open(path, "a", buffering=1)  # noqa: SIM115 - closed on teardown
        self._trace.write(json.dumps(rec) + "\n")

    def teardown(self, stage: str) -> None:
        if self._trace is not None:
            self._trace.close()
            self._trace = None
        self._batch_sum = 0  # token-id checksum of this rank's micro-batches since the last step (trace)

    # validation ---------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = LossOutput.zero()
        self.objective.eval()

    def validation_step(self, batch, batch_idx) -> None:
        gen = torch.Generator(device=self.device).manual_seed(
            step_seed(self.cfg.trainer.seed, batch_idx, self.global_rank, 2))
        out = self.objective(self.model, batch["input_ids"], batch["valid"], generator=gen)
        self._val = self._val.merge(out.detach())

    def on_validation_epoch_end(self) -> None:
        glob = reduce_loss(self._val, self.trainer.strategy)
        self.objective.train()
        if not glob.terms:
            return
        nelbo = float(glob.loss)
        self.log("val/nelbo", nelbo, prog_bar=True, rank_zero_only=True)
        self.log("val/ppl", math.exp(min(nelbo, 80.0)), rank_zero_only=True)
        for k, (nll, n) in glob.terms.items():
            self.log(f"val/{k}_nll", float(nll) / max(int(n), 1), rank_zero_only=True)
            self.log(f"val/{k}_tokens", float(n), rank_zero_only=True)

    # optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self):
        o, t = self.cfg.optim, self.cfg.trainer
        opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                weight_decay=o.weight_decay)

        def factor(step: int) -> float:
            return lr_factor(step, o.warmup_steps, o.schedule, t.max_steps, o.min_lr_ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # checkpoint extras ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["esolm"] = {"consumed": self.consumed, "method": self.method.to_dict(),
                               "tokenizer_json": self.tokenizer_json, "tokenizer_meta": self.tokenizer_meta}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.consumed = int(checkpoint["esolm"]["consumed"])


# -- data module ---------------------------------------------------------------------------------------------

class EsoLMData(pl.LightningDataModule):
    """Training stream (resumable, sharded by rank) and validation split (each rank a disjoint slice)."""

    def __init__(self, cfg: RunConfig, splits: DataSplits):
        super().__init__()
        self.cfg, self.splits = cfg, splits

    def train_dataloader(self):
        t = self.trainer
        start = t.lightning_module.consumed if t is not None else 0
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        sampler = ResumableBatchSampler(len(self.splits.train), self.cfg.micro_batch, seed=self.cfg.trainer.seed,
                                        rank=rank, world_size=world, start=start)
        return torch.utils.data.DataLoader(self.splits.train, batch_sampler=sampler,
                                           num_workers=self.cfg.data.num_workers)

    def val_dataloader(self):
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        rows = list(range(rank, len(self.splits.validation), world))
        return torch.utils.data.DataLoader(torch.utils.data.Subset(self.splits.validation, rows),
                                           batch_size=self.cfg.micro_batch, shuffle=False,
                                           num_workers=self.cfg.data.num_workers)


# -- assembling a run ----------------------------------------------------------------------------------------

@dataclass
class Prepared:
    cfg: RunConfig
    tokenizer: Tokenizer
    splits: DataSplits
    ckpt_path: str | None


def resolve_resume(cfg: RunConfig) -> str | None:
    r = cfg.trainer.resume
    if r is None or r == "none":
        return None
    if r == "auto":
        last = Path(cfg.trainer.out_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(r).is_file():
        raise CheckpointError(f"checkpoint to resume from not found: {r}")
    return r


def check_resumable(ckpt_path: str, cfg: RunConfig) -> None:
    """Read the checkpoint (weights_only) and check it belongs to this model/method/data layout."""
    ckpt = read_checkpoint(ckpt_path)
    try:
        old = ckpt["hyper_parameters"]["config"]
        ckpt["esolm"]["consumed"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{ckpt_path} is not an esolm training checkpoint") from None
    new = cfg.to_dict()
    for key in ("model", "method"):
        if old[key] != new[key]:
            raise CheckpointError(f"{ckpt_path} was trained with {key} {old[key]}, not {new[key]}")
    for key in ("tokenizer", "length", "source"):
        if old["data"][key] != new["data"][key]:
            raise CheckpointError(f"{ckpt_path} was trained with data.{key}={old['data'][key]!r}, "
                                  f"not {new['data'][key]!r}")


def prepare(cfg: RunConfig) -> Prepared:
    """Everything that can fail on user input, before any training work: config, resume checkpoint, data."""
    cfg.validate()
    if cfg.trainer.strategy == "fsdp" and cfg.optim.ema > 0:
        raise ConfigError("EMA (optim.ema > 0) is not supported with strategy=fsdp; set optim.ema=0")
    import importlib.util

    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(cfg.trainer.logger, ())
    if needs and not any(importlib.util.find_spec(m) for m in needs):
        raise ConfigError(f"trainer.logger={cfg.trainer.logger} needs 'pip install {needs[0]}'")
    ckpt_path = resolve_resume(cfg)
    if ckpt_path is not None:
        check_resumable(ckpt_path, cfg)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    cache = cfg.data.cache_dir or default_cache_dir()
    need = cfg.micro_batch * cfg.world_size
    splits = build_datasets(cfg.data.source, tokenizer, cfg.data.length, cfg.data.mode, cfg.data.val_fraction,
                            cfg.data.split_seed, cfg.data.max_documents, cache, min_train_sequences=need)
    return Prepared(cfg, tokenizer, splits, ckpt_path)


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
    ckpt_dir = Path(t.out_dir) / "checkpoints"
    keep = t.keep_checkpoints
    cbs = [Checkpoints(dirpath=ckpt_dir, filename="step{step:08d}", auto_insert_metric_name=False,
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


def train(cfg: RunConfig, callbacks: list | tuple = (), prepared: Prepared | None = None) -> LitEsoLM:
    """Train (or resume) a run, then validate once more (EMA weights) and write ``OUT/final_metrics.json``.

    Returns the module (raw weights; the EMA weights are in the checkpoints)."""
    p = prepared or prepare(cfg)
    pl.seed_everything(cfg.trainer.seed, verbose=False)  # initial weights
    module = LitEsoLM(cfg.to_dict(), p.tokenizer.vocab_size, p.tokenizer.mask_id if cfg.method.name != "ar"
                      else None, p.tokenizer.backend.to_str(), p.tokenizer.meta())
    trainer = build_trainer(cfg, callbacks)
    if trainer.is_global_zero:
        out = Path(cfg.trainer.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")
        data = EsoLMData(cfg, p.splits)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=data, ckpt_path=p.ckpt_path, weights_only=True)
        elapsed = time.perf_counter() - t0
        final = {"step": trainer.global_step, "tokens_seen": module.consumed * cfg.micro_batch * cfg.world_size
                 * cfg.data.length, "fit_seconds": round(elapsed, 1)}
        if cfg.trainer.val_every > 0:
            metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
            final.update({k.replace("/", "_"): float(v) for k, v in metrics.items()})
    if trainer.is_global_zero:
        path = Path(cfg.trainer.out_dir) / "final_metrics.json"
        path.write_text(json.dumps(final, indent=2) + "\n")
        if "val_nelbo" in final:
            print(f"final validation (EMA weights) at step {final['step']}: NELBO {final['val_nelbo']:.4f} "
                  f"nats/token, perplexity <= {final['val_ppl']:.2f}")
    return module


# -- export ----------------------------------------------------------------------------------------------------

def model_from_checkpoint(path: str | os.PathLike) -> tuple[DiT, Method, Tokenizer, dict]:
    """(DiT with the EMA weights, method dict, tokenizer, run config dict) of a training checkpoint."""
    from tokenizers import Tokenizer as HFTokenizer

    ckpt = read_checkpoint(path)
    try:
        hp, extra = ckpt["hyper_parameters"], ckpt["esolm"]
        cfg = RunConfig.from_dict(hp["config"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{path} is not an esolm training checkpoint") from None
    model = DiT(cfg.model_config(hp["vocab_size"], hp["mask_id"]))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    meta = extra["tokenizer_meta"]
    tok = Tokenizer(HFTokenizer.from_str(extra["tokenizer_json"]), meta["name"], meta["mask_id"],
                    meta["eos_id"], meta["bos_id"], meta.get("pad_id"))
    return model.eval(), as_method(extra["method"]), tok, hp["config"]
