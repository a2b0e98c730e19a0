"""Likelihood evaluation: dataset NELBO, single-pass any-order log-likelihood, and the
importance-weighted bound over orders (METHOD.md section 4).

* :func:`nelbo` sums an objective's (NLL, token count) pairs over a dataset, so the per-token NELBO and
  perplexity are exact aggregates, not averages of batch means.
* :func:`anyorder_loglik` uses the causal structure of Eso-LM (B): one forward pass of
  ``[all masks sorted by sigma ; x sorted by sigma]`` with the sequential-phase mask gives every
  conditional ``log p(x_sigma(l) | x_sigma(<l))`` at once (z-query l sees only itself, a mask at its
  own rotary position, and the clean tokens earlier in the order).
* :func:`iw_bound` averages K such orders in probability space:
  ``-log (1/K) sum_k exp(ll_k)``, an upper bound on ``-log p(x)`` that decreases in K.
* :func:`exact_token_logprobs` is the exact per-token scorer of every method with ``exact_likelihood``: AR's
  one causal pass, Eso-LM (B)'s one sequential pass (:func:`order_token_logprobs`) in any order;
  :func:`exact_logits` gives the same pass's whole left-to-right conditionals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from esolm.errors import UserError
from esolm.methods import Method, as_method, require_any_order
from esolm.model import masks
from esolm.model.shift import check_start, is_shifted, query_logits, start_first
from esolm.objectives import LossOutput, Objective, build_objective, causal_logits, hide_padding, token_nll
from esolm.orders import sample_orders

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------
# NELBO over a dataset
# --------------------------------------------------------------------------------------------------


@dataclass
class NelboResult:
    nelbo: float  # nats per token (sum over terms of term NLL / term tokens)
    perplexity: float  # exp(nelbo)
    tokens: int
    terms: dict[str, float]  # per-token NLL of each term
    total: LossOutput  # float64 sums, for further merging


def _split_batch(batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        x0 = batch.get("input_ids", batch.get("x0"))
        valid = batch.get("valid", batch.get("attention_mask"))
        return x0, None if valid is None else valid.bool()
    x0, valid = batch
    return x0, None if valid is None else valid.bool()


@torch.no_grad()
def perplexity(nats_per_token: float) -> float:
    """``exp(nats per token)``; ``inf`` where that overflows a float (an untrained or broken model)."""
    return math.exp(nats_per_token) if nats_per_token < 709.0 else float("inf")


def nelbo(model, objective: Objective | dict, batches: Iterable, generator: torch.Generator | None = None,
          rank: int = 0, world_size: int = 1) -> NelboResult:
    """Exact dataset NELBO: sums of weighted NLL and of token counts over ``batches``.

    A batch is a token tensor ``[B, L]``, a pair ``(tokens, valid)``, or a dict with ``input_ids`` and
    ``attention_mask``. The objective is evaluated with ELBO weights (``objective.eval()``, restored
    afterwards); the model's mode is left as it is (call ``model.eval()`` for dropout-free numbers).
    """
    obj = build_objective(objective) if isinstance(objective, dict) else objective
    was_training = obj.training
    obj.eval()
    total = LossOutput.zero()
    try:
        for batch in batches:
            x0, valid = _split_batch(batch)
            out = obj(model, x0, valid, generator=generator, rank=rank, world_size=world_size)
            total = total.merge(LossOutput({k: (a.detach().double().cpu(), n.detach().cpu())
                                            for k, (a, n) in out.terms.items()}))
    finally:
        obj.train(was_training)
    value = float(total.loss)
    return NelboResult(nelbo=value, perplexity=perplexity(value), tokens=int(total.tokens),
                       terms={k: float(a) / max(int(n), 1) for k, (a, n) in total.terms.items()}, total=total)


# --------------------------------------------------------------------------------------------------
# Any-order likelihood
# --------------------------------------------------------------------------------------------------


def _check_anyorder(model, method: Method | dict | None) -> int:
    if method is not None:
        require_any_order(as_method(method), "the single-pass any-order likelihood")
    if getattr(model.config, "mask_id", None) is None:
        raise UserError("the any-order likelihood needs a model with a mask token (config.mask_id)")
    return model.config.mask_id


def _order_logits(model, x0: Tensor, order: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The one 2L sequential pass of :func:`order_token_logprobs`: the logits ``[B, L, V]`` of every step's
    conditional (mask logit as the network gives it), the tokens in order, and the valid steps (or None)."""
    n = x0.shape[1]
    x_s = x0.gather(1, order)
    if is_shifted(model):  # queries at p - 1; position 0 (first) is the given start token
        check_start(order)
        vs = None if valid is None else valid.bool().gather(1, order)
        return query_logits(model, x_s, order, torch.arange(n, device=x0.device)[None], vs), x_s, vs
    inp = torch.cat([torch.full_like(x_s, model.config.mask_id), x_s], 1)
    attn = masks.sequential(n, x0.device)
    vs = None
    if valid is not None:
        vs = valid.bool().gather(1, order)
        attn = hide_padding(attn, torch.cat([vs, vs], 1))
    logits = model(inp, positions=torch.cat([order, order], 1), mask=attn, logits_slice=slice(0, n))
    return logits, x_s, vs


