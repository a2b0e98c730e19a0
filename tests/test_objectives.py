"""Objectives and schedule: hand-computed losses, brute-force AR equivalence, sampling properties."""

import math

import pytest
import torch

from esolm.config import ConfigError
from esolm.errors import UserError
from esolm.methods import as_method, model_config_for
from esolm.model import masks
from esolm.model.backbone import DiT
from esolm.noise import EPS, LogLinearSchedule, antithetic_times
from esolm.objectives import (
    LossOutput,
    build_objective,
)

V, MASK = 13, 12  # 12 real tokens + the mask


def tiny_model(method: dict, length: int = 8, seed: int = 0, dropout: float = 0.0,
               dtype: torch.dtype = torch.float64) -> DiT:
    """A 2-layer DiT whose zero-initialised adaLN/output weights are re-drawn, so logits are not uniform.

    float64 by default: losses == hand computations are identities, proven to 1e-12 only in float64."""
    torch.manual_seed(seed)
    cfg = model_config_for(method, vocab_size=V, mask_id=None if method["name"] == "ar" else MASK,
                           hidden_size=32, cond_dim=16, n_layers=2, n_heads=2, length=length, dropout=dropout)
    model = DiT(cfg)
    model.randomize_zero_init(0.3)
    return model.to(dtype).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax with the mask logit removed (zero-masking), written independently."""
    logits = logits.double().clone()
    logits[..., MASK] = -1e6
    return logits - torch.logsumexp(logits, -1, keepdim=True)


def logp_last(model, ids, positions, mask=None) -> torch.Tensor:
    """Log-probabilities of the LAST token of one pass over ``ids`` (causal unless ``mask`` is given)."""
    n = len(ids)
    if mask is None:
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
    out = model(torch.tensor([list(ids)]), positions=torch.tensor([list(positions)]), mask=mask)
    return log_probs(out[0, -1])


# ---------------------------------------------------------------------------------------------- schedule


def test_schedule_values():
    s = LogLinearSchedule(0.25)
    t = torch.tensor([EPS, 0.5, 1.0], dtype=torch.float64)
    alpha = 0.25 * (1 - (1 - 1e-3) * t)
    torch.testing.assert_close(s.alpha(t), alpha, rtol=1e-12, atol=0)  # float64 closed forms
    torch.testing.assert_close(s.dalpha(t), torch.full_like(t, -0.25 * 0.999), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.weight(t), -0.25 * 0.999 / (1 - alpha), rtol=1e-12, atol=0)
    assert (s.weight(t) < 0).all()
    assert torch.equal(LogLinearSchedule(0.0).weight(t), torch.zeros_like(t))
    # MDLM (alpha0 = 1): weight = -1/t exactly
    torch.testing.assert_close(LogLinearSchedule(1.0).weight(t), -1 / t, rtol=1e-12, atol=0)


def test_antithetic_times_stratified_and_rank_consistent():
    n_local, world = 4, 3
    full = antithetic_times(n_local * world, gen(7))
    assert full.min() >= EPS and full.max() <= 1.0
    bins = torch.floor((full - EPS) / (1 - EPS) * len(full)).long()
    assert sorted(bins.tolist()) == list(range(len(full)))  # one time in each 1/n bin
    parts = [antithetic_times(n_local, gen(7), rank=r, world_size=world) for r in range(world)]
    # union over ranks == single-process batch; times are float32 in [0, 1]: 1e-6 is ~8 float32 eps of 1
    assert torch.allclose(torch.cat(parts), full, rtol=0, atol=1e-6)
    # identical u on every rank: the offset inside the bin is the same everywhere (float32 times scaled by
    # n = 12 before the fractional part: ~12 * 8 eps32 ~ 1e-5 of rounding; 1e-4 keeps a 10x margin)
    offsets = [((p - EPS) / (1 - EPS) * len(full)) % 1 for p in parts]
    assert all(torch.allclose(o, offsets[0][:1].expand_as(o), atol=1e-4) for o in offsets)
    # a different seed moves the offset
    assert not torch.allclose(antithetic_times(8, gen(8)), antithetic_times(8, gen(7)))


# ---------------------------------------------------------------------------------------------- methods


def test_method_defaults_and_errors():
    assert as_method({"name": "esolm", "alpha0": 1.0}).batch_split == 1.0
    assert as_method({"name": "esolm", "alpha0": 0.0}).batch_split == 0.0
    assert as_method({"name": "esolm", "alpha0": 0.25}).batch_split == 0.5
    for bad in ({"name": "esolm", "variant": "C"}, {"name": "mdlm", "alpha0": 1}, {"name": "gpt"},
                {"name": "bd3lm", "block_size": 0}, {"name": "bd3lm", "block_size": 4, "clip": [0.9, 0.1]},
                {"name": "esolm", "alpha0": 1.5}):
        with pytest.raises(ConfigError):
            build_objective(bad)
    ar = model_config_for({"name": "ar"}, vocab_size=V)
    assert ar.adaln is False and ar.mask_id is None
    assert model_config_for({"name": "mdlm"}, vocab_size=V, mask_id=MASK).adaln is True
    with pytest.raises(ConfigError):
        model_config_for({"name": "mdlm"}, vocab_size=V, mask_id=None)


def test_loss_output_exact_aggregation():
    a = LossOutput({"mdm": (torch.tensor(6.0), torch.tensor(3)), "ar": (torch.tensor(2.0), torch.tensor(4))})
    b = LossOutput({"mdm": (torch.tensor(4.0), torch.tensor(2))})
    m = LossOutput.zero().merge(a).merge(b)
    assert m.loss.item() == pytest.approx(10 / 5 + 2 / 4)
    assert int(m.tokens) == 9
    assert LossOutput.zero().loss.item() == 0.0


# ---------------------------------------------------------------------------------------------- AR


def test_ar_loss_hand_computed_with_padding():
    model = tiny_model({"name": "ar"})
    x = tokens(2, 8)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[1, 5:] = False
    out = build_objective({"name": "ar"})(model, x, valid)
    total, count = 0.0, 0
    for b in range(2):
        n = int(valid[b].sum())
        for i in range(1, n):  # predict x_i from x_<i, one prefix at a time
            causal = torch.tril(torch.ones(i, i, dtype=torch.bool))[None, None]
            logits = model(x[b:b + 1, :i], mask=causal)[0, -1].double()
            total -= torch.log_softmax(logits, -1)[x[b, i]].item()
            count += 1
    assert int(out.terms["ar"][1]) == count == 7 + 4
    assert out.loss.item() == pytest.approx(total / count, rel=1e-12)


# ---------------------------------------------------------------------------------------------- MDLM


def _replay_mdm(g, b, n, schedule, x):
    t = antithetic_times(b, g)
    u = torch.rand((b, n), generator=g)
    is_mask = u < (1 - schedule.alpha(t))[:, None]
    return t, is_mask, torch.where(is_mask, MASK, x)


@pytest.mark.parametrize("low_var", [False, True])
def test_mdlm_loss_hand_computed(low_var):
    method = {"name": "mdlm", "low_var": low_var}
    model = tiny_model(method)
    x = tokens(4, 8)
    obj = build_objective(method)
    train = obj(model, x, generator=gen(3))
    evals = obj.eval()(model, x, generator=gen(3))
    t, is_mask, xt = _replay_mdm(gen(3), 4, 8, LogLinearSchedule(1.0), x)
    assert is_mask.any() and (~is_mask).any()
    lp = log_probs(model(xt)).gather(-1, x[..., None])[..., 0]
    ce = -(lp * is_mask).sum(1)  # per-sequence CE on masked tokens only (carry-over)
    # weight -alpha'/(1-alpha) = 1/t (test_schedule_values), taken from the schedule at the objective's float32
    # t: the objective computes it in float32, ~1e-7/t off 1/t in float64, which would hide the 1e-12 check
    w = -LogLinearSchedule(1.0).weight(t).double()
    elbo = (ce * w).sum() / x.numel()
    assert evals.loss.item() == pytest.approx(elbo.item(), rel=1e-12)
    expected_train = ce.sum() / x.numel() if low_var else elbo
    assert train.loss.item() == pytest.approx(expected_train.item(), rel=1e-12)
    assert obj.training is False and model.training is False


# ---------------------------------------------------------------------------------------------- Eso-LM


def _hand_mask(kind: str, n_clean: int, n: int) -> torch.Tensor:
    """Diffusion-phase masks written out with loops (B: causal; A: clean prefix bidirectional)."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = j <= i or (kind == "A" and j < n_clean)
    return m


