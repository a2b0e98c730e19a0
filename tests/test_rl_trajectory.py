"""The exact trajectory likelihood of RL (``esolm.rl.trajectory``): one pass == the KV-cached sampler's steps.

* the one-pass log-likelihood equals the sum of the log-probabilities the cached sampler recorded, for
  alpha0 in {1, 0.5, 0.25, 0}, multi-token steps, prompts, temperature and nucleus (float64, 1e-9);
* its gradient equals the gradient of the step-by-step computation (autograd through uncached steps);
* the recorded log-probabilities are those of the law actually sampled (chi-square, temperature + top-p);
* on an enumerable model (V = 3, L = 3) the exact per-plan law sums to 1 and matches rollout frequencies,
  while d1's mean-field estimate is measurably biased.
"""

import itertools

import pytest
import torch

from esolm import DiT, ModelConfig
from esolm.errors import UserError
from esolm.model import masks
from esolm.objectives import build_objective
from esolm.rl.trajectory import (
    Rollouts,
    check_likelihood,
    mean_field_logprobs,
    rollout,
    token_logprobs,
    trajectory_logprobs,
)
from esolm.sampling.draw import sampling_logits
from test_sampling_distribution import chi2_pvalue

pytestmark = pytest.mark.numerics

ESOLM_B = {"name": "esolm", "variant": "B", "alpha0": 1.0}


def tiny(vocab=13, length=12, seed=0, dtype=torch.float64, std=0.3):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, mask_id=vocab - 1, hidden_size=32, cond_dim=16, n_layers=2, n_heads=2,
                      length=length)
    return DiT(cfg).randomize_zero_init(std).to(dtype).eval()


def gens(seed):
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)


def trained_on_repeats(steps: int = 150) -> DiT:
    """A V = 3, L = 3 Eso-LM (B) fitted to sequences ``aaa`` (+ 10% uniform noise): its conditionals depend
    strongly on the clean tokens, which a one-step mean-field estimate cannot see."""
    model = tiny(vocab=4, length=3, seed=1, std=0.1).train()
    objective = build_objective(ESOLM_B)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.enable_grad():
        for _ in range(steps):
            _fit_step(model, objective, opt, g)
    return model.eval()


def _fit_step(model, objective, opt, g):
    x0 = torch.randint(0, 3, (64, 1), generator=g).expand(64, 3).clone()
    noise = torch.rand(64, 3, generator=g) < 0.1
    x0[noise] = torch.randint(0, 3, (int(noise.sum()),), generator=g)
    loss = objective(model, x0, generator=g).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def stepwise_logprobs(model, r: Rollouts) -> torch.Tensor:
    """The sampler's path without a cache: for each step, a causal pass over the sorted tokens up to the
    step's end with the step's own positions masked; log-probs by completion position (differentiable)."""
    mask_id = model.config.mask_id
    tokens, order, p = r.tokens, r.order, r.prompt_len
    xs = tokens.gather(1, order)
    b, length = xs.shape
    parts = []
    for lo, hi in r.bounds:
        inp = xs[:, :hi].clone()
        inp[:, lo:hi] = mask_id
        logits = model(inp, positions=order[:, :hi], mask=masks.causal(hi))[:, lo:hi]
        parts.append(token_logprobs(logits, xs[:, lo:hi], mask_id, r.top_p, r.temperature))
    lp_sorted = torch.cat(parts, 1)
    return torch.zeros(b, length - p, dtype=torch.float64).scatter(1, order[:, p:] - p, lp_sorted)


@pytest.mark.parametrize("alpha0", [1.0, 0.5, 0.25, 0.0])
@pytest.mark.parametrize("temperature,top_p", [(1.0, None), (0.7, 0.9)])
def test_one_pass_equals_the_cached_samplers_steps(alpha0, temperature, top_p):
    model = tiny()
    prompt = torch.tensor([[3, 5, 7]]).expand(4, 3)
    for seed in range(50):  # the first seed whose plan has a multi-token step (alpha0 > 0): deterministic
        pg, dg = gens(seed)
        r = rollout(model, ESOLM_B, prompt, steps=3, alpha0=alpha0, temperature=temperature, top_p=top_p,
                    plan_generator=pg, generator=dg)
        sizes = [hi - lo for lo, hi in r.bounds]
        if alpha0 == 0 or max(sizes) > 1:
            break
    assert alpha0 == 0 or max(sizes) > 1, sizes
    assert sum(sizes) == 12 - 3
    one_pass = trajectory_logprobs(model, r)
    torch.testing.assert_close(one_pass, r.logprobs, rtol=0, atol=1e-9)
    assert torch.isfinite(one_pass).all()
    torch.testing.assert_close(one_pass.sum(1), r.logprobs.sum(1), rtol=0, atol=1e-9)


