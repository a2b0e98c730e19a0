"""GRPO with each trajectory likelihood, each tuned on a validation split, then compared on the test split over
seeds with 95% intervals (``esolm rl``; issue: "RL that survives review").

Arms (the same supervised starting policy per task; only the rollout law and the likelihood differ):

* ``exact-B``: Eso-LM (B) rollouts at the policy's alpha0, scored by the exact one-pass trajectory likelihood;
* ``mean-field-B``: the same rollouts, scored by d1's mean-field estimate (one diffusion pass, prompt masked);
* ``mean-field-a1``: pure-diffusion rollouts (``rl.alpha0=1``), mean-field: d1's setting;
* ``AR``: the autoregressive special case (``rl.alpha0=0``), exact (its likelihood is the AR one).

Stages (each run is a resumable folder under ``--runs``; an interrupted sweep continues where it stopped):

1. ``tune``: per task and arm, a staged grid on the task's **validation** split (``task.eval_split=validation``;
   never the test split): first the learning rate (1e-4, 3e-4; and 1e-3 at each mu where 3e-4 beat 1e-4)
   x ``num_iterations`` (mu: 1, 4, 12) at beta 0, epsilon 0.2; then
   beta x epsilon at the best of those (epsilon only where mu > 1: at mu = 1 the ratio is 1 and the clip
   never acts). Selection by the final validation accuracy (d1-sudoku: d1's cell accuracy), one seed per
   point (``--tune-seed``); ties go to the earlier point of the grid.
2. ``final``: per task and arm, the chosen settings with ``--seeds`` (not the tuning seed), on the **test**
   split; held-out accuracy before and after, mean and 95% t-interval over seeds, and the difference of
   each baseline from exact-B with its Welch 95% interval.

Writes ``rl_tune.json`` (every run's record and the choices) and ``rl_tune.md`` to ``--out``. Jobs run
``--jobs`` at a time, one thread each; wall times are RL time only (evaluations excluded) and are only
comparable between runs that ran side by side under the same load.

Usage::

    esolm train task-arithmetic trainer.out_dir=runs/task-arithmetic   # each task's starting policy
    python benchmarks/rl_tune.py --tasks arithmetic d1-countdown d1-sudoku --stage tune final \\
        --policy-dir runs --iterations 100 --seeds 11 12 13 14 15
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import math
import statistics
from pathlib import Path

from esolm.io.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]

ARMS = {
    "exact-B": {"rl.likelihood": "exact"},
    "mean-field-B": {"rl.likelihood": "mean-field"},
    "mean-field-a1": {"rl.likelihood": "mean-field", "rl.alpha0": 1.0},
    "AR": {"rl.likelihood": "exact", "rl.alpha0": 0.0},
}
MUS, LRS, LR_UP = (1, 4, 12), (1e-4, 3e-4), 1e-3
STAGE1 = [{"optim.lr": lr, "rl.num_iterations": mu} for lr in LRS for mu in MUS]
STAGE2 = [{"rl.beta": beta, "rl.epsilon": eps} for beta in (0.0, 0.04) for eps in (0.2, 0.5)]
BASE = {"rl.beta": 0.0, "rl.epsilon": 0.2}
METRIC = {"d1-sudoku": "cell_accuracy"}  # selection metric per task (d1's); else accuracy


def metric(task: str) -> str:
    return METRIC.get(task, "accuracy")


def run_dir(runs: Path, task: str, arm: str, knobs: dict, seed: int, split: str, iterations: int,
            extra: list[str]) -> Path:
    key = json.dumps([task, arm, sorted(knobs.items()), seed, split, iterations] + ([extra] if extra else []))
    return runs / f"{task}-{arm}-{split}-s{seed}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def job(spec: dict) -> dict:
    """One ``esolm rl`` run (resumed if its folder holds a finished or interrupted run); its evaluations."""
    import torch

    from esolm.rl.config import load_rl_config
    from esolm.rl.run import prepare_rl, train_rl

    torch.set_num_threads(1)
    out = Path(spec["out"])
    done = out / "final_metrics.json"
    if not (done.exists() and json.loads(done.read_text())["iterations"] >= spec["iterations"]):
        overrides = [f"{k}={v}" for k, v in {**ARMS[spec["arm"]], **spec["knobs"]}.items()]
        cfg = load_rl_config(spec["task"], [
            f"policy={spec['policy']}", f"trainer.seed={spec['seed']}", f"trainer.out_dir={out}",
            f"trainer.max_steps={spec['iterations']}", "trainer.progress=false", "trainer.logger=csv",
            f"trainer.ckpt_every={spec['iterations']}", f"task.eval_split={spec['split']}",
            f"task.eval_prompts={spec['eval_prompts']}", f"task.eval_every={spec['eval_every']}", *spec["extra"],
            *overrides])
        train_rl(cfg, prepare_rl(cfg))
    evals = [json.loads(ln) for ln in (out / "eval.jsonl").read_text().splitlines()]
    return {**spec, "evals": evals}


def run_jobs(specs: list[dict], jobs: int) -> list[dict]:
    """Every spec's run, ``jobs`` at a time, the costliest first (most optimizer steps per iteration, longest
    sequences), so that the workers finish together; results in the order given."""
    order = sorted(range(len(specs)), key=lambda i: -specs[i]["knobs"].get("rl.num_iterations", 1))
    if jobs <= 1:
        done = {i: job(specs[i]) for i in order}
    else:
        with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {i: pool.submit(job, specs[i]) for i in order}
            done = {i: f.result() for i, f in futures.items()}
    return [done[i] for i in range(len(specs))]


def spec(args, task: str, arm: str, knobs: dict, seed: int, split: str) -> dict:
    return {"task": task, "arm": arm, "knobs": knobs, "seed": seed, "split": split,
            "iterations": args.iterations, "policy": str(args.policy_dir / f"task-{task}" / "checkpoints" /
                                                        "last.ckpt"),
            "eval_prompts": args.eval_prompts[task] if split == "test" else args.val_prompts,
            "eval_every": 0 if split == "validation" else args.eval_every, "extra": args.overrides,
            "out": str(run_dir(args.runs, task, arm, knobs, seed, split, args.iterations, args.overrides))}


def score(run: dict) -> float:
    return run["evals"][-1][metric(run["task"])]


def best(runs: list[dict], task: str, arm: str) -> dict:
    return max((r for r in runs if r["task"] == task and r["arm"] == arm), key=score)["knobs"]


def tune(args, tasks: list[str], arms: list[str]) -> dict:
    """The staged grid (module docstring) for every task and arm; per task, its runs and the chosen knobs."""
    pairs = [(t, a) for t in tasks for a in arms]
    r1 = run_jobs([spec(args, t, a, {**BASE, **k}, args.tune_seed, "validation") for t, a in pairs
                   for k in STAGE1], args.jobs)
    # the learning rate goes up once more (LR_UP) only at a mu where the higher of LRS beat the lower
    by = {(r["task"], r["arm"], r["knobs"]["optim.lr"], r["knobs"]["rl.num_iterations"]): score(r) for r in r1}
    r1 += run_jobs([spec(args, t, a, {**BASE, "optim.lr": LR_UP, "rl.num_iterations": mu}, args.tune_seed,
                         "validation") for t, a in pairs for mu in MUS
                    if by[t, a, LRS[1], mu] > by[t, a, LRS[0], mu]], args.jobs)
    best1 = {p: best(r1, *p) for p in pairs}
    stage2 = [spec(args, t, a, {**best1[t, a], **k}, args.tune_seed, "validation") for t, a in pairs
              for k in STAGE2]
    # at mu = 1 the ratio is exactly 1 and the clip never acts: epsilon 0.5 would repeat epsilon 0.2's run
    r2 = run_jobs([s for s in stage2 if s["knobs"] != best1[s["task"], s["arm"]]
                   and not (s["knobs"]["rl.num_iterations"] == 1 and s["knobs"]["rl.epsilon"] != BASE["rl.epsilon"])],
                  args.jobs)
    runs = r1 + r2
    return {t: {"seed": args.tune_seed, "iterations": args.iterations,
                "runs": [r for r in runs if r["task"] == t],
                "chosen": {a: best(runs, t, a) for a in arms}} for t in tasks}


def t_interval(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    from scipy import stats

    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b and the half-width of Welch's 95% interval."""
    from scipy import stats

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    d = statistics.mean(a) - statistics.mean(b)
    if va + vb == 0:
        return d, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return d, stats.t.ppf(0.975, df) * math.sqrt(va + vb)


