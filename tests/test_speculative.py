"""Speculative decoding draws exactly from the any-order AR law, with the plain sampler's cache.

On L = 4 positions and 3 real tokens (+ mask) we enumerate the law of the plan (as in
``test_sampling_distribution``): ``P(x) = sum_orders P(order) prod_steps prod_{i in step} p(x_i | clean
tokens before the step)``, one uncached causal pass per order and step; with one token per step this is
the any-order AR law. 20000 samples of the speculative sampler (one or a few big batches) must match it
(chi-square p > 0.01), and each test must reject a deliberately wrong law at p < 1e-6.
"""

import itertools

import pytest
import torch

from esolm import DiT, ModelConfig
from esolm.errors import UserError
from esolm.model import masks
from esolm.sampling import generate, plan_from_counts, sample_esolm_b, sample_speculative
from test_sampling_distribution import chi2_pvalue

V, M, L, N = 4, 3, 4, 20000


def tiny_model(seed: int, length: int = L, vocab: int = V, dtype=torch.float32) -> DiT:
    torch.manual_seed(seed)
    model = DiT(ModelConfig(vocab_size=vocab, mask_id=vocab - 1, hidden_size=8, cond_dim=8, n_layers=2,
                            n_heads=2, length=length)).to(dtype)
    model.randomize_zero_init(0.7)
    return model.eval()


def probs(logits: torch.Tensor) -> torch.Tensor:
    lg = logits.double()
    lg[..., M] = float("-inf")
    return lg.softmax(-1)


def order_law(given: list[int], free: list[int], n_diffusion: int) -> dict[tuple, float]:
    """Given positions first; n_diffusion free positions in a uniformly random order; the rest ascending."""
    law: dict[tuple, float] = {}
    perms = list(itertools.permutations(free))
    for p in perms:
        key = tuple(given) + p[:n_diffusion] + tuple(sorted(p[n_diffusion:]))
        law[key] = law.get(key, 0.0) + 1.0 / len(perms)
    return law


