"""GRPO on a diffusion LM, with the exact trajectory likelihood or d1's mean-field estimate.

One RL iteration ``k``: ``P`` prompts (a function of ``(seed, k, rank)``), ``G`` rollouts each at the rollout
law (temperature / top-p; on-policy at temperature 1 by default), rewards, group-normalised advantages
``A = (r - mean_G) / (std_G + eps)`` (``scale_rewards=False``: no division, Dr. GRPO), then ``mu`` optimizer
steps on the clipped token-level objective

    L = - mean_tokens min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * mean_tokens k3(ref || policy),
    rho = exp(log pi_theta(y_j | ...) - log pi_old(y_j | ...)),  k3 = exp(l_ref - l) - (l_ref - l) - 1,

where the per-token log-probabilities come from :func:`esolm.rl.trajectory.sequence_logprobs`. With
``exact`` the old log-probabilities are the ones the sampler recorded (equal to the one-pass likelihood of
the old policy: ``tests/test_rl_trajectory.py``), so ``rho = 1`` at the first inner step. With
``mean-field`` they are the estimator's under the old policy, with the same prompt masking for old, new and
reference (one generator seed per iteration and group, drawn again identically for each of the three
passes), as d1 does. The policy runs in eval mode (no dropout): the ratio must be exactly 1 before the first
update.

**Zero-probability tokens.** A log-probability can be ``-inf`` when a law truncates (``top_p``). The ratio of
a token the *old* law gives probability 0 is undefined (``-inf - (-inf)``): such a token could not have been
drawn from that law, so it is left out of the loss (the exact likelihood never produces one; the mean-field
estimate is scored without the nucleus, so it does not either). A token the *new* policy gives probability 0
has ratio 0. In the k3 KL term a token the current policy gives probability 0 has weight 0 in
``KL(pi || ref) = E_pi[...]`` and is left out (so ``ref = new = -inf`` gives 0, not NaN); one only the
reference rules out has an infinite KL, clamped (``|ref - new| <= 20``).

**Stats** (logged per optimizer step, over every group of the batch: token-weighted means, ``ratio_max`` the
maximum): ``clip_low`` / ``clip_high`` are the fractions of tokens whose clip is active, as TRL reports them
(``rho < 1 - eps`` with ``A < 0``; ``rho > 1 + eps`` with ``A > 0``: the tokens whose gradient the clip
removes), ``clip_frac`` their sum; ``kl`` the mean k3 estimate (``beta > 0``).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch

from esolm.methods import as_method
from esolm.rl.config import RLSection, check_eval_prompts
from esolm.rl.prompts import PromptSource, decode_completions, encode_prompts
from esolm.rl.trajectory import Rollouts, rollout, sequence_logprobs
from esolm.sampling.params import SamplingParams
from esolm.training.module import step_seed

Tensor = torch.Tensor


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """``rewards`` [P * G] (groups contiguous) -> advantages [P * G], float64."""
    r = rewards.double().view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if scale:
        a = a / (r.std(1, keepdim=True) + eps)
    return a.reshape(-1)


def grpo_loss(logp: Tensor, old: Tensor, adv: Tensor, clip_eps: float, ref: Tensor | None = None,
              beta: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate (+ k3 KL) averaged over the tokens the old law could draw; ``logp``/``old``/``ref``
    [B, N], ``adv`` [B]. Finite whenever the inputs are finite or ``-inf`` (module docstring). Stats:
    ``clip_low``, ``clip_high``, ``clip_frac``, ``ratio_max``, ``kl`` (with ``beta > 0``) and ``tokens`` (how
    many tokens they average over, to combine groups with :func:`merge_stats`)."""
    live = torch.isfinite(old)  # tokens the old law gives probability > 0: the others have no ratio
    log_ratio = torch.where(live, logp - old.masked_fill(~live, 0.0), torch.zeros_like(logp))
    ratio = log_ratio.exp()
    a = adv[:, None].to(logp.dtype).expand_as(ratio)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * a)
    per_token = -surrogate
    count = max(int(live.sum()), 1)
    r = ratio.detach()
    low = ((r < 1.0 - clip_eps) & (a < 0) & live).sum().item() / count
    high = ((r > 1.0 + clip_eps) & (a > 0) & live).sum().item() / count
    stats = {"clip_low": low, "clip_high": high, "clip_frac": low + high,
             "ratio_max": float(r[live].max()) if live.any() else 1.0, "tokens": float(int(live.sum()))}
    if ref is not None and beta > 0:
        possible = torch.isfinite(logp) & live  # pi(y) = 0: weight 0 in KL(pi || ref)
        d = torch.where(possible, ref - logp.masked_fill(~possible, 0.0), torch.zeros_like(logp)).clamp(-20.0, 20.0)
        kl = d.exp() - d - 1.0
        per_token = per_token + beta * kl
        stats["kl"] = float(kl.detach()[live].sum()) / count
    return per_token.masked_fill(~live, 0.0).sum() / count, stats


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
                   length: int | None = None) -> tuple[list[Rollouts], list[list[int]]]:
    """``G`` rollouts of every prompt at ``params``; prompts of equal token length share one sampler batch (a
    batch's completions start at one position). Returns the batches and, for each, the indices (into
    ``prompts * G`` flattened prompt-major) of its rows."""
    ids = encode_prompts(tokenizer, prompts)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    out, rows = [], []
    for j, (_, members) in enumerate(sorted(by_len.items())):
        prompt = torch.tensor([ids[i] for i in members for _ in range(group_size)], dtype=torch.long)
        pg = torch.Generator().manual_seed(step_seed(seed, j, 0))
        dg = torch.Generator(device=model.device).manual_seed(step_seed(seed, j, 1))
        out.append(rollout(model, method, prompt, params, length=length, plan_generator=pg, generator=dg))
        rows.append([i * group_size + g for i in members for g in range(group_size)])
    return out, rows


