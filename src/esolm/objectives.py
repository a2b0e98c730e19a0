"""Training objectives: AR, MDLM, Eso-LM (A/B) and BD3-LM (METHOD.md sections 2, 3 and 6).

Every objective returns a :class:`LossOutput`: for each loss term the *summed* negative log-likelihood
(in nats, already weighted) and the number of valid tokens it is normalised by. ``loss`` is the sum over
terms of ``nll / tokens``, an estimate of the negative ELBO per token; summing the raw pairs over a
dataset (:meth:`LossOutput.merge`) gives the exact dataset-level NELBO.

Conventions shared by all objectives:

* **carry-over**: only masked positions contribute; clean positions are copied, not predicted;
* **zero-masking**: the mask logit is set to -1e6 before the log-softmax (float32, or float64 for a float64 model);
* **padding** (``valid`` False): padded tokens are never masked, never counted, and are hidden from
  every other token's attention (a padded query only sees itself), so their content cannot matter;
* the model's train/eval mode is used as is (dropout); objectives never change it. ``obj.train()`` /
  ``obj.eval()`` only switch the low-variance training loss (and BD3-LM's clipped schedule) on or off:
  evaluation always uses the ELBO weights.

Eso-LM's two terms share one network. The first ``round(kappa * B)`` sequences of a batch get the MDM
term (diffusion phase: tokens sorted clean-first, causal attention for (B), prefix-LM for (A)), the rest
the AR term (sequential phase: ``[z0_sorted ; x0_sorted]`` with the sequential mask, logits from the
z-half). Each term is normalised over its own sub-batch and the two are summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from esolm.errors import UserError
from esolm.methods import AR, BD3LM, MDLM, EsoLM, Method, as_method
from esolm.model import masks
from esolm.model.backbone import at_least_fp32
from esolm.noise import EPS, LogLinearSchedule, antithetic_times, uniform
from esolm.orders import sort_clean_first

Tensor = torch.Tensor

MASK_LOGIT = -1e6


# --------------------------------------------------------------------------------------------------
# Loss container
# --------------------------------------------------------------------------------------------------


@dataclass
class LossOutput:
    """Term name -> (summed NLL in nats, token count). ``loss`` = sum over terms of NLL / tokens."""

    terms: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def loss(self) -> Tensor:
        total = None
        for nll, n in self.terms.values():
            v = nll / n.clamp_min(1)
            total = v if total is None else total + v
        if total is None:
            return torch.zeros(())
        return total

    @property
    def tokens(self) -> Tensor:
        total = torch.zeros((), dtype=torch.long)
        for _, n in self.terms.values():
            total = total.to(n.device) + n
        return total

    def detach(self) -> LossOutput:
        return LossOutput({k: (nll.detach(), n.detach()) for k, (nll, n) in self.terms.items()})

    def merge(self, other: LossOutput) -> LossOutput:
        """Term-wise sums of NLL and token counts (exact aggregation over batches)."""
        out = dict(self.terms)
        for k, (nll, n) in other.terms.items():
            if k in out:
                a, b = out[k]
                out[k] = (a + nll.to(a.device, a.dtype), b + n.to(b.device))
            else:
                out[k] = (nll, n)
        return LossOutput(out)

    @classmethod
    def zero(cls) -> LossOutput:
        return cls({})

    def to_dict(self) -> dict[str, float]:
        """Plain floats for logging: each term's per-token NLL, and the total."""
        d = {f"{k}_nll": float(nll.detach()) / max(int(n), 1) for k, (nll, n) in self.terms.items()}
        d.update({f"{k}_tokens": int(n) for k, (_, n) in self.terms.items()})
        d["loss"] = float(self.loss.detach())
        return d


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def token_nll(logits: Tensor, targets: Tensor, mask_id: int | None) -> Tensor:
    """Per-token ``-log p(target)`` in float32 (float64 for float64 logits), with zero-masking (mask logit
    -1e6)."""
    logits = at_least_fp32(logits)
    if mask_id is not None:
        logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), MASK_LOGIT)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


def hide_padding(mask: Tensor, key_valid: Tensor | None) -> Tensor | None:
    """Restrict ``mask`` ([1|B, 1, S, S]) to valid keys; every query keeps itself (no empty rows)."""
    if key_valid is None:
        return mask
    s = key_valid.shape[1]
    eye = torch.eye(s, dtype=torch.bool, device=key_valid.device)[None, None]
    base = mask if mask is not None else torch.ones(1, 1, s, s, dtype=torch.bool, device=key_valid.device)
    return (base & key_valid[:, None, None, :]) | eye


def _valid(x0: Tensor, valid: Tensor | None) -> Tensor | None:
    if valid is None:
        return None
    if valid.shape != x0.shape:
        raise UserError(f"valid mask shape {tuple(valid.shape)} != tokens shape {tuple(x0.shape)}")
    return valid.bool()


