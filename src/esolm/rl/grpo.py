"""GRPO on a diffusion LM, with the exact trajectory likelihood or d1's mean-field estimate.

One RL iteration ``k``: ``P`` prompts (a function of ``(seed, k, rank)``), ``G`` rollouts each at the rollout
law (temperature / top-p; on-policy at temperature 1 by default), rewards, advantages ``A = r - mean_G``
divided by ``std_G + eps`` (``scale_rewards=group``), by the batch's std (``batch``) or by nothing (``none``,
Dr. GRPO), then ``mu = num_iterations`` optimizer steps on the clipped token-level objective

    l_t = - min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta * k3(ref || policy),
    rho = exp(log pi_theta(y_t | ...) - log pi_old(y_t | ...)),  k3 = exp(l_ref - l) - (l_ref - l) - 1,

reduced as TRL's ``loss_type`` says: ``grpo`` the mean over sequences of each sequence's token mean; ``bnpo``
(the default: what esolm did before it had the knob) the token mean over the batch; ``dr_grpo`` the token sum
divided by the constant ``sequences x L`` (``L`` the policy's length, an upper bound on any completion);
``dapo`` the token sum divided by the tokens of the global batch (every rank's; the same as ``bnpo`` on one
device). ``epsilon_high`` (default ``epsilon``) is DAPO's clip-higher. With ``beta > 0`` the reference is the
starting policy, mixed towards the policy every ``ref_sync_steps`` optimizer steps (``ref <- alpha pi +
(1 - alpha) ref``, ``alpha = ref_mixup_alpha``; TRL's sync_ref_model) and then checkpointed with the run.
``skip_zero_variance_groups`` (DAPO's dynamic sampling, without the resampling) leaves the groups whose
rewards all tie out of the loss and its normalisation; ``mask_after_eos`` leaves the completion tokens after
the first EOS out (off by default: esolm scored every completion token before it had the knob). The learning
rate follows ``optim.schedule`` (constant | cosine | linear, after ``optim.warmup_steps``:
:func:`esolm.training.module.lr_factor`, the supervised runs' schedule) over the run's optimizer steps.

The per-token log-probabilities come from :func:`esolm.rl.trajectory.sequence_logprobs`. With ``exact`` the
old log-probabilities are the ones the sampler recorded (equal to the one-pass likelihood of the old policy:
``tests/test_rl_trajectory.py``), so ``rho = 1`` at the first inner step. With ``mean-field`` they are the
estimator's under the old policy, each inner iteration with a fresh prompt masking (one generator seed per
RL iteration, group and inner iteration) shared by old, new and reference (drawn again identically for each
of the three passes), as d1 does. The policy runs in eval mode (no dropout): the ratio must be exactly 1
before the first update.

**Zero-probability tokens.** A log-probability can be ``-inf`` when a law truncates (``top_p``). The ratio of
a token the *old* law gives probability 0 is undefined (``-inf - (-inf)``): such a token could not have been
drawn from that law, so it is left out of the loss (the exact likelihood never produces one; the mean-field
estimate is scored without the nucleus, so it does not either). A token the *new* policy gives probability 0
has ratio 0. In the k3 KL term a token the current policy gives probability 0 has weight 0 in
``KL(pi || ref) = E_pi[...]`` and is left out (so ``ref = new = -inf`` gives 0, not NaN); one only the
reference rules out has an infinite KL, clamped (``|ref - new| <= 20``).

**Stats** (logged per optimizer step, over every group of the batch: token-weighted means, ``ratio_max`` the
maximum): ``clip_low`` / ``clip_high`` are the fractions of tokens whose clip is active, as TRL reports them
(``rho < 1 - epsilon`` with ``A < 0``; ``rho > 1 + epsilon_high`` with ``A > 0``: the tokens whose gradient the
clip removes), ``clip_frac`` their sum; ``kl`` the mean k3 estimate (``beta > 0``); ``entropy`` the mean
``-log pi_theta`` of the sampled tokens (a Monte-Carlo estimate of the policy's per-token entropy, on-policy
at the first inner step); ``logp_mismatch`` (``exact``, first inner step) the mean ``|log p_sampler -
log p_trainer|``, zero up to numerics; ``lr``; ``skipped_groups`` (with ``skip_zero_variance_groups``).
"""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import torch

