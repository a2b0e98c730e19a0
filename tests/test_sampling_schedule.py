"""Schedules, NFE accounting, the token draw, conditioning, EOS handling and user errors."""

import math

import pytest
import torch

from esolm import DiT, ModelConfig
from esolm.sampling import (
    binomial_counts,
    draw,
    generate,
    plan_binomial,
    plan_one_per_step,
    plan_strided,
    sample_esolm_b,
    top_p_filter,
)

V, M, L = 13, 12, 16


def tiny_model(adaln: bool = True) -> DiT:
    torch.manual_seed(0)
    model = DiT(ModelConfig(vocab_size=V, mask_id=M if adaln else None, hidden_size=32, cond_dim=16,
                            n_layers=2, n_heads=2, length=L, adaln=adaln))
    model.randomize_zero_init(0.2)
    return model.eval()


def test_paper_nfe_example_alpha0_1_L1024_T1024():
    """alpha0 = 1, L = T = 1024 costs about 646 calls: T (1 - (1 - 1/T)^L) non-empty steps on average."""
    expected = 1024 * (1 - (1 - 1 / 1024) ** 1024)
    assert abs(expected - 646) < 2  # the paper: ~646
    nfes = []
    for seed in range(10):
        counts = binomial_counts(1024, 1024, 1.0, torch.Generator().manual_seed(seed))
        assert sum(counts) == 1024 and min(counts) >= 1
        nfes.append(len(counts))
        assert abs(len(counts) - expected) / expected < 0.06  # one seed: std ~10 calls
    assert abs(sum(nfes) / len(nfes) - expected) / expected < 0.03


def test_binomial_counts_alpha0_fraction_and_determinism():
    g = torch.Generator().manual_seed(0)
    tot = [sum(binomial_counts(1000, 50, 0.25, g)) for _ in range(20)]
    mean = sum(tot) / len(tot)
    assert abs(mean - 250) < 4 * math.sqrt(1000 * 0.25 * 0.75 / 20)
    a = binomial_counts(100, 10, 0.5, torch.Generator().manual_seed(3))
    b = binomial_counts(100, 10, 0.5, torch.Generator().manual_seed(3))
    assert a == b
    assert binomial_counts(100, 10, 0.0, torch.Generator()) == []


def test_plan_orders_are_permutations_given_first_tail_ascending():
    free = torch.ones(4, L, dtype=torch.bool)
    free[:, [0, 1, 9]] = False
    plan = plan_binomial(free, 4, 0.5, torch.Generator().manual_seed(1))
    assert plan.n_given == 3 and sum(plan.counts) == L - 3
    for row in plan.order:
        assert sorted(row.tolist()) == list(range(L))
        assert row[:3].tolist() == [0, 1, 9]
        tail = row[3 + plan.n_diffusion:].tolist()
        assert tail == sorted(tail)
    assert all(c == 1 for c in plan.counts[len(plan.counts) - plan.n_sequential:])
    assert len({tuple(r.tolist()) for r in plan.order}) > 1  # orders differ per sample
    again = plan_binomial(free, 4, 0.5, torch.Generator().manual_seed(1))
    assert again.counts == plan.counts and torch.equal(again.order, plan.order)


def test_alpha0_zero_is_left_to_right_and_one_per_step():
    plan = plan_binomial(torch.ones(2, L, dtype=torch.bool), 8, 0.0, torch.Generator().manual_seed(0))
    assert plan.counts == [1] * L and plan.n_diffusion == 0
    assert torch.equal(plan.order, torch.arange(L).expand(2, L))
    p1 = plan_one_per_step(torch.ones(2, L, dtype=torch.bool), 1.0, torch.Generator().manual_seed(0))
    assert p1.nfe == L and p1.n_diffusion == L


def test_strided_schedule_positions():
    plan = plan_strided(torch.ones(2, L, dtype=torch.bool), 4)
    assert plan.counts == [4, 4, 4, 4]
    for j, (lo, hi) in enumerate(plan.bounds()):
        assert plan.order[0, lo:hi].tolist() == [j, j + 4, j + 8, j + 12]