def test_float32_one_pass_matches_the_sampler_to_relative_tolerance():
    model = tiny(dtype=torch.float32)
    pg, dg = gens(5)
    r = rollout(model, ESOLM_B, torch.tensor([[2, 4]]).expand(8, 2), steps=4, alpha0=0.5, plan_generator=pg,
                generator=dg)
    one_pass = trajectory_logprobs(model, r)
    scale = r.logprobs.abs().max().item()
    torch.testing.assert_close(one_pass, r.logprobs, rtol=0, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("alpha0", [1.0, 0.25])
def test_gradient_equals_the_stepwise_gradient(alpha0):
    model = tiny(seed=3)
    pg, dg = gens(21)
    r = rollout(model, ESOLM_B, torch.tensor([[1, 2]]).expand(3, 2), steps=4, alpha0=alpha0, temperature=0.8,
                plan_generator=pg, generator=dg)
    weights = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def grads(fn):
        model.zero_grad()
        (fn(model, r) * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    g1, g2 = grads(trajectory_logprobs), grads(stepwise_logprobs)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * max(1.0, b.abs().max().item()))
    assert max(float(a.abs().max()) for a in g1) > 1e-6  # the gradient is not trivially zero


@torch.no_grad()
def test_recorded_logprobs_are_those_of_the_law_sampled():
    """One free token, temperature 0.6 and top-p 0.8: rollout frequencies match exp(recorded log-prob)."""
    model = tiny(vocab=6, length=3, seed=7, std=0.3)
    n = 20000
    pg, dg = gens(2)
    r = rollout(model, ESOLM_B, torch.tensor([[0, 1]]).expand(n, 2), temperature=0.6, top_p=0.9,
                plan_generator=pg, generator=dg)
    tok = r.completions[:, 0]
    law = torch.zeros(6, dtype=torch.float64)
    for v in tok.unique():
        lp = r.logprobs[tok == v, 0]
        assert torch.allclose(lp, lp[0].expand_as(lp))  # one law for every row
        law[v] = lp[0].exp()
    logits = model(torch.tensor([[0, 1, 5]]), mask=masks.causal(3))[:, 2]
    full = sampling_logits(logits, 5, 0.9, 0.6).softmax(-1)[0]
    assert full.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert 2 <= (full > 0).sum() < 5, full  # the nucleus keeps several tokens and removes some
    torch.testing.assert_close(law[law > 0], full[law > 0], rtol=1e-12, atol=0)
    obs = torch.bincount(tok, minlength=6).double()
    assert obs[full == 0].sum() == 0  # nothing outside the nucleus is ever drawn
    assert chi2_pvalue(obs[full > 0], full[full > 0]) > 1e-3
    untempered = sampling_logits(logits, 5).softmax(-1)[0]
    assert chi2_pvalue(obs[full > 0], untempered[full > 0] / untempered[full > 0].sum()) < 1e-6


@torch.no_grad()
def test_exact_is_the_law_and_mean_field_is_biased_on_an_enumerable_model():
    """V = 3, L = 3, no prompt: for a plan with a 2-token step, exp(exact) over all 27 trajectories sums to 1
    and matches rollout frequencies; the mean-field estimate is off by a clear margin."""
    model = trained_on_repeats()
    n = 30000
    pg, dg = gens(9)
    r = rollout(model, ESOLM_B, torch.zeros(n, 0, dtype=torch.long), steps=2, plan_generator=pg, generator=dg)
    # enumerate the trajectories of one plan (order and steps of the first rollout)
    plan_rows = (r.order == r.order[0]).all(1)
    assert [hi - lo for lo, hi in r.bounds] in ([2, 1], [1, 2])
    ys = torch.tensor(list(itertools.product(range(3), repeat=3)))
    enum = Rollouts(ys, r.order[:1].expand(27, 3), r.bounds, 0, None)
    exact = trajectory_logprobs(model, enum).sum(1)
    assert exact.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    idx = r.tokens[plan_rows] @ torch.tensor([9, 3, 1])
    obs = torch.bincount(idx, minlength=27).double()
    assert obs.sum() > 1000
    assert chi2_pvalue(obs, exact.exp()) > 1e-3
    mf = mean_field_logprobs(model, ESOLM_B, enum, torch.Generator().manual_seed(0)).sum(1)
    bias = (exact.exp() * (mf - exact)).sum().item()  # E_pi[mean-field - exact]
    gap = (exact.exp() * (mf - exact).abs()).sum().item()
    assert gap > 0.05, (bias, gap)


def test_exact_needs_eso_lm_b():
    check_likelihood("exact", ESOLM_B)
    check_likelihood("mean-field", {"name": "mdlm"})
    with pytest.raises(UserError, match="needs an Eso-LM \\(B\\)"):
        check_likelihood("exact", {"name": "esolm", "variant": "A", "alpha0": 0.5})
    with pytest.raises(UserError, match="needs an Eso-LM \\(B\\)"):
        check_likelihood("exact", {"name": "mdlm"})
    with pytest.raises(UserError, match="likelihood must be"):
        check_likelihood("elbo", ESOLM_B)
    with pytest.raises(UserError, match="diffusion model"):
        check_likelihood("mean-field", {"name": "ar"})


def test_trajectory_mask_rejects_steps_that_do_not_tile():
    with pytest.raises(ValueError):
        masks.trajectory(5, [(1, 3), (4, 5)])
    m = masks.trajectory(4, [(1, 3), (3, 4)])[0, 0]
    # mask of sorted 2 (step [1, 3)) sees x-key 0 and masks 1, 2; not x-key 1
    assert m[4 + 1].tolist() == [True, False, False, False, True, True, False]


MDLM = {"name": "mdlm"}


@torch.no_grad()
@pytest.mark.parametrize("method", [MDLM, ESOLM_B])
def test_mean_field_scores_nucleus_rollouts_under_the_tempered_law(method):
    """A token drawn by the nucleus sampler given the tokens decoded before it can lie outside the nucleus of the
    one-step marginal; the mean-field estimate scores it under the tempered law without the nucleus (finite), so
    GRPO never computes -inf - (-inf)."""
    model = tiny(seed=4, std=0.1)
    pg, dg = gens(3)
    r = rollout(model, method, torch.tensor([[3, 5]]).expand(64, 2), steps=3, temperature=0.8, top_p=0.3,
                plan_generator=pg, generator=dg)
    mf = mean_field_logprobs(model, method, r, torch.Generator().manual_seed(0), mask_prompt=0.0)
    assert torch.isfinite(mf).all()
    if method is MDLM:  # bidirectional: the one-step input is the clean prompt and the masked completion
        xt = r.tokens.clone()
        xt[:, 2:] = model.config.mask_id
        logits = model(xt)[:, 2:]
        tempered = token_logprobs(logits, r.completions, model.config.mask_id, None, 0.8)
        torch.testing.assert_close(mf, tempered, rtol=0, atol=1e-12)
        truncated = token_logprobs(logits, r.completions, model.config.mask_id, 0.3, 0.8)
        assert torch.isneginf(truncated).any()  # the case arises: truncating would have scored -inf


@torch.no_grad()
@pytest.mark.parametrize("method", [MDLM, ESOLM_B])
def test_mean_field_conditions_on_the_prompt(method):
    """With ``mask_prompt = 0`` the estimate sees the whole prompt: the same completions after another prompt
    score differently; with every prompt token masked they score the same."""
    model = tiny(seed=5, std=0.5)
    pg, dg = gens(7)
    r = rollout(model, method, torch.tensor([[3, 5, 7]]).expand(8, 3), steps=4, plan_generator=pg, generator=dg)
    other = Rollouts(torch.cat([torch.tensor([[9, 2, 4]]).expand(8, 3), r.completions], 1), r.order, r.bounds, 3, None)

    def mf(rr, mask_prompt):
        return mean_field_logprobs(model, method, rr, torch.Generator().manual_seed(1), mask_prompt)

    assert (mf(r, 0.0) - mf(other, 0.0)).abs().max() > 1e-3
    torch.testing.assert_close(mf(r, 1.0), mf(other, 1.0), rtol=0, atol=1e-12)
    if method is MDLM:
        xt = r.tokens.clone()
        xt[:, 3:] = model.config.mask_id
        want = token_logprobs(model(xt)[:, 3:], r.completions, model.config.mask_id, None, 1.0)
        torch.testing.assert_close(mf(r, 0.0), want, rtol=0, atol=1e-12)