def complete(model, method, tokenizer, prompts: list[str], group_size: int, params: SamplingParams,
             seed: int) -> tuple[list[Rollouts], list[list[int]], list[str]]:
    """:func:`rollout_groups` plus the decoded completions, in the order of ``prompts * G`` (prompt-major)."""
    batches, rows = rollout_groups(model, method, tokenizer, prompts, group_size, params, seed)
    completions = [""] * (len(prompts) * group_size)
    for r, idx in zip(batches, rows):
        for i, text in zip(idx, decode_completions(tokenizer, r.tokens, r.prompt_len)):
            completions[i] = text
    return batches, rows, completions


@torch.no_grad()
def evaluate_prompts(model, method, tokenizer, source: PromptSource, n: int, params: SamplingParams,
                     batch: int = 64, examples: int = 0) -> dict:
    """Held-out accuracy (reward > 0.5) and mean reward of one sample per prompt at ``params`` (its ``seed``
    fixes the prompts and the draws: the same every time it is called); ``examples`` of the prompts with their
    completions under ``"examples"``. ``n`` is at most :data:`~esolm.rl.config.MAX_EVAL_PROMPTS`."""
    n = check_eval_prompts(n)
    seed = params.seed
    was = model.training
    model.eval()
    prompts = source.test(n, seed)
    rewards, shown = [], []
    try:
        for s in range(0, n, batch):
            chunk = prompts[s:s + batch]
            _, _, completions = complete(model, method, tokenizer, chunk, 1, params, step_seed(seed, s))
            rewards.append(source.rewards(chunk, completions))
            shown += [{"prompt": p, "completion": c} for p, c in zip(chunk, completions)][:examples - len(shown)]
    finally:
        model.train(was)
    r = torch.cat(rewards)
    res = {"accuracy": float((r > 0.5).double().mean()), "reward": float(r.mean()), "prompts": n}
    if examples:
        res["examples"] = shown
    return res


