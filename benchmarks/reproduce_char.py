"""Character-level reproduction of the paper's comparison (METHOD.md section 7): resumable, one command.

The token-level ``reproduce_cpu.py`` cannot train its 8k-vocabulary models far enough on 2 CPU cores for them
to separate. Here every model is the ``cpu-char`` preset (2 x 128 DiT, L = 128, the ``chars`` tokenizer,
vocabulary 97, the embedded Wikipedia corpus; the text8 convention: bits per character) with the same data
stream and number of optimizer steps, and **every model is trained with several seeds**:

  AR, MDLM, BD3-LM L'=4 and L'=16, Eso-LM (B) alpha0 in {1, 0.5, 0.25, 0.125}, Eso-LM (A) alpha0 = 0.25.

Per (model, seed), each stage skipped when its result exists (re-running the command resumes):

1. train   ``esolm train cpu-char METHOD trainer.seed=S trainer.max_steps=N`` (resumes from ``last.ckpt``);
2. export  the EMA weights to ``OUT/models/NAME-sS``;
3. eval    exact NELBO over the full validation split in bits per character; for Eso-LM (B) also the
           importance-weighted bound for ``--iw-k`` orders on the first ``--iw-sequences`` sequences.

Jobs run ``--workers`` at a time, one CPU thread each (two processes on two cores; no oversubscription).
Then, alone on the machine:

4. frontier  ``esolm bench frontier`` of the seed-1 models over ``--frontier-steps`` with a judge-free metric:
             the NLL of the samples under the AR model of another seed (``--judge-seed``, so AR's own samples
             are not scored by themselves), in bits per character, plus the samples' unigram entropy,
             against sampling seconds (one thread);
5. report    ``OUT/report.md`` and, with ``--report``, ``benchmarks/results/reproduce_char.md`` plus plots
             under ``benchmarks/results/reproduce_char/``.

    python benchmarks/reproduce_char.py --report
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers
from _runs import ROOT, log, read_json, write_json  # noqa: E402
from _runs import esolm as _esolm  # noqa: E402

LN2 = math.log(2)

# name -> (method overrides, description)
MODELS: dict[str, tuple[list[str], str]] = {
    "ar": (["method.name=ar"], "AR"),
    "mdlm": (["method.name=mdlm"], "MDLM"),
    "bd3lm-4": (["method.name=bd3lm", "method.block_size=4"], "BD3-LM L'=4"),
    "bd3lm-16": (["method.name=bd3lm", "method.block_size=16"], "BD3-LM L'=16"),
    "esolm-b-1": (["method.name=esolm", "method.variant=B", "method.alpha0=1"], "Eso-LM (B) alpha0=1"),
    "esolm-b-0.5": (["method.name=esolm", "method.variant=B", "method.alpha0=0.5"], "Eso-LM (B) alpha0=0.5"),
    "esolm-b-0.25": (["method.name=esolm", "method.variant=B", "method.alpha0=0.25"], "Eso-LM (B) alpha0=0.25"),
    "esolm-b-0.125": (["method.name=esolm", "method.variant=B", "method.alpha0=0.125"],
                      "Eso-LM (B) alpha0=0.125"),
    "esolm-a-0.25": (["method.name=esolm", "method.variant=A", "method.alpha0=0.25"], "Eso-LM (A) alpha0=0.25"),
}
# the paper's ordering of likelihoods (LM1B, Table 1): AR best, then Eso-LM (B) as alpha0 falls from 1
PAPER_ORDER = ("ar", "esolm-b-0.125", "esolm-b-0.25", "esolm-b-0.5", "esolm-b-1")
LENGTH = 128

_lock = threading.Lock()


def esolm(*args: str, log_path: Path) -> None:
    """``esolm ARGS`` on one CPU thread (two jobs share the two cores)."""
    _esolm(*args, log_path=log_path, threads=1)


class Stages:
    """Wall seconds per stage, summed over launches, in ``OUT/stage_seconds.json`` (thread-safe)."""

    def __init__(self, out: Path):
        self.path = out / "stage_seconds.json"
        self.times = read_json(self.path) or {}

    def run(self, stage: str, fn, *a):
        t0 = time.perf_counter()
        r = fn(*a)
        with _lock:
            self.times[stage] = round(self.times.get(stage, 0.0) + time.perf_counter() - t0, 1)
            write_json(self.path, self.times)
        return r


# -- one (model, seed) job ---------------------------------------------------------------------------------------

def job_name(name: str, seed: int) -> str:
    return f"{name}-s{seed}"


def train(name: str, seed: int, args, out: Path) -> dict:
    job = job_name(name, seed)
    run_dir = out / "runs" / job
    fm = read_json(run_dir / "final_metrics.json")
    if fm is not None and fm.get("step") == args.steps:
        return fm
    esolm("train", "cpu-char", *MODELS[name][0], f"trainer.out_dir={run_dir}", f"trainer.max_steps={args.steps}",
          f"trainer.seed={seed}", f"trainer.ckpt_every={max(10, args.steps // 4)}", "trainer.keep_checkpoints=1",
          "trainer.val_every=0", "trainer.progress=false", "trainer.resume=auto",
          log_path=out / "logs" / f"train-{job}.log")
    fm = read_json(run_dir / "final_metrics.json")
    if fm is None or fm.get("step") != args.steps:
        raise RuntimeError(f"training {job} ended at step {fm and fm.get('step')} (expected {args.steps})")
    return fm


def export(name: str, seed: int, out: Path) -> Path:
    job = job_name(name, seed)
    model_dir = out / "models" / job
    if (model_dir / "model.safetensors").exists():
        return model_dir
    tmp = out / "models" / f".{job}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    esolm("export", str(out / "runs" / job / "checkpoints" / "last.ckpt"), str(tmp),
          log_path=out / "logs" / f"export-{job}.log")
    os.replace(tmp, model_dir)
    return model_dir


def evaluate(name: str, seed: int, args, out: Path) -> dict:
    """NELBO over the full validation split; for Eso-LM (B) the IW bound on the first sequences (a second
    call, which also reports the NELBO of that subset)."""
    job = job_name(name, seed)
    path = out / "eval" / f"{job}.json"
    if read_json(path) is None:
        esolm("eval", str(out / "models" / job), "--json", str(path), "--batch-size", "32", "--seed", str(seed),
              log_path=out / "logs" / f"eval-{job}.log")
    if name.startswith("esolm-b") and args.iw_k:
        ipath = out / "eval" / f"{job}.iw.json"
        if read_json(ipath) is None:
            esolm("eval", str(out / "models" / job), "--json", str(ipath), "--batch-size", str(args.iw_sequences),
                  "--max-batches", "1", "--seed", str(seed), "--iw-k", args.iw_k,
                  log_path=out / "logs" / f"eval-{job}.log")
    return read_json(path)


def run_job(name: str, seed: int, args, out: Path, stages: Stages) -> None:
    job = job_name(name, seed)
    fm = stages.run(f"train/{job}", train, name, seed, args, out)
    stages.run(f"export/{job}", export, name, seed, out)
    res = stages.run(f"eval/{job}", evaluate, name, seed, args, out)
    log(f"{job}: {bpc(res):.4f} bits/char after {fm['step']} steps ({fm.get('fit_seconds')} s of training)")


# -- frontier ----------------------------------------------------------------------------------------------------

def bd3_steps(steps: str, block: int) -> str:
    """BD3-LM's steps are per block: the same total number of denoising steps T is T x block / L per block."""
    per = sorted({min(block, max(1, round(int(t) * block / LENGTH))) for t in steps.split(",")})
    return ",".join(str(t) for t in per)