def summarize_final(runs: list[dict]) -> dict:
    out: dict = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        rows = {}
        for arm in dict.fromkeys(r["arm"] for r in runs if r["task"] == task):
            rs = [r for r in runs if r["task"] == task and r["arm"] == arm]
            row = {"seeds": [r["seed"] for r in rs], "knobs": rs[0]["knobs"],
                   "wall_seconds": statistics.mean(r["evals"][-1]["seconds"] for r in rs)}
            for m in dict.fromkeys(["accuracy", metric(task)]):
                start = [r["evals"][0][m] for r in rs]
                end = [r["evals"][-1][m] for r in rs]
                row[m] = {"start": start, "end": end, "start_mean": statistics.mean(start),
                          "end_mean_ci95": t_interval(end), "gain_mean_ci95": t_interval(
                              [e - s for s, e in zip(start, end)])}
            rows[arm] = row
        if "exact-B" in rows:
            ref = rows["exact-B"][metric(task)]["end"]
            for arm, row in rows.items():
                if arm != "exact-B":
                    row["exact-B_minus_this_ci95"] = welch(ref, row[metric(task)]["end"])
        out[task] = rows
    return out


def knob_text(k: dict) -> str:
    return (f"lr {k['optim.lr']:g}, mu {k['rl.num_iterations']}, beta {k['rl.beta']:g}, "
            f"eps {k['rl.epsilon']:g}")