def order_token_logprobs(model, x0: Tensor, order: Tensor, valid: Tensor | None = None,
                         method: Method | dict | None = None,
                         with_greedy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``log p(x_order(l) | x_order(<l))`` for every step l, float64 ``[B, L]`` in order (step) positions,
    from one 2L pass; padded steps give 0.

    Input ``[mask * L ; x sorted by order]`` with :func:`esolm.model.masks.sequential` and rotary positions
    ``order`` twice; the z-half logits (mask logit -1e6) give every conditional. Only valid for causal
    Eso-LM (B) models: pass ``method`` to have variant (A) / MDLM / AR models rejected. ``with_greedy``
    also returns ``[B, L]`` booleans: whether each token is the argmax of its conditional (mask excluded).
    """
    mask_id = _check_anyorder(model, method)
    logits, x_s, vs = _order_logits(model, x0, order, valid)
    ll = -token_nll(logits, x_s, mask_id).double()
    if vs is not None:
        ll = ll * vs
    shifted = is_shifted(model)
    if shifted:  # the start token: nothing predicts it (as for AR)
        ll[:, 0] = 0.0
    if not with_greedy:
        return ll
    best = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf")).argmax(-1) == x_s
    if shifted:
        best[:, 0] = True
    return ll, best


def _require_exact(method: Method | dict) -> Method:
    method = as_method(method)
    if not method.exact_likelihood:
        raise UserError(f"{method.label} has no exact likelihood (its Monte-Carlo NELBO is a bound: "
                        "Objective.conditional_nelbo)")
    return method


def exact_logits(model, method: Method | dict, x0: Tensor, valid: Tensor | None = None) -> Tensor:
    """Logits ``[B, L - 1, V]`` whose row ``l`` is the exact conditional of token ``l + 1`` given tokens
    ``0..l`` (left to right; mask logit as the network gives it): the pass of :func:`exact_token_logprobs`
    (Eso-LM (B): its one 2L sequential pass; AR: its one causal pass), as whole distributions, for callers
    that need more than the tokens' log-probabilities (the top alternatives of the HTTP API's ``echo``)."""
    method = _require_exact(method)
    if method.any_order:
        _check_anyorder(model, method)
        order = torch.arange(x0.shape[1], device=x0.device).expand_as(x0)
        return _order_logits(model, x0, order, valid)[0][:, 1:]
    return causal_logits(model, x0, valid)


def exact_token_logprobs(model, method: Method | dict, x0: Tensor, valid: Tensor | None = None,
                         order: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact ``log p(x_l | x_<l)`` of every token, float64 ``[B, L]``, and whether each token is the argmax of
    its conditional (mask excluded), ``[B, L]`` bool, for a method with ``exact_likelihood``.

    Any-order methods (Eso-LM (B)) score in ``order`` (default left to right) from one 2L pass, the values in
    step positions (:func:`order_token_logprobs`); the others (AR) only left to right, from one causal pass,
    where position 0 (which nothing predicts) gets 0 and True. Padded tokens (``valid`` False) get 0.
    UserError/ConfigError for a method whose likelihood is only a bound, or an order AR cannot follow."""
    method = _require_exact(method)
    if method.any_order:
        if order is None:
            order = torch.arange(x0.shape[1], device=x0.device).expand_as(x0)
        return order_token_logprobs(model, x0, order, valid, method, with_greedy=True)
    if order is not None:
        raise UserError(f"{method.label} scores left to right only; it takes no order")
    mask_id = getattr(model.config, "mask_id", None)
    logits = causal_logits(model, x0, valid)
    tgt = x0[:, 1:]
    ll = torch.zeros(x0.shape, dtype=torch.float64, device=x0.device)
    ll[:, 1:] = -token_nll(logits, tgt, mask_id).double()
    if mask_id is not None:
        logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    best = torch.ones(x0.shape, dtype=torch.bool, device=x0.device)
    best[:, 1:] = logits.argmax(-1) == tgt
    if valid is not None:
        ll = ll * valid.bool()
    return ll, best


def anyorder_loglik(model, x0: Tensor, order: Tensor, valid: Tensor | None = None,
                    method: Method | dict | None = None) -> Tensor:
    """``sum_l log p(x_order(l) | x_order(<l))`` for each sequence, float64 ``[B]``: the sum of
    :func:`order_token_logprobs`."""
    return order_token_logprobs(model, x0, order, valid, method).sum(1)


def log_mean_exp(ll: Tensor, dim: int = 0) -> Tensor:
    """``log (1/K) sum_k exp(ll_k)`` along ``dim`` in float64."""
    ll = ll.double()
    return torch.logsumexp(ll, dim) - math.log(ll.shape[dim])


@torch.no_grad()
def iw_bound(model, x0: Tensor, K: int, alpha0: float, generator: torch.Generator | None = None,
             chunk_size: int | None = None, valid: Tensor | None = None,
             method: Method | dict | None = None) -> Tensor:
    """Importance-weighted bound ``-log (1/K) sum_k exp(ll_k)`` per sequence (float64 ``[B]``, nats).

    The K x B (order, sequence) rows are evaluated ``chunk_size`` rows per forward pass (default B: one
    order of every sequence per pass), row ``k * B + b`` being order k of sequence b. Orders come from
    :func:`esolm.orders.sample_orders`. Aggregate perplexity exactly as
    ``exp(sum of bounds / number of valid tokens)``.
    """
    if K < 1:
        raise UserError(f"K must be >= 1, got {K}")
    _check_anyorder(model, method)
    b, n = x0.shape
    rows = K * b
    chunk = b if chunk_size is None else max(1, int(chunk_size))
    ll = torch.empty(rows, dtype=torch.float64, device=x0.device)
    for start in range(0, rows, chunk):
        r = torch.arange(start, min(start + chunk, rows), device=x0.device)
        idx = r % b
        vb = None if valid is None else valid.bool()[idx]
        order = sample_orders(len(r), n, alpha0, generator, vb, device=x0.device)
        if is_shifted(model):
            order = start_first(order)
        ll[start:start + len(r)] = anyorder_loglik(model, x0[idx], order, vb)
    return -log_mean_exp(ll.view(K, b), 0)