def frontier(args, out: Path, names: list[str]) -> dict | None:
    from esolm.evaluation.frontier import merge_parts

    fdir = out / "frontier"
    res = read_json(fdir / "frontier.json")
    if res is not None:
        return res
    judge = out / "models" / job_name("ar", args.judge_seed)
    seed = args.seeds[0]
    groups = [([n for n in names if not n.startswith("bd3lm")], args.frontier_steps)]
    groups += [([n], bd3_steps(args.frontier_steps, int(n.split("-")[1]))) for n in names if n.startswith("bd3lm")]
    parts = []
    for i, (group, steps) in enumerate(groups):
        part = out / "frontier-parts" / f"part{i}"
        if read_json(part / "frontier.json") is None:
            tmp = out / "frontier-parts" / f".part{i}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            specs = [f"{n}={out / 'models' / job_name(n, seed)}" for n in group]
            esolm("bench", "frontier", *specs, "--steps", steps, "--num-samples", str(args.num_samples),
                  "--seed", "0", "--judge", str(judge), "--judge-batch-size", "32", "--no-mauve",
                  "--device", "cpu", "--repeats", "2", "--out", str(tmp), log_path=out / "logs" / "frontier.log")
            shutil.rmtree(part, ignore_errors=True)
            os.replace(tmp, part)
        parts.append(read_json(part / "frontier.json"))
    per_block = {n: bd3_steps(args.frontier_steps, int(n.split("-")[1])) for n in names if n.startswith("bd3lm")}
    return merge_parts(parts, fdir, steps=args.frontier_steps, bd3lm_steps_per_block=per_block)