@pytest.mark.parametrize("steps,alpha0,nfe", [
    (4, 1.0, 4),  # alpha0 = 1: one call per stride
    (4, 0.5, 10),  # d = 8 fills 2 strides of 4, then 8 left-to-right calls
    (4, 0.25, 13),  # one stride, then 12
    (4, 0.0, L),  # pure left to right
    (3, 0.5, 2 + 8),  # strides of 6, 5, 5: d = 8 takes one whole stride and 2 of the next
    (3, 1.0, 3),
    (16, 1.0, 16),
    (32, 1.0, 16),  # more strides than positions: empty strides cost nothing
    (4, 0.4, 2 + 10),  # d = round(6.4) = 6
])
def test_strided_nfe(steps, alpha0, nfe):
    for shuffle in (False, True):
        plan = plan_strided(torch.ones(3, L, dtype=torch.bool), steps, alpha0, shuffle, torch.Generator())
        assert plan.nfe == nfe
        assert plan.n_diffusion == int(alpha0 * L + 0.5) and sum(plan.counts) == L
        assert plan.counts[len(plan.counts) - plan.n_sequential:] == [1] * plan.n_sequential


@pytest.mark.parametrize("shuffle", [False, True])
def test_strided_decodes_every_position_once_stride_by_stride(shuffle):
    free = torch.ones(5, L, dtype=torch.bool)
    free[:, [0, 6]] = False
    plan = plan_strided(free, 4, 0.5, shuffle, torch.Generator().manual_seed(2))
    assert plan.n_given == 2 and plan.n_diffusion == 7
    for row in plan.order:
        assert sorted(row.tolist()) == list(range(L)) and row[:2].tolist() == [0, 6]
        diffusion_steps = [lo for lo, _ in plan.bounds()][:plan.nfe - plan.n_sequential]
        for lo in diffusion_steps:  # each diffusion call decodes (part of) one residue class
            hi = lo + plan.counts[diffusion_steps.index(lo)]
            assert (row[lo:hi] % 4 == row[lo] % 4).all()
        tail = row[2 + plan.n_diffusion:].tolist()
        assert tail == sorted(tail)


def test_strided_shuffle_permutes_within_strides_and_strides():
    free = torch.ones(64, L, dtype=torch.bool)
    plain = plan_strided(free, 4, 1.0, False, torch.Generator().manual_seed(0))
    for lo, hi in plain.bounds():
        block = plain.order[:, lo:hi]
        assert torch.equal(block, block.sort(dim=1).values)  # no shuffle: ascending within each stride
    assert (plain.order[:, [0, 4, 8, 12]] == torch.arange(4)).all()  # and strides in order 0, 1, 2, 3
    firsts, unsorted = set(), 0
    for seed in range(8):
        plan = plan_strided(free, 4, 1.0, True, torch.Generator().manual_seed(seed))
        assert plan.counts == [4, 4, 4, 4]
        firsts.add(int(plan.order[0, 0]) % 4)
        for lo, hi in plan.bounds():
            block = plan.order[:, lo:hi]
            assert (block % 4 == block[:, :1] % 4).all()  # a whole stride, shared by the batch
            unsorted += int((block != block.sort(dim=1).values).any(dim=1).sum())
    assert len(firsts) > 1  # the order of the strides changes with the seed
    assert unsorted > 0.9 * 8 * 4 * 64  # within a stride, 23 of 24 orders are not ascending


def test_strided_plan_is_seeded():
    free = torch.ones(4, L, dtype=torch.bool)
    a = plan_strided(free, 4, 0.5, True, torch.Generator().manual_seed(5))
    b = plan_strided(free, 4, 0.5, True, torch.Generator().manual_seed(5))
    c = plan_strided(free, 4, 0.5, True, torch.Generator().manual_seed(6))
    assert a.counts == b.counts and torch.equal(a.order, b.order) and not torch.equal(a.order, c.order)
    model = tiny_model()
    method = {"name": "esolm", "variant": "B", "alpha0": 1.0}
    kw = dict(num_samples=3, steps=4, alpha0=0.5, sampler="strided", shuffle=True, trace=True)
    x, y = generate(model, method, seed=3, **kw), generate(model, method, seed=3, **kw)
    assert torch.equal(x.tokens, y.tokens) and x.nfe == 10 and not (x.tokens == M).any()
    for row in range(3):
        assert sorted(p for s in x.trace[0] for p in s.row(row)) == list(range(L))


