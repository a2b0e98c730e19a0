"""CPU-scale reproduction of the paper's comparison (METHOD.md section 7), end to end and resumable.

One model size (the ``cpu-small`` preset: 4 x 128 DiT, L = 128, the shipped 8k BPE, the embedded Wikipedia
corpus) and one token budget for every model: AR, MDLM, BD3-LM L'=4 and L'=16, and Eso-LM (B) at
alpha0 in {1, 0.5, 0.25, 0.125} (batch_split left to the method's default: 1 at alpha0 = 1, else 0.5).
Same seed, same data stream, same number of optimizer steps (hence tokens) for every model.

Stages, each skipped when its result already exists (so re-running the same command resumes):

1. plan      ``--steps N``, or ``--minutes-per-model M``: a short probe run of the slowest model (BD3-LM L'=4)
             measures steps/minute and fixes N; written to ``OUT/plan.json`` and reused afterwards.
2. train     ``esolm train cpu-small method...=.. trainer.max_steps=N`` into ``OUT/runs/NAME`` (an
             interrupted run resumes exactly from ``last.ckpt``: trainer.resume=auto).
3. export    ``esolm export OUT/runs/NAME/checkpoints/last.ckpt OUT/models/NAME`` (EMA weights).
4. eval      ``esolm eval OUT/models/NAME --json OUT/eval/NAME.json``: exact NELBO over the full validation
             split, plus the importance-weighted bound with ``--iw-k`` orders for Eso-LM (B).
5. frontier  ``esolm bench frontier`` over AR, MDLM, BD3-LM L'=16 and the Eso-LM (B) models: Gen PPL
             under the SmolLM2 judge and MAUVE against held-out text vs sampling seconds, over
             ``--frontier-steps``.
6. report    ``OUT/table.md`` and, with ``--report``, ``benchmarks/results/reproduce_cpu.md`` plus copies of
             the table and plots under ``benchmarks/results/reproduce_cpu/``.

Every stage runs the ``esolm`` command line in a subprocess (one process per model, so memory is returned
and a crash stays local); results are JSON files written atomically.

    python benchmarks/reproduce_cpu.py --steps 240 --frontier-steps 16,64,128 --num-samples 16 --report
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers
from _runs import ROOT, esolm, log, read_json, write_json  # noqa: E402

# name -> (method overrides, description); the paper's ordering is AR < a0=0.125 < 0.25 < 0.5 < 1 (~ MDLM).
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
}
FRONTIER_MODELS = ("ar", "mdlm", "bd3lm-16", "esolm-b-1", "esolm-b-0.5", "esolm-b-0.25", "esolm-b-0.125")
PAPER_ORDER = ("ar", "esolm-b-0.125", "esolm-b-0.25", "esolm-b-0.5", "esolm-b-1")  # increasing perplexity
PROBE_MODEL = "bd3lm-4"  # the slowest training step of the set
PROBE_STEPS = 20


def train_args(name: str, run_dir: Path, steps: int, warmup: int, seed: int, ckpt_every: int) -> list[str]:
    return ["train", "cpu-small", *MODELS[name][0], f"trainer.out_dir={run_dir}", f"trainer.max_steps={steps}",
            f"optim.warmup_steps={warmup}", f"trainer.seed={seed}", f"trainer.ckpt_every={ckpt_every}",
            "trainer.keep_checkpoints=1", "trainer.val_every=0", "trainer.progress=false",
            "trainer.resume=auto"]


# -- stages -----------------------------------------------------------------------------------------------------

def plan(args, out: Path) -> dict:
    """Fix the step budget once (``OUT/plan.json``); a re-run reuses it so every model sees the same tokens."""
    p = read_json(out / "plan.json")
    if p is not None:
        if args.steps is not None and args.steps != p["steps"]:
            raise SystemExit(f"{out}/plan.json fixes {p['steps']} steps; --steps {args.steps} differs "
                             "(use another --out)")
        return p
    if args.steps is not None:
        p = {"steps": args.steps, "source": "--steps"}
    else:
        probe = out / "probe"
        shutil.rmtree(probe, ignore_errors=True)
        a = train_args(PROBE_MODEL, probe, PROBE_STEPS, 1, args.seed, 0)
        t0 = time.perf_counter()
        esolm(*a, log_path=out / "logs" / "probe.log")
        wall = time.perf_counter() - t0
        fit = read_json(probe / "final_metrics.json")["fit_seconds"]
        per_step = fit / PROBE_STEPS
        overhead = max(0.0, wall - fit)
        steps = max(10, int((args.minutes_per_model * 60 - overhead) / per_step))
        p = {"steps": steps, "source": f"--minutes-per-model {args.minutes_per_model}",
             "probe": {"model": PROBE_MODEL, "steps": PROBE_STEPS, "fit_seconds": fit, "wall_seconds": wall,
                       "steps_per_minute": 60 / per_step}}
        shutil.rmtree(probe, ignore_errors=True)
    p["warmup_steps"] = min(200, max(1, p["steps"] // 10))
    p["tokens_per_model"] = p["steps"] * 32 * 128
    write_json(out / "plan.json", p)
    log(f"plan: {p}")
    return p


def train(name: str, args, out: Path, p: dict) -> dict:
    run_dir = out / "runs" / name
    fm = read_json(run_dir / "final_metrics.json")
    if fm is not None and fm.get("step") == p["steps"]:
        return fm
    ckpt_every = max(10, p["steps"] // 8)
    t0 = time.perf_counter()
    esolm(*train_args(name, run_dir, p["steps"], p["warmup_steps"], args.seed, ckpt_every),
          log_path=out / "logs" / f"train-{name}.log")
    fm = read_json(run_dir / "final_metrics.json")
    if fm is None or fm.get("step") != p["steps"]:
        raise SystemExit(f"training {name} ended at step {fm and fm.get('step')} (expected {p['steps']})")
    fm["wall_seconds_last_launch"] = round(time.perf_counter() - t0, 1)
    write_json(run_dir / "final_metrics.json", fm)
    return fm


def export(name: str, out: Path) -> Path:
    model_dir = out / "models" / name
    if (model_dir / "model.safetensors").exists():
        return model_dir
    tmp = out / "models" / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    esolm("export", str(out / "runs" / name / "checkpoints" / "last.ckpt"), str(tmp),
          log_path=out / "logs" / f"export-{name}.log")
    os.replace(tmp, model_dir)
    return model_dir


def evaluate(name: str, args, out: Path) -> dict:
    """NELBO over the full validation split; for Eso-LM (B) also the IW bound (optionally on the first
    ``--iw-max-batches`` batches only, in a second call that reports the NELBO of that subset too)."""
    path = out / "eval" / f"{name}.json"
    res = read_json(path)
    if res is None:
        a = ["eval", str(out / "models" / name), "--json", str(path), "--batch-size", "16",
             "--seed", str(args.seed)]
        if name.startswith("esolm-b") and args.iw_k and args.iw_max_batches is None:
            a += ["--iw-k", args.iw_k]
        esolm(*a, log_path=out / "logs" / f"eval-{name}.log")
        res = read_json(path)
    if name.startswith("esolm-b") and args.iw_k and args.iw_max_batches is not None:
        ipath = out / "eval" / f"{name}.iw.json"
        if read_json(ipath) is None:
            esolm("eval", str(out / "models" / name), "--json", str(ipath), "--batch-size", "16",
                  "--seed", str(args.seed), "--iw-k", args.iw_k, "--max-batches", str(args.iw_max_batches),
                  log_path=out / "logs" / f"eval-{name}.log")
    return res


def bd3_steps(steps: str, block: int, length: int = 128) -> str:
    """BD3-LM's ``steps`` count per block; the same total number of denoising steps T over the sequence
    is T x block / L per block (at least 1, at most the block size)."""
    per = sorted({min(block, max(1, round(int(t) * block / length))) for t in steps.split(",")})
    return ",".join(str(t) for t in per)


def frontier(args, out: Path, names: list[str]) -> dict | None:
    """``esolm bench frontier`` once for the models whose ``steps`` is global (AR, MDLM, Eso-LM) and once for
    BD3-LM (``steps`` per block, mapped from the same totals); the points are merged into one set of outputs
    with :func:`esolm.evaluation.frontier.write_outputs`."""
    from esolm.evaluation.frontier import merge_parts

    fdir = out / "frontier"
    res = read_json(fdir / "frontier.json")
    if res is not None:
        return res
    groups = [([n for n in names if not n.startswith("bd3lm")], args.frontier_steps)]
    groups += [([n], bd3_steps(args.frontier_steps, int(n.split("-")[1]))) for n in names if n.startswith("bd3lm")]
    parts = []
    for i, (group, steps) in enumerate(groups):
        if not group:
            continue
        part = out / "frontier-parts" / f"part{i}"
        if read_json(part / "frontier.json") is None:
            tmp = out / "frontier-parts" / f".part{i}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            specs = [f"{n}={out / 'models' / n}" for n in group]
            esolm("bench", "frontier", *specs, "--steps", steps, "--num-samples", str(args.num_samples),
                  "--seed", str(args.seed), "--out", str(tmp), log_path=out / "logs" / "frontier.log")
            shutil.rmtree(part, ignore_errors=True)
            os.replace(tmp, part)
        parts.append(read_json(part / "frontier.json"))
    per_block = {n: bd3_steps(args.frontier_steps, int(n.split("-")[1])) for n in names if n.startswith("bd3lm")}
    return merge_parts(parts, fdir, steps=args.frontier_steps, bd3lm_steps_per_block=per_block)


# -- report -----------------------------------------------------------------------------------------------------

def _eval_row(res: dict) -> dict:
    """The first (only) dataset of an ``esolm eval --json`` file."""
    if isinstance(res, dict) and "results" in res:
        res = res["results"]
    if isinstance(res, list):
        res = res[0]
    return res


def _ppl(res: dict | None) -> float | None:
    return None if res is None else _eval_row(res)["perplexity"]


def dominance(points: list[dict]) -> list[str]:
    """Per Eso-LM (B) model: the MDLM / BD3-LM points it dominates (<= seconds, strictly better metric)."""
    lines = []
    esos = sorted({p["label"] for p in points if p["method"] == "esolm"})
    others = [p for p in points if p["method"] in ("mdlm", "bd3lm") and p.get("gen_ppl") is not None]
    for lbl in esos:
        mine = [p for p in points if p["label"] == lbl and p.get("gen_ppl") is not None]
        for metric, better in (("gen_ppl", lambda a, b: a < b), ("mauve", lambda a, b: a > b)):
            cand = [o for o in others if o.get(metric) is not None]
            dom = [o for o in cand if any(m["seconds"] <= o["seconds"] and m.get(metric) is not None
                                          and better(m[metric], o[metric]) for m in mine)]
            names = ", ".join(sorted(f"{o['label']} T={o['steps']}" for o in dom)) or "none"
            lines.append(f"{lbl} ({metric}): dominates {len(dom)}/{len(cand)} MDLM/BD3-LM points "
                         f"({names})")
    return lines


def write_table(out: Path, names: list[str], p: dict, ks: list[int], started: float | None) -> str:
    lines = ["# CPU-scale reproduction: validation perplexity", "",
             f"cpu-small preset (4 x 128 DiT, L = 128, 8k BPE, embedded Wikipedia), {p['steps']} optimizer steps "
             f"x 32 x 128 = {p['tokens_per_model']:,} training tokens per model, seed as given, cosine schedule "
             f"with {p['warmup_steps']} warmup steps; EMA weights. Exact NELBO over the full validation split "
             "(upper bound on perplexity); IW-K = importance-weighted bound with K orders (Eso-LM (B)).", "",
             "| model | train steps | train s | NELBO nats/tok | NELBO ppl | " + " | ".join(f"IW-{k} ppl" for k in ks)
             + " |", "|---|---|---|---|---|" + "---|" * len(ks)]
    ppl, iw, iw_note = {}, {}, {}
    for n in names:
        fm = read_json(out / "runs" / n / "final_metrics.json") or {}
        res = read_json(out / "eval" / f"{n}.json")
        row = _eval_row(res) if res else None
        ppl[n] = row["perplexity"] if row else None
        ires = read_json(out / "eval" / f"{n}.iw.json")
        irow = _eval_row(ires) if ires else row
        iw[n] = {int(k): v["perplexity"] for k, v in (irow or {}).get("iw", {}).items()}
        if ires:
            iw_note[n] = (irow["sequences"], irow["tokens"], irow["perplexity"])
        cells = [MODELS[n][1], str(fm.get("step", "-")), f"{fm['fit_seconds']:.0f}" if "fit_seconds" in fm else "-",
                 f"{row['nelbo']:.4f}" if row else "-", f"{row['perplexity']:.2f}" if row else "-"]
        cells += [f"{iw[n][k]:.2f}" if k in iw[n] else "-" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    for n, (seqs, toks, sub) in iw_note.items():
        lines.append(f"\n{MODELS[n][1]}: IW bound on the first {seqs} validation sequences ({toks:,} tokens; "
                     f"NELBO ppl on that subset {sub:.2f}).")
    lines += ["", "## Paper's ordering", "",
              "Paper (LM1B, METHOD.md section 7): AR < Eso-LM (B) alpha0 = 0.125 < 0.25 < 0.5 < 1, MDLM close to "
              "alpha0 = 1; perplexity falls monotonically as alpha0 falls toward AR.", ""]
    order = [n for n in PAPER_ORDER if ppl.get(n) is not None]
    if len(order) >= 2:
        ok = all(ppl[a] < ppl[b] for a, b in zip(order, order[1:]))
        got = " < ".join(MODELS[n][1] for n in sorted(order, key=lambda n: ppl[n]))
        lines.append(f"- Measured NELBO ordering: {got} -> paper's ordering "
                     f"{'holds' if ok else 'does NOT fully hold'}.")
    if ppl.get("mdlm") and ppl.get("esolm-b-1"):
        r = ppl["mdlm"] / ppl["esolm-b-1"]
        lines.append(f"- MDLM / Eso-LM (B) alpha0=1 perplexity ratio: {r:.3f} (paper: 31.78 / 36.12 = 0.880 NELBO).")
    for n in names:
        if len(iw[n]) >= 2:
            vals = [iw[n][k] for k in sorted(iw[n])]
            mono = all(a >= b for a, b in zip(vals, vals[1:]))
            lines.append(f"- {MODELS[n][1]}: IW bound {' -> '.join(f'{v:.2f}' for v in vals)} over K = "
                         f"{', '.join(str(k) for k in sorted(iw[n]))}: {'falls' if mono else 'does NOT fall'} "
                         "with K.")
    fr = read_json(out / "frontier" / "frontier.json")
    if fr is not None:
        lines += ["", "## Speed-quality frontier", "",
                  f"`esolm bench frontier`, {fr['num_samples']} samples per point, steps {fr['steps']}, top-p "
                  f"{fr['top_p']}, judge {fr['judge']}; BD3-LM steps T are per block "
                  f"({fr.get('bd3lm_steps_per_block')}: the same total number of steps); plots "
                  "`frontier_gen_ppl.png`, `frontier_mauve.png`.", ""]
        lines += (out / "frontier" / "frontier.md").read_text().rstrip().splitlines()
        lines += ["", "Pareto dominance (an Eso-LM point at no more seconds and a strictly better metric):", ""]
        lines += [f"- {s}" for s in dominance(fr["points"])]
    stages = read_json(out / "stage_seconds.json") or {}
    if started is not None and stages:
        lines += ["", f"Total stage time over all launches: {sum(stages.values()) / 60:.1f} min "
                  f"(training {sum(v for k, v in stages.items() if k.startswith('train/')) / 60:.1f} min)."]
    text = "\n".join(lines) + "\n"
    tmp = out / ".table.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "table.md")
    return text


def write_report(out: Path, command: str, table: str, total: dict) -> None:
    dest = ROOT / "benchmarks" / "results" / "reproduce_cpu"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "table.md", dest / "table.md")
    for f in ("frontier_gen_ppl.png", "frontier_mauve.png", "frontier.csv"):
        if (out / "frontier" / f).exists():
            shutil.copy2(out / "frontier" / f, dest / f)
    import torch

    env = (f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads")
    body = table.split("\n", 1)[1]
    text = (f"# CPU-scale reproduction (METHOD.md section 7)\n\n"
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {env}.\n\n"
            f"Command:\n\n```\n{command}\n```\n\n"
            f"Stage wall times (all launches, seconds): {json.dumps(total)}.\n\n"
            "Copies of the table and the frontier plots: `benchmarks/results/reproduce_cpu/`.\n"
            f"{body}")
    path = ROOT / "benchmarks" / "results" / "reproduce_cpu.md"
    tmp = path.with_name(".reproduce_cpu.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- main -------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/reproduce_cpu")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps per model (same for all)")
    budget.add_argument("--minutes-per-model", type=float, default=None,
                        help="measure steps/minute of the slowest model and fix the step budget from it")
    ap.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--iw-k", default="1,4,16", help="IW orders for Eso-LM (B) ('' disables)")
    ap.add_argument("--iw-max-batches", type=int, default=None,
                    help="IW bound on the first N validation batches of 16 only (default: the full split)")
    ap.add_argument("--frontier-steps", default="16,64,128")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--skip-frontier", action="store_true")
    ap.add_argument("--report", action="store_true",
                    help="also write benchmarks/results/reproduce_cpu.md and copies under benchmarks/results/")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.steps is None and args.minutes_per_model is None:
        args.minutes_per_model = 4.0
    if args.steps is not None and args.steps < 1 or args.num_samples < 2:
        ap.error("--steps must be positive and --num-samples at least 2")
    ks = [int(k) for k in args.iw_k.split(",") if k.strip()] if args.iw_k else []
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/reproduce_cpu.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.time()
    times = read_json(out / "stage_seconds.json") or {}

    def timed(stage: str, fn, *a):
        t0 = time.perf_counter()
        r = fn(*a)
        times[stage] = round(times.get(stage, 0.0) + time.perf_counter() - t0, 1)
        write_json(out / "stage_seconds.json", times)
        return r

    p = timed("plan", plan, args, out)
    log(f"{p['steps']} steps per model ({p['tokens_per_model']:,} tokens), models: {', '.join(names)}")
    for n in names:
        fm = timed(f"train/{n}", train, n, args, out, p)
        log(f"trained {n}: step {fm['step']}, fit {fm.get('fit_seconds')} s")
        timed(f"export/{n}", export, n, out)
        res = timed(f"eval/{n}", evaluate, n, args, out)
        row = _eval_row(res)
        log(f"eval {n}: NELBO ppl {row['perplexity']:.2f}"
            + "".join(f", IW-{k} {v['perplexity']:.2f}" for k, v in row.get("iw", {}).items()))
        write_table(out, names, p, ks, None)
    fnames = [n for n in FRONTIER_MODELS if n in names]
    if not args.skip_frontier and fnames:
        timed("frontier", frontier, args, out, fnames)
        log("frontier done")
    table = write_table(out, names, p, ks, started)
    if args.report:
        write_report(out, command, table, times)
    print(table)
    log(f"done in {(time.time() - started) / 60:.1f} min (this launch); total stages {sum(times.values()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