# -- report ------------------------------------------------------------------------------------------------------

def _row(res: dict) -> dict:
    if isinstance(res, dict) and "results" in res:
        res = res["results"]
    return res[0] if isinstance(res, list) else res


def bpc(res: dict) -> float:
    """Bits per character of an ``esolm eval --json`` result (one token = one character)."""
    return _row(res)["nelbo"] / LN2


def summary(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, sample standard deviation, min, max)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd, min(values), max(values)


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    m, sd, lo, hi = summary(values)
    return f"{m:.{digits}f} ± {sd:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def collect(out: Path, names: list[str], seeds: list[int]) -> dict:
    data = {}
    for n in names:
        d = {"bpc": [], "iw": {}, "iw_subset_bpc": [], "fit_seconds": [], "steps": set()}
        for s in seeds:
            job = job_name(n, s)
            res = read_json(out / "eval" / f"{job}.json")
            if res is None:
                continue
            d["bpc"].append(bpc(res))
            fm = read_json(out / "runs" / job / "final_metrics.json") or {}
            d["fit_seconds"].append(fm.get("fit_seconds", float("nan")))
            d["steps"].add(fm.get("step"))
            ires = read_json(out / "eval" / f"{job}.iw.json")
            if ires is not None:
                row = _row(ires)
                d["iw_subset_bpc"].append(row["nelbo"] / LN2)
                d["iw_sequences"] = row["sequences"]
                for k, v in row.get("iw", {}).items():
                    d["iw"].setdefault(int(k), []).append(v["nll"] / LN2 if "nll" in v else math.log2(v["perplexity"]))
        data[n] = d
    return data


