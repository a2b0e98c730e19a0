"""Drawing tokens from logits (METHOD.md §5 "Token draw").

The mask token is never a valid output: its logit is set to ``-inf``. The logits are divided by the
``temperature``, then optional nucleus (top-p) filtering runs in float64 and always keeps the most likely
token: :func:`sampling_logits` is that law, the one every sampler draws from (and whose log-probabilities
RL records). Sampling is Gumbel-max with float64
noise — ``argmax(logits + G)``, ``G = -log(-log U)`` — which draws exactly from ``softmax(logits)``
and takes its randomness from the ``torch.Generator`` given, so results are reproducible.
"""

from __future__ import annotations

import torch

from esolm.methods import check_temperature, check_top_p

Tensor = torch.Tensor

_TINY = torch.finfo(torch.float64).tiny


def mask_logit(logits: Tensor, mask_id: int | None) -> Tensor:
    """float64 copy of ``logits`` with the mask token's logit at ``-inf``."""
    out = logits.to(torch.float64, copy=True)  # a copy even when float64: the caller's logits stay intact
    if mask_id is not None:
        out[..., mask_id] = float("-inf")
    return out


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (at least one); float64."""
    top_p = check_top_p(top_p)
    logits = logits.to(torch.float64)
    if top_p is None:
        return logits
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
    drop = before >= top_p
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def sampling_logits(logits: Tensor, mask_id: int | None = None, top_p: float | None = None,
                    temperature: float = 1.0) -> Tensor:
    """float64 logits of the law :func:`draw` samples: mask removed, divided by ``temperature``,
    nucleus-filtered (``-inf`` outside the nucleus). ``log_softmax`` of it gives the sampled log-probabilities."""
    x = mask_logit(logits, mask_id)
    t = check_temperature(temperature)
    if t != 1.0:
        x = x / t
    return top_p_filter(x, top_p) if top_p is not None else x


def gumbel_noise(shape, device, generator: torch.Generator | None = None) -> Tensor:
    u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
    return -torch.log(-torch.log(u.clamp_min(_TINY)))


def draw(logits: Tensor, mask_id: int | None = None, top_p: float | None = None,
         generator: torch.Generator | None = None, greedy: bool = False, temperature: float = 1.0) -> Tensor:
    """Sample one token per row of ``logits`` [..., V] (raw network output) from :func:`sampling_logits`;
    returns long [...]. ``greedy`` takes the argmax (temperature and top-p do not change it)."""
    if greedy:
        return mask_logit(logits, mask_id).argmax(dim=-1)
    x = sampling_logits(logits, mask_id, top_p, temperature)
    return (x + gumbel_noise(x.shape, x.device, generator)).argmax(dim=-1)
