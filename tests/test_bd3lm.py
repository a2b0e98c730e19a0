"""BD3-LM ``ignore_bos``: token 0 is never masked nor counted in the loss, and is given when sampling."""

import pytest
import torch

from esolm.methods import model_config_for
from esolm.model.backbone import DiT
from esolm.noise import antithetic_times
from esolm.objectives import build_objective
from esolm.sampling import generate, sample_bd3

V, MASK, BS, N = 13, 12, 2, 8
METHOD = {"name": "bd3lm", "block_size": BS, "ignore_bos": True}


def tiny_model() -> DiT:
    torch.manual_seed(0)
    model = DiT(model_config_for(METHOD, vocab_size=V, mask_id=MASK, hidden_size=32, cond_dim=16,
                                 n_layers=2, n_heads=2, length=N))
    model.randomize_zero_init(0.3)
    return model.eval()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ignore_bos_loss_equals_brute_force_without_position_0():
    model = tiny_model()
    x = torch.randint(0, MASK, (3, N), generator=gen(1))
    with torch.no_grad():
        out = build_objective(METHOD).eval()(model, x, generator=gen(9))
    g = gen(9)
    t = antithetic_times(3 * N // BS, g).view(3, N // BS)  # the objective's draws, in its order
    u = torch.rand((3, N), generator=g)
    total = torch.zeros((), dtype=torch.float64)
    n_masked = 0
    for b in range(3):
        for blk in range(N // BS):
            lo, hi = blk * BS, (blk + 1) * BS
            masked = u[b, lo:hi] < 0.999 * t[b, blk]
            if lo == 0:
                masked[0] = False  # the BOS stays clean
            n_masked += int(masked.sum())
            ids = x[b, :lo].tolist() + torch.where(masked, MASK, x[b, lo:hi]).tolist()
            m = torch.ones(hi, hi, dtype=torch.bool)  # the noised block sees everything
            for i in range(lo):
                for j in range(hi):
                    m[i, j] = j // BS <= i // BS  # the clean prefix is block-causal
            with torch.no_grad():
                logits = model(torch.tensor([ids]), mask=m[None, None])[0, lo:hi].double()
            logits[:, MASK] = -1e6
            lp = logits - torch.logsumexp(logits, -1, keepdim=True)
            for k in range(BS):
                if masked[k]:
                    total -= lp[k, x[b, lo + k]] / t[b, blk].double()  # ELBO weight 1 / t
    assert n_masked > 0
    nll, tokens = out.terms["mdm"]
    assert int(tokens) == 3 * (N - 1)  # position 0 is not counted
    assert float(nll) == pytest.approx(float(total), rel=1e-5)
    assert float(out.loss) == pytest.approx(float(total) / (3 * (N - 1)), rel=1e-5)


@pytest.mark.parametrize("clip", [None, [0.9, 1.0]])
def test_ignore_bos_never_masks_position_0(clip):
    model = tiny_model()
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, :N].clone()))
    x = torch.randint(0, MASK, (64, N), generator=gen(2))
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[:, -1] = False  # with padding too
    method = {**METHOD, "clip": clip}
    with torch.no_grad():
        out = build_objective(method).train()(model, x, valid, generator=gen(3))
        plain = build_objective({**method, "ignore_bos": False}).train()(model, x, valid, generator=gen(3))
    xt, xt_plain = seen
    assert not (xt[:, 0] == MASK).any() and (xt[:, 1:] == MASK).any()
    assert (xt_plain[:, 0] == MASK).sum() > 16  # the same draws mask it without ignore_bos
    assert torch.equal(xt[:, 1:], xt_plain[:, 1:])  # and nothing else changes
    assert int(out.terms["mdm"][1]) == 64 * (N - 2) and int(plain.terms["mdm"][1]) == 64 * (N - 1)


def test_ignore_bos_sampling_gives_position_0():
    model = tiny_model()
    out = generate(model, METHOD, num_samples=3, bos_id=5, seed=0, trace=True)
    assert (out.tokens[:, 0] == 5).all() and not (out.tokens == MASK).any()
    decoded = [p for s in out.trace[0] for b in range(3) for p in s.row(b)]  # ancestral: rows differ per step
    assert len(decoded) == 3 * (N - 1) and 0 not in decoded  # position 0 is never decoded
    assert {s.phase for s in out.trace[0]} == {"diffusion"}
    with_prompt = generate(model, METHOD, num_samples=2, prompt_ids=[7, 8], seed=0)
    assert (with_prompt.tokens[:, :2] == torch.tensor([7, 8])).all()
    with pytest.raises(ValueError, match="ignore_bos"):
        generate(model, METHOD, num_samples=1, seed=0)
    x = torch.full((1, N), MASK)
    with pytest.raises(ValueError, match="ignore_bos"):
        sample_bd3(model, x, BS, ignore_bos=True)
    assert (sample_bd3(model, x, BS).tokens != MASK).all()  # without the flag position 0 is sampled