def ordering_lines(data: dict) -> list[str]:
    means = {n: statistics.fmean(d["bpc"]) for n, d in data.items() if d["bpc"]}
    lines = []
    order = [n for n in PAPER_ORDER if n in means]
    if len(order) >= 2:
        got = " < ".join(f"{MODELS[n][1]} ({means[n]:.3f})" for n in sorted(order, key=means.get))
        ok = all(means[a] < means[b] for a, b in zip(order, order[1:]))
        lines.append(f"- Measured ordering of the mean bits/char: {got} -> the paper's ordering "
                     f"{'holds' if ok else 'does NOT fully hold'} on the means.")
        # per seed: does each seed show the ordering?
        seeds_ok = []
        for i in range(min(len(data[n]["bpc"]) for n in order)):
            seeds_ok.append(all(data[a]["bpc"][i] < data[b]["bpc"][i] for a, b in zip(order, order[1:])))
        lines.append(f"- Seed by seed: the full ordering holds in {sum(seeds_ok)} of {len(seeds_ok)} seeds.")
        for a, b in zip(order, order[1:]):
            gap = means[b] - means[a]
            worst = max(summary(data[a]["bpc"])[3] - summary(data[b]["bpc"])[2], 0.0)
            sep = "separated (ranges disjoint)" if summary(data[a]["bpc"])[3] < summary(data[b]["bpc"])[2] \
                else f"ranges overlap by {worst:.3f}"
            lines.append(f"  - {MODELS[a][1]} -> {MODELS[b][1]}: +{gap:.3f} bits/char, {sep}.")
    if "mdlm" in means and "esolm-b-1" in means:
        lines.append(f"- MDLM vs Eso-LM (B) alpha0=1: {means['mdlm']:.3f} vs {means['esolm-b-1']:.3f} bits/char "
                     "(the paper: alpha0 = 1 is MDLM's objective on Eso-LM (B)'s causal any-order attention, "
                     "somewhat worse than MDLM's bidirectional attention).")
    for n in ("bd3lm-4", "bd3lm-16", "esolm-a-0.25"):
        if n in means:
            lines.append(f"- {MODELS[n][1]}: {means[n]:.3f} bits/char.")
    return lines


