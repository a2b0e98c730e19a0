"""The engine's log-probabilities (what ``esolm serve`` answers for ``logprobs`` and ``echo``), in float64 and
in process, against the library's exact likelihoods:

* a sampled token's log-probability is its term of the exact trajectory log-likelihood
  (:func:`esolm.rl.trajectory.trajectory_logprobs` for Eso-LM (B), under the law sampled: temperature and
  nucleus; AR's left-to-right conditionals), recorded at the step that drew it, whatever shares the batch;
* a prompt's scores are :func:`esolm.likelihood.exact_token_logprobs`.
"""

import dataclasses
import math

import pytest
import torch

from esolm import UserError
from esolm.likelihood import exact_token_logprobs
from esolm.rl.trajectory import Rollouts, token_logprobs, trajectory_logprobs
from esolm.sampling.api import free_positions, prepare
from esolm.sampling.draw import sampling_logits
from esolm.serving import Engine
from esolm.serving.engine import law_logprobs
from test_serving_engine import AR, ESOLM_B, Collector, R, staggered, tiny

MIX = [  # (request, logprobs): rows that ask and rows that do not share the batch
    (R([1, 2, 3], 10, seed=1, steps=4, temperature=0.8, top_p=0.9), 3),
    (R([4], 12, seed=2, alpha0=0.25), None),
    (R([5, 6], 9, seed=3, schedule="first_hitting", temperature=1.3), 0),
    (R([2], 13, seed=4, alpha0=1.0, steps=5, top_p=0.7), 5),
    (R([7, 7, 7], 8, seed=5, infill={5: 9, 7: 2}), 2),
    (R([3], 11, seed=6, greedy=True), 4),
]


def LR(*args, logprobs=None, **kw):
    """A request (test_serving_engine's ``R``) that asks for ``logprobs``."""
    return dataclasses.replace(R(*args, **kw), logprobs=logprobs)


def run(engine, reqs):
    col = Collector()
    ids = staggered(engine, col, reqs, [2, 2] if len(reqs) >= 4 else [len(reqs)])
    return col, ids


def drawn_sequence(col, rid, req):
    """The prompt and every token the engine drew (from its step events), given tokens in place."""
    tokens = dict(enumerate(req.prompt_ids)) | dict(req.infill or {})
    for _, e in col.events[rid]:
        tokens.update(zip(e.positions, e.tokens))
    return [tokens[q] for q in range(len(req.prompt_ids) + req.max_tokens)]


def plan_of(engine, req):
    """The decoding plan the engine (and generate) builds for ``req``."""
    prepared = prepare(engine.model, engine.method, req.params, prompt_ids=[req.prompt_ids], infill=req.infill,
                       max_length=len(req.prompt_ids) + req.max_tokens)
    p = len(req.prompt_ids)
    gen = torch.Generator().manual_seed(req.params.seed)
    free = free_positions(prepared.tokens, engine.model.config.mask_id, p)
    return prepared.decoder.plan(free, p, prepared.params, gen), prepared.params


def test_esolm_b_logprobs_are_the_exact_trajectory_terms():
    engine = Engine(tiny(), ESOLM_B, max_batch=3)
    reqs = [dataclasses.replace(r, logprobs=k) for r, k in MIX]
    col, ids = run(engine, reqs)
    checked = 0
    for rid, req in ids.items():
        fin = col.finished[rid]
        assert fin.finish_reason == "length"
        if req.logprobs is None:
            assert fin.logprobs is None and all(e.logprobs is None for _, e in col.events[rid])
            continue
        p = len(req.prompt_ids)
        got = fin.logprobs
        assert len(got) == len(fin.tokens) == req.max_tokens
        if req.infill:  # given tokens are not sampled (trajectory_logprobs takes no infill: RL does not infill)
            given = [q - p for q in req.infill]
            assert all(got[j] is None and fin.top_logprobs[j] is None for j in given)
            assert all(math.isfinite(v) and v <= 0 for j, v in enumerate(got) if j not in given)
            continue
        plan, params = plan_of(engine, req)
        temperature = 1.0 if params.greedy else params.temperature  # a greedy token's law: the model's own
        r = Rollouts(torch.tensor([drawn_sequence(col, rid, req)]), plan.order, plan.bounds(), p, None, temperature,
                     None if params.greedy else params.top_p)
        with torch.no_grad():
            want = trajectory_logprobs(engine.model, r)[0].tolist()
        for j, (a, b) in enumerate(zip(got, want)):
            assert a <= 0 and math.isfinite(a) and abs(a - b) < 1e-9, (rid, j, a, b)
            top = fin.top_logprobs[j]
            assert len(top) <= req.logprobs and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            if top:
                assert a <= top[0][1] + 1e-12
                assert all(v == a for t, v in top if t == fin.tokens[j])  # the same law, the same number
        # each step event carries the log-probabilities of the tokens it decided
        by_position = {q: lp for _, e in col.events[rid] for q, lp in zip(e.positions, e.logprobs)}
        assert {q: got[q - p] for q in by_position} == by_position
        checked += 1
    assert checked == 4


