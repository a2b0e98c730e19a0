"""Assembling and running an RL run: :func:`prepare_rl` (every check, before any work), :func:`train_rl`.

An RL run writes ``OUT/config.yaml``, ``OUT/checkpoints/{stepNNNNNNNN,last}.ckpt`` (atomic, at RL-iteration
boundaries, resumable exactly: rollouts are a function of ``(seed, iteration)``), ``OUT/logs`` (CSV: reward,
accuracy, loss, clip fraction, KL, timings per optimizer step), ``OUT/eval.jsonl`` (held-out accuracy before,
during and after), ``OUT/final_metrics.json`` and the final policy exported to ``OUT/policy`` (load it with
``esolm.load_pretrained`` / ``esolm eval-task`` / ``esolm sample``).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from esolm.errors import ConfigError, UserError
from esolm.io import load_model
from esolm.io.atomic import atomic_write
from esolm.io.pretrained import LoadedModel, ModelNotFound, resolve_model, save_pretrained
from esolm.recipes import parse_max_time
from esolm.rl.config import RLConfig, apply_dict, check_eval_prompts, upgrade_legacy
from esolm.rl.grpo import LitGRPO, check_pass_at, evaluate_prompts
from esolm.rl.prompts import PromptSource, encode_prompts, prompt_source
from esolm.rl.rewards import DEFAULT_REWARD_TIMEOUT
from esolm.rl.trajectory import check_likelihood, check_rollout_memory
from esolm.sampling.params import SamplingParams, check_integer
from esolm.training.checkpoints import AtomicCheckpointIO, Checkpoints, checkpoint_dir, clean_orphans, read_checkpoint
from esolm.training.run import available_devices, build_loggers, check_machine, check_out_dir, resolve_resume

EVAL_BATCH = 64  # held-out prompts decoded per sampler batch


@dataclass
class PreparedRL:
    cfg: RLConfig
    loaded: LoadedModel
    source: PromptSource
    ckpt_path: str | None


def load_policy(name_or_path: str, device=None) -> LoadedModel:
    """The starting policy, by any name :func:`esolm.io.load_model` resolves (a path, a shipped model's name, a
    Hub repo id: :func:`esolm.io.pretrained.resolve_model`); a missing one names the command that makes it."""
    try:
        resolve_model(name_or_path)
    except ModelNotFound as e:
        raise UserError(f"policy {name_or_path} not found: make it first (for a shipped task: esolm train "
                        f"task-TASK, see the README), or set policy=PATH ({e})") from None
    loaded = load_model(name_or_path, device=device)
    if loaded.tokenizer is None:
        raise UserError(f"policy {name_or_path} has no tokenizer saved with it; RL needs one to read prompts and "
                        f"rewards")
    return loaded


def check_prompts(source: PromptSource, loaded: LoadedModel) -> None:
    """Every prompt of a prompt file (two of a shipped task, whose prompts all have one width) encodes as plain
    text and leaves room for a completion in the policy's length (UserError, one line, otherwise)."""
    length = loaded.model.config.length
    prompts = source.pool if source.pool is not None else source.train(2, 0)
    for p, ids in zip(prompts, encode_prompts(loaded.tokenizer, prompts)):
        if len(ids) >= length:
            raise UserError(f"prompt {p[:40]!r} is {len(ids)} tokens with BOS, leaving no completion in the "
                            f"policy's length {length}")


def resolve_params(params: SamplingParams, loaded: LoadedModel, where: str = "") -> SamplingParams:
    """``params`` checked against the policy's method and length (steps at most
    :func:`~esolm.sampling.params.max_steps`, alpha0 only for Eso-LM); ``where`` prefixes the error."""
    try:
        return params.resolve(loaded.method, loaded.model.config.length)
    except UserError as e:
        raise UserError(f"{where}{e}") from None


def run_device(accelerator: str) -> str:
    """The device type ``trainer.accelerator`` trains on here (for memory checks)."""
    kind, _ = available_devices(accelerator)
    return "cuda" if kind.startswith("CUDA") else "mps" if kind.startswith(("MPS", "GPU")) else "cpu"


