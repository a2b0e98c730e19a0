"""benchmarks/rl_tune.py's selection and statistics, with a stand-in for the RL runs (the runs themselves are
``esolm rl``, tested in test_rl_*.py): the staged grid runs what its docstring says and picks each arm's best on
the validation split only; the intervals are the t and Welch intervals."""

import math
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rl_tune  # noqa: E402


def fake_score(task, arm, knobs):
    """A made-up validation accuracy: best at mu 12, lr 1e-4, except for 'exact-B' (best at mu 4, lr 3e-4); beta 0.04
    helps 'AR'; epsilon 0.5 helps everyone (where it is run)."""
    lr, mu = knobs["optim.lr"], knobs["rl.num_iterations"]
    best_here = arm == "exact-B" and mu == 4
    s = 0.3 + 0.001 * mu + 0.05 * best_here - 100 * abs(lr - (3e-4 if best_here else 1e-4))
    return s + 0.05 * knobs["rl.beta"] / 0.04 * (arm == "AR") + 0.02 * (knobs["rl.epsilon"] == 0.5)


@pytest.fixture
def sweep(monkeypatch, tmp_path):
    ran = []
    score = {"fn": fake_score}

    def job(spec):
        ran.append(spec)
        acc = score["fn"](spec["task"], spec["arm"], spec["knobs"])
        return {**spec, "evals": [{"accuracy": 0.1, "seconds": 0.0}, {"accuracy": acc, "seconds": 1.0}]}

    monkeypatch.setattr(rl_tune, "job", job)
    args = SimpleNamespace(iterations=3, policy_dir=tmp_path, eval_prompts={"arithmetic": 5}, val_prompts=4,
                           eval_every=0, overrides=[], runs=tmp_path, jobs=1, tune_seed=1)
    return args, ran, score


def test_the_staged_grid_runs_what_it_says_and_picks_each_arms_best(sweep):
    args, ran, _ = sweep
    res = rl_tune.tune(args, ["arithmetic"], ["exact-B", "AR"])["arithmetic"]
    assert all(s["split"] == "validation" and s["seed"] == 1 for s in ran)
    lrs = {(s["arm"], s["knobs"]["rl.num_iterations"]) for s in ran if s["knobs"]["optim.lr"] == rl_tune.LR_UP}
    assert lrs == {("exact-B", 4)}  # 1e-3 only where 3e-4 beat 1e-4
    for arm in ("exact-B", "AR"):
        stage2 = [s["knobs"] for s in ran if s["arm"] == arm and (s["knobs"]["rl.beta"], s["knobs"]["rl.epsilon"])
                  != (0.0, 0.2)]
        best_mu = 12 if arm == "AR" else 4
        assert {k["rl.num_iterations"] for k in stage2} == {best_mu} and len(stage2) == 3
    assert res["chosen"]["exact-B"] == {"optim.lr": 3e-4, "rl.num_iterations": 4, "rl.beta": 0.0, "rl.epsilon": 0.5}
    assert res["chosen"]["AR"] == {"optim.lr": 1e-4, "rl.num_iterations": 12, "rl.beta": 0.04, "rl.epsilon": 0.5}
    assert len({s["out"] for s in ran}) == len(ran)  # every grid point its own run folder


def test_epsilon_is_not_tuned_where_the_clip_cannot_act(sweep):
    args, ran, score = sweep
    score["fn"] = lambda task, arm, k: fake_score(task, arm, k) - 0.2 * (k["rl.num_iterations"] > 1)
    res = rl_tune.tune(args, ["arithmetic"], ["AR"])["arithmetic"]
    assert res["chosen"]["AR"] == {"optim.lr": 1e-4, "rl.num_iterations": 1, "rl.beta": 0.04, "rl.epsilon": 0.2}
    stage2 = [s["knobs"] for s in ran if (s["knobs"]["rl.beta"], s["knobs"]["rl.epsilon"]) != (0.0, 0.2)]
    assert stage2 == [{"optim.lr": 1e-4, "rl.num_iterations": 1, "rl.beta": 0.04, "rl.epsilon": 0.2}]


def test_intervals_are_the_t_and_welch_intervals():
    a, b = [0.82, 0.59, 0.80, 0.76, 0.79], [0.58, 0.70, 0.37, 0.42, 0.61]
    m, h = rl_tune.t_interval(a)
    lo, hi = stats.t.interval(0.95, 4, loc=statistics.mean(a), scale=stats.sem(a))
    assert m == pytest.approx((lo + hi) / 2) and h == pytest.approx((hi - lo) / 2)
    d, w = rl_tune.welch(a, b)
    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(0.95)
    assert d == pytest.approx((ci.low + ci.high) / 2) and w == pytest.approx((ci.high - ci.low) / 2)
    assert math.isnan(rl_tune.t_interval([0.5])[1]) and rl_tune.welch([1.0, 1.0], [0.0, 0.0]) == (1.0, 0.0)


def test_final_summary_reads_the_tasks_metric_and_differences_from_exact_b():
    def run(arm, seed, start, end):
        return {"task": "d1-sudoku", "arm": arm, "seed": seed, "knobs": {},
                "evals": [{"accuracy": 0.0, "cell_accuracy": start, "seconds": 0},
                          {"accuracy": 0.0, "cell_accuracy": end, "seconds": 2}]}

    runs = [run("exact-B", s, 0.5, 0.6 + 0.01 * s) for s in range(5)] + [run("AR", s, 0.6, 0.6) for s in range(5)]
    out = rl_tune.summarize_final(runs)["d1-sudoku"]
    assert out["exact-B"]["cell_accuracy"]["end_mean_ci95"][0] == pytest.approx(0.62)
    assert out["AR"]["exact-B_minus_this_ci95"][0] == pytest.approx(0.02)
    assert out["AR"]["cell_accuracy"]["gain_mean_ci95"] == (pytest.approx(0.0), 0.0)