@torch.no_grad()
def plan_law(model, row: torch.Tensor, counts: list[int], n_diffusion: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every completion of ``row`` (mask = free) [n, L] and its probability under the plan's law [n]."""
    free = [i for i in range(L) if row[i] == M]
    given = [i for i in range(L) if row[i] != M]
    outs = torch.tensor(list(itertools.product(range(3), repeat=len(free))))
    full = row.expand(len(outs), L).clone()
    full[:, free] = outs
    orders = order_law(given, free, n_diffusion)
    pos = torch.tensor(list(orders)).repeat_interleave(len(outs), 0)  # every (order, outcome) pair at once
    xs = full.repeat(len(orders), 1).gather(1, pos)
    p = torch.tensor(list(orders.values()), dtype=torch.float64).repeat_interleave(len(outs))
    rows = torch.arange(len(xs))
    lo = len(given)
    for n in counts:
        state = xs.clone()
        state[:, lo:] = M
        pr = probs(model(state, pos, mask=masks.causal(L)))
        for i in range(lo, lo + n):
            p *= pr[rows, i, xs[:, i]]
        lo += n
    return full, p.view(len(orders), len(outs)).sum(0)


def histogram(tokens: torch.Tensor, outcomes: torch.Tensor) -> torch.Tensor:
    """Counts of each outcome row among the samples (every sample must be one of them)."""
    code = lambda t: (t * torch.tensor([27, 9, 3, 1])).sum(-1)  # noqa: E731
    index = {int(c): i for i, c in enumerate(code(outcomes))}
    obs = torch.zeros(len(outcomes), dtype=torch.float64)
    ids, counts = code(tokens).unique(return_counts=True)
    for c, n in zip(ids.tolist(), counts.tolist()):
        obs[index[c]] += n
    return obs


def check_law(tokens, outcomes, law, wrong) -> None:
    obs = histogram(tokens, outcomes)
    assert abs(float(law.sum()) - 1.0) < 1e-6
    assert chi2_pvalue(obs, law) > 0.01
    assert chi2_pvalue(obs, wrong) < 1e-6  # the test has power


def test_fixed_k_random_order_is_the_any_order_law():
    model = tiny_model(0)
    x = torch.full((N, L), M)
    plan = plan_from_counts(x == M, [1] * L, L, torch.Generator().manual_seed(1))
    out = sample_speculative(model, x, plan, k=3, generator=torch.Generator().manual_seed(2))
    assert out.nfe <= L
    assert int(out.depth_proposed.sum()) > 0 and int(out.depth_accepted.sum()) > 0
    outcomes, law = plan_law(model, x[0], [1] * L, L)
    _, wrong = plan_law(model, x[0], [L], L)  # the one-call parallel draft's law
    check_law(out.tokens, outcomes, law, wrong)


def test_adaptive_left_to_right_with_prompt_is_the_ar_law():
    model = tiny_model(1)
    x = torch.full((N, L), M)
    x[:, 0] = 2
    plan = plan_from_counts(x == M, [1] * 3, 0, torch.Generator().manual_seed(3))
    out = sample_speculative(model, x, plan, k=2, adaptive=True, generator=torch.Generator().manual_seed(4))
    assert out.nfe <= L and (out.tokens[:, 0] == 2).all()
    outcomes, law = plan_law(model, x[0], [1] * 3, 0)
    _, wrong = plan_law(model, x[0], [2, 1], 0)
    check_law(out.tokens, outcomes, law, wrong)


def test_diffusion_phase_then_speculative_tail():
    model = tiny_model(2)
    x = torch.full((N, L), M)
    plan = plan_from_counts(x == M, [2, 1, 1], 2, torch.Generator().manual_seed(5))
    out = sample_speculative(model, x, plan, k=3, generator=torch.Generator().manual_seed(6))
    assert out.nfe <= plan.nfe
    outcomes, law = plan_law(model, x[0], [2, 1, 1], 2)
    _, wrong = plan_law(model, x[0], [2, 2], 2)
    check_law(out.tokens, outcomes, law, wrong)


def test_generate_batches_with_infill_and_eos():
    """Through ``generate``: 4 batches, an infilled token, EOS cuts; the law of the cut sequences."""
    model = tiny_model(3)
    eos = 0
    method = {"name": "esolm", "alpha0": 1.0}
    out = generate(model, method, num_samples=N, batch_size=N // 4, infill={2: 1}, sampler="first_hitting",
                   speculative=2, draft="adaptive", eos_id=eos, seed=7)
    assert out.num_batches == 4 and all(n <= L for n in out.nfe_per_batch)
    row = torch.full((L,), M)
    row[2] = 1

    def cut(t: torch.Tensor) -> torch.Tensor:  # generate's EOS rule
        first = torch.where((t == eos).any(1), (t == eos).float().argmax(1), L - 1)
        return t.masked_fill(torch.arange(L)[None] > first[:, None], eos)

    outcomes, law = plan_law(model, row, [1] * 3, 3)
    _, wrong = plan_law(model, row, [3], 3)
    cuts, inverse = cut(outcomes).unique(dim=0, return_inverse=True)
    fold = lambda p: torch.zeros(len(cuts), dtype=torch.float64).index_add_(0, inverse, p)  # noqa: E731
    assert ((out.tokens[:, 2] == 1) | (out.tokens[:, :2] == eos).any(1)).all()
    check_law(out.tokens, cuts, fold(law), fold(wrong))


@pytest.mark.parametrize("adaptive", [False, True])
def test_cache_equals_the_sequential_samplers(adaptive):
    """After every call, each row's cached slots are the K/V that the plain sampler caches for the same tokens
    (a causal pass over the final sorted sequence), float64 <= 1e-10; nothing else is ever stored."""
    length = 14
    model = tiny_model(4, length, vocab=6, dtype=torch.float64)
    x = torch.full((64, length), 5)
    x[:, 0] = 1
    x[:, 6] = 2
    plan = plan_from_counts(x == 5, [2] + [1] * 10, 3, torch.Generator().manual_seed(8))
    seen = []

    def monitor(cache, committed):
        seen.append((committed.clone(), [k.clone() for k in cache.k], [v.clone() for v in cache.v]))

    out = sample_speculative(model, x, plan, k=3, adaptive=adaptive, generator=torch.Generator().manual_seed(9),
                             monitor=monitor)
    assert out.nfe == len(seen) <= plan.nfe
    assert (int(out.depth_proposed[2:].sum()) > 0) == adaptive  # adaptive drafts grew past k = 3
    order = plan.order
    ref = model.new_cache(length)
    with torch.no_grad():
        model(out.tokens.gather(1, order), order, mask=masks.causal(length), cache=ref, commit=length)
    slots = torch.arange(length)[None, None, :, None]
    for committed, ks, vs in seen:
        inside = slots < committed[:, None, None, None]
        for got, want in zip(ks + vs, ref.k + ref.v):
            assert float((got - want[:, :, :length]).abs().masked_fill(~inside, 0).max()) <= 1e-10
            assert bool((got.masked_fill(inside, 0) == 0).all())
    assert bool((seen[-1][0] >= length - 1).all())


@pytest.mark.parametrize("k,adaptive", [(2, False), (4, False), (3, True)])
def test_greedy_equals_the_plain_sampler(k, adaptive):
    length = 12
    model = tiny_model(5, length, vocab=6, dtype=torch.float64)
    x = torch.full((32, length), 5)
    x[:, :2] = torch.tensor([1, 3])
    plan = plan_from_counts(x == 5, [3, 2] + [1] * 5, 5, torch.Generator().manual_seed(10))
    plain = sample_esolm_b(model, x, plan, greedy=True)
    spec = sample_speculative(model, x, plan, k=k, adaptive=adaptive, greedy=True, trace=True)
    assert torch.equal(plain.tokens, spec.tokens)
    assert spec.nfe <= plan.nfe
    decoded = torch.cat([torch.stack([s.rows, s.positions], 1) for s in spec.trace])  # (row, position)
    assert len(decoded) == 32 * (length - 2) and len(decoded.unique(dim=0)) == len(decoded)
    assert [s.phase for s in spec.trace[:2]] == ["diffusion", "diffusion"]  # the plan's two parallel steps
    assert {s.phase for s in spec.trace[2:]} == {"sequential"}


def test_generate_refuses_bad_requests():
    model = tiny_model(6)
    esolm = {"name": "esolm", "alpha0": 0.5}
    for bad in (1, 0, 2.5, "4"):
        with pytest.raises(UserError, match="speculative"):
            generate(model, esolm, num_samples=2, speculative=bad)
    with pytest.raises(UserError, match="draft"):
        generate(model, esolm, num_samples=2, speculative=True, draft="greedy")
    with pytest.raises(UserError, match="Eso-LM \\(B\\)"):
        generate(model, {"name": "esolm", "variant": "A"}, num_samples=2, speculative=True)
    with pytest.raises(UserError, match="Eso-LM \\(B\\)"):
        generate(model, {"name": "mdlm"}, num_samples=2, speculative=3)
    with pytest.raises(UserError, match="step_callback"):
        generate(model, esolm, num_samples=2, speculative=True, step_callback=lambda *a: None)
    out = generate(model, esolm, num_samples=3, speculative=True, seed=1)
    assert out.tokens.shape == (3, L) and not (out.tokens == M).any() and out.nfe <= L


def test_sample_command_flag():
    from esolm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["sample", "m"]).speculative is None
    assert parser.parse_args(["sample", "m", "--speculative"]).speculative is True
    assert parser.parse_args(["sample", "m", "--speculative", "6"]).speculative == 6
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "m", "--speculative", "1"])