from esolm.methods import as_method
from esolm.rl.config import MAX_SAMPLES, RLSection, check_eval_prompts
from esolm.rl.prompts import PromptSource, decode_completions, encode_prompts
from esolm.rl.trajectory import Rollouts, rollout, sequence_logprobs
from esolm.sampling.api import cut_at_eos
from esolm.sampling.params import SamplingParams, check_integer
from esolm.training.module import lr_factor, step_seed

Tensor = torch.Tensor


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """``rewards`` [P * G] (groups contiguous) -> advantages [P * G], float64: ``r - mean_group``, divided by
    ``std_group + eps`` (``scale="group"``), ``std_batch + eps`` (``"batch"``) or nothing (``"none"``)."""
    r = rewards.double().view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if scale == "group":
        a = a / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        a = a / (r.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return a.reshape(-1)


def tied_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[P] bool: the groups whose ``G`` rewards are all equal (zero variance: no advantage to learn from)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(1)


def eos_mask(tokens: Tensor, prompt_len: int, eos_id: int) -> Tensor:
    """[B, L - p] bool: the completion tokens up to and including the first EOS (all when there is none)."""
    _, lengths = cut_at_eos(tokens, prompt_len, eos_id)
    return torch.arange(prompt_len, tokens.shape[1])[None] < lengths[:, None]


def loss_denominator(loss_type: str, tokens: int, rows: int, max_completion_length: int) -> float:
    """What :func:`grpo_loss` divides the batch's summed loss by (TRL's ``loss_type``): ``grpo`` the sequences
    (each a per-sequence token mean), ``bnpo`` / ``dapo`` the tokens, ``dr_grpo`` sequences x
    ``max_completion_length``; at least 1."""
    if loss_type == "grpo":
        n = rows
    elif loss_type in ("bnpo", "dapo"):
        n = tokens
    elif loss_type == "dr_grpo":
        n = rows * max_completion_length
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return float(max(n, 1))


def grpo_loss(logp: Tensor, old: Tensor, adv: Tensor, epsilon: float, ref: Tensor | None = None,
              beta: float = 0.0, *, epsilon_high: float | None = None, loss_type: str = "bnpo",
              mask: Tensor | None = None, denominator: float | None = None,
              max_completion_length: int | None = None) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate (+ k3 KL) over the tokens of ``mask`` (default all) the old law could draw;
    ``logp``/``old``/``ref``/``mask`` [B, N], ``adv`` [B]. The clip is ``[1 - epsilon, 1 + epsilon_high]``
    (default ``epsilon_high = epsilon``). Reduction (``loss_type``): ``grpo`` sums each row's token mean,
    the others sum over tokens; then a division by ``denominator`` (the whole batch's
    :func:`loss_denominator`, for a batch split in groups; default this one's, with ``max_completion_length``
    default N). Finite whenever the inputs are finite or ``-inf`` (module docstring). Stats: ``clip_low``,
    ``clip_high``, ``clip_frac``, ``ratio_max``, ``entropy`` (``-mean log pi_theta`` of the tokens), ``kl``
    (with ``beta > 0``) and ``tokens`` (how many tokens they average over, to combine groups with
    :func:`merge_stats`)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    counted = torch.ones_like(old, dtype=torch.bool) if mask is None else mask.to(old.device)
    live = torch.isfinite(old) & counted  # tokens the old law gives probability > 0: the others have no ratio
    log_ratio = torch.where(live, logp - old.masked_fill(~live, 0.0), torch.zeros_like(logp))
    ratio = log_ratio.exp()
    a = adv[:, None].to(logp.dtype).expand_as(ratio)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1.0 - epsilon, 1.0 + eps_high) * a)
    per_token = -surrogate
    n_live = int(live.sum())
    count = max(n_live, 1)
    r = ratio.detach()
    low = ((r < 1.0 - epsilon) & (a < 0) & live).sum().item() / count
    high = ((r > 1.0 + eps_high) & (a > 0) & live).sum().item() / count
    seen = live & torch.isfinite(logp)
    stats = {"clip_low": low, "clip_high": high, "clip_frac": low + high,
             "ratio_max": float(r[live].max()) if live.any() else 1.0,
             "entropy": -float(logp.detach()[seen].sum()) / max(int(seen.sum()), 1), "tokens": float(n_live)}
    if ref is not None and beta > 0:
        possible = torch.isfinite(logp) & live  # pi(y) = 0: weight 0 in KL(pi || ref)
        d = torch.where(possible, ref - logp.masked_fill(~possible, 0.0), torch.zeros_like(logp)).clamp(-20.0, 20.0)
        kl = d.exp() - d - 1.0
        per_token = per_token + beta * kl
        stats["kl"] = float(kl.detach()[live].sum()) / count
    per_token = per_token.masked_fill(~live, 0.0)
    if denominator is None:
        rows = int(counted.any(1).sum())
        denominator = loss_denominator(loss_type, n_live, rows, max_completion_length or logp.shape[1])
    if loss_type == "grpo":
        total = (per_token.sum(1) / live.sum(1).clamp(min=1)).sum()
    else:
        total = per_token.sum()
    return total / denominator, stats


