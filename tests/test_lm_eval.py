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

LENGTH = 32
METHODS = {
    "eso": {"name": "esolm", "variant": "B", "alpha0": 0.5},
    "esoA": {"name": "esolm", "variant": "A", "alpha0": 0.5},
    "ar": {"name": "ar"},
    "mdlm": {"name": "mdlm"},
    "bd3": {"name": "bd3lm", "block_size": 4},
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


@pytest.mark.parametrize("name, kw", [("mdlm0", {}), ("esoA0", {}), ("bd30", {}), ("eso0", {"estimator": "mc"})])
def test_mc_nelbo_of_uniform_model(models, name, kw):
    """Uniform predictions over V - 1 tokens: every method's conditional NELBO has expectation
    n * (1 - eps * alpha0) * log(V - 1) (the ELBO weight times the masking rate is -alpha'_t)."""
    lm = EsoLMLM(pretrained=str(models[name]), mc_num=32, batch_size=2, seed=3, **kw)
    ctx, cont = lm.tok_encode("The old city"), lm.tok_encode(" of the north")
    ests = torch.tensor([-ll for ll, _ in lm._loglikelihood_tokens([(None, ctx, cont)] * 8)], dtype=torch.float64)
    a0 = lm.method.alpha0 if lm.method.name == "esolm" else 1.0
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
    with pytest.raises(UserError, match="must be >= 1"):
        EsoLMLM(pretrained="/nonexistent", orders=0)
    with pytest.raises(UserError, match="need pretrained"):
        EsoLMLM(batch_size=2)
    with pytest.raises(UserError, match="estimator must be auto or mc"):
        EsoLMLM(pretrained="/nonexistent", estimator="iw")
