"""Scale-free gradient quality (``esolm.rl.gradients``) on gradients drawn from a known Gaussian."""

import math

import pytest
import torch

from esolm.rl.gradients import gradient_quality, snr_from_moments

N, D = 20, 5000


def draws(seed=0):
    """``N`` draws of ``mu + z``, ``z ~ N(0, I_D)``, ``||mu||^2 = D / 4``: true SNR 0.25."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.full((D,), 0.5, dtype=torch.float64)
    return mu, mu + torch.randn(N, D, generator=g, dtype=torch.float64)


def test_snr_is_unbiased_and_scale_free():
    mu, g = draws()
    q = gradient_quality(g)
    assert q["snr"] == pytest.approx(0.25, rel=0.05)
    assert q["snr_plugin"] == pytest.approx(0.25 + 1 / N, rel=0.05)  # the plug-in is off by tr / n: 20% here
    assert q["trace_cov"] == pytest.approx(D, rel=0.02) and q["batches"] == N
    big = gradient_quality(g * 1e3)
    for k in ("snr", "snr_plugin", "cosine_mean", "cosine_std", "cosine_median"):
        assert big[k] == pytest.approx(q[k], rel=1e-9)
    assert snr_from_moments(q["mean_norm2"], q["trace_cov"], N) == (q["snr"], q["snr_plugin"])


def test_cosine_to_a_fixed_and_to_a_leave_one_out_reference():
    mu, g = draws(1)
    fixed = gradient_quality(g, mu)
    assert fixed["cosine_mean"] == pytest.approx(1 / math.sqrt(1 + 1 / 0.25), abs=0.02)  # 0.447
    assert 0.005 < fixed["cosine_std"] < 0.03  # per batch: about 1 / sqrt(||mu||^2 + D) = 0.0126
    assert fixed["cosine_min"] <= fixed["cosine_q10"] <= fixed["cosine_median"] <= fixed["cosine_q90"] \
        <= fixed["cosine_max"]
    m2 = D / 4
    loo = gradient_quality(g)  # reference r_i: the mean of the other N - 1 draws
    want = m2 / (math.sqrt(m2 + D) * math.sqrt(m2 + D / (N - 1)))
    assert loo["cosine_mean"] == pytest.approx(want, abs=0.02)  # 0.406: the reference's own noise counts
    assert gradient_quality(g, g.clone()) == loo  # [n, d] reference: leave-one-out of its rows
    # an estimator as precise (SNR 0.25) but biased to a mean orthogonal to mu: cosine 0 to the reference
    perp = mu * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(D // 2)
    other = gradient_quality(perp + torch.randn(N, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
                             g)
    assert other["snr"] == pytest.approx(0.25, rel=0.05) and abs(other["cosine_mean"]) < 0.02


def test_degenerate_gradients():
    zero = gradient_quality(torch.zeros(4, 3))  # every batch's rewards tied: no gradient at all
    assert math.isnan(zero["snr"]) and math.isnan(zero["snr_plugin"]) and zero["cosine_mean"] == 0.0
    assert gradient_quality(torch.ones(4, 3))["snr"] == math.inf


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="n >= 2"):
        gradient_quality(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="reference must be"):
        gradient_quality(torch.zeros(3, 4), torch.zeros(2, 4))
