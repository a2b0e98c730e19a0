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
probability ``mask_prompt``; one pass of the method's diffusion attention (``method.diffusion_attention``)
gives ``log p(y_j | masked input)`` for every completion position, used as if the tokens were independent.
It is biased (it ignores the order and the within-step dependencies that produced ``y``), but it applies to
Eso-LM (A) and MDLM models too. It is scored under the rollout's *tempered, untruncated* law: the nucleus
(``top_p``) of the one-step marginal is not the nucleus any token was drawn from (each was drawn given the
tokens decoded before it), so truncating it would give sampled tokens probability 0 (``-inf``, and a NaN
ratio ``-inf - (-inf)`` in GRPO) without making the estimate any closer to the law sampled. d1 scores its
estimate with the raw logits too.

Rollouts decode with the method's decoder (:func:`esolm.sampling.decoders.decoder_for`: its plan, then its
sampler) at a :class:`~esolm.sampling.params.SamplingParams`, so the knobs have one check and one meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esolm.devices import available_memory, format_bytes
from esolm.errors import UserError
from esolm.methods import Method, as_method
from esolm.model import masks
from esolm.model.shift import check_start, is_shifted, query_logits, start_first
from esolm.noise import uniform
from esolm.orders import sort_clean_first
from esolm.sampling.api import sampling_params
from esolm.sampling.decoders import decoder_for
from esolm.sampling.draw import sampling_logits
from esolm.sampling.params import SamplingParams

Tensor = torch.Tensor

LIKELIHOODS = ("exact", "mean-field")
ACTIVATION_FLOATS = 16  # floats kept per hidden unit, layer and token of a pass with gradients (q, k, v, MLP ...)


def rollout_row_bytes(config) -> int:
    """A rough upper estimate of the memory one rollout row (one sequence of ``config.length`` tokens) takes
    through an RL update: the sampler's recorded float32 step logits (L x V), the likelihood pass's float64
    sampling logits, log-softmax and gradient (3 x L x V x 8), the activations it keeps for the backward pass
    over up to 2L tokens, and its attention weights with their gradient."""
    length, vocab = config.length, config.vocab_size
    acts = 2 * length * config.hidden_size * config.n_layers * ACTIVATION_FLOATS * 4
    attention = 2 * config.n_heads * (2 * length) ** 2 * config.n_layers * 4
    return length * vocab * (4 + 3 * 8) + acts + attention


def check_rollout_memory(config, rows: int, device, what: str) -> None:
    """UserError (one line, before any work) when ``rows`` rollout rows (:func:`rollout_row_bytes` each) would not
    fit in the free memory of ``device`` (:func:`esolm.devices.available_memory`; no limit when unknown)."""
    free = available_memory(device)
    need = rows * rollout_row_bytes(config)
    if free is not None and need > free:
        raise UserError(f"{what} = {rows:,} rollouts of {config.length} tokens need about {format_bytes(need)} "
                        f"({format_bytes(rollout_row_bytes(config))} each) but only {format_bytes(free)} is free on "
                        f"{torch.device(device)}; use fewer")


@dataclass
class Rollouts:
    """``B`` sampled completions of prompts of one length ``prompt_len`` (one decoding plan's step sizes).

    * ``tokens`` [B, L]: prompt + completion, original order;
    * ``order`` [B, L]: sorted index -> position (prompt first; ``None`` for a decoder without a plan, MDLM);
    * ``bounds``: the plan's steps ``[lo, hi)`` in sorted indices (shared by the batch);
    * ``logprobs`` [B, L - prompt_len] float64: log-probability of each completion token (by position) under
      the law it was drawn from, recorded by the sampler's steps (``None`` unless the method has the exact
      likelihood, and for greedy decoding, which has no law);
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
    """``likelihood`` if ``method`` offers it (``method.rl_likelihoods``: ``exact`` needs Eso-LM (B), whose
    causal attention over the order gives a fixed KV cache); one-line UserError otherwise."""
    method = as_method(method)
    if likelihood not in LIKELIHOODS:
        raise UserError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    if not method.rl_likelihoods:
        raise UserError(f"RL needs a diffusion model (Eso-LM or MDLM), not {method.label}")
    if likelihood not in method.rl_likelihoods:
        raise UserError(f"the exact trajectory likelihood needs an Eso-LM (B) model, whose causal attention "
                        f"makes each step's conditionals fixed; {method.label} has bidirectional attention among "
                        f"clean tokens, so use likelihood=mean-field")
    return likelihood


def rollout_params(method: Method | dict, length: int, prompt_len: int, params: SamplingParams) -> SamplingParams:
    """``params`` resolved for a rollout of ``length`` tokens after a ``prompt_len``-token prompt: checked against
    the method and the length (UserError: steps beyond :func:`~esolm.sampling.params.max_steps`, alpha0 for a
    method without one), ``alpha0`` filled with the method's, ``steps`` defaulting to the completion length."""
    if not 0 <= prompt_len < length:
        raise UserError(f"a prompt of {prompt_len} tokens leaves no completion in a sequence of {length}")
    params = params.resolve(method, length)
    if params.speculative is not None:
        raise UserError("speculative decoding does not record the log-probabilities RL needs; leave it off")
    return params if params.steps is not None else params.replace(steps=length - prompt_len)