def _count(x0: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return torch.tensor(x0.numel(), device=x0.device)
    return valid.sum()


def _mask_id(model) -> int:
    m = model.config.mask_id
    if m is None:
        raise UserError("this objective needs a model with a mask token (config.mask_id)")
    return m


class Objective:
    """Base class: ``obj(model, x0, valid=None, generator=None, rank=0, world_size=1, time_generator=None)
    -> LossOutput``.

    ``time_generator`` (default: ``generator``) draws only the antithetic time offset ``u``; under DDP it is
    seeded alike on every rank, so the ranks' time slices form one stratified global batch, while
    ``generator`` (masks, orders) can differ per rank."""

    def __init__(self, method: Method | dict):
        self.method = as_method(method)
        self.training = True

    def train(self, mode: bool = True) -> Objective:
        self.training = mode
        return self

    def eval(self) -> Objective:
        return self.train(False)

    def __call__(self, model, x0: Tensor, valid: Tensor | None = None,
                 generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1,
                 time_generator: torch.Generator | None = None) -> LossOutput:
        times = generator if time_generator is None else time_generator
        return self.forward(model, x0, _valid(x0, valid), generator, rank, world_size, times)

    def forward(self, model, x0, valid, generator, rank, world_size, time_generator) -> LossOutput:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# AR
# --------------------------------------------------------------------------------------------------


class ARObjective(Objective):
    """Next-token prediction: ``x0[:, :-1] -> x0[:, 1:]`` under a causal mask (tokens: L - 1 per row)."""

    def forward(self, model, x0, valid, generator, rank, world_size, time_generator) -> LossOutput:
        inp, tgt = x0[:, :-1], x0[:, 1:]
        mask = masks.causal(inp.shape[1], x0.device)
        tv = None
        if valid is not None:
            mask = hide_padding(mask, valid[:, :-1])
            tv = valid[:, 1:] & valid[:, :-1]
        nll = token_nll(model(inp, mask=mask), tgt, model.config.mask_id)
        if tv is not None:
            nll = nll * tv
        return LossOutput({"ar": (nll.sum(), _count(tgt, tv))})


# --------------------------------------------------------------------------------------------------
# MDM term (MDLM, Eso-LM diffusion phase) and AR term (Eso-LM sequential phase)
# --------------------------------------------------------------------------------------------------


def mdm_term(model, x0: Tensor, valid: Tensor | None, generator, rank: int, world_size: int,
             schedule: LogLinearSchedule, attention: str, low_var: bool,
             time_generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Weighted masked-token NLL of one diffusion draw per sequence; returns (nll_sum, tokens).

    ``attention``: ``"bidirectional"`` (MDLM, natural order) or, on tokens sorted clean-first with the
    authors' random key, ``"causal"`` (Eso-LM B) or ``"prefix"`` (Eso-LM A).
    """
    b, n = x0.shape
    mask_id = _mask_id(model)
    times = generator if time_generator is None else time_generator
    t = antithetic_times(b, times, rank, world_size, device=x0.device)
    coef = torch.ones_like(t) if low_var else -schedule.weight(t)  # -(alpha'/(1-alpha)) >= 0
    is_mask = uniform((b, n), generator, x0.device) < schedule.mask_prob(t)[:, None]
    if valid is not None:
        is_mask &= valid
    xt = torch.where(is_mask, torch.full_like(x0, mask_id), x0)
    if attention == "bidirectional":
        logits = model(xt, mask=hide_padding(None, valid) if valid is not None else None)
        nll = token_nll(logits, x0, mask_id) * is_mask
    else:
        sort_idx = sort_clean_first(is_mask, generator)
        if attention == "causal":
            mask = masks.causal(n, x0.device)
        else:
            mask = masks.prefix_lm((~is_mask).sum(1), n, x0.device)
        vs = None if valid is None else valid.gather(1, sort_idx)
        logits = model(xt.gather(1, sort_idx), positions=sort_idx, mask=hide_padding(mask, vs))
        nll = token_nll(logits, x0.gather(1, sort_idx), mask_id) * is_mask.gather(1, sort_idx)
    return (nll * coef[:, None]).sum(), _count(x0, valid)


def sequential_term(model, x0: Tensor, valid: Tensor | None, generator, alpha0: float,
                    any_order: bool) -> tuple[Tensor, Tensor]:
    """Eso-LM's AR term: ``z0 ~ q0`` (mask w.p. 1 - alpha0); order = clean z0 tokens first (random for
    B, ``any_order``; ascending for A), then the masks left to right; one 2L pass ``[z0_sorted ; x0_sorted]``."""
    b, n = x0.shape
    mask_id = _mask_id(model)
    is_mask = uniform((b, n), generator, x0.device) < (1.0 - alpha0)
    if valid is not None:
        is_mask &= valid
    z0 = torch.where(is_mask, torch.full_like(x0, mask_id), x0)
    sort_idx = sort_clean_first(is_mask, generator, shuffle_clean=any_order, shuffle_masks=False)
    if any_order:
        mask = masks.sequential(n, x0.device)
    else:
        mask = masks.sequential_prefix((~is_mask).sum(1), n, x0.device)
    if valid is not None:
        vs = valid.gather(1, sort_idx)
        mask = hide_padding(mask, torch.cat([vs, vs], 1))
    x_s = x0.gather(1, sort_idx)
    inp = torch.cat([z0.gather(1, sort_idx), x_s], 1)
    logits = model(inp, positions=torch.cat([sort_idx, sort_idx], 1), mask=mask, logits_slice=slice(0, n))
    nll = token_nll(logits, x_s, mask_id) * is_mask.gather(1, sort_idx)
    return nll.sum(), _count(x0, valid)


class MDLMObjective(Objective):
    """MDLM: bidirectional DiT, natural positions, ``alpha_t = 1 - (1 - eps) t``, ELBO weight (or the
    low-variance weight -1 in training when ``low_var``)."""

    def forward(self, model, x0, valid, generator, rank, world_size, time_generator) -> LossOutput:
        low_var = self.training and self.method.low_var
        term = mdm_term(model, x0, valid, generator, rank, world_size, LogLinearSchedule(1.0),
                        "bidirectional", low_var, time_generator)
        return LossOutput({"mdm": term})


class EsoLMObjective(Objective):
    """Eso-LM (A) or (B): MDM term on the first ``round(kappa B)`` sequences, AR term on the rest."""

    def split(self, batch_size: int) -> int:
        return int(math.floor(self.method.batch_split * batch_size + 0.5))

    def forward(self, model, x0, valid, generator, rank, world_size, time_generator) -> LossOutput:
        m = self.method
        k = self.split(x0.shape[0])
        out = {}
        if k > 0:
            v = None if valid is None else valid[:k]
            out["mdm"] = mdm_term(model, x0[:k], v, generator, rank, world_size,
                                  LogLinearSchedule(m.alpha0), m.diffusion_attention, self.training and m.low_var,
                                  time_generator)
        if k < x0.shape[0]:
            v = None if valid is None else valid[k:]
            out["ar"] = sequential_term(model, x0[k:], v, generator, m.alpha0, m.any_order)
        return LossOutput(out)


# --------------------------------------------------------------------------------------------------
# BD3-LM
# --------------------------------------------------------------------------------------------------


class BD3LMObjective(Objective):
    """Block diffusion: one noise level per block (antithetic over batch x blocks), input
    ``[x_t ; x_0]`` with the block-diffusion mask, MDLM ELBO weight per block, natural positions.

    With ``clip = [beta, omega]`` the training masking rate is drawn from ``[beta, omega]`` (weight
    ``-1 / rate``); evaluation always uses the full schedule, so it stays a bound. With ``ignore_bos``
    token 0 of every sequence (the BOS) is never masked and is left out of the token count, as in the
    bd3lms reference; the random draws are the same either way."""

    def forward(self, model, x0, valid, generator, rank, world_size, time_generator) -> LossOutput:
        b, n = x0.shape
        bs = self.method.block_size
        if n % bs:
            raise UserError(f"bd3lm block_size {bs} must divide the sequence length {n}")
        nb = n // bs
        mask_id = _mask_id(model)
        clip = self.method.clip if self.training else None
        if clip is None:
            sched = LogLinearSchedule(1.0)
            t = antithetic_times(b * nb, time_generator, rank, world_size, device=x0.device)
            rate, coef = sched.mask_prob(t), -sched.weight(t)
        else:
            rate = antithetic_times(b * nb, time_generator, rank, world_size, low=clip[0], high=clip[1],
                                    device=x0.device).clamp_min(EPS)
            coef = 1.0 / rate
        rate = rate.view(b, nb).repeat_interleave(bs, dim=1)
        coef = coef.view(b, nb).repeat_interleave(bs, dim=1)
        is_mask = uniform((b, n), generator, x0.device) < rate
        counted = valid  # the tokens the loss is normalised by (valid ones, less the BOS)
        if self.method.ignore_bos:
            counted = torch.ones_like(x0, dtype=torch.bool) if valid is None else valid.clone()
            counted[:, 0] = False
        if counted is not None:
            is_mask &= counted
        xt = torch.where(is_mask, torch.full_like(x0, mask_id), x0)
        pos = torch.arange(n, device=x0.device).expand(b, n)
        mask = masks.block_diffusion(n, bs, x0.device)
        if valid is not None:
            mask = hide_padding(mask, torch.cat([valid, valid], 1))
        logits = model(torch.cat([xt, x0], 1), positions=torch.cat([pos, pos], 1), mask=mask,
                       logits_slice=slice(0, n))
        nll = token_nll(logits, x0, mask_id) * is_mask * coef
        return LossOutput({"mdm": (nll.sum(), _count(x0, counted))})


_OBJECTIVES: dict[type[Method], type[Objective]] = {AR: ARObjective, MDLM: MDLMObjective, EsoLM: EsoLMObjective,
                                                    BD3LM: BD3LMObjective}


def build_objective(method: Method | dict) -> Objective:
    """The objective of a method spec (or its dict): the registry, keyed by the spec's class."""
    m = as_method(method)
    return _OBJECTIVES[type(m)](m)
