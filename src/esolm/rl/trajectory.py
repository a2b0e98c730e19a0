"""Rollouts and their log-likelihoods: the exact one-pass trajectory likelihood and d1's mean-field estimate.

**Exact (Eso-LM (B)).** A KV-cached rollout with plan steps ``[lo_k, hi_k)`` (sorted indices) draws the tokens
of step ``k`` from mask queries that see the clean tokens sorted before ``lo_k`` and, causally, the masks of
step ``k`` before them. So

    log pi(y | prompt) = sum_k sum_{j in [lo_k, hi_k)} log p(y_j | clean tokens before lo_k, masks lo_k..j)

and one forward pass over ``[x sorted ; one mask per decoded index]`` with :func:`esolm.model.masks.trajectory`
gives every term, with gradients: the same logits as the sampler's steps (``tests/test_rl_trajectory.py``).
The log-probabilities are those of the law actually sampled (:func:`esolm.sampling.draw.sampling_logits`:
temperature, then nucleus), so the importance ratios of GRPO are exact for any ``temperature``/``top_p``.

**Mean-field (d1 / diffu-GRPO, the baseline).** The completion fully masked, each prompt token masked with
probability ``mask_prompt``; one pass of the method's diffusion attention gives ``log p(y_j | masked input)``
for every completion position, used as if the tokens were independent. It is biased (it ignores the order
and the within-step dependencies that produced ``y``), but it applies to Eso-LM (A) and MDLM models too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esolm.errors import UserError
from esolm.methods import Method, as_method, check_temperature, check_top_p
from esolm.model import masks
from esolm.noise import uniform
from esolm.orders import sort_clean_first
from esolm.sampling.draw import sampling_logits
from esolm.sampling.esolm import sample_esolm_a, sample_esolm_b
from esolm.sampling.mdlm import sample_mdlm
from esolm.sampling.schedule import plan_binomial

Tensor = torch.Tensor

LIKELIHOODS = ("exact", "mean-field")


@dataclass
class Rollouts:
    """``B`` sampled completions of prompts of one length ``prompt_len`` (one decoding plan's step sizes).

    * ``tokens`` [B, L]: prompt + completion, original order;
    * ``order`` [B, L]: sorted index -> position (prompt first; ``None`` for MDLM, which has no order);
    * ``bounds``: the plan's steps ``[lo, hi)`` in sorted indices (shared by the batch);
    * ``logprobs`` [B, L - prompt_len] float64: log-probability of each completion token (by position) under
      the law it was drawn from, recorded by the sampler's steps (``None`` for MDLM);
    * ``temperature``, ``top_p``: that law.
    """

    tokens: Tensor
    order: Tensor | None
    bounds: list[tuple[int, int]]
    prompt_len: int
    logprobs: Tensor | None
    temperature: float = 1.0
    top_p: float | None = None
    nfe: int = 0

    @property
    def completions(self) -> Tensor:
        return self.tokens[:, self.prompt_len:]


def token_logprobs(logits: Tensor, targets: Tensor, mask_id: int | None, top_p: float | None,
                   temperature: float) -> Tensor:
    """float64 ``log q(target)`` under the sampled law of ``logits`` [..., V]; targets [...]."""
    lp = sampling_logits(logits, mask_id, top_p, temperature).log_softmax(-1)
    return lp.gather(-1, targets[..., None])[..., 0]


def check_likelihood(likelihood: str, method: Method | dict) -> str:
    """``exact`` needs Eso-LM (B) (causal attention over the order, hence a fixed KV cache); one-line error."""
    method = as_method(method)
    if likelihood not in LIKELIHOODS:
        raise UserError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    if method.name not in ("esolm", "mdlm"):
        raise UserError(f"RL needs a diffusion model (Eso-LM or MDLM), not {method.label}")
    if likelihood == "exact" and not (method.name == "esolm" and method.variant == "B"):
        raise UserError(f"the exact trajectory likelihood needs an Eso-LM (B) model, whose causal attention "
                        f"makes each step's conditionals fixed; {method.label} has bidirectional attention among "
                        f"clean tokens, so use likelihood=mean-field")
    return likelihood


@torch.no_grad()
def rollout(model, method: Method | dict, prompt_ids: Tensor, *, length: int | None = None, steps: int | None = None,
            alpha0: float | None = None, temperature: float = 1.0, top_p: float | None = None,
            plan_generator: torch.Generator | None = None, generator: torch.Generator | None = None) -> Rollouts:
    """Sample completions of ``prompt_ids`` [B, p] (one row per rollout) to ``length`` tokens (default the
    model's), recording each token's log-probability under the law it was drawn from.

    Eso-LM uses the binomial schedule with ``steps`` (default the number of free tokens) and ``alpha0``
    (default the method's); MDLM ancestral sampling with ``steps``.
    """
    method = as_method(method)
    temperature, top_p = check_temperature(temperature), check_top_p(top_p)
    mask_id = model.config.mask_id
    length = length or model.config.length
    b, p = prompt_ids.shape
    if not 0 <= p < length:
        raise UserError(f"a prompt of {p} tokens leaves no completion in a sequence of {length}")
    x = torch.full((b, length), mask_id, dtype=torch.long)
    x[:, :p] = prompt_ids.cpu()
    if method.name == "mdlm":
        out = sample_mdlm(model, x, steps=steps or length - p, temperature=temperature, top_p=top_p,
                          generator=generator, plan_generator=plan_generator)
        return Rollouts(out.tokens.cpu().clone(), None, [], p, None, temperature, top_p, out.nfe)
    a0 = method.alpha0 if alpha0 is None else alpha0
    plan = plan_binomial(x == mask_id, steps or length - p, a0, plan_generator)
    recorded: list[tuple[int, int, Tensor]] = []

    def record(k, lo, hi, logits, tokens):
        recorded.append((lo, hi, logits.clone()))

    fn = sample_esolm_a if method.variant == "A" else sample_esolm_b
    out = fn(model, x, plan, temperature=temperature, top_p=top_p, generator=generator, step_callback=record)
    tokens = out.tokens.clone()  # the sampler's are inference tensors: autograd may not save them
    order = plan.order.to(tokens.device)
    x_sorted = tokens.gather(1, order)
    lp_sorted = torch.zeros(b, length, dtype=torch.float64, device=tokens.device)
    for lo, hi, logits in recorded:
        lp_sorted[:, lo:hi] = token_logprobs(logits, x_sorted[:, lo:hi], mask_id, top_p, temperature)
    lp = torch.zeros_like(lp_sorted).scatter_(1, order, lp_sorted)[:, p:]
    return Rollouts(tokens.cpu(), plan.order.cpu(), plan.bounds(), p, lp.cpu(), temperature, top_p, out.nfe)


def trajectory_logprobs(model, r: Rollouts) -> Tensor:
    """Exact per-token log-probabilities [B, L - p] (float64, by completion position) of the rollouts'
    trajectories under ``model``, from one forward pass (differentiable)."""
    if r.order is None:
        raise UserError("the exact trajectory likelihood needs Eso-LM (B) rollouts (a decoding order)")
    device = model.device
    mask_id = model.config.mask_id
    tokens, order = r.tokens.to(device), r.order.to(device)
    b, length = tokens.shape
    p = r.prompt_len
    x_sorted = tokens.gather(1, order)
    inp = torch.cat([x_sorted, torch.full((b, length - p), mask_id, dtype=torch.long, device=device)], 1)
    positions = torch.cat([order, order[:, p:]], 1)
    attn = masks.trajectory(length, r.bounds, device)
    logits = model(inp, positions=positions, mask=attn, logits_slice=slice(length, None))
    lp_sorted = token_logprobs(logits, x_sorted[:, p:], mask_id, r.top_p, r.temperature)
    return torch.zeros_like(lp_sorted).scatter(1, order[:, p:] - p, lp_sorted)


def mean_field_logprobs(model, method: Method | dict, r: Rollouts, generator: torch.Generator | None = None,
                        mask_prompt: float = 0.15) -> Tensor:
    """d1's one-step estimate [B, L - p] (float64, by completion position): the completion fully masked,
    each prompt token masked with probability ``mask_prompt`` (draws from ``generator``: pass identically
    seeded generators to compare policies on the same input), one pass of the method's diffusion attention."""
    method = as_method(method)
    device = model.device
    mask_id = model.config.mask_id
    tokens = r.tokens.to(device)
    b, length = tokens.shape
    p = r.prompt_len
    is_mask = torch.ones(b, length, dtype=torch.bool, device=device)
    is_mask[:, :p] = uniform((b, p), generator, device) < mask_prompt
    xt = torch.where(is_mask, torch.full_like(tokens, mask_id), tokens)
    if method.name == "mdlm":
        logits = model(xt)
    else:
        sort_idx = sort_clean_first(is_mask, generator)
        if method.variant == "B":
            attn = masks.causal(length, device)
        else:
            attn = masks.prefix_lm((~is_mask).sum(1), length, device)
        out = model(xt.gather(1, sort_idx), positions=sort_idx, mask=attn)
        logits = torch.empty_like(out).scatter_(1, sort_idx[:, :, None].expand_as(out), out)
    return token_logprobs(logits[:, p:], tokens[:, p:], mask_id, r.top_p, r.temperature)


def sequence_logprobs(model, method: Method | dict, r: Rollouts, likelihood: str,
                      generator: torch.Generator | None = None, mask_prompt: float = 0.15) -> Tensor:
    """Per-token log-probabilities [B, L - p] with the chosen estimator (``exact`` or ``mean-field``)."""
    if likelihood == "exact":
        return trajectory_logprobs(model, r)
    return mean_field_logprobs(model, method, r, generator, mask_prompt)
