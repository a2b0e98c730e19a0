"""lm-evaluation-harness integration (``--model esolm``) on tiny random models saved in tmp_path."""

import itertools
import logging
import math
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table  # noqa: E402

from esolm import cli  # noqa: E402
from esolm.data.tokenizers import bpe8k  # noqa: E402
from esolm.errors import UserError  # noqa: E402
from esolm.integrations import TASKS_DIR  # noqa: E402
from esolm.integrations.lm_eval import EsoLMLM  # noqa: E402
from esolm.io import save_pretrained  # noqa: E402
from esolm.likelihood import order_token_logprobs  # noqa: E402
from esolm.methods import model_config_for  # noqa: E402
from esolm.model import masks  # noqa: E402
from esolm.model.backbone import DiT  # noqa: E402
from esolm.noise import EPS  # noqa: E402
from esolm.objectives import build_objective  # noqa: E402
from esolm.sampling import generate  # noqa: E402
from esolm.sampling.params import SamplingParams  # noqa: E402

LENGTH = 32
METHODS = {
    "eso": {"name": "esolm", "variant": "B", "alpha0": 0.5},
    "esoA": {"name": "esolm", "variant": "A", "alpha0": 0.5},
    "ar": {"name": "ar"},
    "mdlm": {"name": "mdlm"},
    "bd3": {"name": "bd3lm", "block_size": 4},
    "bd3bos": {"name": "bd3lm", "block_size": 4, "ignore_bos": True},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    tok = bpe8k()
    out = {}
    for name, method in METHODS.items():
        cfg = model_config_for(method, vocab_size=tok.vocab_size, mask_id=None if name == "ar" else tok.mask_id,
                               hidden_size=32, cond_dim=16, n_layers=2, n_heads=2, length=LENGTH)
        torch.manual_seed(1)
        model = DiT(cfg)
        for p in model.parameters():  # away from the zero-initialised output: non-trivial predictions
            p.data.add_(0.05 * torch.randn_like(p))
        for folder, zero in ((root / name, False), (root / f"{name}0", True)):
            if zero:  # a copy whose output layer is zero: every prediction is uniform
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n.startswith("output_layer.linear"):
                            p.zero_()
            save_pretrained(model, folder, method=method)
            tok.save(folder)
            out[name + ("0" if zero else "")] = folder
    return out


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when written to (pytest swaps it per test)."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


@pytest.fixture
def lm_eval_logs_to_capsys(capsys):
    """lm-eval's log handler keeps the stderr of the test that configured it; make it follow sys.stderr."""
    from lm_eval.utils import setup_logging

    setup_logging()
    for h in logging.getLogger("lm_eval").handlers:
        if type(h) is logging.StreamHandler:
            h.stream = _CurrentStderr()
    return capsys


def lm64(folder, **kw) -> EsoLMLM:
    lm = EsoLMLM(pretrained=str(folder), **kw)
    lm.model = lm.model.double()
    return lm


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]


@torch.no_grad()
def one_at_a_time(model, ids: list[int], start: int, causal_ar: bool) -> float:
    """sum_{l >= start} log p(x_l | x_<l), each conditional from its own forward pass: for AR the prefix
    under a causal mask; for Eso-LM (B) the prefix followed by one mask token (causal attention), i.e.
    the diffusion-phase pass of a model with only x_l masked and the order clean-first."""
    total = 0.0
    mask_id = model.config.mask_id
    for pos in range(start, len(ids)):
        inp = ids[:pos] if causal_ar else ids[:pos] + [mask_id]
        logits = model(torch.tensor([inp]), mask=masks.causal(len(inp)))[0, -1].double()
        if mask_id is not None:
            logits[mask_id] = -math.inf
        total += float(torch.log_softmax(logits, -1)[ids[pos]])
    return total


PAIRS = [("The river city of", " Paris is old"), ("Music", " and art"), ("A long", " war began")]