def plot_bpc(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in data if data[n]["bpc"]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, n in enumerate(names):
        vals = data[n]["bpc"]
        ax.scatter([i] * len(vals), vals, color="tab:gray", s=14, zorder=2)
        m, sd, _, _ = summary(vals)
        ax.errorbar([i], [m], yerr=[sd], fmt="o", color="tab:blue", capsize=4, zorder=3)
    ax.set_xticks(range(len(names)), [MODELS[n][1].replace(" alpha0=", "\nα0=") for n in names], fontsize=7)
    ax.set_ylabel("validation bits / character (NELBO)")
    ax.set_title("cpu-char: every method, same data and budget (mean ± sd, dots = seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_iw(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for n, d in data.items():
        if not d["iw"]:
            continue
        ks = sorted(d["iw"])
        ms = [statistics.fmean(d["iw"][k]) for k in ks]
        ax.plot(ks, ms, marker="o", label=MODELS[n][1])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (orders)")
    ax.set_ylabel("IW bound, bits / character")
    ax.set_title("Importance-weighted bound vs K (mean over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def frontier_lines(fr: dict) -> list[str]:
    """The frontier table in bits/char of the samples under the judge, plus Pareto dominance."""
    pts = fr["points"]
    lines = ["| model | steps T | NFE | s / sample | judge bits/char | entropy |", "|---|---|---|---|---|---|"]
    for p in sorted(pts, key=lambda p: (p["label"], p["steps"] or 0)):
        jb = math.log2(p["gen_ppl"]) if p.get("gen_ppl") else float("nan")
        lines.append(f"| {p['description']} | {p['steps'] if p['steps'] is not None else '-'} | {p['nfe']} | "
                     f"{p['seconds_per_sample']:.4f} | {jb:.3f} | {p['entropy']:.3f} |")
    lines += ["", "Pareto dominance (an Eso-LM (B) point at no more seconds per sample and strictly fewer judge "
              "bits/char):", ""]
    others = [p for p in pts if p["method"] in ("mdlm", "bd3lm")]
    for lbl in sorted({p["label"] for p in pts if p["label"].startswith("esolm-b")}):
        mine = [p for p in pts if p["label"] == lbl]
        dom = [o for o in others if any(m["seconds_per_sample"] <= o["seconds_per_sample"]
                                        and m["gen_ppl"] < o["gen_ppl"] for m in mine)]
        names = ", ".join(sorted(f"{o['label']} T={o['steps']}" for o in dom)) or "none"
        lines.append(f"- {lbl}: dominates {len(dom)}/{len(others)} MDLM/BD3-LM points ({names})")
    return lines


def write_report(out: Path, names: list[str], args, command: str, report: bool) -> str:
    data = collect(out, names, args.seeds)
    ks = sorted({k for d in data.values() for k in d["iw"]})
    lines = ["# Character-level reproduction (METHOD.md section 7)", "",
             f"`cpu-char` preset: 2 x 128 DiT, L = {LENGTH}, characters (vocabulary 97) of the embedded Wikipedia "
             f"corpus; {args.steps} optimizer steps x 32 x {LENGTH} = {args.steps * 32 * LENGTH:,} training "
             f"characters per model, seeds {', '.join(map(str, args.seeds))}, EMA weights. Exact NELBO (an upper "
             "bound on the NLL) over the full validation split, in bits per character; mean ± sample standard "
             "deviation (min–max) over seeds.", "",
             "| model | seeds | train s (mean) | validation bits/char |", "|---|---|---|---|"]
    for n in names:
        d = data[n]
        fit = statistics.fmean(d["fit_seconds"]) if d["fit_seconds"] else float("nan")
        lines.append(f"| {MODELS[n][1]} | {len(d['bpc'])} | {fit:.0f} | {fmt(d['bpc'])} |")
    lines += ["", "## The paper's ordering", "",
              "Paper (LM1B, METHOD.md section 7): AR < Eso-LM (B) alpha0 = 0.125 < 0.25 < 0.5 < 1, MDLM close to "
              "alpha0 = 1.", ""]
    lines += ordering_lines(data)
    if ks:
        seqs = next((d.get("iw_sequences") for d in data.values() if d.get("iw_sequences")), "?")
        lines += ["", "## Importance-weighted bound vs K", "",
                  f"On the first {seqs} validation sequences (the same ones for every K and model); bits/char, mean ± "
                  "sd over seeds. NELBO = the bound the model is trained on (one random order per draw of masks).", "",
                  "| model | NELBO (subset) | " + " | ".join(f"IW K={k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        for n in names:
            d = data[n]
            if d["iw"]:
                lines.append(f"| {MODELS[n][1]} | {fmt(d['iw_subset_bpc'])} | "
                             + " | ".join(fmt(d["iw"].get(k, [])) for k in ks) + " |")
        for n in names:
            d = data[n]
            if len(d["iw"]) >= 2:
                ms = [statistics.fmean(d["iw"][k]) for k in ks]
                mono = all(a >= b - 1e-9 for a, b in zip(ms, ms[1:]))
                trend = "falls monotonically" if mono else "does NOT fall monotonically"
                lines.append(f"- {MODELS[n][1]}: {' -> '.join(f'{m:.3f}' for m in ms)} over K = "
                             f"{', '.join(map(str, ks))}: {trend} ({ms[0] - ms[-1]:+.3f} bits/char from K={ks[0]} "
                             f"to K={ks[-1]}).")
    fr = read_json(out / "frontier" / "frontier.json")
    if fr is not None:
        lines += ["", "## Speed-quality frontier", "",
                  f"`esolm bench frontier` of the seed-{args.seeds[0]} models, {fr['num_samples']} samples of "
                  f"{LENGTH} characters per point, top-p {fr['top_p']}, steps T = {fr['steps']} (BD3-LM: per block, "
                  f"{fr.get('bd3lm_steps_per_block')}, the same totals), one CPU thread. Quality: the NLL of the "
                  f"samples under the AR model of seed {args.judge_seed} (judge-free: trained here on the same "
                  "data; another seed than the AR model sampled), in bits/char, lower is better; unigram entropy "
                  "of the samples (nats) exposes repetitive collapse. Plot: `frontier_gen_ppl.png` (the judge's "
                  "per-character perplexity, 2^bits).", ""]
        lines += frontier_lines(fr)
    stages = read_json(out / "stage_seconds.json") or {}
    if stages:
        train_s = sum(v for k, v in stages.items() if k.startswith("train/"))
        lines += ["", f"Stage wall time summed over jobs and launches: {sum(stages.values()) / 3600:.2f} h "
                  f"(training {train_s / 3600:.2f} h; jobs ran {args.workers} at a time, one thread each)."]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    plot_bpc(data, out / "bpc.png")
    if ks:
        plot_iw(data, out / "iw.png")
    if report:
        import torch

        dest = ROOT / "benchmarks" / "results" / "reproduce_char"
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("bpc.png", "iw.png"):
            if (out / f).exists():
                shutil.copy2(out / f, dest / f)
        for f in ("frontier_gen_ppl.png", "frontier.csv", "frontier.json"):
            if (out / "frontier" / f).exists():
                shutil.copy2(out / "frontier" / f, dest / f)
        env = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        body = text.split("\n", 1)[1]
        (ROOT / "benchmarks" / "results" / "reproduce_char.md").write_text(
            f"# Character-level reproduction (METHOD.md section 7)\n\n"
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {env}.\n\nCommand:\n\n```\n{command}\n```\n\n"
            f"Plots and raw frontier data: `benchmarks/results/reproduce_char/`.\n{body}")
    return text


# -- main --------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/reproduce_char")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per model (the same for all)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--workers", type=int, default=2, help="jobs at a time (one CPU thread each)")
    ap.add_argument("--iw-k", default="1,4,16,64,256", help="IW orders for Eso-LM (B) ('' disables)")
    ap.add_argument("--iw-sequences", type=int, default=32, help="validation sequences for the IW bound")
    ap.add_argument("--frontier-steps", default="16,32,64,128")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--judge-seed", type=int, default=None, help="seed of the AR judge (default: the last seed)")
    ap.add_argument("--skip-frontier", action="store_true")
    ap.add_argument("--report", action="store_true",
                    help="also write benchmarks/results/reproduce_char.md and plots under benchmarks/results/")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.seeds or args.steps < 1 or args.workers < 1 or args.num_samples < 1:
        ap.error("--seeds must name a seed; --steps, --workers and --num-samples must be positive")
    args.judge_seed = args.seeds[-1] if args.judge_seed is None else args.judge_seed
    out = Path(args.out)
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    plan = read_json(out / "plan.json")
    if plan is not None and plan["steps"] != args.steps:
        ap.error(f"{out}/plan.json fixes {plan['steps']} steps; --steps {args.steps} differs (use another --out)")
    write_json(out / "plan.json", {"steps": args.steps, "preset": "cpu-char"})
    command = "python benchmarks/reproduce_char.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.time()
    stages = Stages(out)
    jobs = [(n, s) for s in args.seeds for n in names]  # seed-major: a complete first seed comes first
    log(f"{len(jobs)} jobs ({len(names)} models x {len(args.seeds)} seeds), {args.steps} steps each, "
        f"{args.workers} at a time")
    failures = []
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(run_job, n, s, args, out, stages): (n, s) for n, s in jobs}
        for fut, (n, s) in futures.items():
            try:
                fut.result()
            except RuntimeError as e:
                failures.append(f"{job_name(n, s)}: {e}")
                log(f"FAILED {job_name(n, s)}: {e}")
        write_report(out, names, args, command, report=False)
    if failures:
        raise SystemExit("failed jobs:\n" + "\n".join(failures))
    if not args.skip_frontier and "ar" in names:
        stages.run("frontier", frontier, args, out, names)
        log("frontier done")
    text = write_report(out, names, args, command, report=args.report)
    print(text)
    log(f"done in {(time.time() - started) / 60:.1f} min (this launch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
