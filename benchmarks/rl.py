"""Exact trajectory likelihood vs d1's mean-field estimate for GRPO on a diffusion LM (``esolm rl``).

Four measurements, written to ``benchmarks/results/rl/`` (``rl.md``, ``rl.json``, ``rl_<task>.png``):

1. **Learning** (``--tasks``, ``--seeds``, ``--likelihoods``): ``esolm rl TASK`` from the task's supervised
   starting policy with the same budget (``--iterations``) and seeds; held-out accuracy (fixed prompts and
   draws) vs RL wall time and vs rollouts, mean and spread over seeds. Runs are resumable folders under
   ``--runs`` (an interrupted benchmark continues where it stopped).
2. **Gradient quality at a fixed policy** (``--grad-tasks``, ``--grad-batches``; alone with
   ``--gradients-only``, written to ``rl_gradients.json`` / ``rl_gradients.md``): ``--grad-batches``
   independent rollout batches of each task's starting policy; the GRPO gradient at ratio 1 of each batch,
   with each estimator on the *same* rollouts; scale-free figures (:mod:`esolm.rl.gradients`): the
   signal-to-noise ``||E g||^2 / tr Cov(g)`` of one batch's gradient, and the cosine of each batch's gradient
   to the large-batch exact gradient of the other batches (leave-one-out: the exact estimator is unbiased,
   so that mean is the policy gradient's estimate), mean and spread over batches; for mean-field also to its
   own leave-one-out mean, and the cosine between the two mean gradients.
3. **Cost of one likelihood pass** (forward + backward, same batch): exact / mean-field.
4. **Rollout speed**: completion tokens/s of the KV-cached sampler vs the same plan without the cache.

Usage (after ``esolm train task-TASK`` for each task)::

    python benchmarks/rl.py --tasks arithmetic sudoku countdown --seeds 1 2 3 \\
        --likelihoods exact --mean-field-tasks countdown
    python benchmarks/rl.py --gradients-only --grad-tasks arithmetic sudoku countdown --grad-batches 32

Timings are single-threaded (``--threads 1``) and only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_learning(task: str, likelihood: str, seed: int, iterations: int | None, runs: Path, extra: list[str]) -> dict:
    from esolm.rl.config import load_rl_config
    from esolm.rl.run import prepare_rl, train_rl

    out = runs / f"{task}-{likelihood}-s{seed}"
    budget = [] if iterations is None else [f"trainer.max_steps={iterations}"]
    cfg = load_rl_config(task, [f"rl.likelihood={likelihood}", f"trainer.seed={seed}", f"trainer.out_dir={out}",
                                "trainer.progress=false", *budget, *extra])
    done = out / "final_metrics.json"
    if not (done.exists() and json.loads(done.read_text())["iterations"] >= cfg.trainer.max_steps):
        train_rl(cfg, prepare_rl(cfg))
    evals = [json.loads(ln) for ln in (out / "eval.jsonl").read_text().splitlines()]
    return {"task": task, "likelihood": likelihood, "seed": seed, "evals": evals}


def policy_gradients(task: str, batches: int, seed: int = 0, policy: str | None = None) -> dict:
    """Scale-free quality of the GRPO gradient at ratio 1 of the task's starting policy (or ``policy``), both
    estimators on the same ``batches`` rollout batches (module docstring, item 2)."""
    from esolm.rl.config import load_rl_config
    from esolm.rl.gradients import gradient_quality
    from esolm.rl.grpo import group_advantages, grpo_loss, rollout_groups
    from esolm.rl.prompts import decode_completions, prompt_source
    from esolm.rl.run import load_policy
    from esolm.rl.trajectory import sequence_logprobs
    from esolm.sampling.params import SamplingParams
    from esolm.training.module import step_seed

    cfg = load_rl_config(task, [] if policy is None else [f"policy={policy}"])
    loaded = load_policy(cfg.policy)
    model, method, tok = loaded.model.float(), loaded.method, loaded.tokenizer
    model.eval()
    source = prompt_source(cfg.task.name)
    rl = cfg.rl
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {"exact": [], "mean-field": []}
    for k in range(batches):
        prompts = source.train(rl.prompts_per_step, step_seed(seed, k))
        rolls, rows = rollout_groups(model, method, tok, prompts, rl.group_size, SamplingParams.from_rl(rl),
                                     step_seed(seed, k, 1))
        flat = [p for p in prompts for _ in range(rl.group_size)]
        comps = [""] * len(flat)
        for r, idx in zip(rolls, rows):
            for i, t in zip(idx, decode_completions(tok, r.tokens, r.prompt_len)):
                comps[i] = t
        adv = group_advantages(source.rewards(flat, comps), rl.group_size, rl.scale_rewards)
        for lik in grads:
            model.zero_grad()
            for j, (r, idx) in enumerate(zip(rolls, rows)):
                gen = torch.Generator().manual_seed(step_seed(seed, k, 2, j))
                lp = sequence_logprobs(model, method, r, lik, gen, rl.mask_prompt)
                loss, _ = grpo_loss(lp, lp.detach(), adv[idx], rl.epsilon, loss_type=rl.loss_type)
                loss.backward()
            grads[lik].append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                                         for p in params]))
    ex, mf = torch.stack(grads["exact"]), torch.stack(grads["mean-field"])
    me, mm = ex.mean(0), mf.mean(0)
    return {"task": task, "batches": batches, "rollouts_per_batch": rl.prompts_per_step * rl.group_size,
            "policy": str(cfg.policy), "exact": gradient_quality(ex, ex), "mean-field": gradient_quality(mf, ex),
            "mean-field_own_reference": gradient_quality(mf),
            "cosine_of_means": float(me @ mm / (me.norm() * mm.norm()).clamp_min(1e-300))}


def gradient_lines(grads: dict) -> list[str]:
    """Markdown of :func:`policy_gradients` results, one table row per task and estimator."""
    lines = ["## Gradient quality at the starting policy (scale-free; same rollouts for both estimators)", "",
             "signal-to-noise = ||E g||^2 / tr Cov(g) of one batch's gradient (unbiased); cosine of each batch's "
             "gradient to the exact gradient of the other batches (leave-one-out), mean +- std [min, max] over "
             "batches", "",
             "| task | estimator | batches x rollouts | signal-to-noise | cosine to exact reference | "
             "cosine to own reference | cosine of the means |", "|---|---|---|---|---|---|---|"]
    for task, g in grads.items():
        for lik in ("exact", "mean-field"):
            q = g[lik]
            own = g["exact"] if lik == "exact" else g["mean-field_own_reference"]
            lines.append(f"| {task} | {lik} | {g['batches']} x {g['rollouts_per_batch']} | {q['snr']:.3f} | "
                         f"{q['cosine_mean']:.3f} +- {q['cosine_std']:.3f} [{q['cosine_min']:.3f}, "
                         f"{q['cosine_max']:.3f}] | {own['cosine_mean']:.3f} +- {own['cosine_std']:.3f} | "
                         f"{g['cosine_of_means']:.3f} |")
    return lines


def likelihood_cost(task: str, repeats: int = 20) -> dict:
    """Median seconds of one forward+backward likelihood pass on one batch of rollouts, each estimator."""
    from esolm.rl.config import load_rl_config
    from esolm.rl.grpo import rollout_groups
    from esolm.rl.prompts import prompt_source
    from esolm.rl.run import load_policy
    from esolm.rl.trajectory import sequence_logprobs
    from esolm.sampling.params import SamplingParams

    cfg = load_rl_config(task)
    loaded = load_policy(cfg.policy)
    model, method, tok = loaded.model.float().eval(), loaded.method, loaded.tokenizer
    rl = cfg.rl
    prompts = prompt_source(cfg.task.name).train(rl.prompts_per_step, 0)
    (r,), _ = rollout_groups(model, method, tok, prompts, rl.group_size, SamplingParams.from_rl(rl), 0)
    times = {}
    for lik in ("exact", "mean-field"):
        ts = []
        for i in range(repeats + 3):
            model.zero_grad()
            t0 = time.perf_counter()
            sequence_logprobs(model, method, r, lik, torch.Generator().manual_seed(i)).sum().backward()
            ts.append(time.perf_counter() - t0)
        times[lik] = statistics.median(ts[3:])
    return {"rows": r.tokens.shape[0], "length": r.tokens.shape[1], "seconds": times,
            "ratio_exact_over_mean_field": times["exact"] / times["mean-field"]}


def rollout_speed(task: str, repeats: int = 5) -> dict:
    """Completion tokens/s of the cached sampler vs the same plans uncached (one batch of rollouts)."""
    from esolm.rl.config import load_rl_config
    from esolm.rl.prompts import encode_prompts, prompt_source
    from esolm.rl.run import load_policy
    from esolm.sampling.esolm import sample_esolm_b
    from esolm.sampling.schedule import plan_binomial

    cfg = load_rl_config(task)
    loaded = load_policy(cfg.policy)
    model, tok = loaded.model.float().eval(), loaded.tokenizer
    rl = cfg.rl
    ids = torch.tensor(encode_prompts(tok, prompt_source(cfg.task.name).train(rl.prompts_per_step, 0)))
    ids = ids.repeat_interleave(rl.group_size, 0)
    length = model.config.length
    x = torch.full((ids.shape[0], length), model.config.mask_id)
    x[:, :ids.shape[1]] = ids
    plan = plan_binomial(x == model.config.mask_id, length - ids.shape[1], loaded.method.alpha0,
                         torch.Generator().manual_seed(0))
    n_tok = (length - ids.shape[1]) * ids.shape[0]
    out = {}
    for cached in (True, False):
        ts = []
        for i in range(repeats + 1):
            res = sample_esolm_b(model, x, plan, generator=torch.Generator().manual_seed(i), use_cache=cached)
            ts.append(res.seconds)
        out["cached" if cached else "uncached"] = n_tok / statistics.median(ts[1:])
    out["speedup"] = out["cached"] / out["uncached"]
    out["rows"], out["length"], out["nfe"] = ids.shape[0], length, plan.nfe
    return out


def summarize(results: list[dict]) -> dict:
    """Per (task, likelihood): accuracy at each evaluation point, mean / min / max over seeds."""
    table: dict = {}
    for r in results:
        table.setdefault((r["task"], r["likelihood"]), []).append(r["evals"])
    out = {}
    for (task, lik), runs in table.items():
        n = min(len(e) for e in runs)
        pts = []
        for i in range(n):
            acc = [e[i]["accuracy"] for e in runs]
            pts.append({"iteration": runs[0][i]["iteration"], "rollouts": runs[0][i]["rollouts"],
                        "seconds": statistics.mean(e[i]["seconds"] for e in runs), "mean": statistics.mean(acc),
                        "min": min(acc), "max": max(acc), "per_seed": acc})
        out[f"{task}/{lik}"] = pts
    return out


def plot(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for task in sorted({k.split("/")[0] for k in summary}):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for key, pts in summary.items():
            if not key.startswith(task + "/"):
                continue
            lik = key.split("/")[1]
            for ax, x in zip(axes, ("seconds", "rollouts")):
                xs = [p[x] for p in pts]
                ax.plot(xs, [p["mean"] for p in pts], marker="o", label=lik)
                ax.fill_between(xs, [p["min"] for p in pts], [p["max"] for p in pts], alpha=0.2)
        for ax, x in zip(axes, ("RL wall time (s)", "rollouts")):
            ax.set_xlabel(x)
            ax.set_ylabel("held-out accuracy")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"GRPO on {task}: mean and min-max over seeds")
        fig.tight_layout()
        path = out / f"rl_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def write_markdown(res: dict, out: Path, command: str) -> None:
    lines = ["# GRPO: exact trajectory likelihood vs mean-field", "", f"Command: `{command}`", ""]
    lines += ["## Held-out accuracy (start -> end, per seed; mean)", "",
              "| task | likelihood | start | end (per seed) | end mean | gain mean | spread of end |",
              "|---|---|---|---|---|---|---|"]
    for key, pts in res["learning"].items():
        task, lik = key.split("/")
        s, e = pts[0], pts[-1]
        lines.append(f"| {task} | {lik} | {s['mean']:.3f} | {', '.join(f'{a:.3f}' for a in e['per_seed'])} | "
                     f"{e['mean']:.3f} | {e['mean'] - s['mean']:+.3f} | {e['max'] - e['min']:.3f} |")
    if res.get("gradients"):
        lines += [""] + gradient_lines(res["gradients"])
    if res.get("likelihood_cost"):
        c = res["likelihood_cost"]
        lines += ["", f"## One likelihood pass, forward + backward ({c['rows']} rollouts, L = {c['length']})", "",
                  f"exact {c['seconds']['exact'] * 1e3:.2f} ms, mean-field {c['seconds']['mean-field'] * 1e3:.2f} ms: "
                  f"ratio {c['ratio_exact_over_mean_field']:.2f}"]
    if res.get("rollout_speed"):
        r = res["rollout_speed"]
        lines += ["", f"## Rollout speed ({r['rows']} rollouts, L = {r['length']}, NFE {r['nfe']})", "",
                  f"KV-cached {r['cached']:.0f} tokens/s, uncached {r['uncached']:.0f} tokens/s: {r['speedup']:.2f}x"]
    (out / "rl.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["arithmetic"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--likelihoods", nargs="+", default=["exact"], choices=["exact", "mean-field"])
    ap.add_argument("--mean-field-tasks", nargs="*", default=["countdown"],
                    help="tasks also run with likelihood=mean-field (the comparison)")
    ap.add_argument("--iterations", type=int, default=None, help="RL iterations (default: each preset's)")
    ap.add_argument("--grad-tasks", nargs="+", default=["countdown"],
                    help="tasks whose starting policy's gradient quality is measured (item 2)")
    ap.add_argument("--grad-batches", type=int, default=32)
    ap.add_argument("--gradients-only", action="store_true",
                    help="only item 2, written to rl_gradients.json / rl_gradients.md (rl.json is left alone)")
    ap.add_argument("--policy", default=None, help="item 2's policy instead of each task preset's (a smoke run)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-rl")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-learning", action="store_true")
    ap.add_argument("--learning-only", action="store_true", help="only the learning runs (e.g. to run parts in "
                                                                 "parallel; a final call without it reads them back)")
    ap.add_argument("overrides", nargs="*", help="extra RL config overrides for every run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    if args.gradients_only:
        grads = {t: policy_gradients(t, args.grad_batches, policy=args.policy) for t in args.grad_tasks}
        (args.out / "rl_gradients.json").write_text(json.dumps(grads, indent=2) + "\n")
        command = "python benchmarks/rl.py " + " ".join(argv or __import__("sys").argv[1:])
        (args.out / "rl_gradients.md").write_text("\n".join([f"Command: `{command}`", "", *gradient_lines(grads)])
                                                   + "\n")
        print("\n".join(gradient_lines(grads)))
        return
    if not args.skip_learning:
        results = []
        for task in args.tasks:
            liks = list(dict.fromkeys(args.likelihoods + (["mean-field"] if task in args.mean_field_tasks else [])))
            for lik in liks:
                for seed in args.seeds:
                    results.append(run_learning(task, lik, seed, args.iterations, args.runs, args.overrides))
        res["learning"] = summarize(results)
    if args.learning_only:
        return
    res["gradients"] = {t: policy_gradients(t, args.grad_batches, policy=args.policy) for t in args.grad_tasks}
    res["likelihood_cost"] = likelihood_cost(args.grad_tasks[0])
    res["rollout_speed"] = rollout_speed(args.grad_tasks[0])
    (args.out / "rl.json").write_text(json.dumps(res, indent=2) + "\n")
    if "learning" in res:
        plot(res["learning"], args.out)
        write_markdown(res, args.out, "python benchmarks/rl.py " + " ".join(argv or __import__("sys").argv[1:]))
    print(json.dumps({k: v for k, v in res.items() if k != "learning"}, indent=2))


if __name__ == "__main__":
    main()