@pytest.mark.parametrize("name", ["eso", "ar"])
def test_loglikelihood_is_exact_sequential_conditional(models, name):
    lm = lm64(models[name], batch_size=2)
    got = lm.loglikelihood(ll_requests(PAIRS))
    for (ctx, cont), (ll, greedy) in zip(PAIRS, got, strict=True):
        c, x = lm._encode_pair(ctx, cont)
        want = one_at_a_time(lm.model, c + x, len(c), name == "ar")
        assert abs(ll - want) <= 1e-9 * max(1.0, abs(want))
        assert greedy is False  # a random model does not predict real text greedily


def test_is_greedy_exact(models):
    """The continuation made of the model's own argmax tokens is greedy; changing one token is not."""
    lm = lm64(models["eso"])
    ctx = lm.tok_encode("The river")
    ids = list(ctx)
    for _ in range(3):
        logits = lm.model(torch.tensor([ids + [lm.tok.mask_id]]), mask=masks.causal(len(ids) + 1))[0, -1]
        logits[lm.tok.mask_id] = -math.inf
        ids.append(int(logits.argmax()))
    cont = ids[len(ctx):]
    (_, g1), (_, g2) = lm._loglikelihood_tokens([(None, ctx, cont), (None, ctx, cont[:-1] + [(cont[-1] + 1) % 100])])
    assert g1 is True and g2 is False


def test_rolling_is_exact_sequential_loglik(models):
    lm = lm64(models["eso"], batch_size=3)
    short = "The old king of the north"
    ids = [lm.prefix_token_id] + lm.tok_encode(short)
    assert len(ids) <= LENGTH
    order = torch.arange(len(ids))[None]
    with torch.no_grad():
        exact = float(order_token_logprobs(lm.model, torch.tensor([ids]), order)[0, 1:].sum())
    long_text = " ".join(["the river city of the old north and the long war"] * 4)
    toks = lm.tok_encode(long_text)
    assert len(toks) > LENGTH
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, lm.prefix_token_id, LENGTH - 1, 1)]
    windowed = sum(one_at_a_time(lm.model, c + x, len(c), False) for c, x in windows)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                    for i, t in enumerate([short, long_text])])
    assert abs(got[0] - exact) <= 1e-9 * abs(exact)
    assert abs(got[1] - windowed) <= 1e-9 * abs(windowed)


def _expected_iw(ll: torch.Tensor, k: int) -> float:
    """E[log mean_k exp(ll_sigma_k)] over K orders drawn uniformly with replacement, by enumeration."""
    vals = [torch.logsumexp(ll[list(t)], 0) - math.log(k) for t in itertools.product(range(len(ll)), repeat=k)]
    return float(torch.stack(vals).mean())


def test_iw_orders_estimate(models):
    """Over random permutations of 3 continuation tokens: the K=1 estimate is unbiased for the mean
    single-order log-likelihood, the K=2 mean matches the exact expectation, and the expectation rises
    with K towards the mixture's log-likelihood."""
    lm = lm64(models["eso"], batch_size=256)
    ctx, cont = lm.tok_encode("The river"), lm.tok_encode(" city of war")[:3]
    assert len(cont) == 3
    n = len(ctx) + 3
    lls = []
    for perm in itertools.permutations(range(3)):
        order = torch.tensor([list(range(len(ctx))) + [len(ctx) + p for p in perm]])
        lls.append(order_token_logprobs(lm.model, torch.tensor([ctx + cont]), order)[0, len(ctx):n].sum())
    lls = torch.stack(lls).detach()
    mixture = float(torch.logsumexp(lls, 0) - math.log(6))
    expected = [_expected_iw(lls, k) for k in (1, 2, 3)]
    assert expected[0] < expected[1] < expected[2] < mixture
    assert abs(expected[0] - float(lls.mean())) < 1e-12
    for k in (1, 2):
        lm.orders = k
        est = torch.tensor([ll for ll, _ in lm._loglikelihood_tokens([(None, ctx, cont)] * 256)], dtype=torch.float64)
        se = float(est.std()) / math.sqrt(len(est))
        assert float(est.std()) > 0
        assert abs(float(est.mean()) - expected[k - 1]) < 4 * se + 1e-9