@pytest.mark.parametrize("variant", ["A", "B"])
def test_strided_generate_alpha0_below_one(variant):
    model = tiny_model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    out = generate(model, {"name": "esolm", "variant": variant, "alpha0": 0.5}, num_samples=2, steps=4,
                   sampler="subcontext", shuffle=True, prompt_ids=[1, 2], seed=0)
    assert out.nfe == len(calls) == 2 + 7  # 14 free: d = 7 over strides of 4 and 3, then 7 calls
    assert (out.tokens[:, :2] == torch.tensor([1, 2])).all() and not (out.tokens == M).any()


def test_strided_cached_equals_uncached_float64():
    """A strided plan with alpha0 < 1 (shuffled, with a prompt): every cached step's logits equal the
    uncached causal pass over the sorted sequence, in float64."""
    model = tiny_model().double()
    x = torch.full((3, L), M, dtype=torch.long)
    x[:, :3] = torch.tensor([4, 5, 6])
    plan = plan_strided(x == M, 4, 0.5, True, torch.Generator().manual_seed(1))
    assert plan.n_diffusion == 7 and plan.n_sequential == 6  # round(0.5 * 13) = 7 (halves up)
    runs = []
    for use_cache in (True, False):
        steps = []

        def record(k, lo, hi, logits, tokens, steps=steps):
            steps.append(logits.clone())

        out = sample_esolm_b(model, x, plan, generator=torch.Generator().manual_seed(2), use_cache=use_cache,
                             step_callback=record)
        runs.append((out, steps))
    (a, sa), (b, sb) = runs
    assert a.nfe == b.nfe == plan.nfe == len(sa) == len(sb) and torch.equal(a.tokens, b.tokens)
    for la, lb in zip(sa, sb):
        assert la.dtype == torch.float64
        torch.testing.assert_close(la, lb, atol=1e-10, rtol=0)


@pytest.mark.parametrize("method,sampler", [
    ({"name": "esolm", "variant": "B", "alpha0": 0.5}, "auto"),
    ({"name": "esolm", "variant": "A", "alpha0": 0.5}, "auto"),
    ({"name": "esolm", "variant": "B", "alpha0": 1.0}, "first_hitting"),
    ({"name": "mdlm"}, "auto"),
    ({"name": "mdlm"}, "first_hitting"),
    ({"name": "mdlm"}, "left_to_right"),
    ({"name": "bd3lm", "block_size": 4}, "auto"),
    ({"name": "bd3lm", "block_size": 4}, "first_hitting"),
])
def test_nfe_counts_real_network_calls(method, sampler):
    model = tiny_model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    out = generate(model, method, num_samples=3, steps=6, sampler=sampler, seed=0)
    assert out.nfe == len(calls)
    assert out.tokens.shape == (3, L) and not (out.tokens == M).any()
    if sampler in ("first_hitting", "left_to_right"):
        assert out.nfe == L


def test_esolm_nfe_equals_plan_and_trace_covers_every_position():
    model = tiny_model()
    method = {"name": "esolm", "variant": "B", "alpha0": 0.5}
    out = generate(model, method, num_samples=2, steps=5, seed=7, trace=True, prompt_ids=[1, 2])
    plan = plan_binomial(torch.cat([torch.zeros(2, 2), torch.ones(2, L - 2)], 1).bool(), 5, 0.5,
                         torch.Generator().manual_seed(7))
    assert out.nfe == plan.nfe
    steps = out.trace[0]
    assert [s.positions.shape[1] for s in steps] == plan.counts
    assert [s.call for s in steps] == list(range(plan.nfe))
    assert [s.phase for s in steps] == [plan.phase(lo) for lo, _ in plan.bounds()]  # typed, from the plan
    assert "sequential" in {s.phase for s in steps} and "diffusion" in {s.phase for s in steps}
    for b in range(2):
        assert sorted(p for s in steps for p in s.row(b)) == list(range(2, L))