@pytest.mark.parametrize("variant", ["B", "A"])
def test_esolm_diffusion_term_hand_computed(variant):
    alpha0 = 0.5
    method = {"name": "esolm", "variant": variant, "alpha0": alpha0, "batch_split": 1.0}
    model = tiny_model(method)
    x = tokens(3, 8)
    out = build_objective(method)(model, x, generator=gen(5))
    assert set(out.terms) == {"mdm"}
    sched = LogLinearSchedule(alpha0)
    g = gen(5)
    t, is_mask, xt = _replay_mdm(g, 3, 8, sched, x)
    key = is_mask.float() + 0.9 * torch.rand((3, 8), generator=g)  # the authors' sort key
    total = 0.0
    for b in range(3):
        order = torch.argsort(key[b]).tolist()
        n_clean = int((~is_mask[b]).sum())
        assert all(not is_mask[b, p] for p in order[:n_clean])  # clean first
        mask = _hand_mask(variant, n_clean, 8)[None, None]
        logits = model(xt[b, order][None], positions=torch.tensor([order]), mask=mask)[0]
        lp = log_probs(logits)
        w = -sched.weight(t[b]).double()  # -alpha'/(1-alpha) in float32, as the objective (see the MDLM test)
        for i, p in enumerate(order):
            if is_mask[b, p]:
                total -= w.item() * lp[i, x[b, p]].item()
    assert out.loss.item() == pytest.approx(total / x.numel(), rel=1e-12)


