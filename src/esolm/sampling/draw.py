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
    return _nucleus(logits, top_p)


def _nucleus(logits: Tensor, top_p: float | Tensor) -> Tensor:
    """:func:`top_p_filter` of float64 ``logits`` with a threshold ``top_p`` (a float, or a float64 tensor
    broadcast against ``logits[..., :1]``: one threshold per row). Every op is row-wise."""
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


def draw_segments(logits: Tensor, counts: list[int], mask_id: int | None, top_p: list[float | None],
                  temperature: list[float], greedy: list[bool], generators: list[torch.Generator | None]) -> Tensor:
    """:func:`draw` for many requests at once. ``logits`` [N, V] holds ``counts[j]`` consecutive rows for
    request ``j``; returns long [N], segment ``j`` equal to ``draw(segment[None], mask_id, top_p[j],
    generators[j], greedy[j], temperature[j])[0]``. Every op is row-wise, and each sampled request draws its
    uniforms from its own generator, in order, in the shape ``draw`` does, so the tokens are the same."""
    x = mask_logit(logits, mask_id)
    sampled = [j for j, g in enumerate(greedy) if not g]
    x_at, y_at, n = [0], {}, 0  # first row of each segment in x; of each sampled segment in y (sampled rows)
    for c in counts:
        x_at.append(x_at[-1] + c)
    for j in sampled:
        y_at[j], n = n, n + counts[j]

    def rows(segments: list[int], at) -> Tensor:
        return torch.tensor([i for j in segments for i in range(at[j], at[j] + counts[j])], device=x.device)

    def per_row(values: list[float], segments: list[int]) -> Tensor:
        return torch.tensor([v for j, v in zip(segments, values) for _ in range(counts[j])], dtype=torch.float64,
                            device=x.device)[:, None]

    if len(sampled) == len(counts):
        out, y = None, x
    else:
        out = x.argmax(dim=-1)  # the greedy rows' tokens; the sampled rows' are replaced below
        if not sampled:
            return out
        sel = rows(sampled, x_at)
        y = x[sel]
    t = [check_temperature(temperature[j]) for j in sampled]
    if any(v != 1.0 for v in t):
        y = y / per_row(t, sampled)  # x / 1.0 == x exactly
    nucleus = [j for j in sampled if check_top_p(top_p[j]) is not None]
    if nucleus:
        p = per_row([check_top_p(top_p[j]) for j in nucleus], nucleus)
        if len(nucleus) == len(sampled):
            y = _nucleus(y, p)
        else:
            at = rows(nucleus, y_at)
            y[at] = _nucleus(y[at], p)
    u = torch.empty_like(y)
    for j in sampled:
        u[y_at[j]:y_at[j] + counts[j]].uniform_(0.0, 1.0, generator=generators[j])  # what torch.rand does
    # y - log(-log u) is y + gumbel_noise exactly (IEEE subtraction adds the negation)
    drawn = (y - torch.log(-torch.log(u.clamp_min_(_TINY)))).argmax(dim=-1)
    if out is None:
        return drawn
    out[sel] = drawn
    return out
