"""The shifted query convention (``esolm.model.shift``, docs/llama.md) and the mask-gated adapters of
``esolm.model.llama``, proven in float64 on tiny random Llama networks (those of tests/test_llama.py):

* alpha0 = 0 *is* the base model: the Eso-LM (B) sampler's logits equal transformers' ``LlamaForCausalLM`` (1e-10),
  greedy decoding equals its ``generate``, the exact likelihood equals its log-probabilities, and the sequential
  training term equals its NLL;
* KV-cached Eso-LM (B) decoding == the uncached passes == the one-pass query logits of the plan, in any order;
* the one-pass likelihood == per-token brute force (a fresh pass per conditional); the losses == brute force;
* self-speculative decoding keeps the law: greedy it equals the plain sampler token for token (both call
  layouts), and sampled its first two tokens follow the exact law (chi-square);
* a mask-gated adapter never changes a row fed a real token (AR mode bit-identical), keeps every identity, trains
  only its deltas, and an adapter folder round-trips through ``save_adapter`` / ``load_model``.
"""

import dataclasses

import pytest
import torch
from scipy import stats

from esolm.io import llama as llama_io
from esolm.io import load_model
from esolm.io.pretrained import ADAPTER_WEIGHTS, save_adapter
from esolm.likelihood import iw_bound, order_token_logprobs
from esolm.model import masks
from esolm.model.llama import add_adapter
from esolm.model.shift import query_logits, shift_queries, start_first
from esolm.objectives import build_objective
from esolm.sampling import plan_binomial, sample_esolm_b
from esolm.sampling.schedule import plan_left_to_right
from esolm.sampling.speculative import sample_speculative

transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs transformers")
from transformers import LlamaForCausalLM  # noqa: E402

from test_llama import L, V, assert_same, hf_config, hf_in_float64, tokens  # noqa: E402

ESO_B = {"name": "esolm", "variant": "B", "alpha0": 0.5}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(7)
    f = tmp_path_factory.mktemp("shift")
    LlamaForCausalLM(hf_config(True)).save_pretrained(f)
    return f


@pytest.fixture(scope="module")
def model(folder):
    m = llama_io.from_hf_folder(folder, dtype=torch.float64)
    assert m.config.shifted
    return m


@pytest.fixture(scope="module")
def hf(folder):
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def adapted(model):
    torch.manual_seed(3)
    m = add_adapter(model, rank=4, alpha=8.0, gate="mask")
    with torch.no_grad():
        for p in m.adapter_parameters().values():
            p.normal_(0.0, 0.3)  # trained-looking deltas: every identity must hold with them too
    return m.eval()


def prompted(b: int, given: list[int]) -> torch.Tensor:
    x = torch.full((b, L), V)  # the mask id is V
    x[:, :len(given)] = torch.tensor(given)
    return x


# --------------------------------------------------------------------------------------------------
# alpha0 = 0 is the base model
# --------------------------------------------------------------------------------------------------


def test_alpha0_0_sampler_is_the_base_model(model, hf):
    x = prompted(2, [4, 9, 1])
    plan = plan_binomial(x == V, L, 0.0, torch.Generator().manual_seed(0))
    assert plan.n_diffusion == 0
    seen = []
    out = sample_esolm_b(model, x, plan, greedy=True,
                         step_callback=lambda k, lo, hi, logits, state: seen.append(logits[:, 0, :V].clone()))
    with torch.no_grad(), hf_in_float64():
        ref = hf(out.tokens).logits[:, 2:L - 1]
        greedy = hf.generate(x[:, :3], max_new_tokens=L - 3, do_sample=False, pad_token_id=0)
    assert_same(torch.stack(seen, 1), ref)
    assert torch.equal(out.tokens, greedy)