@pytest.mark.parametrize("variant", ["B", "A"])
def test_esolm_sequential_term_equals_token_by_token(variant):
    """AR term from one 2L pass == each masked token decoded by its own forward pass over
    [x at the earlier sorted positions ; mask], i.e. the sequential phase done one step at a time."""
    alpha0 = 0.4
    method = {"name": "esolm", "variant": variant, "alpha0": alpha0, "batch_split": 0.0}
    model = tiny_model(method)
    x = tokens(3, 8)
    out = build_objective(method)(model, x, generator=gen(11))
    assert set(out.terms) == {"ar"}
    g = gen(11)
    is_mask = torch.rand((3, 8), generator=g) < 1 - alpha0
    noise = torch.rand((3, 8), generator=g)
    total = 0.0
    for b in range(3):
        clean = [p for p in range(8) if not is_mask[b, p]]
        if variant == "B":  # clean tokens in the authors' random order
            clean = [clean[i] for i in torch.argsort(noise[b, clean]).tolist()]
        order = clean + [p for p in range(8) if is_mask[b, p]]  # masks left to right
        nc = len(clean)
        for i in range(nc, 8):
            ids = [int(x[b, p]) for p in order[:i]] + [MASK]
            mask = None if variant == "B" else masks.prefix_lm(nc, i + 1)
            total -= logp_last(model, ids, order[:i + 1], mask)[x[b, order[i]]].item()
    assert out.loss.item() == pytest.approx(total / x.numel(), rel=1e-12)


def test_esolm_alpha0_zero_is_exact_ar_nll():
    method = {"name": "esolm", "variant": "B", "alpha0": 0.0}  # default batch_split 0
    model = tiny_model(method)
    x = tokens(2, 8)
    out = build_objective(method)(model, x, generator=gen(2))
    brute = 0.0
    for b in range(2):
        for i in range(8):  # [x_<i clean ; mask at i], causal, natural positions, read the last logit
            brute -= logp_last(model, x[b, :i].tolist() + [MASK], list(range(i + 1)))[x[b, i]].item()
    assert int(out.terms["ar"][1]) == 16
    assert out.loss.item() == pytest.approx(brute / 16, rel=1e-12)
    # and it does not depend on the random draws at all
    assert build_objective(method)(model, x, generator=gen(99)).loss.item() == pytest.approx(out.loss.item(),
                                                                                             rel=1e-12)


