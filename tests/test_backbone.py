"""Properties of the DiT backbone that the method relies on (METHOD.md section 3)."""

import pytest
import torch

from esolm.config import ConfigError, ModelConfig
from esolm.model import masks
from esolm.model.backbone import DiT

V, L = 37, 12
DTYPES = [torch.float64, torch.float32]
# Two float32 computations of the same function that round differently (other kernels, blocking, summation
# order) agree to 1e-5 of the logits' scale (~84 float32 eps): the longest dot product here has 128 terms
# (the MLP), whose rounding grows like sqrt(128) eps ~ 1.3e-6 of the scale, so the bound keeps an 8x margin.
FP32_RTOL = 1e-5


def assert_same(got, ref):
    """An identity: to 1e-10 in float64; in float32 to ``FP32_RTOL`` of the reference's largest logit."""
    atol = 1e-10 if ref.dtype == torch.float64 else FP32_RTOL * ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=0.0, atol=atol)


def random_dit(adaln=True, dropout=0.0, seed=0, **kw):
    """A tiny DiT whose every parameter is random and non-zero (the paper's zero init would hide paths)."""
    cfg = ModelConfig(vocab_size=V, mask_id=V - 1 if adaln else None, hidden_size=32, cond_dim=16, n_layers=2,
                      n_heads=4, length=L, dropout=dropout, adaln=adaln, **kw)
    model = DiT(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + 0.05)
    return model.eval()


def _tokens(b=3, n=L, seed=1):
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bidirectional_forward_is_permutation_equivariant_with_explicit_positions(dtype):
    """Permuting tokens together with their rotary positions permutes the output: the network knows a
    token's place only through the position it is given, so a sorted sequence keeps original places."""
    model = random_dit().to(dtype)
    x = _tokens()
    pos = torch.arange(L).expand(3, L)
    perm = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(s)) for s in range(3)])
    with torch.no_grad():
        out = model(x, positions=pos)
        out_perm = model(x.gather(1, perm), positions=pos.gather(1, perm))
    expected = out.gather(1, perm[..., None].expand(-1, -1, V))
    assert out.dtype == dtype
    assert_same(out_perm, expected)
    # positions matter: the same permuted tokens at default positions give another function
    with torch.no_grad():
        wrong = model(x.gather(1, perm))
    assert (wrong - expected).abs().max().item() > 1e-2


@pytest.mark.parametrize("adaln", [True, False])
def test_causal_mask_hides_the_future(adaln):
    model = random_dit(adaln=adaln)
    x = _tokens()
    t = 5
    y = x.clone()
    y[:, t:] = (y[:, t:] + 1) % V
    mask = masks.causal(L)
    with torch.no_grad():
        a, b = model(x, mask=mask), model(y, mask=mask)
    assert torch.equal(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min().item() > 1e-4  # every later position notices


def _chunks(model, x, pos, sizes, queried=0, mask_id=None):
    """Cached forward in chunks; each call may also query ``queried`` extra (mask) tokens that are not
    committed. Returns the committed tokens' logits and the queried tokens' logits per call."""
    cache = model.new_cache(x.shape[1] + queried)
    committed, probes, start = [], [], 0
    for n in sizes:
        new, new_pos = x[:, start:start + n], pos[:, start:start + n]
        if queried:
            extra = torch.full((x.shape[0], queried), mask_id)
            new = torch.cat([new, extra], 1)
            new_pos = torch.cat([new_pos, pos[:, start + n:start + n + queried]], 1)
        with torch.no_grad():
            out = model(new, positions=new_pos, mask=masks.cached_step(cache.length, new.shape[1]),
                        cache=cache, commit=n)
        committed.append(out[:, :n])
        probes.append(out[:, n:])
        start += n
        assert cache.length == start
    return torch.cat(committed, 1), probes


def test_kv_cache_chunks_equal_one_uncached_causal_forward():
    """An identity: proven in float64 (1e-10); float32 agrees to a tolerance relative to the logits' scale."""
    x = _tokens()
    pos = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(10 + s)) for s in range(3)])
    for dtype in DTYPES:
        model = random_dit().to(dtype)
        with torch.no_grad():
            full = model(x, positions=pos, mask=masks.causal(L))
        cached, _ = _chunks(model, x, pos, [3, 1, 4, 2, 2])
        assert cached.dtype == dtype
        assert_same(cached, full)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_cache_discards_queried_tokens(dtype):
    """Masks queried at a step are not kept: their logits equal the uncached causal forward of
    [committed tokens ; masks], and later steps are unaffected by them."""
    model = random_dit().to(dtype)
    mask_id = V - 1
    x = _tokens()
    pos = torch.arange(L).expand(3, L)
    sizes = [2, 3, 1, 2]
    cached, probes = _chunks(model, x[:, :8], pos, sizes, queried=2, mask_id=mask_id)
    with torch.no_grad():
        assert_same(cached, model(x[:, :8], positions=pos[:, :8], mask=masks.causal(8)))
        start = 0
        for n, probe in zip(sizes, probes):
            start += n
            seq = torch.cat([x[:, :start], torch.full((3, 2), mask_id)], 1)
            ref = model(seq, positions=pos[:, :start + 2], mask=masks.causal(start + 2))[:, start:]
            assert_same(probe, ref)


def test_ar_model_has_no_time_conditioning():
    model = random_dit(adaln=False)
    assert model.sigma_map is None
    names = [n for n, _ in model.named_parameters()]
    assert not any("adaLN" in n or "sigma_map" in n for n in names)
    x = _tokens()
    with torch.no_grad():
        out = model(x, mask=masks.causal(L))
    assert out.shape == (3, L, V) and torch.isfinite(out).all()


def test_default_conditioning_is_sigma_zero():
    model = random_dit()
    x = _tokens()
    with torch.no_grad():
        a = model(x)
        b = model(x, sigma=torch.zeros(3))
        c = model(x, sigma=torch.full((3,), 0.7))
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 1e-4


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    model = random_dit()
    x = _tokens()
    with torch.no_grad():
        ref = model(x, mask=masks.causal(L))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, mask=masks.causal(L))
    assert low.dtype == torch.float32
    err = (low - ref).abs().max().item()
    assert 0 < err < 0.05 * ref.abs().max().item()


def test_dropout_only_in_train_mode():
    model = random_dit(dropout=0.3)
    plain = random_dit(dropout=0.0)  # same seed, same weights
    x = _tokens()
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        assert torch.equal(a, plain(x))
        model.train()
        c, d = model(x), model(x)
    assert not torch.equal(c, d)
    assert not torch.equal(c, a)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=30, n_heads=4), "must divide"),
    (dict(vocab_size=10, mask_id=10), "outside the vocabulary"),
    (dict(vocab_size=10, mask_id=-1), "outside the vocabulary"),
    (dict(hidden_size=36, n_heads=4), "even"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_layers=0), "n_layers"),
])
def test_config_errors_are_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        ModelConfig(**kwargs)
    assert "\n" not in str(info.value)