class LitGRPO(pl.LightningModule):
    """GRPO with manual optimisation: each training step is one optimizer step; an RL iteration (rollouts)
    happens every ``inner_updates`` steps. ``config`` is the plain-dict :class:`~esolm.rl.config.RLConfig`."""

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
        return torch.optim.AdamW(self.policy.parameters(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                 weight_decay=o["weight_decay"])

    # -- one RL iteration's data -------------------------------------------------------------------------
    def _collect(self) -> dict:
        rl, k = self.rl, self.iteration
        rank = self.global_rank
        self.policy.eval()
        t0 = time.perf_counter()
        prompts = self.source.train(rl.prompts_per_step, step_seed(self.seed, k, rank))
        batches, rows, completions = complete(self.policy, self.method, self.tokenizer, prompts, rl.group_size,
                                              self.params, step_seed(self.seed, k, rank, 1))
        t_roll = time.perf_counter() - t0
        rewards = self.source.rewards([p for p in prompts for _ in range(rl.group_size)], completions)
        adv = group_advantages(rewards, rl.group_size, rl.scale_rewards)
        groups = []
        for j, (r, idx) in enumerate(zip(batches, rows)):
            g = dict(rollouts=r, adv=adv[idx], seed=step_seed(self.seed, k, rank, 2, j))
            with torch.no_grad():
                g["old"] = r.logprobs if rl.likelihood == "exact" else self._logprobs(self.policy, g)
                ref = self._reference[0]
                g["ref"] = self._logprobs(ref, g) if ref is not None and rl.beta > 0 else None
            groups.append(g)
        tokens = sum(g["rollouts"].completions.numel() for g in groups)
        nfe = sum(g["rollouts"].nfe for g in groups)
        return dict(groups=groups, rewards=rewards, tokens=tokens, nfe=nfe, rollout_s=t_roll,
                    collect_s=time.perf_counter() - t0)

    def _logprobs(self, model, g: dict) -> Tensor:
        gen = torch.Generator(device=model.device).manual_seed(g["seed"])
        return sequence_logprobs(model, self.method, g["rollouts"], self.rl.likelihood, gen, self.rl.mask_prompt)

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        rl = self.rl
        inner = self.global_step % rl.inner_updates
        if inner == 0 or self._batch is None:
            self._batch = self._collect()
        data = self._batch
        opt = self.optimizers()
        self.policy.eval()
        opt.zero_grad()
        t0 = time.perf_counter()
        total, parts = 0.0, []
        for g in data["groups"]:
            new = self._logprobs(self.policy, g)
            old = g["old"].to(new.device)
            ref = None if g["ref"] is None else g["ref"].to(new.device)
            loss, stats = grpo_loss(new, old, g["adv"].to(new.device), rl.clip_eps, ref, rl.beta)
            weight = g["rollouts"].completions.numel() / data["tokens"]
            self.manual_backward(loss * weight)
            total += float(loss.detach()) * weight
            parts.append(stats)
        stats = merge_stats(parts)
        stats.pop("tokens")
        clip = self.hparams["config"]["optim"]["grad_clip"]
        if clip > 0:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt.step()
        r = data["rewards"]
        log = {"loss": total, "reward": float(r.mean()), "accuracy": float((r > 0.5).double().mean()),
               "rollout_s": data["rollout_s"], "update_s": time.perf_counter() - t0, "nfe": float(data["nfe"]),
               **stats}
        for key, value in log.items():
            self.log(key, value, prog_bar=key in ("reward", "loss"), on_step=True, batch_size=1)
        if inner == rl.inner_updates - 1:
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
                               self.params.replace(seed=t["eval_seed"]))
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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("esolm_rl", {})
        self.iteration = int(state.get("iteration", 0))
        self.eval_history = list(state.get("eval_history", []))
        self.fit_seconds = float(state.get("fit_seconds", 0.0))