def logp_mismatch(sampler: Tensor, trainer: Tensor, mask: Tensor) -> float:
    """Mean ``|log p_sampler - log p_trainer|`` over the tokens of ``mask`` both give probability > 0: the
    sampler's recorded log-probabilities against the trainer's pass (equal up to numerics before an update)."""
    both = mask & torch.isfinite(sampler) & torch.isfinite(trainer)
    return float((sampler - trainer)[both].abs().sum()) / max(int(both.sum()), 1)


@torch.no_grad()
def sync_reference(reference, policy, alpha: float) -> None:
    """``reference <- alpha * policy + (1 - alpha) * reference`` (TRL's ref_model_mixup_alpha), in place; integer
    buffers are copied."""
    for r, p in zip(reference.state_dict().values(), policy.state_dict().values()):
        if r.is_floating_point():
            r.lerp_(p.to(r.dtype), alpha)
        else:
            r.copy_(p)


MAX_STATS = ("ratio_max",)


def merge_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    """The stats of several groups' :func:`grpo_loss` as those of one batch: each mean weighted by its group's
    ``tokens``, ``ratio_max`` the maximum, ``tokens`` the sum."""
    total = sum(p["tokens"] for p in parts)
    out: dict[str, float] = {}
    for key in parts[0]:
        if key == "tokens":
            out[key] = total
        elif key in MAX_STATS:
            out[key] = max(p[key] for p in parts)
        else:
            out[key] = sum(p[key] * p["tokens"] for p in parts) / total if total else 0.0
    return out


def rollout_groups(model, method, tokenizer, prompts: list[str], group_size: int, params: SamplingParams, seed: int,
                   max_new_tokens: int | None = None) -> tuple[list[Rollouts], list[list[int]]]:
    """``G`` rollouts of every prompt at ``params``, each completion at most ``max_new_tokens`` tokens (default:
    to the policy's length); prompts of equal token length share one sampler batch (a batch's completions
    start at one position). Returns the batches and, for each, the indices (into ``prompts * G`` flattened
    prompt-major) of its rows."""
    ids = encode_prompts(tokenizer, prompts)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    out, rows = [], []
    for j, (plen, members) in enumerate(sorted(by_len.items())):
        prompt = torch.tensor([ids[i] for i in members for _ in range(group_size)], dtype=torch.long)
        length = None if max_new_tokens is None else min(model.config.length, plen + max_new_tokens)
        pg = torch.Generator().manual_seed(step_seed(seed, j, 0))
        dg = torch.Generator(device=model.device).manual_seed(step_seed(seed, j, 1))
        out.append(rollout(model, method, prompt, params, length=length, plan_generator=pg, generator=dg))
        rows.append([i * group_size + g for i in members for g in range(group_size)])
    return out, rows


