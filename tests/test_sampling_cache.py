"""Cache exactness: every cached sampling step equals an uncached forward pass (METHOD.md §5).

Eso-LM (B): each step's logits = a full causal pass over the sorted sequence in which the positions
before the step are clean and the rest masks — in the diffusion and the sequential phase, with prompts
and with infilling. Eso-LM (A): the sequential phase = the 2L ``sequential_prefix`` pass. BD3-LM: every
in-block call = the 2L ``block_diffusion`` pass. AR: every cached call = an uncached causal pass.
"""

import pytest
import torch

from esolm import DiT, ModelConfig
from esolm.model import masks
from esolm.sampling import (
    plan_binomial,
    plan_from_counts,
    plan_strided,
    sample_ar,
    sample_bd3,
    sample_esolm_a,
    sample_esolm_b,
)

V, M, L = 17, 16, 16
# Every identity is proven in float64 (1e-10) and checked in float32, the dtype samplers run in, where two
# computations that round differently agree to 1e-5 of the logits' scale (~84 float32 eps; the longest dot
# product has 128 terms, whose rounding grows like sqrt(128) eps ~ 1.3e-6 of the scale: an 8x margin).
DTYPES = [torch.float64, torch.float32]
FP32_RTOL = 1e-5


def assert_same(got, ref):
    """``got == ref`` to 1e-10 in float64, or to ``FP32_RTOL`` of the reference's largest logit in float32."""
    atol = 1e-10 if ref.dtype == torch.float64 else FP32_RTOL * ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=0.0, atol=atol)


