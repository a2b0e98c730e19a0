"""The log-linear noise schedule and antithetic training times (METHOD.md section 2).

Each token of ``x0`` is kept with probability ``alpha_t`` and replaced by the mask otherwise::

    alpha_t = alpha0 * (1 - (1 - eps) * t),     t in [eps, 1],  eps = 1e-3
    d alpha_t / dt = -alpha0 * (1 - eps)

``alpha0 = 1`` is MDLM's schedule; Eso-LM scales it by ``alpha0`` so that the diffusion phase leaves
each token clean with probability ``alpha0`` at t -> 0. The MDM term of the negative ELBO weighs the
log-likelihood of each masked token by ``alpha'_t / (1 - alpha_t)`` (negative, so the term is positive).
The samplers walk the same schedule with ``eps = 0`` (``alpha_t = alpha0 (1 - t)`` on the grid
``t = k / T``, METHOD.md sections 5 and 6) through :meth:`LogLinearSchedule.reveal_prob`.

Training times are drawn with low-discrepancy ("antithetic") sampling over the *global* batch of ``n``
values: one uniform ``u`` shared by every process, ``t_i = (u / n + i / n) mod 1`` (one value in each
1/n bin), then mapped to ``[eps, 1]``. Process ``rank`` of ``world_size`` takes its contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esolm.errors import UserError
from esolm.methods import check_alpha0

Tensor = torch.Tensor

EPS = 1e-3


def uniform(shape, generator: torch.Generator | None = None, device=None,
            dtype: torch.dtype = torch.float32) -> Tensor:
    """``U[0, 1)`` draws of ``dtype`` from ``generator`` (on the generator's device), moved to ``device``.

    The one source of uniforms for noise, times and orders, so a seed fixes all of them."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


@dataclass(frozen=True)
class LogLinearSchedule:
    """``alpha_t = alpha0 * (1 - (1 - eps) t)``; ``alpha0 = 1`` is MDLM's log-linear schedule."""

    alpha0: float = 1.0
    eps: float = EPS

    def __post_init__(self) -> None:
        check_alpha0(self.alpha0)

    def alpha(self, t: Tensor) -> Tensor:
        """Probability that a token is still clean at time ``t``."""
        return self.alpha0 * (1.0 - (1.0 - self.eps) * t)

    def dalpha(self, t: Tensor) -> Tensor:
        """``d alpha_t / dt`` (constant, non-positive)."""
        return torch.full_like(t, -self.alpha0 * (1.0 - self.eps))

    def mask_prob(self, t: Tensor) -> Tensor:
        return 1.0 - self.alpha(t)

    def reveal_prob(self, t, s):
        """``(alpha_s - alpha_t) / (1 - alpha_t)``: probability that a token masked at ``t`` is clean at
        ``s < t`` (the ancestral step of the reverse process). Floats or tensors."""
        a_t, a_s = self.alpha(t), self.alpha(s)
        return (a_s - a_t) / (1.0 - a_t)

    def weight(self, t: Tensor) -> Tensor:
        """MDM ELBO weight ``alpha'_t / (1 - alpha_t)`` (<= 0); exactly 0 when ``alpha0 = 0``."""
        if self.alpha0 == 0:
            return torch.zeros_like(t)
        return self.dalpha(t) / (1.0 - self.alpha(t))


def antithetic_times(n_local: int, generator: torch.Generator | None = None, rank: int = 0,
                     world_size: int = 1, low: float = EPS, high: float = 1.0, device=None) -> Tensor:
    """This process's ``n_local`` times of a stratified global batch of ``n_local * world_size``.

    ``t_i = (u / n + i / n) mod 1`` for global indices ``i`` of this rank's slice, mapped to
    ``[low, high]`` (default ``[eps, 1]``). ``u`` is the generator's first draw, so identically seeded
    generators give the same ``u`` on every rank and the union of the slices is the global batch.
    """
    if n_local < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"invalid antithetic sampling: n_local={n_local}, rank={rank}, "
                         f"world_size={world_size}")
    n = n_local * world_size
    u = uniform((), generator, device)
    i = torch.arange(rank * n_local, (rank + 1) * n_local, device=device, dtype=torch.float32)
    t = torch.remainder(u / max(n, 1) + i / max(n, 1), 1.0)
    return (high - low) * t + low
