"""Folded inference path: ``DiT.frozen_conditioning`` folds the frozen adaLN modulations (and every
LayerNorm weight) into the linear layers; the samplers' logits equal those of the unfolded network.

The reference runs the same sampler with folding switched off (``frozen_conditioning`` returning
``None``, so every call recomputes the sigma = 0 conditioning and runs the modulations). Identities are
proven in float64 (1e-10) and checked in float32 to 1e-5 of the logits' scale.
"""

import pytest
import torch

from esolm import DiT, ModelConfig
from esolm.model import masks
from esolm.sampling import plan_binomial, sample_ar, sample_bd3, sample_esolm_b

V, M, L = 17, 16, 16
DTYPES = [torch.float64, torch.float32]


def assert_same(got, ref):
    atol = 1e-10 if ref.dtype == torch.float64 else 1e-5 * ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=0.0, atol=atol)


def tiny_model(adaln: bool = True, seed: int = 0, dtype: torch.dtype = torch.float64, dropout: float = 0.0,
               n_layers: int = 2) -> DiT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, mask_id=M if adaln else None, hidden_size=32, cond_dim=16,
                      n_layers=n_layers, n_heads=2, length=L, adaln=adaln, dropout=dropout)
    model = DiT(cfg).randomize_zero_init(0.2)
    with torch.no_grad():  # non-trivial LayerNorm weights, so that folding them is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_final.weight"):
                p.normal_(1.0, 0.3)
    return model.to(dtype).eval()


def unfolded(model: DiT) -> DiT:
    """The same model object with folding off: samplers then pass ``cond=None`` (the training path)."""
    model.frozen_conditioning = lambda batch_size, sigma=None: None
    return model


def record(sampler, model, *args, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    steps = []
    out = sampler(model, *args, generator=torch.Generator().manual_seed(5),
                  step_callback=lambda k, lo, hi, logits, tokens: steps.append(logits.clone()), **kwargs)
    return out.tokens, steps


def assert_same_run(a, b):
    (tok_a, steps_a), (tok_b, steps_b) = a, b
    assert len(steps_a) == len(steps_b) > 0
    for got, ref in zip(steps_a, steps_b):
        assert_same(got, ref)
    assert torch.equal(tok_a, tok_b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha0", [0.5, 1.0])
@pytest.mark.parametrize("prompt", [0, 3])
def test_esolm_b_cached_folded_equals_unfolded(dtype, alpha0, prompt):
    x = torch.full((3, L), M, dtype=torch.long)
    x[:, :prompt] = 4
    plan = plan_binomial(x == M, 3, alpha0, torch.Generator().manual_seed(1))
    folded = record(sample_esolm_b, tiny_model(seed=1, dtype=dtype), x, plan)
    ref = record(sample_esolm_b, unfolded(tiny_model(seed=1, dtype=dtype)), x, plan)
    assert_same_run(folded, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ar_folded_equals_unfolded(dtype):
    """The AR transformer (no adaLN) folds its LayerNorm weights the same way."""
    x = torch.full((2, L), 0, dtype=torch.long)
    x[:, :2] = torch.tensor([3, 5])
    folded = record(sample_ar, tiny_model(adaln=False, seed=2, dtype=dtype), x, 2)
    ref = record(sample_ar, unfolded(tiny_model(adaln=False, seed=2, dtype=dtype)), x, 2)
    assert_same_run(folded, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bd3_folded_equals_unfolded(dtype):
    x = torch.full((2, L), M, dtype=torch.long)
    x[:, :3] = 7
    folded = record(sample_bd3, tiny_model(seed=3, dtype=dtype), x, 4, steps=3)
    ref = record(sample_bd3, unfolded(tiny_model(seed=3, dtype=dtype)), x, 4, steps=3)
    assert_same_run(folded, ref)


@pytest.mark.parametrize("adaln", [True, False])
@pytest.mark.parametrize("n_layers", [1, 3])
def test_folded_forward_with_cache_mask_and_logits_slice(adaln, n_layers):
    """Cached call with a causal mask slice and a logits slice (the last block runs only the sliced rows),
    for any sigma shared by the rows; the cache holds the same keys/values as the unfolded pass."""
    model = tiny_model(adaln, seed=4, n_layers=n_layers)
    b = 2
    x = torch.randint(0, V, (b, L))
    pos = torch.randperm(L).expand(b, L)
    sigma = torch.full((b,), 0.7)
    causal = masks.causal(L)
    with torch.no_grad():
        ref = model(x, pos, mask=causal, sigma=sigma)
        cond = model.frozen_conditioning(b, sigma)
        assert_same(model(x, pos, mask=causal, cond=cond), ref)
        cache, ref_cache = model.new_cache(), model.new_cache()
        model(x[:, :9], pos[:, :9], mask=causal[:, :, :9, :9], cache=cache, commit=6, cond=cond)
        model(x[:, :6], pos[:, :6], mask=causal[:, :, :6, :6], cache=ref_cache, commit=6, sigma=sigma)
        for start, hi, sl in ((6, 10, slice(1, None)), (6, 10, slice(3, 4)), (6, 7, slice(0, None))):
            got = model(x[:, start:hi], pos[:, start:hi], mask=causal[:, :, start:hi, :hi], cache=cache,
                        commit=0, cond=cond, logits_slice=sl)
            assert_same(got, ref[:, start:hi][:, sl])
        for layer in range(n_layers):
            assert_same(cache.k[layer][:, :, :6], ref_cache.k[layer][:, :, :6])
            assert_same(cache.v[layer][:, :, :6], ref_cache.v[layer][:, :, :6])


def test_folded_training_mode_applies_the_same_dropout():
    """In training mode the folded path draws the same dropout masks: gate * drop(h) == drop(gate * h)."""
    model = tiny_model(seed=5, dropout=0.3).train()
    x = torch.randint(0, V, (2, L))
    with torch.no_grad():
        torch.manual_seed(11)
        ref = model(x, mask=masks.causal(L))
        cond = model.frozen_conditioning(2)
        torch.manual_seed(11)
        got = model(x, mask=masks.causal(L), cond=cond)
        torch.manual_seed(12)
        other = model(x, mask=masks.causal(L), cond=cond)
    assert_same(got, ref)
    assert not torch.allclose(other, ref)


def test_frozen_conditioning_needs_one_shared_sigma():
    model = tiny_model()
    with pytest.raises(ValueError, match="shared by every row"):
        model.frozen_conditioning(2, torch.tensor([0.0, 0.5]))
    cond = model.frozen_conditioning(2, torch.tensor([0.5, 0.5]))
    assert all(not t.requires_grad for blk in cond.blocks for t in blk if t is not None)