def prepare_rl(cfg: RLConfig) -> PreparedRL:
    """Config, machine, output folder, resume checkpoint, policy, likelihood/method, prompts and reward:
    everything that can fail on user input, before any work."""
    cfg.validate()
    check_machine(cfg)
    check_out_dir(cfg.trainer.out_dir)
    ckpt = resolve_resume(cfg)
    if ckpt is not None:
        old = read_checkpoint(ckpt).get("hyper_parameters", {}).get("config")
        if not isinstance(old, dict) or "rl" not in old:
            raise ConfigError(f"{ckpt} is not an esolm RL checkpoint; use another trainer.out_dir")
        keep = {"trainer", "preset"}
        old = upgrade_legacy({k: v for k, v in old.items() if k != "trainer"})  # keys renamed since: today's names
        now, then = cfg.to_dict(), apply_dict(RLConfig(), old).to_dict()
        diff = sorted(k for k in now if k not in keep and now[k] != then[k])  # keys added since: their defaults
        if diff:
            raise ConfigError(f"cannot resume {ckpt} with a different config ({', '.join(diff)}); start a fresh "
                              f"run (trainer.resume=null or another trainer.out_dir)")
    loaded = load_policy(cfg.policy)
    check_likelihood(cfg.rl.likelihood, loaded.method)
    t, rl = cfg.task, cfg.rl
    source = prompt_source(t.name, t.prompts, t.reward, t.reward_timeout, t.prompt_style)
    source.check_held_out(t.eval_prompts, "task.eval_prompts", t.eval_split)
    resolve_params(SamplingParams.from_rl(rl), loaded, "rl.")
    check_prompts(source, loaded)
    device = run_device(cfg.trainer.accelerator)
    config = loaded.model.config
    check_rollout_memory(config, rl.prompts_per_step * rl.group_size, device, "rl.prompts_per_step x rl.group_size")
    check_rollout_memory(config, min(t.eval_prompts, EVAL_BATCH), device, "a held-out evaluation batch")
    probe = source.train(2, 0)
    source.rewards(probe, ["" for _ in probe])  # the reward function runs, before any work
    return PreparedRL(cfg, loaded, source, ckpt)


def _write(path: Path, text: str) -> None:
    try:
        atomic_write(path, text)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e})") from None