def test_batch_split_semantics():
    method = {"name": "esolm", "variant": "B", "alpha0": 0.25, "batch_split": 0.5}
    model = tiny_model(method)
    x = tokens(4, 8)
    out = build_objective(method)(model, x, generator=gen(4))
    assert int(out.terms["mdm"][1]) == 16 and int(out.terms["ar"][1]) == 16
    g = gen(4)  # MDM draws first (first half of the batch), then the AR draws (second half)
    mdm = build_objective({**method, "batch_split": 1.0})(model, x[:2], generator=g)
    ar = build_objective({**method, "batch_split": 0.0})(model, x[2:], generator=g)
    torch.testing.assert_close(out.terms["mdm"][0], mdm.terms["mdm"][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(out.terms["ar"][0], ar.terms["ar"][0], rtol=1e-12, atol=0)
    assert out.loss.item() == pytest.approx(mdm.loss.item() + ar.loss.item(), rel=1e-12)


def test_low_var_only_in_training():
    method = {"name": "esolm", "variant": "B", "alpha0": 1.0, "low_var": True}
    model = tiny_model(method)
    x = tokens(2, 8)
    obj = build_objective(method)
    train = obj(model, x, generator=gen(6)).terms["mdm"][0]
    evals = obj.eval()(model, x, generator=gen(6)).terms["mdm"][0]
    elbo = build_objective({**method, "low_var": False})(model, x, generator=gen(6)).terms["mdm"][0]
    torch.testing.assert_close(evals, elbo, rtol=1e-12, atol=0)
    assert not torch.allclose(train, elbo)


# ---------------------------------------------------------------------------------------------- BD3-LM


def test_bd3lm_full_block_equals_mdlm():
    """Block size L: x_t sees only itself (bidirectionally), so the loss is MDLM's for the same draws."""
    model = tiny_model({"name": "mdlm"})
    x = tokens(3, 8)
    bd3 = build_objective({"name": "bd3lm", "block_size": 8}).eval()(model, x, generator=gen(8))
    mdlm = build_objective({"name": "mdlm"}).eval()(model, x, generator=gen(8))
    assert bd3.loss.item() == pytest.approx(mdlm.loss.item(), rel=1e-12)  # float64 model, same float32 weights


def test_bd3lm_hand_computed_blocks():
    bs, n = 2, 8
    model = tiny_model({"name": "bd3lm", "block_size": bs})
    x = tokens(2, n)
    out = build_objective({"name": "bd3lm", "block_size": bs})(model, x, generator=gen(9))
    g = gen(9)
    t = antithetic_times(2 * n // bs, g).view(2, n // bs)  # one time per block
    u = torch.rand((2, n), generator=g)
    total = 0.0
    for b in range(2):
        for blk in range(n // bs):
            lo, hi = blk * bs, (blk + 1) * bs
            mask_blk = u[b, lo:hi] < 0.999 * t[b, blk]
            # block diffusion by hand: clean previous blocks, then this (noised) block, bidirectional
            ids = x[b, :lo].tolist() + torch.where(mask_blk, MASK, x[b, lo:hi]).tolist()
            m = torch.ones(hi, hi, dtype=torch.bool)  # the noised block sees everything
            for i in range(lo):
                for j in range(hi):
                    m[i, j] = j // bs <= i // bs  # the clean prefix is block-causal
            logits = model(torch.tensor([ids]), mask=m[None, None])[0]
            lp = log_probs(logits[lo:hi])
            for k in range(bs):
                if mask_blk[k]:
                    # weight 1/t, in float32 as the objective computes it (see the MDLM test)
                    total += lp[k, x[b, lo + k]].item() * LogLinearSchedule(1.0).weight(t[b, blk]).item()
    assert out.loss.item() == pytest.approx(total / x.numel(), rel=1e-12)


def test_bd3lm_clip_only_in_training():
    model = tiny_model({"name": "mdlm"})
    x = tokens(4, 8)
    clipped = build_objective({"name": "bd3lm", "block_size": 4, "clip": [0.3, 0.8]})
    plain = build_objective({"name": "bd3lm", "block_size": 4})
    assert clipped.eval()(model, x, generator=gen(1)).loss.item() == pytest.approx(
        plain.eval()(model, x, generator=gen(1)).loss.item())
    assert clipped.train()(model, x, generator=gen(1)).loss.item() != pytest.approx(
        plain.train()(model, x, generator=gen(1)).loss.item())


# ---------------------------------------------------------------------------------------------- shared


ALL_METHODS = [
    {"name": "ar"},
    {"name": "mdlm"},
    {"name": "esolm", "variant": "B", "alpha0": 0.5, "batch_split": 0.5},
    {"name": "esolm", "variant": "A", "alpha0": 0.5, "batch_split": 0.5},
    {"name": "bd3lm", "block_size": 2},
]


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m["name"] + m.get("variant", ""))
def test_padding_contributes_nothing(method):
    model = tiny_model(method)
    x = tokens(4, 8)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[0, 6:] = False
    valid[3, 3:] = False
    y = x.clone()
    y[~valid] = (x[~valid] + 5) % MASK  # different padding content
    obj = build_objective(method)
    a, b = obj(model, x, valid, generator=gen(2)), obj(model, y, valid, generator=gen(2))
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-12, abs=0)  # float64 model
    if method["name"] != "ar":
        assert int(a.tokens) == int(valid.sum())
    full = obj(model, x, generator=gen(2))
    assert full.loss.item() != pytest.approx(a.loss.item())


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m["name"] + m.get("variant", ""))
def test_objectives_keep_model_mode_and_backprop(method):
    model = tiny_model(method, dropout=0.1, dtype=torch.float32).train()  # the training dtype
    out = build_objective(method)(model, tokens(4, 8), generator=gen(3))
    assert model.training
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    model.eval()
    build_objective(method)(model, tokens(4, 8), generator=gen(3))
    assert not model.training
    assert math.isfinite(out.loss.item())


# ---------------------------------------------------------------------------------------------- fixed values

# (summed NLL, token count) of every term for the draws below, recorded from the objectives before their term
# functions were factored to also serve the per-row conditional score (float64 model: reproducible to 1e-12).
RECORDED = {
    "ar": ({"name": "ar"}, True, {"ar": (78.98169501736842, 22)}),
    "mdlm": ({"name": "mdlm"}, True, {"mdm": (71.997779823343, 26)}),
    "mdlm_lowvar": ({"name": "mdlm", "low_var": True}, True, {"mdm": (51.20270685188513, 26)}),
    "eso_b": ({"name": "esolm", "variant": "B", "alpha0": 0.5}, True,
              {"mdm": (20.757506055187775, 14), "ar": (28.497434229686046, 12)}),
    "eso_b_lowvar": ({"name": "esolm", "variant": "B", "alpha0": 0.25, "low_var": True}, True,
                     {"mdm": (38.3495553333899, 14), "ar": (36.54763072337926, 12)}),
    "eso_a": ({"name": "esolm", "variant": "A", "alpha0": 0.5, "batch_split": 0.25}, True,
              {"mdm": (12.43393987408946, 8), "ar": (39.79100166198854, 18)}),
    "bd3": ({"name": "bd3lm", "block_size": 2}, True, {"mdm": (89.60913971710261, 26)}),
    "bd3_clip": ({"name": "bd3lm", "block_size": 4, "clip": [0.3, 0.8]}, True, {"mdm": (83.26297345406309, 26)}),
    "bd3_bos": ({"name": "bd3lm", "block_size": 2, "ignore_bos": True, "clip": [0.2, 0.9]}, True,
                {"mdm": (79.35929729530596, 22)}),
    "bd3_bos_eval": ({"name": "bd3lm", "block_size": 2, "ignore_bos": True}, False, {"mdm": (74.86115806660725, 22)}),
}


@pytest.mark.parametrize("case", RECORDED)
def test_training_losses_unchanged(case):
    """Padding, a second rank and a separate time generator: every term's value and count as recorded."""
    method, training, want = RECORDED[case]
    model = tiny_model(method)
    x = tokens(4, 8, seed=5)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[1, 6:] = False
    valid[3, 4:] = False
    with torch.no_grad():
        out = build_objective(method).train(training)(model, x, valid, generator=gen(13), rank=1, world_size=2,
                                                      time_generator=gen(21))
    assert set(out.terms) == set(want)
    for k, (nll, n) in want.items():
        assert float(out.terms[k][0]) == pytest.approx(nll, rel=1e-12, abs=0)
        assert int(out.terms[k][1]) == n


# ---------------------------------------------------------------------------------------------- conditional score


def _padded(x: torch.Tensor) -> torch.Tensor:
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[1, 6:] = False
    return valid


@pytest.mark.parametrize("method", [
    {"name": "mdlm"},
    {"name": "bd3lm", "block_size": 2},
    {"name": "bd3lm", "block_size": 4, "clip": [0.3, 0.8]},
    {"name": "esolm", "variant": "B", "alpha0": 1.0},
    {"name": "esolm", "variant": "A", "alpha0": 1.0},
    {"name": "esolm", "variant": "B", "alpha0": 0.0},
    {"name": "esolm", "variant": "A", "alpha0": 0.0},
], ids=lambda m: "-".join(str(v) for v in m.values()))
def test_conditional_nelbo_with_every_token_maskable_is_the_evaluation_loss(method):
    """maskable = valid: the per-row scores sum to the evaluation loss's NLL for the same draws (one
    implementation; at alpha0 = 1 Eso-LM's sequential term masks nothing, at 0 its diffusion weight is 0 and its
    sequential term is deterministic), even on an objective left in training mode (the ELBO weights, no clip)."""
    model = tiny_model(method)
    x = tokens(3, 8)
    valid = _padded(x)
    obj = build_objective(method)
    with torch.no_grad():
        want = obj.eval()(model, x, valid, generator=gen(4)).loss * int(valid.sum())
        got = obj.train().conditional_nelbo(model, x, valid, valid, gen(4))
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert float(got.sum()) == pytest.approx(float(want), rel=1e-9)
    assert obj.training


@pytest.mark.parametrize("method", [
    {"name": "mdlm"},
    {"name": "bd3lm", "block_size": 2},
    {"name": "bd3lm", "block_size": 4, "ignore_bos": True},
    {"name": "esolm", "variant": "B", "alpha0": 0.5},
    {"name": "esolm", "variant": "A", "alpha0": 0.5},
], ids=lambda m: "-".join(str(v) for v in m.values()))
def test_conditional_nelbo_masks_only_maskable_tokens(method):
    """Every pass the score runs masks only maskable valid tokens (never the context, the padding, or BD3-LM's
    position 0 with ignore_bos), and masks each maskable position in some row; rows of any width (BD3-LM pads
    blocks)."""
    model = tiny_model(method)
    seen = []  # every pass's (input ids, rotary positions or None)
    model.register_forward_pre_hook(lambda mod, args, kw: seen.append((args[0], kw.get("positions"))),
                                    with_kwargs=True)
    x = tokens(64, 7, seed=3)  # 7 tokens: not a whole number of BD3-LM blocks
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[::2, 6] = False
    maskable = torch.zeros_like(valid)
    maskable[:, 3:] = True  # context: positions 0-2
    if method.get("ignore_bos"):
        maskable[:, 0] = True  # asked for, refused
    with torch.no_grad():
        out = build_objective(method).conditional_nelbo(model, x, valid, maskable, gen(1))
    assert out.shape == (64,) and torch.isfinite(out).all() and (out >= 0).all() and (out > 0).any()
    allowed = maskable & valid
    if method.get("ignore_bos"):
        allowed[:, 0] = False
    hit = torch.zeros_like(allowed)
    n = x.shape[1]
    for ids, pos in seen:
        w = ids.shape[1] // 2 if ids.shape[1] > n else ids.shape[1]  # [x_t ; x_0] passes: the noised half
        pos = torch.arange(w).expand(64, w) if pos is None else pos[:, :w]
        is_mask = torch.zeros(64, w, dtype=torch.bool).scatter(1, pos, ids[:, :w] == MASK)[:, :n]
        assert not (is_mask & ~allowed).any()
        hit |= is_mask
    assert torch.equal(hit.any(0), allowed.any(0))  # every maskable position is masked in some row


def test_ar_conditional_nelbo_and_exact_token_logprobs_are_the_causal_chain():
    """AR: each maskable token given the tokens before it, one pass each by hand; exact_token_logprobs gives the
    same per-token values (0 at position 0 and at padding) and refuses orders and methods that only bound."""
    from esolm.likelihood import exact_token_logprobs

    model = tiny_model({"name": "ar"})
    x = tokens(2, 8)
    valid = _padded(x)
    maskable = torch.zeros_like(valid)
    maskable[:, 3:] = True
    with torch.no_grad():
        got = build_objective({"name": "ar"}).conditional_nelbo(model, x, valid, maskable, gen(0))
        ll, best = exact_token_logprobs(model, {"name": "ar"}, x, valid)
        for b in range(2):
            want = []
            for i in range(8):
                if i:  # no mask token: a plain log-softmax
                    causal = torch.tril(torch.ones(i, i, dtype=torch.bool))[None, None]
                    lp = torch.log_softmax(model(x[b:b + 1, :i], mask=causal)[0, -1].double(), -1)
                want.append(float(lp[x[b, i]]) if i and valid[b, i] else 0.0)
                if i and valid[b, i]:
                    assert bool(best[b, i]) == (int(lp.argmax()) == int(x[b, i]))
            assert ll[b].tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
            n = int(valid[b].sum())
            assert float(got[b]) == pytest.approx(-sum(want[3:n]), rel=1e-12)
    with pytest.raises(UserError, match="position 0"):
        build_objective({"name": "ar"}).conditional_nelbo(model, x, valid, torch.ones_like(valid))
    with pytest.raises(UserError, match="left to right only"):
        exact_token_logprobs(model, {"name": "ar"}, x, order=torch.arange(8).expand(2, 8))
    with pytest.raises(UserError, match="no exact likelihood"):
        exact_token_logprobs(tiny_model({"name": "mdlm"}), {"name": "mdlm"}, x)