@torch.no_grad()
def rollout(model, method: Method | dict, prompt_ids: Tensor, params: SamplingParams | None = None, *,
            length: int | None = None, plan_generator: torch.Generator | None = None,
            generator: torch.Generator | None = None, **knobs) -> Rollouts:
    """Sample completions of ``prompt_ids`` [B, p] (one row per rollout) to ``length`` tokens (default the
    model's) with the method's decoder at ``params`` (or its fields as keywords: ``temperature``, ``top_p``,
    ``steps``, ``alpha0``; see :func:`rollout_params`), recording each token's log-probability under the law it
    was drawn from when the method has the exact likelihood.

    ``plan_generator`` draws the plan (order and step sizes), ``generator`` the tokens.
    """
    method = as_method(method)
    mask_id = model.config.mask_id
    length = length or model.config.length
    b, p = prompt_ids.shape
    params = rollout_params(method, length, p, sampling_params(params, **knobs))
    x = torch.full((b, length), mask_id, dtype=torch.long)
    x[:, :p] = prompt_ids.cpu()
    decoder = decoder_for(method)
    plan = decoder.plan(x == mask_id, p, params, plan_generator)
    recorded: list[tuple[int, int, Tensor]] = []
    keep = plan is not None and "exact" in method.rl_likelihoods and not params.greedy

    def record(k, lo, hi, logits, tokens):
        recorded.append((lo, hi, logits.clone()))

    out = decoder.run(model, x, params, prompt_len=p, plan=plan, plan_generator=plan_generator, generator=generator,
                      step_callback=record if keep else None)
    tokens = out.tokens.clone()  # the sampler's are inference tensors: autograd may not save them
    if plan is None:
        return Rollouts(tokens.cpu(), None, [], p, None, params.temperature, params.top_p, out.nfe)
    lp = None
    if keep:
        order = plan.order.to(tokens.device)
        x_sorted = tokens.gather(1, order)
        lp_sorted = torch.zeros(b, length, dtype=torch.float64, device=tokens.device)
        for lo, hi, logits in recorded:
            lp_sorted[:, lo:hi] = token_logprobs(logits, x_sorted[:, lo:hi], mask_id, params.top_p,
                                                 params.temperature)
        lp = torch.zeros_like(lp_sorted).scatter_(1, order, lp_sorted)[:, p:].cpu()
    return Rollouts(tokens.cpu(), plan.order.cpu(), plan.bounds(), p, lp, params.temperature, params.top_p, out.nfe)


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
    if is_shifted(model):  # each target's query with its step's clean prefix (esolm.model.shift), one pass
        check_start(order, "the rollouts' order")
        n_clean = torch.zeros(length, dtype=torch.long, device=device)
        for lo, hi in r.bounds:
            n_clean[lo:hi] = lo
        logits = query_logits(model, x_sorted, order, n_clean)[:, p:]
    else:
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
    seeded generators to compare policies on the same input), one pass of the method's diffusion attention,
    scored under the rollout's tempered law without the nucleus (module docstring): always finite."""
    method = as_method(method)
    device = model.device
    mask_id = model.config.mask_id
    tokens = r.tokens.to(device)
    b, length = tokens.shape
    p = r.prompt_len
    is_mask = torch.ones(b, length, dtype=torch.bool, device=device)
    is_mask[:, :p] = uniform((b, p), generator, device) < mask_prompt
    xt = torch.where(is_mask, torch.full_like(tokens, mask_id), tokens)
    attention = method.diffusion_attention
    if is_shifted(model):  # every masked token queried with the clean tokens (position 0, a prompt token, kept)
        is_mask[:, 0] = False
        sort_idx = start_first(sort_clean_first(is_mask, generator))
        out = query_logits(model, tokens.gather(1, sort_idx), sort_idx, (~is_mask).sum(1)[:, None])
        logits = torch.empty_like(out).scatter_(1, sort_idx[:, :, None].expand_as(out), out)
    elif attention == "bidirectional":
        logits = model(xt)
    else:  # causal (any order) or prefix-LM attention over the clean tokens sorted first
        sort_idx = sort_clean_first(is_mask, generator)
        attn = masks.causal(length, device) if attention == "causal" else masks.prefix_lm((~is_mask).sum(1),
                                                                                           length, device)
        out = model(xt.gather(1, sort_idx), positions=sort_idx, mask=attn)
        logits = torch.empty_like(out).scatter_(1, sort_idx[:, :, None].expand_as(out), out)
    return token_logprobs(logits[:, p:], tokens[:, p:], mask_id, None, r.temperature)


def sequence_logprobs(model, method: Method | dict, r: Rollouts, likelihood: str,
                      generator: torch.Generator | None = None, mask_prompt: float = 0.15) -> Tensor:
    """Per-token log-probabilities [B, L - p] with the chosen estimator (``exact`` or ``mean-field``)."""
    if likelihood == "exact":
        return trajectory_logprobs(model, r)
    return mean_field_logprobs(model, method, r, generator, mask_prompt)