def tiny_model(adaln: bool = True, seed: int = 0, length: int = L, dtype: torch.dtype = torch.float32) -> DiT:
    """A random tiny network whose zero-initialised adaLN/output weights are made non-zero."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, mask_id=M if adaln else None, hidden_size=32, cond_dim=16, n_layers=2,
                      n_heads=2, length=length, adaln=adaln)
    model = DiT(cfg)
    model.randomize_zero_init(0.2)
    return model.to(dtype).eval()


class Recorder:
    def __init__(self):
        self.steps = []

    def __call__(self, k, lo, hi, logits, tokens):
        self.steps.append((k, lo, hi, logits.clone(), tokens.clone()))


def start_tokens(b: int, prompt=None, infill=None) -> torch.Tensor:
    x = torch.full((b, L), M, dtype=torch.long)
    if prompt is not None:
        x[:, : len(prompt)] = torch.tensor(prompt)
    for p, t in (infill or {}).items():
        x[:, p] = t
    return x


CASES = {
    "plain": dict(),
    "prompt": dict(prompt=[3, 1, 4, 1, 5]),
    "infill": dict(infill={0: 2, 7: 9, 8: 9, 15: 6}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("alpha0", [0.5, 1.0])
def test_esolm_b_every_step_equals_uncached_causal_pass(case, alpha0, dtype):
    model = tiny_model(dtype=dtype)
    x = start_tokens(3, **CASES[case])
    g = torch.Generator().manual_seed(1)
    plan = plan_binomial(x == M, 2, alpha0, g)
    rec = Recorder()
    out = sample_esolm_b(model, x, plan, generator=torch.Generator().manual_seed(2), step_callback=rec)
    assert len(rec.steps) == out.nfe == plan.nfe
    assert max(plan.counts) > 1  # a parallel diffusion step is exercised
    if alpha0 < 1:
        assert plan.n_sequential > 0
    causal = masks.causal(L)
    with torch.no_grad():
        for _, lo, hi, logits, state in rec.steps:
            assert (state[:, lo:] == M).all() and (state[:, :lo] != M).all()
            ref = model(state, plan.order, mask=causal)[:, lo:hi]
            assert_same(logits, ref)
    # the given tokens are kept and nothing is left masked
    given = x != M
    assert torch.equal(out.tokens[given], x[given]) and not (out.tokens == M).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_esolm_b_sequential_phase_equals_training_pass(dtype):
    """The cached sequential steps equal the z-half of the 2L training pass (``masks.sequential``)."""
    model = tiny_model(seed=3, dtype=dtype)
    x = start_tokens(2, prompt=[7, 7])
    plan = plan_binomial(x == M, 3, 0.4, torch.Generator().manual_seed(5))
    rec = Recorder()
    out = sample_esolm_b(model, x, plan, generator=torch.Generator().manual_seed(0), step_callback=rec)
    prefix = plan.n_given + plan.n_diffusion
    x_sorted = out.tokens.gather(1, plan.order)
    z_sorted = x_sorted.clone()
    z_sorted[:, prefix:] = M
    with torch.no_grad():
        full = model(torch.cat([z_sorted, x_sorted], 1), torch.cat([plan.order, plan.order], 1),
                     mask=masks.sequential(L))[:, :L]
    seq = [s for s in rec.steps if s[1] >= prefix]
    assert len(seq) == L - prefix > 0
    for _, lo, hi, logits, _ in seq:
        assert_same(logits, full[:, lo:hi])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_esolm_b_strided_schedule_is_exact(dtype):
    model = tiny_model(seed=4, dtype=dtype)
    x = start_tokens(2)
    plan = plan_strided(x == M, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    rec = Recorder()
    sample_esolm_b(model, x, plan, generator=torch.Generator().manual_seed(0), step_callback=rec)
    assert [hi - lo for _, lo, hi, _, _ in rec.steps] == [4, 4, 4, 4]
    with torch.no_grad():
        for _, lo, hi, logits, state in rec.steps:
            ref = model(state, plan.order, mask=masks.causal(L))[:, lo:hi]
            assert_same(logits, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["plain", "prompt"])
def test_esolm_a_both_phases_equal_uncached_passes(case, dtype):
    model = tiny_model(seed=1, dtype=dtype)
    x = start_tokens(3, **CASES[case])
    plan = plan_binomial(x == M, 4, 0.5, torch.Generator().manual_seed(3))
    rec = Recorder()
    out = sample_esolm_a(model, x, plan, generator=torch.Generator().manual_seed(4), step_callback=rec)
    prefix = plan.n_given + plan.n_diffusion
    assert 0 < prefix < L and len(rec.steps) == plan.nfe
    x_sorted = out.tokens.gather(1, plan.order)
    z_sorted = x_sorted.clone()
    z_sorted[:, prefix:] = M
    n_clean = torch.full((3,), prefix)
    with torch.no_grad():
        seq_full = model(torch.cat([z_sorted, x_sorted], 1), torch.cat([plan.order, plan.order], 1),
                         mask=masks.sequential_prefix(n_clean, L))[:, :L]
        n_seq = 0
        for _, lo, hi, logits, state in rec.steps:
            if lo < prefix:  # diffusion: the full-length prefix-LM pass over the sorted state
                ref = model(state, plan.order, mask=masks.prefix_lm(torch.full((3,), lo), L))[:, lo:hi]
            else:
                ref = seq_full[:, lo:hi]
                n_seq += 1
            assert_same(logits, ref)
    assert n_seq == L - prefix


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting"])
@pytest.mark.parametrize("prompt", [None, [5, 6, 7, 8, 9]])
def test_bd3_every_call_equals_block_diffusion_pass(sampler, prompt, dtype):
    model = tiny_model(seed=2, dtype=dtype)
    x = start_tokens(2, prompt=prompt)
    rec = Recorder()
    out = sample_bd3(model, x, 4, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(0),
                     plan_generator=torch.Generator().manual_seed(1), step_callback=rec)
    assert len(rec.steps) == out.nfe
    if sampler == "first_hitting":
        assert out.nfe == int((x == M).sum(1)[0])
    pos = torch.arange(L).expand(2, L)
    mask = masks.block_diffusion(L, 4)
    with torch.no_grad():
        for _, lo, hi, logits, state in rec.steps:
            assert (state[:, :lo] != M).all()
            ref = model(torch.cat([state, state], 1), torch.cat([pos, pos], 1), mask=mask)[:, lo:hi]
            assert_same(logits, ref)
    assert not (out.tokens == M).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ar_cached_equals_uncached(dtype):
    model = tiny_model(adaln=False, seed=5, dtype=dtype)
    x = torch.zeros(2, L, dtype=torch.long)
    x[:, :3] = torch.tensor([1, 2, 3])
    rec = Recorder()
    out = sample_ar(model, x, 3, generator=torch.Generator().manual_seed(0), step_callback=rec)
    assert out.nfe == len(rec.steps) == L - 3
    with torch.no_grad():
        for _, i, _, logits, state in rec.steps:
            ref = model(state[:, :i], mask=masks.causal(i))[:, -1:]
            assert_same(logits, ref)
    assert torch.equal(out.tokens[:, :3], x[:, :3])


def test_plan_from_counts_matches_given_schedule():
    x = start_tokens(2, prompt=[1, 2])
    plan = plan_from_counts(x == M, [5, 1, 1, 7], n_diffusion=5, generator=torch.Generator().manual_seed(0))
    assert plan.bounds() == [(2, 7), (7, 8), (8, 9), (9, 16)]
    with pytest.raises(ValueError):
        plan_from_counts(x == M, [5, 1], generator=torch.Generator())


def test_cached_step_mask_is_a_slice_of_the_causal_mask():
    """The (B) sampler slices one causal mask instead of building ``cached_step`` at every step."""
    causal = masks.causal(12)
    for start in range(0, 10):
        for n in range(1, 12 - start + 1):
            assert torch.equal(causal[:, :, start:start + n, :start + n], masks.cached_step(start, n))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frozen_conditioning_gives_identical_logits(dtype):
    """Samplers fold the frozen adaLN modulations (sigma = 0) into the weights once; the network output is
    unchanged up to rounding (tests/test_step_folding.py covers the samplers)."""
    model = tiny_model(seed=6, dtype=dtype)
    x = torch.randint(0, V, (3, L))
    pos = torch.randperm(L).expand(3, L)
    with torch.no_grad():
        ref = model(x, pos, mask=masks.causal(L))
        got = model(x, pos, mask=masks.causal(L), cond=model.frozen_conditioning(3))
    assert_same(got, ref)
    with pytest.raises(ValueError):
        model(x, pos, cond=model.frozen_conditioning(2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_esolm_b_without_cache_gives_the_same_steps(dtype):
    model = tiny_model(seed=7, dtype=dtype)
    x = start_tokens(3, prompt=[2, 2, 2])
    plan = plan_binomial(x == M, 3, 0.5, torch.Generator().manual_seed(0))
    runs = []
    for use_cache in (True, False):
        rec = Recorder()
        out = sample_esolm_b(model, x, plan, generator=torch.Generator().manual_seed(9), step_callback=rec,
                             use_cache=use_cache)
        runs.append((out, rec))
    (a, ra), (b, rb) = runs
    assert a.nfe == b.nfe == plan.nfe and torch.equal(a.tokens, b.tokens)
    for sa, sb in zip(ra.steps, rb.steps):
        assert_same(sa[3], sb[3])