@pytest.mark.parametrize("name, kw", [("mdlm0", {}), ("esoA0", {}), ("bd30", {}), ("eso0", {"estimator": "mc"}),
                                      ("mdlm0", {"mc_num": 200})])  # 200: two passes of draws
def test_mc_nelbo_of_uniform_model(models, name, kw):
    """Uniform predictions over V - 1 tokens: every method's conditional NELBO has expectation
    n * (1 - eps * alpha0) * log(V - 1) (the ELBO weight times the masking rate is -alpha'_t)."""
    lm = EsoLMLM(pretrained=str(models[name]), batch_size=2, seed=3, **{"mc_num": 32, **kw})
    ctx, cont = lm.tok_encode("The old city"), lm.tok_encode(" of the north")
    ests = torch.tensor([-ll for ll, _ in lm._loglikelihood_tokens([(None, ctx, cont)] * 8)], dtype=torch.float64)
    a0 = lm.method.alpha0 if lm.method.takes_alpha0 else 1.0
    want = len(cont) * (1 - EPS * a0) * math.log(lm.tok.vocab_size - 1)
    assert float(ests.std()) > 0  # seeded draws differ across requests
    assert abs(float(ests.mean()) - want) < 4 * float(ests.std()) / math.sqrt(8) + 1e-3 * want


def test_tokenization_split_follows_template_lm(models):
    """Context ending mid-word, trailing spaces on the context, leading spaces on the continuation, and
    an empty context: the scored split is TemplateLM's (context tokens, then the rest of the whole
    text's tokens; trailing context spaces move to the continuation), the BOS for an empty context."""
    lm = lm64(models["eso"])
    cases = [("The riv", "er city"), ("The river  ", "city"), ("The river", "   city"), ("", "The river")]
    seen = []
    lm._loglikelihood_tokens = lambda reqs, **kw: seen.extend(reqs) or [(0.0, False)] * len(reqs)
    lm.loglikelihood(ll_requests(cases))
    for (ctx, cont), (_, c, x) in zip(cases, seen, strict=True):
        if ctx:
            assert (c, x) == TemplateLM._encode_pair(lm, ctx, cont)
            assert c == lm.tok_encode(ctx.rstrip())
            assert x == lm.tok_encode(ctx + cont)[len(c):]
            if not ctx.endswith("riv"):  # at a word boundary the split loses nothing
                assert c + x == lm.tok_encode(ctx + cont)
        else:
            assert c == [lm.tok.bos_id] and x == lm.tok_encode(cont)


def test_long_context_truncated_on_the_left(models):
    lm = lm64(models["eso"])
    ctx = lm.tok_encode(" ".join(["the long war"] * 20))
    cont = lm.tok_encode(" in the north")
    (full,), (cut,) = (lm._loglikelihood_tokens([(None, c, cont)]) for c in (ctx, ctx[-(LENGTH - len(cont)):]))
    assert full == cut


def test_simple_evaluate_task_pack(models):
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"num_docs": 3})
    lm = EsoLMLM(pretrained=str(models["eso"]), batch_size=4, max_gen_toks=4)
    res = simple_evaluate(model=lm, tasks=["esolm_wiki_ppl", "esolm_wiki_choice", "esolm_wiki_next"],
                          task_manager=tm)
    table = make_table(res)
    for task in ("esolm_wiki_ppl", "esolm_wiki_choice", "esolm_wiki_next"):
        assert task in table
        assert res["n-samples"][task]["effective"] == 3  # the num_docs knob
    ppl = res["results"]["esolm_wiki_ppl"]["word_perplexity,none"]
    assert math.isfinite(ppl) and ppl > 1
    assert 0 <= res["results"]["esolm_wiki_choice"]["acc,none"] <= 1