def train_rl(cfg: RLConfig, prepared: PreparedRL | None = None) -> LitGRPO:
    """Run (or resume) GRPO; evaluates held-out accuracy before, every ``task.eval_every`` iterations and
    after; exports the final policy to ``OUT/policy``."""
    p = prepared or prepare_rl(cfg)
    t, rl = cfg.trainer, cfg.rl
    loaded = p.loaded
    policy = loaded.model.float() if t.precision != "64-true" else loaded.model
    reference = None
    if rl.beta > 0:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    module = LitGRPO(cfg.to_dict(), policy, loaded.method.to_dict(), loaded.tokenizer, p.source, reference)
    inner = rl.num_iterations
    cbs = [Checkpoints(dirpath=checkpoint_dir(t.out_dir), filename="step{step:08d}", auto_insert_metric_name=False,
                       every_n_train_steps=(t.ckpt_every * inner) or None, save_last=True,
                       save_top_k=-1 if t.keep_checkpoints == -1 else t.keep_checkpoints,
                       monitor=None if t.keep_checkpoints == -1 else "step", mode="max",
                       save_on_train_epoch_end=False, enable_version_counter=False)]
    if t.progress:
        cbs.append(TQDMProgressBar(refresh_rate=1))
    trainer = pl.Trainer(default_root_dir=t.out_dir, accelerator=t.accelerator, devices=t.devices,
                         num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
                         max_steps=t.max_steps * inner, max_time=parse_max_time(t.max_time), max_epochs=-1,
                         log_every_n_steps=t.log_every, logger=build_loggers(cfg) or False, callbacks=cbs,
                         plugins=[AtomicCheckpointIO()], enable_progress_bar=t.progress,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    out = Path(t.out_dir)
    if trainer.is_global_zero:
        for orphan in clean_orphans(checkpoint_dir(out)):
            print(f"removed {orphan}, left by a checkpoint writer that was killed")
        _write(out / "config.yaml", cfg.to_yaml())
    steps = torch.utils.data.DataLoader(range(t.max_steps * inner), batch_size=None)
    before = None
    if p.ckpt_path is None:
        before = module.run_eval()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the policy runs in eval mode
        # checkpoints are taken at RL-iteration boundaries, after the optimizer step: what resume needs
        warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch.*")
        trainer.fit(module, train_dataloaders=steps, ckpt_path=p.ckpt_path, weights_only=True)
    elapsed = time.perf_counter() - t0
    if not module.eval_history or module.eval_history[-1]["iteration"] != module.iteration:
        module.run_eval()
    if trainer.is_global_zero:
        hist = module.eval_history
        _write(out / "eval.jsonl", "".join(json.dumps(h) + "\n" for h in hist))
        final = {"iterations": module.iteration, "fit_seconds": round(elapsed, 1),
                 "heldout_accuracy_start": hist[0]["accuracy"], "heldout_accuracy_end": hist[-1]["accuracy"],
                 "likelihood": rl.likelihood, "task": p.source.name}
        _write(out / "final_metrics.json", json.dumps(final, indent=2) + "\n")
        save_pretrained(module.policy, out / "policy", loaded.method, tokenizer=loaded.tokenizer,
                        recipe={"rl": cfg.to_dict(), "sft": loaded.recipe})
        start = "" if before is None else f"{before['accuracy']:.3f} -> "
        print(f"held-out accuracy ({hist[-1]['prompts']} prompts): {start}{hist[-1]['accuracy']:.3f} after "
              f"{module.iteration} iterations; policy in {out / 'policy'}")
    return module


def evaluate_task(model_path: str, task: str | None = None, prompts: str | None = None, reward: str | None = None,
                  n: int = 200, params: SamplingParams | None = None, device=None, show: int = 0,
                  reward_timeout: float = DEFAULT_REWARD_TIMEOUT, samples: int = 1, pass_at: int | None = None,
                  split: str = "test", max_new_tokens: int | None = None, prompt_style: str = "compact") -> dict:
    """Held-out accuracy of a model on a task (``esolm eval-task``): ``n`` prompts (at most
    :data:`~esolm.rl.config.MAX_EVAL_PROMPTS`), ``samples`` samples each at ``params`` (its seed fixes prompts and
    draws; temperature 0 decodes greedily), with ``pass_at`` k the unbiased pass@k (k <= ``samples``); ``show``
    of them (at most ``n``) with their completions under ``"examples"``; ``split``: test, or a shipped task's
    validation split (for tuning); ``max_new_tokens``: completion tokens per sample (default: to the model's
    length); ``prompt_style``: compact, or instruction (a d1 task's natural-language prompts, for a pretrained
    LM). Every check runs before any sampling."""
    n = check_eval_prompts(n, "the number of held-out prompts")
    if isinstance(show, bool) or not isinstance(show, int) or not 0 <= show <= n:
        raise UserError(f"show must be an integer in [0, {n}] (the prompts evaluated), got {show!r}")
    samples, pass_at = check_pass_at(samples, pass_at)
    if max_new_tokens is not None:
        max_new_tokens = check_integer(max_new_tokens, "max new tokens", 1, 1 << 30)
    params = params or SamplingParams(seed=1234)
    loaded = load_policy(model_path, device)
    check_likelihood("mean-field", loaded.method)  # any diffusion model; AR refused with one line
    source = prompt_source(task, prompts, reward, reward_timeout, prompt_style)
    source.check_held_out(n, "the number of held-out prompts (--prompts)", split)
    params = resolve_params(params, loaded)
    check_prompts(source, loaded)
    rows = min(n, max(1, EVAL_BATCH // samples)) * samples
    check_rollout_memory(loaded.model.config, rows, loaded.model.device, "an evaluation batch")
    return evaluate_prompts(loaded.model, loaded.method, loaded.tokenizer, source, n, params, EVAL_BATCH, show,
                            samples, pass_at, split, max_new_tokens)
