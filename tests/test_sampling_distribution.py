"""The samplers sample the distribution that the model and the schedule define (chi-square tests).

On L = 3 positions and 3 real tokens (+ mask) we enumerate the exact law of the output:
``P(x) = sum_orders P(order) prod_steps prod_{i in step} p_theta(x_i | clean tokens before the step)``,
where a parallel step takes the product of its per-position conditionals, each computed by an uncached
forward pass, and compare it with 20000 samples drawn in one batch by the cached sampler.
"""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from esolm import DiT, ModelConfig
from esolm.model import masks
from esolm.sampling import plan_from_counts, sample_esolm_b, sample_mdlm

V, M, L, N = 4, 3, 3, 20000
OUTCOMES = list(itertools.product(range(3), repeat=L))


def tiny_model(seed: int) -> DiT:
    """float64: the batch rows that share a context then get bitwise the same conditionals, so the exact law
    sums to 1 up to float64 rounding (in float32, kernels may round rows differently: ~1e-11 here)."""
    torch.manual_seed(seed)
    model = DiT(ModelConfig(vocab_size=V, mask_id=M, hidden_size=8, cond_dim=8, n_layers=2, n_heads=2,
                            length=L))
    model.randomize_zero_init(0.7)
    return model.double().eval()


def order_law(n_diffusion: int) -> dict[tuple, float]:
    """Law of the order: a uniform random order of n_diffusion positions, then the rest ascending."""
    law: dict[tuple, float] = {}
    perms = list(itertools.permutations(range(L)))
    for p in perms:
        key = p[:n_diffusion] + tuple(sorted(p[n_diffusion:]))
        law[key] = law.get(key, 0.0) + 1.0 / len(perms)
    return law


def probs(logits: torch.Tensor) -> torch.Tensor:
    lg = logits.double()
    lg[..., M] = float("-inf")
    return lg.softmax(-1)


ALL = torch.tensor(OUTCOMES)  # [27, L], every outcome in original order


@torch.no_grad()
def esolm_law(model, counts, n_diffusion) -> torch.Tensor:
    """Exact law of Eso-LM (B) decoding: all 27 outcomes at once, one causal pass per order and step."""
    law = torch.zeros(len(OUTCOMES), dtype=torch.float64)
    rows = torch.arange(len(OUTCOMES))
    for order, p_order in order_law(n_diffusion).items():
        pos = torch.tensor(order).expand(len(OUTCOMES), L)
        xs = ALL[:, list(order)]  # sorted
        p = torch.full((len(OUTCOMES),), p_order, dtype=torch.float64)
        lo = 0
        for n in counts:
            state = xs.clone()
            state[:, lo:] = M
            pr = probs(model(state, pos, mask=masks.causal(L)))
            for i in range(lo, lo + n):
                p *= pr[rows, i, xs[:, i]]
            lo += n
        law += p
    return law


@torch.no_grad()
def mdlm_first_hitting_law(model) -> torch.Tensor:
    """Exact law of one-token-per-call MDLM decoding in a uniformly random order."""
    law = torch.zeros(len(OUTCOMES), dtype=torch.float64)
    rows = torch.arange(len(OUTCOMES))
    for order, p_order in order_law(L).items():
        state = torch.full((len(OUTCOMES), L), M)
        p = torch.full((len(OUTCOMES),), p_order, dtype=torch.float64)
        for i in order:
            p *= probs(model(state))[rows, i, ALL[:, i]]
            state[:, i] = ALL[:, i]
        law += p
    return law


def chi2_pvalue(obs: torch.Tensor, law: torch.Tensor) -> float:
    """Pearson chi-square p-value; cells expecting fewer than 5 counts are pooled into one."""
    exp = law * obs.sum()
    small = exp < 5
    o = torch.cat([obs[~small], obs[small].sum()[None]]) if small.any() else obs
    e = torch.cat([exp[~small], exp[small].sum()[None]]) if small.any() else exp
    return float(chisquare(o.numpy(), e.numpy() * (o.sum() / e.sum()).item()).pvalue)


def histogram(tokens: torch.Tensor) -> torch.Tensor:
    assert not (tokens == M).any()
    idx = tokens[:, 0] * 9 + tokens[:, 1] * 3 + tokens[:, 2]
    return torch.bincount(idx, minlength=27).double()


@pytest.mark.parametrize("counts,n_diffusion", [([1, 1, 1], 3), ([2, 1], 3), ([3], 3), ([1, 1, 1], 1)],
                         ids=["one-per-step", "parallel-2+1", "parallel-3", "diffusion1+sequential2"])
def test_esolm_b_samples_the_model(counts, n_diffusion):
    model = tiny_model(0)
    law = esolm_law(model, counts, n_diffusion)
    assert abs(float(law.sum()) - 1.0) < 1e-12  # float64 sums of float64 softmax products
    x = torch.full((N, L), M)
    plan = plan_from_counts(x == M, counts, n_diffusion, torch.Generator().manual_seed(1))
    out = sample_esolm_b(model, x, plan, generator=torch.Generator().manual_seed(2))
    obs = histogram(out.tokens)
    p_value = chi2_pvalue(obs, law)
    assert p_value > 1e-3
    # the test has power: the same samples are rejected against another schedule's law
    other = esolm_law(model, [3] if counts != [3] else [1, 1, 1], 3)
    p_wrong = chi2_pvalue(obs, other)
    assert p_wrong < 1e-6


def test_mdlm_first_hitting_samples_the_model():
    model = tiny_model(1)
    law = mdlm_first_hitting_law(model)
    x = torch.full((N, L), M)
    out = sample_mdlm(model, x, sampler="first_hitting", generator=torch.Generator().manual_seed(0),
                      plan_generator=torch.Generator().manual_seed(1))
    obs = histogram(out.tokens)
    p_value = chi2_pvalue(obs, law)
    assert p_value > 1e-3
    # a one-shot parallel decode is a different law, and the test tells them apart
    with torch.no_grad():
        pr = probs(model(torch.full((1, L), M))[0])
    indep = torch.tensor([float(pr[0, a] * pr[1, b] * pr[2, c]) for a, b, c in OUTCOMES], dtype=torch.float64)
    p_wrong = chi2_pvalue(obs, indep)
    assert p_wrong < 1e-6
