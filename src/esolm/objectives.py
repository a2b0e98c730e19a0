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

:meth:`Objective.conditional_nelbo` scores rows instead of training on them: the negative ELBO of the
``maskable`` tokens of each row given the others (kept clean), float64 ``[B]``, always with the ELBO weights
(lm-eval's Monte-Carlo ``loglikelihood``). It runs the same term functions as the training loss (the same
draws, masks and network passes), only with fewer tokens allowed to be masked and per-row sums: for Eso-LM its
diffusion term at the model's alpha0 plus its sequential term on every row; for BD3-LM ``ignore_bos`` keeps
position 0 clean; for AR it is the exact NLL of the maskable tokens, each given the tokens before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from esolm.errors import ConfigError, UserError
from esolm.methods import AR, BD3LM, MDLM, EsoLM, Method, as_method
from esolm.model import masks
from esolm.model.backbone import at_least_fp32
from esolm.model.shift import is_shifted, query_logits, start_first
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


def _valid(x0: Tensor, valid: Tensor | None, what: str = "valid") -> Tensor | None:
    if valid is None:
        return None
    if valid.shape != x0.shape:
        raise UserError(f"{what} mask shape {tuple(valid.shape)} != tokens shape {tuple(x0.shape)}")
    return valid.bool()


def _count(x0: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return torch.tensor(x0.numel(), device=x0.device)
    return valid.sum()


def _scored(model, x0: Tensor, valid: Tensor | None) -> Tensor:
    """Tokens a diffusion term scores: every valid one, but position 0 under the shifted query convention (the
    given start token, as for AR)."""
    if is_shifted(model):
        return _count(x0[:, 1:], None if valid is None else valid[:, 1:])
    return _count(x0, valid)


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

    def conditional_nelbo(self, model, x0: Tensor, valid: Tensor | None, maskable: Tensor,
                          generator: torch.Generator | None = None,
                          times: torch.Generator | None = None) -> Tensor:
        """One-draw negative ELBO of each row's ``maskable`` tokens given its other tokens, float64 ``[B]`` nats.

        The other valid tokens stay clean (the context); padding (``valid`` False) is hidden and never masked;
        the weights are the ELBO's whatever ``self.training`` says (no low-variance weight, no clipping). The
        draws are the training loss's: times antithetic over the rows from ``times`` (default ``generator``),
        masks and orders from ``generator``. To average ``m`` draws of ``R`` rows, tile them (``x0.repeat(m,
        1)``: row ``j * R + r`` is draw ``j`` of row ``r``) so each row's ``m`` times fall one in each ``1/m``
        stratum, and average ``out.view(m, R)`` over dim 0. AR has no draws: its value is the exact NLL."""
        valid = _valid(x0, valid)
        maskable = _valid(x0, maskable, "maskable")
        if maskable is None:
            raise UserError("conditional_nelbo needs the maskable tokens (a [B, L] boolean mask)")
        if valid is not None:
            maskable = maskable & valid
        return self.conditional(model, x0, valid, maskable, generator, generator if times is None else times)

    def conditional(self, model, x0, valid, maskable, generator, times) -> Tensor:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# AR
# --------------------------------------------------------------------------------------------------


def causal_logits(model, x0: Tensor, valid: Tensor | None) -> Tensor:
    """Logits ``[B, L - 1, V]`` of ``x0[:, 1:]``, each from the tokens before it: one causal pass over
    ``x0[:, :-1]``, padding hidden (AR's training pass and its exact likelihood)."""
    inp = x0[:, :-1]
    mask = masks.causal(inp.shape[1], x0.device)
    if valid is not None:
        mask = hide_padding(mask, valid[:, :-1])
    return model(inp, mask=mask)


class ARObjective(Objective):
    """Next-token prediction: ``x0[:, :-1] -> x0[:, 1:]`` under a causal mask (tokens: L - 1 per row)."""

    def forward(self, model, x0, valid, generator, rank, world_size, time_generator) -> LossOutput:
        tgt = x0[:, 1:]
        tv = None if valid is None else valid[:, 1:] & valid[:, :-1]
        nll = token_nll(causal_logits(model, x0, valid), tgt, model.config.mask_id)
        if tv is not None:
            nll = nll * tv
        return LossOutput({"ar": (nll.sum(), _count(tgt, tv))})

    def conditional(self, model, x0, valid, maskable, generator, times) -> Tensor:
        """Exact: ``-sum log p(x_l | x_<l)`` over the maskable positions (position 0, which nothing predicts,
        is refused)."""
        if bool(maskable[:, 0].any()):
            raise UserError("an AR model cannot score position 0 (no token before it predicts it)")
        nll = token_nll(causal_logits(model, x0, valid), x0[:, 1:], model.config.mask_id).double()
        return (nll * maskable[:, 1:]).sum(1)


# --------------------------------------------------------------------------------------------------
# MDM term (MDLM, Eso-LM diffusion phase) and AR term (Eso-LM sequential phase)
# --------------------------------------------------------------------------------------------------


def _mdm_draw(model, x0: Tensor, valid: Tensor | None, maskable: Tensor | None, generator, times,
              rank: int, world_size: int, schedule: LogLinearSchedule, attention: str) -> tuple[Tensor, Tensor]:
    """One diffusion draw per row: antithetic times ``t`` [B] from ``times``, masks (only where ``maskable``)
    and the clean-first order from ``generator``; returns the unweighted masked-token NLL [B, L] (in the pass's
    token order) and ``t``."""
    b, n = x0.shape
    mask_id = _mask_id(model)
    t = antithetic_times(b, times, rank, world_size, device=x0.device)
    is_mask = uniform((b, n), generator, x0.device) < schedule.mask_prob(t)[:, None]
    if maskable is not None:
        is_mask &= maskable
    if is_shifted(model):  # queries at p - 1 (esolm.model.shift); position 0 is the given start token
        if attention != "causal":
            raise ConfigError(f"the shifted query convention needs causal any-order attention, not {attention!r}")
        is_mask[:, 0] = False
        sort_idx = start_first(sort_clean_first(is_mask, generator))
        vs = None if valid is None else valid.gather(1, sort_idx)
        logits = query_logits(model, x0.gather(1, sort_idx), sort_idx, (~is_mask).sum(1)[:, None], vs)
        return token_nll(logits, x0.gather(1, sort_idx), mask_id) * is_mask.gather(1, sort_idx), t
    xt = torch.where(is_mask, torch.full_like(x0, mask_id), x0)
    if attention == "bidirectional":
        logits = model(xt, mask=hide_padding(None, valid) if valid is not None else None)
        return token_nll(logits, x0, mask_id) * is_mask, t
    sort_idx = sort_clean_first(is_mask, generator)
    if attention == "causal":
        mask = masks.causal(n, x0.device)
    else:
        mask = masks.prefix_lm((~is_mask).sum(1), n, x0.device)
    vs = None if valid is None else valid.gather(1, sort_idx)
    logits = model(xt.gather(1, sort_idx), positions=sort_idx, mask=hide_padding(mask, vs))
    return token_nll(logits, x0.gather(1, sort_idx), mask_id) * is_mask.gather(1, sort_idx), t


def mdm_term(model, x0: Tensor, valid: Tensor | None, generator, rank: int, world_size: int,
             schedule: LogLinearSchedule, attention: str, low_var: bool,
             time_generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Weighted masked-token NLL of one diffusion draw per sequence; returns (nll_sum, tokens).

    ``attention``: ``"bidirectional"`` (MDLM, natural order) or, on tokens sorted clean-first with the
    authors' random key, ``"causal"`` (Eso-LM B) or ``"prefix"`` (Eso-LM A).
    """
    times = generator if time_generator is None else time_generator
    nll, t = _mdm_draw(model, x0, valid, valid, generator, times, rank, world_size, schedule, attention)
    coef = torch.ones_like(t) if low_var else -schedule.weight(t)  # -(alpha'/(1-alpha)) >= 0
    return (nll * coef[:, None]).sum(), _scored(model, x0, valid)


def mdm_rows(model, x0: Tensor, valid: Tensor | None, maskable: Tensor, generator, times,
             schedule: LogLinearSchedule, attention: str) -> Tensor:
    """:func:`mdm_term`'s draw with only ``maskable`` tokens masked, per row with the ELBO weight: float64 [B]."""
    nll, t = _mdm_draw(model, x0, valid, maskable, generator, times, 0, 1, schedule, attention)
    return nll.double().sum(1) * -schedule.weight(t).double()


def _sequential_draw(model, x0: Tensor, valid: Tensor | None, maskable: Tensor | None, generator, alpha0: float,
                     any_order: bool) -> Tensor:
    """One sequential-phase draw per row: the masked-token NLL [B, L] in the sorted order."""
    b, n = x0.shape
    mask_id = _mask_id(model)
    is_mask = uniform((b, n), generator, x0.device) < (1.0 - alpha0)
    if maskable is not None:
        is_mask &= maskable
    if is_shifted(model):
        if not any_order:
            raise ConfigError("the shifted query convention needs causal any-order attention (Eso-LM (B))")
        is_mask[:, 0] = False
        sort_idx = start_first(sort_clean_first(is_mask, generator, shuffle_clean=True, shuffle_masks=False))
        x_s = x0.gather(1, sort_idx)
        vs = None if valid is None else valid.gather(1, sort_idx)
        logits = query_logits(model, x_s, sort_idx, torch.arange(n, device=x0.device)[None], vs)
        return token_nll(logits, x_s, mask_id) * is_mask.gather(1, sort_idx)
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
    return token_nll(logits, x_s, mask_id) * is_mask.gather(1, sort_idx)


def sequential_term(model, x0: Tensor, valid: Tensor | None, generator, alpha0: float,
                    any_order: bool) -> tuple[Tensor, Tensor]:
    """Eso-LM's AR term: ``z0 ~ q0`` (mask w.p. 1 - alpha0); order = clean z0 tokens first (random for
    B, ``any_order``; ascending for A), then the masks left to right; one 2L pass ``[z0_sorted ; x0_sorted]``."""
    return _sequential_draw(model, x0, valid, valid, generator, alpha0, any_order).sum(), _scored(model, x0, valid)


def sequential_rows(model, x0: Tensor, valid: Tensor | None, maskable: Tensor, generator, alpha0: float,
                    any_order: bool) -> Tensor:
    """:func:`sequential_term`'s draw with only ``maskable`` tokens masked, per row: float64 [B]."""
    return _sequential_draw(model, x0, valid, maskable, generator, alpha0, any_order).double().sum(1)


class MDLMObjective(Objective):
    """MDLM: bidirectional DiT, natural positions, ``alpha_t = 1 - (1 - eps) t``, ELBO weight (or the
    low-variance weight -1 in training when ``low_var``)."""

    def forward(self, model, x0, valid, generator, rank, world_size, time_generator) -> LossOutput:
        low_var = self.training and self.method.low_var
        term = mdm_term(model, x0, valid, generator, rank, world_size, LogLinearSchedule(1.0),
                        self.method.diffusion_attention, low_var, time_generator)
        return LossOutput({"mdm": term})

    def conditional(self, model, x0, valid, maskable, generator, times) -> Tensor:
        return mdm_rows(model, x0, valid, maskable, generator, times, LogLinearSchedule(1.0),
                        self.method.diffusion_attention)


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

    def conditional(self, model, x0, valid, maskable, generator, times) -> Tensor:
        """Both terms on every row: the diffusion term at the model's alpha0, then the sequential term."""
        m = self.method
        if is_shifted(model) and bool(maskable[:, 0].any()):
            raise UserError("this model cannot score position 0 (it is the given start token)")
        diffusion = mdm_rows(model, x0, valid, maskable, generator, times, LogLinearSchedule(m.alpha0),
                             m.diffusion_attention)
        return diffusion + sequential_rows(model, x0, valid, maskable, generator, m.alpha0, m.any_order)


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

    @staticmethod
    def _rates(rows: int, nb: int, times, rank: int, world_size: int, clip, device) -> tuple[Tensor, Tensor]:
        """Masking rate and loss weight of each block, ``[rows, nb]`` each: the full schedule with the ELBO weight,
        or with ``clip = (beta, omega)`` rates drawn from ``[beta, omega]`` with weight ``1 / rate``."""
        if clip is None:
            sched = LogLinearSchedule(1.0)
            t = antithetic_times(rows * nb, times, rank, world_size, device=device)
            rate, coef = sched.mask_prob(t), -sched.weight(t)
        else:
            rate = antithetic_times(rows * nb, times, rank, world_size, low=clip[0], high=clip[1],
                                    device=device).clamp_min(EPS)
            coef = 1.0 / rate
        return rate.view(rows, nb), coef.view(rows, nb)

    def _counted(self, x0: Tensor, valid: Tensor | None) -> Tensor | None:
        """The tokens that may be masked and are counted: the valid ones, less token 0 with ``ignore_bos``."""
        if not self.method.ignore_bos:
            return valid
        counted = torch.ones_like(x0, dtype=torch.bool) if valid is None else valid.clone()
        counted[:, 0] = False
        return counted

    def _draw(self, model, x0, valid, maskable, generator, times, rank, world_size, clip) -> Tensor:
        """One draw: the weighted masked-token NLL [B, L] of the ``[x_t ; x_0]`` pass (masks only where
        ``maskable``)."""
        b, n = x0.shape
        bs = self.method.block_size
        mask_id = _mask_id(model)
        rate, coef = self._rates(b, n // bs, times, rank, world_size, clip, x0.device)
        rate, coef = rate.repeat_interleave(bs, dim=1), coef.repeat_interleave(bs, dim=1)
        is_mask = uniform((b, n), generator, x0.device) < rate
        if maskable is not None:
            is_mask &= maskable
        xt = torch.where(is_mask, torch.full_like(x0, mask_id), x0)
        pos = torch.arange(n, device=x0.device).expand(b, n)
        mask = masks.block_diffusion(n, bs, x0.device)
        if valid is not None:
            mask = hide_padding(mask, torch.cat([valid, valid], 1))
        logits = model(torch.cat([xt, x0], 1), positions=torch.cat([pos, pos], 1), mask=mask,
                       logits_slice=slice(0, n))
        return token_nll(logits, x0, mask_id) * is_mask * coef

    def forward(self, model, x0, valid, generator, rank, world_size, time_generator) -> LossOutput:
        n, bs = x0.shape[1], self.method.block_size
        if n % bs:
            raise UserError(f"bd3lm block_size {bs} must divide the sequence length {n}")
        counted = self._counted(x0, valid)  # the tokens the loss is normalised by (valid ones, less the BOS)
        clip = self.method.clip if self.training else None
        nll = self._draw(model, x0, valid, counted, generator, time_generator, rank, world_size, clip)
        return LossOutput({"mdm": (nll.sum(), _count(x0, counted))})

    def conditional(self, model, x0, valid, maskable, generator, times) -> Tensor:
        """Rows of any width: padded (hidden) to whole blocks; the full schedule (no clip); with ``ignore_bos``
        position 0 is never masked."""
        n, bs = x0.shape[1], self.method.block_size
        width = math.ceil(n / bs) * bs
        if width > model.config.length:
            raise UserError(f"bd3lm: {n} tokens padded to blocks of {bs} exceed the model length "
                            f"{model.config.length}")
        pad = width - n
        valid = torch.ones_like(x0, dtype=torch.bool) if valid is None else valid
        x0 = F.pad(x0, (0, pad))
        valid, maskable = (F.pad(v, (0, pad), value=False) for v in (valid, maskable))
        maskable = maskable & self._counted(x0, valid)
        return self._draw(model, x0, valid, maskable, generator, times, 0, 1, None).double().sum(1)


_OBJECTIVES: dict[type[Method], type[Objective]] = {AR: ARObjective, MDLM: MDLMObjective, EsoLM: EsoLMObjective,
                                                    BD3LM: BD3LMObjective}


def build_objective(method: Method | dict) -> Objective:
    """The objective of a method spec (or its dict): the registry, keyed by the spec's class."""
    m = as_method(method)
    return _OBJECTIVES[type(m)](m)