def test_generate_until_cuts_at_first_stop(models):
    lm = EsoLMLM(pretrained=str(models["ar"]), seed=5)
    req = lambda until: Instance("generate_until", {}, ("The river", {"until": until, "max_gen_toks": 12}), 0)  # noqa: E731
    (free,) = lm.generate_until([req([])])
    assert free
    stop = free.strip()[:2]
    (cut,) = lm.generate_until([req(["\x00", stop])])
    assert cut == free[:free.index(stop)]


def test_cli_runs_lm_eval(models, lm_eval_logs_to_capsys):
    capsys = lm_eval_logs_to_capsys
    rc = cli.main(["lm-eval", "--model", "esolm", "--model_args", f"pretrained={models['mdlm']},mc_num=2",
                   "--tasks", "esolm_wiki_choice", "--include_path", str(TASKS_DIR), "--limit", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "esolm_wiki_choice" in out and "acc" in out


@pytest.mark.parametrize("args, msg", [
    ("pretrained={m},bogus=1", "unknown esolm model_args bogus"),
    ("pretrained={m},mc_num=many", "mc_num='many' must be int"),
    ("pretrained={m}/missing", "no such file or folder"),
    ("pretrained={m},batch_size=4", "give --batch_size as lm-eval options"),
    ("pretrained={m},orders=100000000", "orders must be an integer in [1, 10000], got 100000000"),
    ("pretrained={m},orders=100000", "orders must be an integer in [1, 10000], got 100000"),
    ("pretrained={m},estimator=mc,mc_num=100000000", "mc_num must be an integer in [1, 10000]"),
    ("pretrained={m},seed=10000000000000000000000000", "seed must be an integer in [0, 9223372036854775807]"),
    ("pretrained={m},seed=-1", "seed must be an integer in [0, 9223372036854775807]"),
    ("pretrained={m},temperature=-1", "temperature must be >= 0"),
    ("pretrained={m},top_p=0", "top_p must lie in (0, 1]"),
])
def test_bad_model_args_one_line(models, lm_eval_logs_to_capsys, args, msg):
    capsys = lm_eval_logs_to_capsys
    rc = cli.main(["lm-eval", "--model", "esolm", "--model_args", args.format(m=models["eso"]),
                   "--tasks", "esolm_wiki_choice", "--include_path", str(TASKS_DIR)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert msg in line


def test_cli_prints_tasks_dir(capsys):
    assert cli.main(["lm-eval", "--tasks-dir"]) == 0
    assert capsys.readouterr().out.strip() == str(TASKS_DIR)


def test_model_args_checked_before_loading():
    with pytest.raises(UserError, match=r"orders must be an integer in \[1, 10000\], got 0"):
        EsoLMLM(pretrained="/nonexistent", orders=0)
    with pytest.raises(UserError, match="need pretrained"):
        EsoLMLM(batch_size=2)
    with pytest.raises(UserError, match="estimator must be auto or mc"):
        EsoLMLM(pretrained="/nonexistent", estimator="iw")


# ---------------------------------------------------------------------------------------------- one implementation


def _masks_of_passes(model, n: int) -> list[torch.Tensor]:
    """Record the noised half ``x_t`` (natural positions) of every ``[x_t ; x_0]`` pass of a BD3-LM model."""
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, :args[0].shape[1] // 2]))
    return seen


def test_bd3_ignore_bos_never_masks_position_0_in_monte_carlo_score(models):
    """lm-eval's Monte-Carlo score is the objective's: a BD3-LM model trained with ignore_bos never has position 0
    masked, even when the scored span starts there (the forked scorer masked it), while the model without the flag
    does under the same draws."""
    got = {}
    for name in ("bd3bos", "bd3"):
        lm = EsoLMLM(pretrained=str(models[name]), mc_num=64, seed=1)
        seen = _masks_of_passes(lm.model, LENGTH)
        ids = lm.tok_encode("The old city of the north")
        with torch.no_grad():  # the whole row scored: position 0 too
            lm._mc_nelbo(_batch_of(lm, [(ids, len(ids))]))
        (xt,) = seen
        got[name] = xt == lm.tok.mask_id
    assert not got["bd3bos"][:, 0].any() and got["bd3bos"][:, 1:].any()
    assert got["bd3"][:, 0].sum() > 8
    assert torch.equal(got["bd3bos"][:, 1:], got["bd3"][:, 1:])  # nothing else changes


def _batch_of(lm, rows):
    from esolm.integrations.lm_eval import _batch

    return _batch(rows, lm.tok.pad_id, lm.model.device)


@pytest.mark.parametrize("name", ["mdlm", "bd3bos", "esoA"])
def test_mc_score_is_the_objectives_conditional_nelbo(models, name):
    """The Monte-Carlo loglikelihood is minus the mean of Objective.conditional_nelbo over mc_num tiled draws
    (context clean, the continuation maskable), drawn from the model's seed."""
    lm = lm64(models[name], mc_num=5, seed=7)
    ctx, cont = lm.tok_encode("The old city"), lm.tok_encode(" of the north")
    ((ll, greedy),) = lm._loglikelihood_tokens([(None, ctx, cont)])
    x = torch.tensor([ctx + cont]).repeat(5, 1)
    maskable = torch.zeros_like(x, dtype=torch.bool)
    maskable[:, len(ctx):] = True
    with torch.no_grad():
        want = build_objective(lm.method).conditional_nelbo(lm.model, x, torch.ones_like(maskable), maskable,
                                                            torch.Generator().manual_seed(7)).mean()
    assert ll == pytest.approx(-float(want), rel=1e-12) and greedy is False


# ---------------------------------------------------------------------------------------------- generation params


@pytest.mark.parametrize("name", ["ar", "eso"])
def test_generate_until_honours_temperature_and_top_p(models, name):
    """The task's temperature / top_p (over the model_args' defaults) decode exactly as generate does with those
    params; they change what is sampled."""
    lm = EsoLMLM(pretrained=str(models[name]), seed=3, temperature=0.5)
    prompt = lm.tok_encode("The river")

    def sample(**params):
        res = generate(lm.model, lm.method, prompt_ids=[prompt], params=SamplingParams(seed=3, **params),
                       max_length=len(prompt) + 12, eos_id=lm.tok.eos_id)
        return lm.tok.decode(res.tokens[0, len(prompt):].tolist())

    def lm_sample(**gen_kwargs):
        req = Instance("generate_until", {}, ("The river", {"until": [], "max_gen_toks": 12, **gen_kwargs}), 0)
        return lm.generate_until([req])[0]

    cases = {"hot": ({"temperature": 2.0}, {"temperature": 2.0}),
             "nucleus": ({"temperature": 1.5, "top_p": 0.3}, {"temperature": 1.5, "top_p": 0.3}),
             "default": ({}, {"temperature": 0.5}),  # the model_args' temperature
             "greedy": ({"do_sample": False, "temperature": 2.0}, {"temperature": 0.0})}
    texts = {}
    for case, (gen_kwargs, params) in cases.items():
        texts[case] = lm_sample(**gen_kwargs)
        assert texts[case] == sample(**params), case
    assert len(set(texts.values())) == len(texts)


# ---------------------------------------------------------------------------------------------- hostile requests


def test_orders_and_draws_bounded_per_forward_pass(models, monkeypatch):
    """orders and mc_num above one pass's share are evaluated DRAWS_PER_PASS per request per pass (memory bounded
    by batch_size x DRAWS_PER_PASS rows); the orders give the values of one unchunked pass (the same orders; the
    chunked Monte-Carlo mean is checked against its expectation in test_mc_nelbo_of_uniform_model)."""
    import esolm.integrations.lm_eval as mod

    reqs = [(None, [5, 6, 7], [8, 9, 10]), (None, [6, 7], [8, 9, 10])]
    for name, kw in (("eso", {"orders": 300}), ("mdlm", {"mc_num": 300})):
        values, rows = {}, {}
        for per_pass in (128, 1000):
            monkeypatch.setattr(mod, "DRAWS_PER_PASS", per_pass)
            lm = lm64(models[name], batch_size=2, seed=4, **kw)
            seen = rows[per_pass] = []
            lm.model.register_forward_pre_hook(lambda mod_, args, seen=seen: seen.append(args[0].shape[0]))
            values[per_pass] = [ll for ll, _ in lm._loglikelihood_tokens(reqs)]
        assert max(rows[128]) == 2 * 128 and max(rows[1000]) == 2 * 300
        if "orders" in kw:
            assert values[128] == pytest.approx(values[1000], rel=1e-9)


def test_special_token_strings_are_plain_text(models):
    """``<|mask|>`` in a context or a continuation is text: never the mask id fed to the model, and it scores as
    ordinary tokens (the mask id scored about -1e6)."""
    lm = lm64(models["eso"])
    assert lm.tok.mask_id not in lm.tok_encode("a <|mask|> b <|endoftext|>")
    seen = []
    real = lm._loglikelihood_tokens
    lm._loglikelihood_tokens = lambda reqs, **kw: seen.extend(reqs) or real(reqs, **kw)
    (ll1, _), (ll2, _) = lm.loglikelihood(ll_requests([("The <|mask|> river", " city"), ("The river", "<|mask|>")]))
    assert all(lm.tok.mask_id not in c + x for _, c, x in seen)
    assert -100 * len(seen[1][2]) < ll2 < 0 and -100 < ll1 < 0


@pytest.mark.parametrize("where", ["context", "continuation", "rolling", "generate"])
def test_lone_surrogate_is_one_user_error(models, where):
    lm = lm64(models["eso"])
    bad = "The \ud800 river"
    with pytest.raises(UserError, match="not valid UTF-8"):
        if where == "context":
            lm.loglikelihood(ll_requests([("ok", " fine"), (bad, " city")]))
        elif where == "continuation":
            lm.loglikelihood(ll_requests([("", bad)]))
        elif where == "rolling":
            lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (bad,), 0)])
        else:
            lm.generate_until([Instance("generate_until", {}, (bad, {"until": []}), 0)])


def test_empty_request_refused(models):
    lm = lm64(models["eso"])
    with pytest.raises(UserError, match="request 1 has an empty context and a continuation of no tokens"):
        lm.loglikelihood(ll_requests([("The", " river"), ("", "")]))
    ((ll, greedy),) = lm.loglikelihood(ll_requests([("The river", "")]))  # nothing to score after a context
    assert ll == 0.0 and greedy is True


@pytest.mark.parametrize("gen_kwargs, msg", [
    ({"max_gen_toks": -5}, "request 1: max_gen_toks must be an integer >= 1, got -5"),
    ({"max_gen_toks": 0}, "request 1: max_gen_toks must be an integer >= 1, got 0"),
    ({"temperature": -1.0}, "request 1: temperature must be >= 0"),
    ({"top_p": 1.5}, "request 1: top_p must lie in (0, 1]"),
    ({"until": [None]}, "request 1: until must be a string or a list of strings"),
])
def test_bad_generation_options_refused_before_generating(models, monkeypatch, gen_kwargs, msg):
    import esolm.sampling

    lm = EsoLMLM(pretrained=str(models["ar"]))
    calls = []
    monkeypatch.setattr(esolm.sampling, "generate", lambda *a, **k: calls.append(1))
    reqs = [Instance("generate_until", {}, ("The river", {"until": []}), 0),
            Instance("generate_until", {}, ("The river", {"until": [], **gen_kwargs}), 1)]
    with pytest.raises(UserError) as e:
        lm.generate_until(reqs)
    assert msg in str(e.value) and "max_length" not in str(e.value)
    assert not calls


def test_seed_out_of_range_refused(models):
    for seed in (10**25, -1, 2**63):
        with pytest.raises(UserError, match=r"seed must be an integer in \[0, 9223372036854775807\]"):
            EsoLMLM(pretrained=str(models["eso"]), seed=seed)
