"""The LightningModule: one backbone + one objective, AdamW with warmup, exact global loss aggregation.

Randomness is a function of position, so resume is exact without storing RNG states. Micro-batch ``k``
of rank ``r`` draws

* its antithetic time offset ``u`` from a generator seeded with ``(seed, k)`` — the same on every rank, so
  the ranks' time slices form one stratified global batch;
* its masks and orders from a generator seeded with ``(seed, k, r, 3)`` — different on every rank;
* dropout from the global RNG seeded with ``(seed, k, r, 1)``.

A non-finite loss stops training before the step is applied, and weights that turn non-finite in an
optimizer step (a finite loss can still produce inf weights) stop it before anything of that step is saved:
:class:`~esolm.errors.NonFiniteLossError` either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from esolm.errors import NonFiniteLossError, UserError
from esolm.model.backbone import DiT
from esolm.objectives import LossOutput, build_objective
from esolm.recipes import RunConfig
from esolm.training.checkpoints import checkpoint_dir, kept_message

TERM_NAMES = ("ar", "mdm")


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs, processes and platforms)."""
    h = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def noise_generators(seed: int, k: int, rank: int, device=None) -> tuple[torch.Generator, torch.Generator]:
    """(time generator, noise generator) of training micro-batch ``k`` on ``rank``: the first is the same
    on every rank (antithetic times over the global batch), the second is the rank's own (masks, orders)."""
    times = torch.Generator(device=device).manual_seed(step_seed(seed, k, 0))
    noise = torch.Generator(device=device).manual_seed(step_seed(seed, k, rank, 3))
    return times, noise


def lr_factor(step: int, warmup: int, schedule: str, max_steps: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then constant, or cosine or linear decay to ``min_ratio`` at
    ``max_steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
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
    """One backbone + one objective; hyper-parameters are the plain-dict run config.

    The training loss is ``LossOutput.loss`` (per-token NELBO, low-var where the method asks for it);
    validation is the exact dataset NELBO (``LossOutput.merge`` over batches, summed over ranks) with
    ELBO weights."""

    def __init__(self, config: dict, vocab_size: int, mask_id: int | None, tokenizer_json: str = "",
                 tokenizer_meta: dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer_json"])
        cfg = RunConfig.from_dict(config)
        self._setup(cfg, DiT(cfg.model_config(vocab_size, mask_id)), tokenizer_json, tokenizer_meta)

    def _setup(self, cfg: RunConfig, model: torch.nn.Module, tokenizer_json: str, tokenizer_meta: dict | None) -> None:
        """The run's state around a built ``model`` (shared with :class:`esolm.training.adapt.LitAdapt`, whose
        network is a pretrained Llama)."""
        self.cfg = cfg
        self.method = self.cfg.method_spec()
        self.model = model
        self.objective = build_objective(self.method)
        self.tokenizer_json, self.tokenizer_meta = tokenizer_json, tokenizer_meta or {}
        self.consumed = 0            # micro-batches consumed (= position in the training stream)
        self._acc = LossOutput.zero()  # this optimizer step's loss terms (over accumulation)
        self._val = LossOutput.zero()
        self._tick: tuple[float, int] | None = None
        self._trace = None
        self._batch_sum = 0  # token-id checksum of this rank's micro-batches since the last step (trace)

    # training -----------------------------------------------------------------------------------
    def micro_batch_loss(self, batch: dict, k: int, rank: int, world_size: int) -> LossOutput:
        """The objective on training micro-batch ``k`` as rank ``rank`` of ``world_size`` draws it."""
        times, noise = noise_generators(self.cfg.trainer.seed, k, rank, self.device)
        return self.training_objective(k)(self.model, batch["input_ids"], batch["valid"], generator=noise,
                                          time_generator=times, rank=rank, world_size=world_size)

    def training_objective(self, k: int):
        """The objective of training micro-batch ``k`` (the method's; ``esolm adapt`` may ramp its alpha0)."""
        return self.objective

    def training_step(self, batch, batch_idx):
        k = self.consumed
        self.consumed += 1
        torch.manual_seed(step_seed(self.cfg.trainer.seed, k, self.global_rank, 1))  # dropout (per rank)
        self.objective.train()
        out = self.micro_batch_loss(batch, k, self.global_rank, self.trainer.world_size)
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
            raise NonFiniteLossError(f"non-finite training loss ({float(loss.detach())}) at step "
                                     f"{self.global_step + 1}; training stopped, the step was not applied; "
                                     f"{kept_message(checkpoint_dir(self.cfg.trainer.out_dir))}")
        if world > 1:
            loss = sum(out.terms[k][0] * (world / max(float(stats[i]), 1.0))
                       for i, k in enumerate(TERM_NAMES) if k in out.terms)
        self._acc = self._acc.merge(out.detach())
        self._batch_sum += int(batch["input_ids"].sum())
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then a check that every weight is still finite (identical on all ranks)."""
        super().optimizer_step(*args, **kwargs)
        params = dict(self.trained_parameters())
        if bool(torch.stack([torch.isfinite(p).all() for p in params.values()]).all()):
            return
        bad = [name for name, p in params.items() if not bool(torch.isfinite(p).all())]
        raise NonFiniteLossError(f"non-finite weights after optimizer step {self.global_step + 1} "
                                 f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); training stopped, "
                                 f"nothing of this step was saved; "
                                 f"{kept_message(checkpoint_dir(self.cfg.trainer.out_dir))}")

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

    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every weight the optimizer updates (all of a DiT's; a frozen base's are left out)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

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
        self._batch_sum = 0

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
        opt = torch.optim.AdamW([p for _, p in self.trained_parameters()], lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                weight_decay=o.weight_decay)

        def factor(step: int) -> float:
            return lr_factor(step, o.warmup_steps, o.schedule, t.max_steps, o.min_lr_ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # checkpoint extras ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["esolm"] = {"consumed": self.consumed, "method": self.method.to_dict(),
                               "model_config": self.model.config.to_dict(),
                               "tokenizer_json": self.tokenizer_json, "tokenizer_meta": self.tokenizer_meta}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.consumed = int(checkpoint["esolm"]["consumed"])
