"""Likelihood evaluation of a trained model on token rows (``esolm eval``).

For one model and one token dataset this computes

* the **NELBO perplexity**: ``exp(sum over terms of summed NLL / token count)`` with the model's own
  method (alpha0 and batch_split as in training, ELBO weights, never the low-variance training loss),
  aggregated exactly over the whole dataset (:func:`esolm.likelihood.nelbo`). For an AR model it is the
  exact perplexity;
* the **importance-weighted bound** with K generation orders (causal Eso-LM (B) only):
  ``-log (1/K) sum_k p(x | order_k)`` per sequence from the single-pass any-order likelihood, summed
  over sequences and divided by the number of tokens. It decreases towards ``-log p(x)`` as K grows
  (METHOD.md section 4).

Every random choice (diffusion times, masks, orders) comes from one seeded ``torch.Generator``, so a
run is reproducible. Memory does not grow with K: the orders are evaluated in chunks of (order,
sequence) rows sized to the device's free memory (:func:`iw_chunk_rows`) and combined exactly.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from esolm.config import ModelConfig
from esolm.devices import available_memory, format_bytes
from esolm.errors import UserError
from esolm.evaluation.datasets import batches
from esolm.likelihood import iw_bound, nelbo, perplexity
from esolm.methods import Method, as_method, check_alpha0, require_any_order
from esolm.objectives import build_objective

Tensor = torch.Tensor

# (order, sequence) log-likelihoods one iw_bound call holds (float64): 8 MiB whatever K is
IW_GROUP_ROWS = 1 << 20


@dataclass
class EvalResult:
    """Perplexities of one dataset (all aggregated over tokens, never averaged over batches)."""

    dataset: str
    sequences: int
    tokens: int
    nelbo: float  # nats per token
    perplexity: float  # exp(nelbo)
    terms: dict[str, float] = field(default_factory=dict)  # per-token NLL of each loss term
    iw: dict[int, dict[str, float]] = field(default_factory=dict)  # K -> {"nll": nats/token, "perplexity"}
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["iw"] = {str(k): v for k, v in self.iw.items()}
        return d


def iw_row_bytes(config: ModelConfig) -> int:
    """Memory of one (order, sequence) row of the IW bound: a 2L-token pass, ~2L x vocab float32 logits."""
    return 2 * config.length * config.vocab_size * 4


def iw_chunk_rows(config: ModelConfig, batch_size: int, chunk: int | None = None,
                  device: str | torch.device = "cpu") -> int:
    """(order, sequence) rows per forward pass of the IW bound.

    ``chunk`` when given (UserError when it cannot fit in the device's free memory); else one order of
    every sequence of a batch (``batch_size`` rows), fewer when those would take more than half the free
    memory. UserError when not even one row fits. Free memory: :func:`esolm.devices.available_memory`
    (no limit when unknown).
    """
    row = iw_row_bytes(config)
    free = available_memory(device)
    if free is None:
        return chunk or batch_size
    if row > free:
        raise UserError(f"the importance-weighted bound needs {format_bytes(row)} per (order, sequence) row "
                        f"(2 x length {config.length} x vocabulary {config.vocab_size} x 4 bytes) but only "
                        f"{format_bytes(free)} is free on {torch.device(device)}")
    if chunk is not None:
        if chunk * row > free:
            raise UserError(f"an IW chunk of {chunk} rows needs {format_bytes(chunk * row)} but only "
                            f"{format_bytes(free)} is free on {torch.device(device)}; use a chunk of at most "
                            f"{free // row} rows")
        return chunk
    return max(1, min(batch_size, free // 2 // row))


def _iw_nll(model, x0: Tensor, valid: Tensor, k: int, alpha0: float, generator: torch.Generator, chunk: int,
            method: Method) -> Tensor:
    """:func:`esolm.likelihood.iw_bound` for any K in bounded memory: groups of orders, combined exactly.

    A group's row count is a multiple of ``chunk``, so the chunks and the random orders are those of a
    single ``iw_bound`` call over all K orders.
    """
    b = len(x0)
    unit = chunk // math.gcd(b, chunk)  # orders per group: unit * b rows is a multiple of chunk
    group = unit * max(1, IW_GROUP_ROWS // (unit * b))
    log_sum = None  # log sum_k p(x | order_k) over the groups so far, float64 [B]
    for start in range(0, k, group):
        g = min(group, k - start)
        part = math.log(g) - iw_bound(model, x0, g, alpha0, generator, chunk_size=chunk, valid=valid,
                                      method=method)
        log_sum = part if log_sum is None else torch.logaddexp(log_sum, part)
    return math.log(k) - log_sum


MAX_IW_K = 1 << 16  # orders per sequence; the paper's largest is 5000, and each order is one 2L pass


def check_iw_ks(iw_ks: Sequence[int]) -> None:
    """IW K values: positive integers up to :data:`MAX_IW_K` (a typo such as 100000000 would be days of work)."""
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in iw_ks):
        raise UserError(f"IW K values must be positive integers, got {list(iw_ks)}")
    if any(k > MAX_IW_K for k in iw_ks):
        raise UserError(f"IW K values above {MAX_IW_K:,} orders are refused (each order is one 2L pass per "
                        f"sequence), got {max(iw_ks):,}")


@torch.no_grad()
def evaluate(model, method: Method | dict, ids: np.ndarray, valid: np.ndarray, *, dataset: str = "data",
             batch_size: int = 16, iw_ks: Sequence[int] = (), iw_alpha0: float | None = None,
             iw_chunk: int | None = None, seed: int = 0, max_batches: int | None = None) -> EvalResult:
    """NELBO (and importance-weighted) perplexity of ``model`` on token rows ``ids``/``valid``.

    ``iw_alpha0`` is the alpha0 of the order distribution (default: the model's own); ``iw_chunk`` is the
    number of (order, sequence) rows per forward pass of the IW bound (default: :func:`iw_chunk_rows`).
    """
    method = as_method(method)
    if len(ids) == 0:
        raise UserError(f"dataset {dataset!r} has no sequences")
    device = next(model.parameters()).device
    if iw_ks:
        require_any_order(method, "the importance-weighted bound")
        check_iw_ks(iw_ks)
        a0 = method.alpha0 if iw_alpha0 is None else check_alpha0(iw_alpha0, "iw_alpha0")
        chunk = iw_chunk_rows(model.config, batch_size, iw_chunk, device)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        res = nelbo(model, build_objective(method), batches(ids, valid, batch_size, device, max_batches), gen)
        n_seq = min(len(ids), batch_size * max_batches) if max_batches is not None else len(ids)
        out = EvalResult(dataset=dataset, sequences=n_seq, tokens=res.tokens, nelbo=res.nelbo,
                         perplexity=res.perplexity, terms=res.terms)
        for k in iw_ks:
            gen = torch.Generator(device=device).manual_seed(seed + 1_000_003 * k)
            total, count = 0.0, 0
            for x0, v in batches(ids, valid, batch_size, device, max_batches):
                total += float(_iw_nll(model, x0, v, k, a0, gen, chunk, method).sum())
                count += int(v.sum())
            out.iw[k] = {"nll": total / count, "perplexity": perplexity(total / count)}
    finally:
        model.train(was_training)
    out.seconds = time.perf_counter() - t0
    return out