def complete(model, method, tokenizer, prompts: list[str], group_size: int, params: SamplingParams,
             seed: int, max_new_tokens: int | None = None) -> tuple[list[Rollouts], list[list[int]], list[str]]:
    """:func:`rollout_groups` plus the decoded completions, in the order of ``prompts * G`` (prompt-major)."""
    batches, rows = rollout_groups(model, method, tokenizer, prompts, group_size, params, seed, max_new_tokens)
    completions = [""] * (len(prompts) * group_size)
    for r, idx in zip(batches, rows):
        for i, text in zip(idx, decode_completions(tokenizer, r.tokens, r.prompt_len)):
            completions[i] = text
    return batches, rows, completions


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` are correct: ``1 - C(n - c, k) / C(n, k)``
    (Chen et al. 2021), computed exactly in integers."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def check_pass_at(samples, pass_at) -> tuple[int, int | None]:
    """``samples`` per prompt (an integer in [1, MAX_SAMPLES]) and ``pass_at`` (None, or an integer in
    [1, samples]); UserError (one line) otherwise."""
    samples = check_integer(samples, "samples per prompt", 1, MAX_SAMPLES)
    if pass_at is not None:
        pass_at = check_integer(pass_at, f"pass@k's k (at most the {samples} samples per prompt)", 1, samples)
    return samples, pass_at


@torch.no_grad()
def evaluate_prompts(model, method, tokenizer, source: PromptSource, n: int, params: SamplingParams,
                     batch: int = 64, examples: int = 0, samples: int = 1, pass_at: int | None = None,
                     split: str = "test", max_new_tokens: int | None = None) -> dict:
    """Held-out accuracy (the fraction of every sample whose reward counts as solved: ``source.correct``,
    reward > 0.5 unless the task says otherwise) and mean reward of ``samples`` samples per prompt at
    ``params`` (its ``seed`` fixes the prompts and the draws: the same every time it is called), plus the
    task's own aggregates (``source.metrics``: d1-sudoku's ``cell_accuracy``); with ``pass_at`` k, the mean
    over prompts of the unbiased :func:`pass_at_k` (under ``"pass@k"``); ``examples`` of the prompts with
    their (first) completions under ``"examples"``. ``split``: the held-out split scored (test, or a shipped
    task's validation split, for tuning); ``max_new_tokens``: completion tokens per sample (default: to the
    policy's length). ``n`` is at most
    :data:`~esolm.rl.config.MAX_EVAL_PROMPTS`; ``batch`` bounds the rows of one sampler batch."""
    n = check_eval_prompts(n)
    samples, pass_at = check_pass_at(samples, pass_at)
    seed = params.seed
    was = model.training
    model.eval()
    prompts = source.held_out(n, seed, split)
    rewards, shown, asked, answers = [], [], [], []
    per = max(1, batch // samples)  # prompts per sampler batch
    try:
        for s in range(0, n, per):
            chunk = prompts[s:s + per]
            _, _, completions = complete(model, method, tokenizer, chunk, samples, params, step_seed(seed, s),
                                         max_new_tokens)
            flat = [p for p in chunk for _ in range(samples)]
            rewards.append(source.rewards(flat, completions))
            asked += flat
            answers += completions
            shown += [{"prompt": p, "completion": c}
                      for p, c in zip(chunk, completions[::samples])][:examples - len(shown)]
    finally:
        model.train(was)
    r = torch.cat(rewards)
    correct = source.correct(r)
    res = {"accuracy": float(correct.double().mean()), "reward": float(r.mean()), "prompts": n}
    if source.metrics is not None:
        res.update(source.metrics(asked, answers))
    if samples > 1:
        res["samples"] = samples
    if pass_at is not None:
        per_prompt = correct.view(n, samples).sum(1).tolist()
        res[f"pass@{pass_at}"] = sum(pass_at_k(samples, c, pass_at) for c in per_prompt) / n
    if examples:
        res["examples"] = shown
    return res


class LitGRPO(pl.LightningModule):
    """GRPO with manual optimisation: each training step is one optimizer step; an RL iteration (rollouts)
    happens every ``num_iterations`` steps. ``config`` is the plain-dict :class:`~esolm.rl.config.RLConfig`."""

    def __init__(self, config: dict, policy, method: dict, tokenizer, source: PromptSource, reference=None):
        super().__init__()
        self.save_hyperparameters({"config": config, "method": method})
        self.automatic_optimization = False
        self.policy = policy
        self.method = as_method(method)
        self.tokenizer = tokenizer
        self.source = source
        self._reference = [reference]  # a list: not a submodule, so neither trained nor checkpointed
        self.rl = RLSection(**config["rl"])
        self.params = SamplingParams.from_rl(self.rl)  # the rollout law (checked against the policy in prepare_rl)
        self.seed = int(config["trainer"]["seed"])
        self.iteration = 0  # RL iterations done (restored on resume)
        self.fit_seconds = 0.0  # wall time spent in RL iterations so far (restored on resume)
        self._t_start: float | None = None
        self._batch: dict | None = None
        self.eval_history: list[dict] = []

    def configure_optimizers(self):
        o = self.hparams["config"]["optim"]
        opt = torch.optim.AdamW(self.policy.parameters(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                weight_decay=o["weight_decay"])
        total = self.hparams["config"]["trainer"]["max_steps"] * self.rl.num_iterations  # optimizer steps

        def factor(step: int) -> float:
            return lr_factor(step, o["warmup_steps"], o["schedule"], total, o["min_lr_ratio"])

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}

    # -- one RL iteration's data -------------------------------------------------------------------------
    def _collect(self) -> dict:
        rl, k = self.rl, self.iteration
        rank = self.global_rank
        self.policy.eval()
        t0 = time.perf_counter()
        prompts = self.source.train(rl.prompts_per_step, step_seed(self.seed, k, rank))
        batches, rows, completions = complete(self.policy, self.method, self.tokenizer, prompts, rl.group_size,
                                              self.params, step_seed(self.seed, k, rank, 1), rl.max_completion_length)
        t_roll = time.perf_counter() - t0
        rewards = self.source.rewards([p for p in prompts for _ in range(rl.group_size)], completions)
        adv = group_advantages(rewards, rl.group_size, rl.scale_rewards)
        tied = tied_groups(rewards, rl.group_size)
        keep = ~tied.repeat_interleave(rl.group_size)  # rows of the groups with differing rewards
        mean_field = rl.likelihood == "mean-field"
        ref_model = self._reference[0] if rl.beta > 0 else None
        groups = []
        for j, (r, idx) in enumerate(zip(batches, rows)):
            mask = torch.ones(r.completions.shape, dtype=torch.bool)
            if rl.mask_after_eos:
                mask &= eos_mask(r.tokens, r.prompt_len, self.tokenizer.eos_id)
            if rl.skip_zero_variance_groups:
                mask &= keep[idx][:, None]
            # mean-field: a fresh prompt mask per inner iteration (d1), shared by old, new and reference within it
            seeds = [step_seed(self.seed, k, rank, 2, j, *([i] if i else [])) for i in range(rl.num_iterations)]
            g = dict(rollouts=r, rows=idx, adv=adv[idx], seeds=seeds, mask=mask)
            with torch.no_grad():
                if mean_field:
                    g["old"] = [self._logprobs(self.policy, r, s) for s in seeds]
                    g["ref"] = None if ref_model is None else [self._logprobs(ref_model, r, s) for s in seeds]
                else:  # the exact likelihood needs no mask: one pass serves every inner iteration
                    g["old"] = [r.logprobs] * rl.num_iterations
                    g["ref"] = None if ref_model is None else [self._logprobs(ref_model, r, 0)] * rl.num_iterations
            groups.append(g)
        nfe = sum(g["rollouts"].nfe for g in groups)
        return dict(groups=groups, rewards=rewards, nfe=nfe, rollout_s=t_roll,
                    collect_s=time.perf_counter() - t0, skipped=int(tied.sum()) if rl.skip_zero_variance_groups else 0)

    def _logprobs(self, model, r: Rollouts, seed: int) -> Tensor:
        gen = torch.Generator(device=model.device).manual_seed(seed)
        return sequence_logprobs(model, self.method, r, self.rl.likelihood, gen, self.rl.mask_prompt)

    def _denominator(self, groups: list[dict], inner: int) -> float:
        """The batch's :func:`loss_denominator` at inner iteration ``inner``; ``dapo`` counts the tokens of the
        global batch (every rank's; divided by the world size, as gradients are averaged over ranks)."""
        live = [torch.isfinite(g["old"][inner]) & g["mask"] for g in groups]
        tokens = sum(int(x.sum()) for x in live)
        rows = sum(int(g["mask"].any(1).sum()) for g in groups)
        if self.rl.loss_type == "dapo" and self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(torch.tensor(float(tokens), device=self.device), reduce_op="sum")
            return max(float(total), 1.0) / self.trainer.world_size
        return loss_denominator(self.rl.loss_type, tokens, rows,
                                self.rl.max_completion_length or self.policy.config.length)

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        rl = self.rl
        inner = self.global_step % rl.num_iterations
        if inner == 0 or self._batch is None:
            self._batch = self._collect()
        data = self._batch
        opt = self.optimizers()
        self.policy.eval()
        opt.zero_grad()
        t0 = time.perf_counter()
        denominator = self._denominator(data["groups"], inner)
        total, parts = 0.0, []
        for g in data["groups"]:
            new = self._logprobs(self.policy, g["rollouts"], g["seeds"][inner])
            old = g["old"][inner].to(new.device)
            ref = None if g["ref"] is None else g["ref"][inner].to(new.device)
            mask = g["mask"].to(new.device)
            loss, stats = grpo_loss(new, old, g["adv"].to(new.device), rl.epsilon, ref, rl.beta,
                                    epsilon_high=rl.epsilon_high, loss_type=rl.loss_type, mask=mask,
                                    denominator=denominator)
            if inner == 0 and rl.likelihood == "exact":
                stats["logp_mismatch"] = logp_mismatch(g["rollouts"].logprobs.to(new.device), new.detach(), mask)
            self.manual_backward(loss)
            total += float(loss.detach())
            parts.append(stats)
        stats = merge_stats(parts)
        stats.pop("tokens")
        clip = self.hparams["config"]["optim"]["grad_clip"]
        if clip > 0:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        lr = opt.param_groups[0]["lr"]
        opt.step()
        self.lr_schedulers().step()
        if rl.ref_sync_steps and (self.global_step + 1) % rl.ref_sync_steps == 0:
            sync_reference(self._reference[0], self.policy, rl.ref_mixup_alpha)
        r = data["rewards"]
        log = {"loss": total, "reward": float(r.mean()), "accuracy": float(self.source.correct(r).double().mean()),
               "rollout_s": data["rollout_s"], "update_s": time.perf_counter() - t0, "nfe": float(data["nfe"]),
               "lr": lr, **stats}
        if rl.skip_zero_variance_groups:
            log["skipped_groups"] = float(data["skipped"])
        for key, value in log.items():
            self.log(key, value, prog_bar=key in ("reward", "loss"), on_step=True, batch_size=1)
        if inner == rl.num_iterations - 1:
            self.iteration += 1
            self._batch = None
            every = self.hparams["config"]["task"]["eval_every"]
            if every and self.iteration % every == 0:
                self.fit_seconds += time.perf_counter() - self._t_start
                self._t_start = None  # evaluation time is not RL time
                res = self.run_eval()
                self.log("heldout_accuracy", res["accuracy"], prog_bar=True, on_step=True, batch_size=1)

    def run_eval(self) -> dict:
        """Held-out accuracy now; recorded with the iteration, the rollouts and the RL wall time so far
        (evaluation time excluded)."""
        t = self.hparams["config"]["task"]
        res = evaluate_prompts(self.policy, self.method, self.tokenizer, self.source, t["eval_prompts"],
                               self.params.replace(seed=t["eval_seed"]), split=t.get("eval_split", "test"),
                               max_new_tokens=self.rl.max_completion_length)
        res.update(iteration=self.iteration, rollouts=self.iteration * self.rl.prompts_per_step * self.rl.group_size,
                   seconds=round(self.fit_seconds, 3))
        self.eval_history.append(res)
        return res

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._t_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._t_start is not None:
            self.fit_seconds += time.perf_counter() - self._t_start

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["esolm_rl"] = {"iteration": self.iteration, "eval_history": self.eval_history,
                                  "fit_seconds": self.fit_seconds}
        if self.rl.ref_sync_steps and self._reference[0] is not None:  # a synced reference is part of the state
            checkpoint["esolm_rl"]["reference"] = self._reference[0].state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("esolm_rl", {})
        self.iteration = int(state.get("iteration", 0))
        self.eval_history = list(state.get("eval_history", []))
        self.fit_seconds = float(state.get("fit_seconds", 0.0))
        if "reference" in state and self._reference[0] is not None:
            self._reference[0].load_state_dict(state["reference"])
        if "lr_schedulers" not in checkpoint:  # saved before esolm rl had optim.schedule: a constant rate so far
            steps = int(checkpoint.get("global_step", 0))
            sched = self.configure_optimizers()["lr_scheduler"]["scheduler"].state_dict()
            checkpoint["lr_schedulers"] = [{**sched, "last_epoch": steps, "_step_count": steps + 1}]