def test_greedy_logprobs_are_the_models_own_law_and_the_top_token():
    engine = Engine(tiny(), ESOLM_B, max_batch=2)
    col, ids = run(engine, [LR([3], 11, seed=6, greedy=True, logprobs=2)])
    fin = col.finished[0]
    for tok, lp, top in zip(fin.tokens, fin.logprobs, fin.top_logprobs):
        assert top[0] == (tok, lp) and lp < 0  # the argmax, with its probability under temperature 1


def test_ar_logprobs_are_the_left_to_right_conditionals():
    model = tiny(adaln=False)
    engine = Engine(model, AR, max_batch=2, bos_id=0)
    reqs = [LR([1, 2, 3], 10, seed=1, logprobs=1), LR([], 12, seed=2, logprobs=0), R([5], 9, seed=3),
            LR([4, 4], 8, seed=4, temperature=0.7, top_p=0.8, logprobs=3)]
    col, ids = run(engine, reqs)
    for rid, req in ids.items():
        fin = col.finished[rid]
        if req.logprobs is None:
            assert fin.logprobs is None
            continue
        prompt = engine.check(req).prompt_ids
        x = torch.tensor([prompt + fin.tokens])
        with torch.no_grad():
            if req.params.temperature == 1.0 and req.params.top_p is None:
                want = exact_token_logprobs(model, AR, x)[0][0, len(prompt):]
            else:
                logits = model(x[:, :-1], mask=torch.ones(x.shape[1] - 1, x.shape[1] - 1).tril().bool())
                want = token_logprobs(logits[0, len(prompt) - 1:], x[0, len(prompt):], None, req.params.top_p,
                                      req.params.temperature)
        assert fin.logprobs == pytest.approx(want.tolist(), abs=1e-9)


@pytest.mark.parametrize("method,adaln", [(ESOLM_B, True), (AR, False)], ids=["esolm_b", "ar"])
def test_score_is_exact_token_logprobs(method, adaln):
    model = tiny(adaln=adaln)
    engine = Engine(model, method, max_batch=2)
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9], [2] * 16, []]
    scores = engine.score(prompts, top_k=3)
    for ids, s in zip(prompts, scores):
        assert len(s.logprobs) == len(s.top_logprobs) == len(ids)
        if not ids:
            continue
        assert s.logprobs[0] is None and s.top_logprobs[0] is None  # nothing before the first token predicts it
        with torch.no_grad():
            want, best = exact_token_logprobs(model, method, torch.tensor([ids]))
        assert s.logprobs[1:] == pytest.approx(want[0, 1:].tolist(), abs=1e-12)
        for j in range(1, len(ids)):
            top = s.top_logprobs[j]
            assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
            assert (top[0][0] == ids[j]) == bool(best[0, j])
            if best[0, j]:
                assert top[0][1] == s.logprobs[j]  # the test lm-eval's is_greedy makes, exactly


def test_logprobs_and_scores_are_refused_where_not_exact():
    mdlm = Engine(tiny(), {"name": "mdlm"}, max_batch=2)
    with pytest.raises(UserError, match="Eso-LM \\(B\\) or AR"):
        mdlm.check(LR([1], 4, logprobs=1))
    with pytest.raises(UserError, match="exact likelihoods"):
        mdlm.score([[1, 2]])
    engine = Engine(tiny(), ESOLM_B)
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(UserError, match="logprobs"):
            engine.check(LR([1], 4, logprobs=bad))
    for prompts, match in (([[1, 16]], "mask id"), ([[17]], "token id"), ([[1] * 17], "length"), ([5], "list")):
        with pytest.raises(UserError, match=match):
            engine.score(prompts)


def test_law_logprobs_never_lists_tokens_outside_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, 2.0]], dtype=torch.float64)
    chosen, top = law_logprobs(logits, torch.tensor([1]), 4, 0.8, 1.0, 5)
    law = sampling_logits(logits, 4, 0.8, 1.0).log_softmax(-1)
    assert math.isfinite(chosen[0]) and chosen == [float(law[0, 1])] and [t for t, _ in top[0]] == [0, 1]
    assert all(math.isfinite(v) for _, v in top[0])
