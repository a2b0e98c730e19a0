"""Drawing tokens from logits (METHOD.md §5 "Token draw").

The mask token is never a valid output: its logit is set to ``-inf``. Optional nucleus (top-p)
filtering runs in float64 and always keeps the most likely token. Sampling is Gumbel-max with float64
noise — ``argmax(logits + G)``, ``G = -log(-log U)`` — which draws exactly from ``softmax(logits)``
and takes its randomness from the ``torch.Generator`` given, so results are reproducible.
"""

from __future__ import annotations

import torch

from esolm.methods import check_top_p

Tensor = torch.Tensor

_TINY = torch.finfo(torch.float64).tiny


def mask_logit(logits: Tensor, mask_id: int | None) -> Tensor:
    """float64 copy of ``logits`` with the mask token's logit at ``-inf``."""
    out = logits.to(torch.float64)
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


def gumbel_noise(shape, device, generator: torch.Generator | None = None) -> Tensor:
    u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
    return -torch.log(-torch.log(u.clamp_min(_TINY)))


def draw(logits: Tensor, mask_id: int | None = None, top_p: float | None = None,
         generator: torch.Generator | None = None, greedy: bool = False) -> Tensor:
    """Sample one token per row of ``logits`` [..., V] (raw network output); returns long [...]."""
    x = mask_logit(logits, mask_id)
    if greedy:
        return x.argmax(dim=-1)
    if top_p is not None:
        x = top_p_filter(x, top_p)
    return (x + gumbel_noise(x.shape, x.device, generator)).argmax(dim=-1)