def test_exact_likelihood_and_sequential_loss_are_the_base_models(model, hf):
    x = tokens(3, L, seed=21)
    order = torch.arange(L).expand(3, L)
    ll = order_token_logprobs(model, x, order, method=ESO_B)
    with torch.no_grad(), hf_in_float64():
        ref = torch.log_softmax(hf(x).logits, -1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    assert (ll[:, 0] == 0).all()
    torch.testing.assert_close(ll[:, 1:], ref, rtol=0, atol=1e-10)
    obj = build_objective({"name": "esolm", "variant": "B", "alpha0": 0.0, "batch_split": 0.0})
    out = obj(model, x, None, generator=torch.Generator().manual_seed(0))
    assert out.terms["ar"][1] == 3 * (L - 1)  # position 0 is given, never scored
    assert out.terms["ar"][0].item() == pytest.approx(-ref.sum().item(), abs=1e-9)


# --------------------------------------------------------------------------------------------------
# cache == uncached == one pass, in any order; one pass == per-token brute force
# --------------------------------------------------------------------------------------------------


def brute_query(model, xs, order, l, c):
    """The query of sorted index ``l`` with the clean prefix ``xs[:, :c]``: a fresh pass over ``[clean (causal) ;
    the query]``, built from the convention's words (not from esolm.model.shift)."""
    b = xs.shape[0]
    out = []
    for r in range(b):
        p = int(order[r, l])
        prev = int((order[r] == p - 1).nonzero()) if p > 0 else -1
        q_id = xs[r, prev] if 0 <= prev < c else torch.tensor(V)
        ids = torch.cat([xs[r, :c], q_id.view(1)])[None]
        pos = torch.cat([order[r, :c], torch.tensor([max(p - 1, 0)])])[None]
        m = torch.zeros(1, 1, c + 1, c + 1, dtype=torch.bool)
        m[0, 0, :c, :c] = masks.causal(c)[0, 0]
        m[0, 0, c, :c] = torch.arange(c) != prev
        m[0, 0, c, c] = True
        out.append(model(ids, pos, mask=m)[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("which", ["base", "adapted"])
def test_one_pass_equals_per_token_brute_force(model, adapted, which):
    net = model if which == "base" else adapted
    n = 9
    g = torch.Generator().manual_seed(5)
    order = start_first(torch.stack([torch.randperm(n, generator=g) for _ in range(2)]))
    x = tokens(2, n, seed=6)
    xs = x.gather(1, order)
    with torch.no_grad():
        ll = order_token_logprobs(net, x, order, method=ESO_B)
        for c_of in (lambda l: l, lambda l: 1 + 3 * ((l - 1) // 3)):  # sequential conditionals, parallel steps
            n_clean = torch.tensor([max(c_of(l), 0) for l in range(n)])
            q = query_logits(net, xs, order, n_clean)
            for l in range(1, n):
                assert_same(q[:, l], brute_query(net, xs, order, l, int(n_clean[l])))
        ref = torch.log_softmax(query_logits(net, xs, order, torch.arange(n)).masked_fill(
            torch.arange(V + 1) == V, float("-inf")), -1)
    torch.testing.assert_close(ll[:, 1:], ref.gather(-1, xs[..., None])[:, 1:, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("which", ["base", "adapted"])
@pytest.mark.parametrize("alpha0", [0.5, 1.0])
def test_cached_steps_equal_uncached_and_the_plans_one_pass(model, adapted, which, alpha0):
    net = model if which == "base" else adapted
    x = prompted(2, [4, 9])
    plan = plan_binomial(x == V, 3, alpha0, torch.Generator().manual_seed(1))
    assert max(plan.counts) > 1
    seen, unseen = [], []
    out = sample_esolm_b(net, x, plan, generator=torch.Generator().manual_seed(2),
                         step_callback=lambda k, lo, hi, lg, s: seen.append((lo, hi, lg.clone())))
    ref = sample_esolm_b(net, x, plan, generator=torch.Generator().manual_seed(2), use_cache=False,
                         step_callback=lambda k, lo, hi, lg, s: unseen.append(lg.clone()))
    assert torch.equal(out.tokens, ref.tokens) and len(seen) == plan.nfe
    order = plan.order
    n_clean = torch.zeros(L, dtype=torch.long)
    for lo, hi in plan.bounds():
        n_clean[lo:hi] = lo
    with torch.no_grad():
        one = query_logits(net, out.tokens.gather(1, order), order, n_clean)
    for (lo, hi, lg), ulg in zip(seen, unseen):
        assert_same(lg, ulg)
        assert_same(lg, one[:, lo:hi])


def test_diffusion_loss_equals_brute_force(model):
    """The diffusion term's per-token NLL: replaying its draws, each masked target's query from a fresh pass."""
    x = tokens(2, L, seed=31)
    obj = build_objective({"name": "esolm", "variant": "B", "alpha0": 0.5, "batch_split": 1.0})
    g = torch.Generator().manual_seed(4)
    out = obj(model, x, None, generator=g, time_generator=torch.Generator().manual_seed(5))
    # replay: antithetic t from the time generator, masks then the sort key from the noise generator
    from esolm.noise import LogLinearSchedule, antithetic_times, uniform
    from esolm.orders import sort_clean_first
    t = antithetic_times(2, torch.Generator().manual_seed(5), 0, 1)
    g = torch.Generator().manual_seed(4)
    is_mask = uniform((2, L), g) < LogLinearSchedule(0.5).mask_prob(t)[:, None]
    is_mask[:, 0] = False
    order = start_first(sort_clean_first(is_mask, g))
    xs, ms = x.gather(1, order), is_mask.gather(1, order)
    c = int((~is_mask).sum(1).min())
    assert ms.any()
    total = 0.0
    with torch.no_grad():
        for b in range(2):
            cb = int((~is_mask[b]).sum())
            for l in range(cb, L):
                lg = brute_query(model, xs[b:b + 1], order[b:b + 1], l, cb)[0]
                lg[V] = float("-inf")
                total -= torch.log_softmax(lg, -1)[xs[b, l]].item() * float(-LogLinearSchedule(0.5).weight(t)[b])
    assert c >= 1 and out.terms["mdm"][1] == 2 * (L - 1)
    assert out.terms["mdm"][0].item() == pytest.approx(total, rel=1e-9)


def test_iw_bound_orders_start_with_the_given_token(model):
    x = tokens(2, L, seed=41)
    b1 = iw_bound(model, x, 3, 0.5, torch.Generator().manual_seed(0), method=ESO_B)
    ll = order_token_logprobs(model, x, torch.arange(L).expand(2, L), method=ESO_B).sum(1)
    assert torch.isfinite(b1).all() and (iw_bound(model, x, 1, 0.0, method=ESO_B) - -ll).abs().max() < 1e-9


# --------------------------------------------------------------------------------------------------
# speculative decoding under the shifted convention
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha0", [0.0, 0.5])
@pytest.mark.parametrize("which", ["base", "adapted"])
def test_greedy_speculative_equals_the_plain_sampler(model, adapted, which, alpha0):
    net = model if which == "base" else adapted
    x = prompted(3, [4, 9, 1])
    plan = plan_binomial(x == V, 4, alpha0, torch.Generator().manual_seed(3))
    ref = sample_esolm_b(net, x, plan, greedy=True)
    for k in (2, 4):
        spec = sample_speculative(net, x, plan, k=k, greedy=True)
        assert torch.equal(spec.tokens, ref.tokens) and spec.nfe <= ref.nfe


def test_speculative_law_chi_square(adapted):
    """Sampled, the first two generated tokens follow the exact sequential law p(t1) p(t2 | t1) (from the base
    rows) although every draft comes from the adapter's diffusion queries: chi-square over the joint."""
    net = adapted
    n = 5
    x = torch.full((1, n), V)
    x[0, :3] = torch.tensor([4, 9, 1])
    with torch.no_grad():
        p1 = torch.softmax(net(x[:, :3], mask=masks.causal(3))[0, -1, :V], -1)
        ctx = torch.cat([x[:, :3].expand(V, 3), torch.arange(V)[:, None]], 1)
        p2 = torch.softmax(net(ctx, mask=masks.causal(4))[:, -1, :V], -1)
    joint = (p1[:, None] * p2).flatten()
    N = 6000
    out = sample_speculative(net, x.expand(N, n).clone(), plan_left_to_right(n, 3, N), k=3,
                             generator=torch.Generator().manual_seed(11))
    assert out.depth_proposed.sum() > 0
    cells = out.tokens[:, 3] * V + out.tokens[:, 4]
    counts = torch.bincount(cells, minlength=V * V).double()
    expected = joint * N
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    assert int(keep.sum()) > 20
    assert stats.chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


# --------------------------------------------------------------------------------------------------
# mask-gated adapters
# --------------------------------------------------------------------------------------------------


def test_mask_gated_adapter_leaves_real_token_rows_bit_identical(model, adapted):
    x = tokens(2, L, seed=51)
    with torch.no_grad():
        assert torch.equal(adapted(x, mask=masks.causal(L)), model(x, mask=masks.causal(L)))
        xm = x.clone()
        xm[:, 5] = V
        a, b = adapted(xm, mask=masks.causal(L)), model(xm, mask=masks.causal(L))
    assert torch.equal(a[:, :5], b[:, :5]) and (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3
    all_rows = add_adapter(model, 2, 8.0, "all")
    with torch.no_grad():
        for p in all_rows.adapter_parameters().values():
            p.normal_(0.0, 0.3)
        assert (all_rows(x, mask=masks.causal(L)) - model(x, mask=masks.causal(L))).abs().max() > 1e-3


def test_adapter_trains_only_its_deltas(model):
    net = add_adapter(model, rank=2).freeze_base().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    obj = build_objective({"name": "esolm", "variant": "B", "alpha0": 0.5}).train()
    for s in range(2):
        opt.zero_grad()
        obj(net, tokens(4, L, seed=s), None, generator=torch.Generator().manual_seed(s)).loss.backward()
        opt.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(net.adapter_parameters())
    assert net.config.parameter_count() == net.num_parameters()


def test_adapter_folder_round_trip(model, folder, tmp_path):
    net = add_adapter(model, rank=3, alpha=6.0)
    with torch.no_grad():
        for p in net.adapter_parameters().values():
            p.normal_(0.0, 0.2)
    out = save_adapter(net, tmp_path / "ad", ESO_B, base=folder, provenance={"adapted": True})
    assert (out / ADAPTER_WEIGHTS).stat().st_size < 60_000  # the deltas only
    loaded = load_model(out)
    assert loaded.provenance == {"adapted": True} and loaded.method.alpha0 == 0.5
    assert loaded.model.config == dataclasses.replace(net.config)
    x = tokens(2, L, seed=61)
    x[:, 3] = V
    with torch.no_grad():
        got = loaded.model(x, mask=masks.causal(L))
        ref = net.float()(x, mask=masks.causal(L))
    assert_same(got, ref)
    # a different base is refused in one line
    other = tmp_path / "other"
    torch.manual_seed(99)
    LlamaForCausalLM(hf_config(True)).save_pretrained(other)
    import json
    meta = json.loads((out / "config.json").read_text())
    meta["base"]["path"] = str(other)
    (out / "config.json").write_text(json.dumps(meta))
    from esolm.errors import CheckpointError
    with pytest.raises(CheckpointError, match="not the one it was trained on"):
        load_model(out)


def test_shift_queries_read_visible_predecessors_only(model):
    order = torch.tensor([[0, 3, 1, 2]])
    xs = torch.tensor([[7, 8, 9, 10]])
    ids, pos, prev = shift_queries(xs, order, torch.tensor([0, 1, 2, 3]), V)
    # targets: 3 (prev pos 2 at sorted 3: not visible), 1 (prev pos 0 at sorted 0: visible), 2 (pos 1 at sorted 2)
    assert ids.tolist() == [[V, V, 7, 9]] and pos.tolist() == [[0, 2, 0, 1]] and prev.tolist() == [[-1, 3, 0, 2]]


@pytest.mark.parametrize("which", ["base", "adapted"])
def test_rl_trajectory_likelihood_is_the_samplers_law(model, adapted, which):
    """GRPO's exact estimator on a shifted network: the one-pass trajectory log-probabilities equal those the sampler
    recorded as it drew each token (parallel diffusion steps included); the mean-field estimate is finite and
    differentiable."""
    from esolm.rl.trajectory import mean_field_logprobs, rollout, trajectory_logprobs

    net = model if which == "base" else adapted
    prompts = torch.tensor([[4, 9, 1]] * 3)
    r = rollout(net, ESO_B, prompts, steps=4, alpha0=0.75, temperature=0.8, top_p=0.9,
                plan_generator=torch.Generator().manual_seed(1), generator=torch.Generator().manual_seed(2))
    assert max(hi - lo for lo, hi in r.bounds) > 1
    with torch.no_grad():
        lp = trajectory_logprobs(net, r)
        mf = mean_field_logprobs(net, ESO_B, r, torch.Generator().manual_seed(3))
    torch.testing.assert_close(lp, r.logprobs.to(lp.dtype), rtol=0, atol=1e-10)
    assert torch.isfinite(mf).all() and mf.shape == lp.shape