def markdown(res: dict, command: str) -> str:
    lines = ["# GRPO: each likelihood tuned on a validation split, compared on the test split", "",
             "Commands (`benchmarks/rl_tune.py`; records in `rl_tune.json`):", "",
             *[f"- `{c}`" for c in dict.fromkeys([*res.get("commands", {}).values(), command])], ""]
    for task, t in res.get("tune", {}).items():
        lines += [f"## Tuning on {task} (validation split, {metric(task)}, seed {t['seed']})", "",
                  "| arm | lr | mu | beta | epsilon | validation start | validation end | RL seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(t["runs"], key=lambda r: (list(ARMS).index(r["arm"]), -score(r))):
            k = r["knobs"]
            mark = " **(chosen)**" if k == t["chosen"][r["arm"]] else ""
            lines.append(f"| {r['arm']}{mark} | {k['optim.lr']:g} | {k['rl.num_iterations']} | {k['rl.beta']:g} | "
                         f"{k['rl.epsilon']:g} | {r['evals'][0][metric(task)]:.3f} | {score(r):.3f} | "
                         f"{r['evals'][-1]['seconds']:.0f} |")
        lines.append("")
    for task, rows in res.get("final", {}).items():
        m = metric(task)
        lines += [f"## {task}: test split, {len(next(iter(rows.values()))['seeds'])} seeds at the chosen settings", "",
                  f"{m}: mean over seeds with its 95% t-interval; the difference is exact-B minus the arm (Welch "
                  f"95% interval)", "",
                  "| arm | settings | start | end | gain | exact-B minus arm | per seed (end) | RL seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, row in rows.items():
            v = row[m]
            e, g = v["end_mean_ci95"], v["gain_mean_ci95"]
            d = row.get("exact-B_minus_this_ci95")
            diff = "—" if d is None else f"{d[0]:+.3f} ± {d[1]:.3f}"
            lines.append(f"| {arm} | {knob_text(row['knobs'])} | {v['start_mean']:.3f} | {e[0]:.3f} ± {e[1]:.3f} | "
                         f"{g[0]:+.3f} ± {g[1]:.3f} | {diff} | {', '.join(f'{x:.3f}' for x in v['end'])} | "
                         f"{row['wall_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["arithmetic", "d1-countdown", "d1-sudoku"])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--stage", nargs="+", default=["tune", "final"], choices=["tune", "final"])
    ap.add_argument("--policy-dir", type=Path, default=ROOT / "runs",
                    help="folder holding task-TASK/checkpoints/last.ckpt (esolm train task-TASK)")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--tune-seed", type=int, default=1)
    ap.add_argument("--seeds", nargs="+", type=int, default=[11, 12, 13, 14, 15])
    ap.add_argument("--val-prompts", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "rl-tune")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rl")
    ap.add_argument("overrides", nargs="*", help="RL config overrides for every run (e.g. rl.prompts_per_step=4)")
    args = ap.parse_args(argv)
    args.eval_prompts = {"arithmetic": 500, "d1-countdown": 256, "d1-sudoku": 500, "countdown": 500, "sudoku": 500}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rl_tune.json"

    def save(section: str, per_task: dict) -> dict:
        """Merge one section's per-task results into the JSON (read again first: sweeps of other tasks may
        run beside this one)."""
        res = json.loads(path.read_text()) if path.exists() else {}
        res.setdefault(section, {}).update(per_task)
        atomic_write(path, json.dumps(res, indent=2) + "\n")
        return res

    res = json.loads(path.read_text()) if path.exists() else {}
    if "tune" in args.stage:
        res = save("tune", tune(args, args.tasks, args.arms))
    if "final" in args.stage:
        specs = [spec(args, task, arm, res["tune"][task]["chosen"][arm], seed, "test")
                 for task in args.tasks for arm in args.arms for seed in args.seeds]
        runs = run_jobs(specs, args.jobs)
        save("final_runs", {t: [r for r in runs if r["task"] == t] for t in args.tasks})
        res = save("final", summarize_final(runs))
    command = "python benchmarks/rl_tune.py " + " ".join(argv or __import__("sys").argv[1:])
    res = save("commands", {" ".join(args.tasks) + " / " + " ".join(args.stage): command})
    atomic_write(args.out / "rl_tune.md", markdown(res, command) + "\n")
    print(markdown(res, command))


if __name__ == "__main__":
    main()
