"""Sampling schedules: how many tokens each network call decodes, and in which order (METHOD.md §5).

A :class:`Plan` is everything a sampler needs besides the network:

* ``order`` [B, L]: a permutation per sample, *sorted index -> original position* (built by
  :mod:`esolm.orders`). Given tokens (prompt / infill) come first, then the positions decoded by the
  diffusion phase (in a random order, or stride by stride), then the positions of the sequential phase
  in ascending (left-to-right) order.
* ``counts``: how many tokens each network call decodes, after the given prefix. Shared across the
  batch, so every sample of a batch has the same number of clean tokens at every step and the KV cache
  keeps one length for the whole batch. ``sum(counts) == L - n_given`` and ``NFE == len(counts)``.

The Eso-LM schedule (``binomial_counts``): with ``T`` steps and ``alpha_t = alpha0 (1 - t)``, walk
``t = 1, 1 - 1/T, ..., 1/T`` and draw ``n_t ~ Binomial(remaining, (alpha_s - alpha_t) / (1 - alpha_t))``
with ``s = t - 1/T``. A step with ``n_t = 0`` changes nothing and is dropped (no network call). When
``alpha0 = 1`` any remainder is appended as one last step; otherwise the ``L - sum n_t`` positions left
are decoded one per step, left to right (the sequential phase). Every random choice comes from the
``torch.Generator`` passed in, so plans are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esolm.errors import UserError
from esolm.methods import check_alpha0
from esolm.noise import LogLinearSchedule
from esolm.orders import random_order, strided_order
from esolm.sampling.common import DIFFUSION, SEQUENTIAL

Tensor = torch.Tensor


@dataclass
class Plan:
    """A decoding plan for one batch (see module docstring)."""

    order: Tensor
    counts: list[int]
    n_given: int
    n_diffusion: int

    @property
    def nfe(self) -> int:
        """Network calls the plan costs (one per step; given tokens ride along with the first step)."""
        return len(self.counts)

    @property
    def length(self) -> int:
        return self.order.shape[1]

    @property
    def n_sequential(self) -> int:
        return self.length - self.n_given - self.n_diffusion

    @property
    def diffusion_end(self) -> int:
        """First sorted index of the sequential phase (``length`` when there is none)."""
        return self.n_given + self.n_diffusion

    def phase(self, lo: int) -> str:
        """The phase of the step that starts at sorted index ``lo``."""
        return DIFFUSION if lo < self.diffusion_end else SEQUENTIAL

    def bounds(self) -> list[tuple[int, int]]:
        """Sorted-index range ``[lo, hi)`` decoded by each step."""
        out, lo = [], self.n_given
        for n in self.counts:
            out.append((lo, lo + n))
            lo += n
        return out


def binomial_counts(n: int, steps: int, alpha0: float, generator: torch.Generator | None = None) -> list[int]:
    """Diffusion-phase unmask counts for ``n`` masked tokens over ``steps`` steps, zero steps dropped.

    Probabilities are float64. With ``alpha0 = 1`` every token is decoded by diffusion (a remainder is
    appended as one last step); with ``alpha0 < 1`` about ``(1 - alpha0) n`` tokens are left over for the
    sequential phase (not included here).
    """
    alpha0 = check_alpha0(alpha0)
    if steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    schedule = LogLinearSchedule(alpha0, eps=0.0)
    counts: list[int] = []
    remaining = int(n)
    total = torch.zeros(1, dtype=torch.float64)
    for k in range(steps, 0, -1):
        if remaining == 0:
            break
        p = min(max(schedule.reveal_prob(k / steps, (k - 1) / steps), 0.0), 1.0)
        if p == 0.0:
            continue
        total.fill_(remaining)
        c = int(torch.binomial(total, torch.tensor([p], dtype=torch.float64), generator=generator).item())
        if c:
            counts.append(c)
            remaining -= c
    if alpha0 == 1.0 and remaining:
        counts.append(remaining)
    return counts


def _free_counts(free: Tensor) -> int:
    n = free.sum(dim=1)
    if (n != n[0]).any():
        raise UserError("every sample of a batch must have the same number of given tokens")
    return int(n[0])


def plan_from_counts(free: Tensor, counts: list[int], n_diffusion: int | None = None,
                     generator: torch.Generator | None = None) -> Plan:
    """A plan with fixed per-step counts: the first ``n_diffusion`` decoded tokens (default: all) take a
    random order, the rest (the sequential tail) go left to right."""
    n_free = _free_counts(free)
    counts = [int(c) for c in counts if int(c) > 0]
    if sum(counts) != n_free:
        raise UserError(f"step counts sum to {sum(counts)} but {n_free} tokens are to be decoded")
    d = n_free if n_diffusion is None else int(n_diffusion)
    order = random_order(free, d, generator)
    return Plan(order, counts, int(free.shape[1] - n_free), d)


def plan_binomial(free: Tensor, steps: int, alpha0: float, generator: torch.Generator | None = None) -> Plan:
    """The Eso-LM schedule: binomial diffusion steps, then one step per remaining token, left to right."""
    n_free = _free_counts(free)
    diff = binomial_counts(n_free, steps, alpha0, generator)
    d = sum(diff)
    return Plan(random_order(free, d, generator), diff + [1] * (n_free - d), int(free.shape[1] - n_free), d)


def plan_left_to_right(length: int, prompt_len: int, batch: int = 1) -> Plan:
    """AR decoding as a plan: the prompt given, then one position per step, left to right."""
    order = torch.arange(length).expand(batch, length).clone()
    return Plan(order, [1] * (length - prompt_len), prompt_len, 0)


def plan_one_per_step(free: Tensor, alpha0: float, generator: torch.Generator | None = None) -> Plan:
    """One token per network call (NFE = number of free tokens): each free position is decoded by the
    diffusion phase with probability ``alpha0`` (random order), the rest left to right afterwards.
    This is the T -> infinity limit of :func:`plan_binomial`."""
    alpha0 = check_alpha0(alpha0)
    n_free = _free_counts(free)
    p = torch.tensor([alpha0], dtype=torch.float64)
    d = n_free
    if alpha0 < 1.0:
        d = int(torch.binomial(p.new_full((1,), n_free), p, generator=generator).item())
    return Plan(random_order(free, d, generator), [1] * n_free, int(free.shape[1] - n_free), d)


def plan_strided(free: Tensor, steps: int, alpha0: float = 1.0, shuffle: bool = False,
                 generator: torch.Generator | None = None) -> Plan:
    """The "subcontext" schedule with ``S = steps`` strides (:func:`esolm.orders.strided_order`).

    Stride ``j`` holds the free positions ``{j, j + S, j + 2S, ...}``. The diffusion phase decodes the
    first ``d = round(alpha0 * n_free)`` (halves up) positions of the strided order, one stride per
    network call (the last stride it reaches may be cut short); the sequential phase then decodes the
    other ``n_free - d`` positions one per call, left to right. So ``NFE = (strides reached) + n_free - d``:
    with ``alpha0 = 1`` it is the number of non-empty strides, ``S`` unless given tokens fill a whole
    stride (no tail); with ``L = 16, S = 4, alpha0 = 0.5``,
    ``d = 8`` fills two strides of 4 and ``NFE = 2 + 8 = 10``. ``shuffle`` randomises the order of the
    strides and the order within each stride, as the authors' ``subcontext_shuffle``.
    """
    alpha0 = check_alpha0(alpha0)
    if steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    n_free = _free_counts(free)
    d = int(math.floor(alpha0 * n_free + 0.5))
    order, sizes = strided_order(free, steps, d, shuffle, generator)
    counts, left = [], d
    for size in sizes:
        if left == 0:
            break
        counts.append(min(size, left))
        left -= counts[-1]
    return Plan(order, counts + [1] * (n_free - d), free.shape[1] - n_free, d)