def test_mdlm_reuses_p_x0_when_nothing_changes():
    """With many more steps than tokens most steps change nothing and cost no call."""
    model = tiny_model()
    out = generate(model, {"name": "mdlm"}, num_samples=1, steps=1000, seed=0)
    assert out.nfe <= L


def test_seed_reproducible_and_prompt_kept():
    model = tiny_model()
    method = {"name": "esolm", "variant": "B", "alpha0": 0.5}
    a = generate(model, method, num_samples=4, prompt_ids=[3, 4, 5], top_p=0.9, seed=11, batch_size=2)
    b = generate(model, method, num_samples=4, prompt_ids=[3, 4, 5], top_p=0.9, seed=11, batch_size=2)
    c = generate(model, method, num_samples=4, prompt_ids=[3, 4, 5], top_p=0.9, seed=12, batch_size=2)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert a.num_batches == 2 and (a.tokens[:, :3] == torch.tensor([3, 4, 5])).all()


def test_infill_and_prompt_for_every_method():
    model = tiny_model()
    infill = {5: 7, 11: 2}
    for method in ({"name": "esolm", "variant": "B", "alpha0": 0.5}, {"name": "esolm", "variant": "A",
                   "alpha0": 0.5}, {"name": "mdlm"}, {"name": "bd3lm", "block_size": 4}):
        out = generate(model, method, num_samples=2, prompt_ids=[1, 1], infill=infill, seed=0)
        assert (out.tokens[:, 5] == 7).all() and (out.tokens[:, 11] == 2).all()
        assert (out.tokens[:, :2] == 1).all()
    ar = tiny_model(adaln=False)
    out = generate(ar, {"name": "ar"}, num_samples=2, prompt_ids=[4, 5, 6], seed=0)
    assert out.nfe == L - 3 and (out.tokens[:, :3] == torch.tensor([4, 5, 6])).all()


def test_eos_truncation_and_max_length():
    model = tiny_model()
    out = generate(model, {"name": "mdlm"}, num_samples=64, max_length=10, eos_id=0, seed=0,
                   prompt_ids=[0, 3])
    assert out.tokens.shape == (64, 10)
    for row, n in zip(out.tokens, out.lengths):
        n = int(n)
        gen = row[2:n].tolist()
        assert 0 not in gen[:-1]  # the first generated EOS ends the sample
        assert n == 10 or gen[-1] == 0
        assert (row[n:] == 0).all()
    seqs = out.sequences()
    assert [len(s) for s in seqs] == out.lengths.tolist()
    assert any(n < 10 for n in out.lengths.tolist())


def test_top_p_filter_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_p_filter(logits, 0.79))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_p_filter(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 1e-9)).tolist() == [[True, False, False, False]]


def test_draw_never_returns_mask_and_follows_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 5.0]).expand(20000, 4)
    tok = draw(logits, mask_id=3, generator=torch.Generator().manual_seed(0))
    assert not (tok == 3).any()
    freq = torch.bincount(tok, minlength=4)[:3].double() / 20000
    p = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64).softmax(0)
    assert torch.allclose(freq, p, atol=0.015)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prompt_ids=list(range(L + 1))), "longer than"),
    (dict(infill={L: 1}), "infill position"),
    (dict(infill={-1: 1}), "infill position"),
    (dict(alpha0=1.5), "alpha0"),
    (dict(alpha0=-0.1), "alpha0"),
    (dict(max_length=L + 1), "max_length"),
    (dict(sampler="nope"), "sampler"),
    (dict(shuffle=True), "shuffle"),
])
def test_user_errors_are_one_line_value_errors(kwargs, msg):
    model = tiny_model()
    with pytest.raises(ValueError) as e:
        generate(model, {"name": "esolm", "variant": "B", "alpha0": 0.5}, num_samples=1, **kwargs)
    assert msg in str(e.value) and "\n" not in str(e.value)
