"""RL run configs: YAML presets (``esolm/presets/rl-*.yaml``) plus ``section.key=value`` overrides.

Sections: ``policy`` (the starting model: anything :func:`esolm.io.load_model` reads), ``task`` (a shipped
task, or a prompt file plus a reward function), ``rl`` (GRPO and rollout settings), ``optim`` and ``trainer``
(the same trainer keys as supervised runs: devices, precision, checkpoints, resume, loggers, progress bar).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from esolm.errors import ConfigError, UserError
from esolm.recipes import PRESETS_DIR, TrainerSection, parse_override, read_yaml, set_field
from esolm.rl.rewards import DEFAULT_REWARD_TIMEOUT, check_timeout
from esolm.rl.tasks import PROMPT_STYLES
from esolm.rl.trajectory import LIKELIHOODS
from esolm.sampling.params import MAX_SEED, SamplingParams, check_integer

MAX_EVAL_PROMPTS = 100_000  # held-out prompts one evaluation may score (task.eval_prompts, eval-task --prompts)
MAX_SAMPLES = 1024  # samples per held-out prompt (eval-task --samples, for pass@k)


@dataclass
class TaskSection:
    name: str | None = None          # a shipped task: arithmetic | sudoku | countdown | d1-countdown | d1-sudoku
    prompts: str | None = None       # or a file of prompts (.txt: one per line; .jsonl: {"prompt": ...})
    reward: str | None = None        # reward callable module:function or file.py:function (default: the task's)
    eval_prompts: int = 200          # held-out prompts for accuracy (fixed seed)
    eval_every: int = 10             # RL iterations between held-out evaluations (0: only before and after)
    eval_seed: int = 1234
    eval_split: str = "test"         # held-out split scored: test | validation (a shipped task's, for tuning)
    prompt_style: str = "compact"    # compact (tiny character models) | instruction (d1 tasks, for pretrained LMs)
    reward_timeout: float = DEFAULT_REWARD_TIMEOUT  # seconds one call of the reward function may take


@dataclass
class RLSection:
    likelihood: str = "exact"        # exact (Eso-LM (B)) | mean-field (d1's estimate; any diffusion model)
    group_size: int = 8              # G rollouts per prompt
    prompts_per_step: int = 4        # prompts per RL iteration (batch = prompts_per_step x group_size)
    num_iterations: int = 1          # optimizer steps on each batch of rollouts (mu, TRL's num_iterations)
    epsilon: float = 0.2             # lower clip: rho >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip: rho <= 1 + epsilon_high (DAPO clip-higher; default epsilon)
    loss_type: str = "bnpo"          # grpo | bnpo | dr_grpo | dapo (TRL's; grpo.py's docstring)
    beta: float = 0.0                # KL(policy || reference) weight, k3 estimator; 0 disables
    ref_sync_steps: int = 0          # every this many optimizer steps ref <- alpha policy + (1 - alpha) ref; 0: never
    ref_mixup_alpha: float = 0.6     # that alpha (TRL's ref_model_mixup_alpha; 1: copy the policy)
    skip_zero_variance_groups: bool = False  # DAPO dynamic sampling: groups whose rewards tie leave the loss
    mask_after_eos: bool = False     # leave completion tokens after the first EOS out of the loss
    # the rollout law, a SamplingParams (SamplingParams.from_rl): checked there, once; the log-probs are always
    # those of the law sampled
    temperature: float = 1.0         # > 0 (0 would decode greedily: every rollout of a group alike)
    top_p: float | None = None
    alpha0: float | None = None      # Eso-LM rollout alpha0 (default: the policy's)
    steps: int | None = None         # diffusion steps T of the rollout schedule (default: completion length)
    max_completion_length: int | None = None  # completion tokens per rollout (TRL's; default: to the policy's length)
    mask_prompt: float = 0.15        # mean-field only: probability of masking each prompt token (d1)
    scale_rewards: str = "group"     # divide advantages by the group's std (GRPO) | batch (the batch's) | none
    #                                  (true / false, as TRL takes them: group / none)


@dataclass
class RLOptimSection:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: str = "constant"       # constant | cosine | linear (to min_lr_ratio * lr at the last step)
    warmup_steps: int = 0            # linear warmup (optimizer steps)
    min_lr_ratio: float = 0.0


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
RL_SCHEDULES = ("constant", "cosine", "linear")
# keys renamed since earlier releases: a checkpoint's config is read with them translated; a user's config that
# uses one gets a one-line error naming the new key
RENAMED = {"inner_updates": "num_iterations", "clip_eps": "epsilon"}


def upgrade_legacy(d: dict) -> dict:
    """An RL config dict as saved by an earlier release, in today's keys: ``rl.inner_updates`` ->
    ``rl.num_iterations``, ``rl.clip_eps`` -> ``rl.epsilon``, boolean ``rl.scale_rewards`` -> group / none."""
    d = dict(d)
    rl = dict(d.get("rl") or {})
    for old, new in RENAMED.items():
        if old in rl:
            rl[new] = rl.pop(old)
    if isinstance(rl.get("scale_rewards"), bool):
        rl["scale_rewards"] = "group" if rl["scale_rewards"] else "none"
    if "rl" in d:
        d["rl"] = rl
    return d


def _rl_trainer() -> TrainerSection:
    return TrainerSection(out_dir="runs/rl", global_batch=1, max_steps=100, precision="32-true", val_every=0,
                          ckpt_every=10, log_every=1)


SECTIONS = {"task": TaskSection, "rl": RLSection, "optim": RLOptimSection, "trainer": TrainerSection}
TRAINER_KEYS = ("out_dir", "seed", "max_steps", "max_time", "accelerator", "devices", "num_nodes", "strategy",
                "precision", "ckpt_every", "keep_checkpoints", "log_every", "logger", "progress", "resume")


@dataclass
class RLConfig:
    preset: str = "custom"
    policy: str | None = None
    task: TaskSection = field(default_factory=TaskSection)
    rl: RLSection = field(default_factory=RLSection)
    optim: RLOptimSection = field(default_factory=RLOptimSection)
    trainer: TrainerSection = field(default_factory=_rl_trainer)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["trainer"] = {k: d["trainer"][k] for k in TRAINER_KEYS}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> RLConfig:
        return apply_dict(cls(), d)

    def validate(self) -> RLConfig:
        """Everything checkable without the model; ConfigError (one line)."""
        def req(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        t, r, o, tr = self.task, self.rl, self.optim, self.trainer
        req(self.policy is not None, "policy: give the starting model (a checkpoint or exported folder)")
        req((t.name is None) != (t.prompts is None), "task: give task.name (a shipped task) or task.prompts "
                                                     "(a prompt file with task.reward), not both")
        req(t.prompts is None or t.reward is not None, "task.prompts needs task.reward (module:function)")
        check_eval_prompts(t.eval_prompts, "task.eval_prompts")
        req(t.eval_split in ("test", "validation"), f"task.eval_split must be test or validation, "
                                                    f"got {t.eval_split!r}")
        req(t.prompt_style in PROMPT_STYLES, f"task.prompt_style must be one of {', '.join(PROMPT_STYLES)}, "
                                             f"got {t.prompt_style!r}")
        req(t.eval_every >= 0, "task.eval_every must be >= 0")
        req(r.likelihood in LIKELIHOODS, f"rl.likelihood must be one of {', '.join(LIKELIHOODS)}, "
                                         f"got {r.likelihood!r}")
        req(r.group_size >= 2, f"rl.group_size must be at least 2 (advantages are relative to the group), "
                               f"got {r.group_size}")
        req(r.prompts_per_step >= 1, "rl.prompts_per_step must be positive")
        req(r.num_iterations >= 1, f"rl.num_iterations must be positive, got {r.num_iterations}")
        req(r.max_completion_length is None or (isinstance(r.max_completion_length, int)
                                                and not isinstance(r.max_completion_length, bool)
                                                and r.max_completion_length >= 1),
            f"rl.max_completion_length must be a positive integer (or null: to the policy's length), "
            f"got {r.max_completion_length!r}")
        req(0.0 < r.epsilon < 1.0, f"rl.epsilon must be in (0, 1), got {r.epsilon}")
        req(r.epsilon_high is None or r.epsilon <= r.epsilon_high, f"rl.epsilon_high must be >= rl.epsilon "
                                                                   f"({r.epsilon}), got {r.epsilon_high}")
        req(r.loss_type in LOSS_TYPES, f"rl.loss_type must be one of {', '.join(LOSS_TYPES)}, got {r.loss_type!r}")
        req(r.scale_rewards in SCALE_REWARDS, f"rl.scale_rewards must be one of {', '.join(SCALE_REWARDS)}, "
                                              f"got {r.scale_rewards!r}")
        req(math.isfinite(r.beta) and r.beta >= 0.0, f"rl.beta must be >= 0, got {r.beta}")
        req(r.ref_sync_steps >= 0, f"rl.ref_sync_steps must be >= 0 (0: never), got {r.ref_sync_steps}")
        req(0.0 < r.ref_mixup_alpha <= 1.0, f"rl.ref_mixup_alpha must be in (0, 1], got {r.ref_mixup_alpha}")
        req(r.ref_sync_steps == 0 or r.beta > 0, "rl.ref_sync_steps needs rl.beta > 0 (without the KL term there "
                                                 "is no reference policy to sync)")
        req(0.0 <= r.mask_prompt < 1.0, "rl.mask_prompt must be in [0, 1)")
        check_integer(t.eval_seed, "task.eval_seed", 0, MAX_SEED)
        try:
            params = SamplingParams.from_rl(r)  # the rollout knobs' one check
        except UserError as e:
            raise ConfigError(f"rl.{e}") from None
        req(not params.greedy, f"rl.temperature={r.temperature} decodes greedily: the rollouts of a group would "
                               f"not differ by their tokens and have no law to score; use a temperature > 0")
        check_timeout(t.reward_timeout)
        req(o.lr > 0, "optim.lr must be positive")
        req(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas invalid: {o.betas}")
        req(o.grad_clip >= 0, "optim.grad_clip must be >= 0")
        req(o.schedule in RL_SCHEDULES, f"optim.schedule must be one of {', '.join(RL_SCHEDULES)}, "
                                        f"got {o.schedule!r}")
        req(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        req(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        for k in ("devices", "num_nodes", "max_steps", "log_every"):
            req(getattr(tr, k) > 0, f"trainer.{k} must be positive, got {getattr(tr, k)}")
        req(tr.ckpt_every >= 0, "trainer.ckpt_every must be >= 0")
        return self


def check_eval_prompts(n, what: str = "held-out prompts") -> int:
    """How many held-out prompts an evaluation scores: an integer in [1, :data:`MAX_EVAL_PROMPTS`]."""
    return check_integer(n, what, 1, MAX_EVAL_PROMPTS)


def apply_dict(cfg: RLConfig, d: dict) -> RLConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"an RL config must be a mapping, got {type(d).__name__}")
    for key, value in d.items():
        if key == "preset":
            cfg.preset = str(value)
        elif key == "policy":
            cfg.policy = None if value is None else str(value)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{key}' must be a mapping")
            for name, v in value.items():
                _check_trainer_key(key, name)
                if key == "rl" and name in RENAMED:
                    raise ConfigError(f"rl.{name} is now rl.{RENAMED[name]} (TRL's name)")
                if key == "rl" and name == "scale_rewards" and isinstance(v, bool):  # TRL's booleans
                    v = "group" if v else "none"
                set_field(getattr(cfg, key), name, v, f"{key}.{name}")
        else:
            raise ConfigError(f"unknown RL config section '{key}' (known: policy, {', '.join(SECTIONS)})")
    return cfg


def _check_trainer_key(section: str, name: str) -> None:
    if section == "trainer" and name not in TRAINER_KEYS:
        raise ConfigError(f"unknown config key 'trainer.{name}' for an RL run (known: {', '.join(TRAINER_KEYS)})")


def apply_overrides(cfg: RLConfig, overrides: list[str]) -> RLConfig:
    d: dict = {}
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if parts == ["policy"] or parts == ["preset"]:
            d[parts[0]] = value
        elif len(parts) == 2 and parts[0] in SECTIONS:
            d.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ConfigError(f"unknown config key '{key}' (use policy=PATH or section.key with section in "
                              f"{', '.join(SECTIONS)})")
    return apply_dict(cfg, d)


def rl_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("rl-*.yaml"))


def load_rl_config(task_or_file: str, overrides: list[str] | tuple[str, ...] = ()) -> RLConfig:
    """``TASK`` (preset ``rl-TASK``), a preset name ``rl-...``, or a YAML file; then overrides; validated."""
    p = Path(task_or_file)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"RL config file not found: {p}")
        path = p
    else:
        name = task_or_file if task_or_file.startswith("rl-") else f"rl-{task_or_file}"
        path = PRESETS_DIR / f"{name}.yaml"
        if not path.is_file():
            choices = ", ".join(n.removeprefix("rl-") for n in rl_presets())
            raise ConfigError(f"unknown RL task or preset '{task_or_file}' (shipped: {choices}; or a YAML file)")
    cfg = apply_dict(RLConfig(), read_yaml(path, "RL config"))
    if cfg.preset == "custom":
        cfg.preset = path.stem
    return apply_overrides(cfg, list(overrides)).validate()
