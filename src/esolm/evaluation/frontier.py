"""The speed-quality frontier (``esolm bench frontier``): sample quality against sampling time.

For a set of trained models (AR, MDLM, BD3-LM, Eso-LM at several alpha0) and a sweep of sampling
steps T, draw the same number of samples per point, time them, and score them with the metrics of
:mod:`esolm.evaluation.metrics`: generative perplexity under one judge LM (loaded once), MAUVE against held-out
text (features of the reference computed once per tokenizer) and unigram entropy (to expose
repetitive, low-perplexity collapse). Eso-LM models can also be sampled at alpha0 values other than
the trained one (``--alpha0``; the paper's best: train 0.25, sample 0.0625). The AR model has no step
count: it contributes a single point (NFE = L).

Outputs in ``--out``: ``frontier.csv``, ``frontier.md`` (a markdown table), ``frontier.json``,
``frontier_gen_ppl.png`` (Gen PPL vs seconds, log-log) and ``frontier_mauve.png`` (MAUVE vs seconds),
and the samples of every point under ``samples/``. Lower-left is better on the first plot, upper-left on
the second: the paper's Figure of Eso-LM's frontier against MDLM and BD3-LM.

Timings include only sampling (device-synchronised wall time reported by ``generate``); each model is
warmed up with one short untimed call first, and ``--repeats R`` keeps the fastest of R identical draws.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from esolm.errors import UserError
from esolm.evaluation import (
    default_device,
    load_model,
    parse_float_list,
    parse_int_list,
    reference_texts,
    resolve_data,
    write_json,
)

COLUMNS = ("label", "description", "method", "train_alpha0", "alpha0", "steps", "num_samples", "nfe", "seconds",
           "seconds_per_sample", "gen_ppl", "mauve", "entropy")


@dataclass
class FrontierPoint:
    label: str  # model label (one line per label and sampling alpha0 in the plots)
    description: str  # what the model is, e.g. "Eso-LM (B) alpha0=0.25"
    method: str
    train_alpha0: float | None
    alpha0: float | None  # sampling alpha0 (Eso-LM)
    steps: int | None  # None for AR
    num_samples: int
    nfe: int  # network calls summed over batches
    seconds: float  # sampling wall time for all samples
    seconds_per_sample: float
    gen_ppl: float | None
    mauve: float | None
    entropy: float

    @property
    def series(self) -> str:
        name = f"{self.label}: {self.description}"
        if self.method == "esolm" and self.alpha0 is not None and self.alpha0 != self.train_alpha0:
            return f"{name}, sampled at alpha0={self.alpha0:g}"
        return name


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``LABEL=PATH`` or ``PATH`` (label: the folder name)."""
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        if not label or not path:
            raise UserError(f"model spec must be PATH or LABEL=PATH, got {spec!r}")
        return label, path
    return Path(spec.rstrip("/")).name or spec, spec


def run_frontier(models: list[tuple[str, str]], *, steps: list[int], alpha0s: list[float] | None = None,
                 num_samples: int = 32, batch_size: int | None = None, top_p: float | None = 0.9, seed: int = 0,
                 sampler: str = "auto", tokenizer_name: str | None = None, judge=None, featurizer=None,
                 mauve_data: str | None = None, val_fraction: float | None = None,
                 split_seed: int | None = None, device=None, samples_dir: Path | None = None,
                 warmup: bool = True, repeats: int = 1, log=print) -> list[FrontierPoint]:
    """Sample every (model, sampling alpha0, steps) point and score it; see the module docstring."""
    from esolm.commands.sample import _write_jsonl, generate_samples
    from esolm.evaluation import metrics

    device = device or default_device()
    points: list[FrontierPoint] = []
    ref_features: dict[tuple[str, int], object] = {}
    for label, path in models:
        loaded = load_model(path, tokenizer_name, device=device)
        model, method, tok = loaded.model, loaded.method, loaded.tokenizer
        name = method.name
        train_a0 = getattr(method, "alpha0", None)
        a0_list = (alpha0s or [train_a0]) if name == "esolm" else [None]
        step_list: list[int | None] = [None] if name == "ar" else list(steps)
        if warmup:
            generate_samples(model, method, tok, num_samples=1, steps=2 if name != "ar" else None, seed=seed)
        ref = None
        if featurizer is not None:
            data = resolve_data(loaded, mauve_data, val_fraction, split_seed)
            key = (tok.fingerprint, model.config.length, json.dumps(data, sort_keys=True))
            if key not in ref_features:
                ref_features[key] = featurizer(reference_texts(data, tok, model.config.length, num_samples))
            ref = ref_features[key]
        for a0 in a0_list:
            for t in step_list:
                rows = generate_samples(model, method, tok, num_samples=num_samples, batch_size=batch_size,
                                        steps=t, alpha0=a0 if name == "esolm" else None, top_p=top_p,
                                        seed=seed, sampler=sampler, repeats=repeats)
                per_batch = {r["batch"]: r for r in rows}.values()
                nfe = sum(r["nfe"] for r in per_batch)
                secs = sum(r["seconds"] for r in per_batch)
                texts = [r["text"] for r in rows]
                gen_ppl = judge.perplexity(texts) if judge is not None else None
                mauve = metrics.mauve_score(featurizer(texts), ref) if featurizer is not None else None
                ent = metrics.unigram_entropy([r["token_ids"] for r in rows])
                p = FrontierPoint(label=label, description=method.label, method=name, train_alpha0=train_a0,
                                  alpha0=a0, steps=t, num_samples=len(rows), nfe=nfe, seconds=secs,
                                  seconds_per_sample=secs / len(rows), gen_ppl=gen_ppl, mauve=mauve, entropy=ent)
                points.append(p)
                if samples_dir is not None:
                    a0_tag = f"-a{a0:g}" if a0 is not None else ""
                    _write_jsonl(str(samples_dir / f"{label}{a0_tag}-T{t or 'L'}.jsonl"), rows)
                log(_fmt_point(p))
    return points


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _fmt_point(p: FrontierPoint) -> str:
    return (f"{p.series}: T={p.steps or '-'} NFE={p.nfe} {p.seconds:.2f}s gen_ppl={_fmt(p.gen_ppl, '.2f')} "
            f"mauve={_fmt(p.mauve, '.3f')} entropy={p.entropy:.3f}")


def to_csv(points: list[FrontierPoint]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for p in points:
        w.writerow({k: ("" if v is None else v) for k, v in asdict(p).items()})
    return buf.getvalue()


def to_markdown(points: list[FrontierPoint]) -> str:
    head = "| model | sample alpha0 | steps T | NFE | seconds | s/sample | Gen PPL | MAUVE | entropy |"
    lines = [head, "|" + "---|" * 9]
    for p in points:
        lines.append(f"| {p.label} | {_fmt(p.alpha0, 'g')} | {p.steps or '-'} | {p.nfe} | {p.seconds:.2f} | "
                     f"{p.seconds_per_sample:.4f} | {_fmt(p.gen_ppl, '.2f')} | {_fmt(p.mauve, '.3f')} | "
                     f"{p.entropy:.3f} |")
    return "\n".join(lines) + "\n"


def plot(points: list[FrontierPoint], metric: str, path: Path, title: str) -> Path | None:
    """One line per series (model, sampling alpha0) of ``metric`` against sampling seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series: dict[str, list[FrontierPoint]] = {}
    for p in points:
        if getattr(p, metric) is not None:
            series.setdefault(p.series, []).append(p)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, pts in series.items():
        pts = sorted(pts, key=lambda q: q.steps or 0)  # one line per step sweep
        xs, ys = [q.seconds for q in pts], [getattr(q, metric) for q in pts]
        ax.plot(xs, ys, marker="o" if len(pts) > 1 else "*", markersize=6 if len(pts) > 1 else 12, label=name)
        for q in pts:
            if q.steps is not None:
                ax.annotate(f"T={q.steps}", (q.seconds, getattr(q, metric)), textcoords="offset points",
                            xytext=(3, 3), fontsize=7)
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if metric == "gen_ppl":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("sampling time (s, all samples)")
    ax.set_ylabel({"gen_ppl": "Gen PPL (lower is better)", "mauve": "MAUVE (higher is better)"}[metric])
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_outputs(points: list[FrontierPoint], out: Path, meta: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, text in (("frontier.csv", to_csv(points)), ("frontier.md", to_markdown(points))):
        tmp = out / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
        files[name] = out / name
    files["frontier.json"] = write_json(out / "frontier.json", {**meta, "points": [asdict(p) for p in points]})
    judge = meta.get("judge") or "judge"
    for metric, title in (("gen_ppl", f"Gen PPL ({judge}) vs sampling time"), ("mauve", "MAUVE vs sampling time")):
        f = plot(points, metric, out / f"frontier_{metric}.png", title)
        if f is not None:
            files[f.name] = f
    return files


# ----------------------------------------------------------------------------------------------------------
# CLI (wired as ``esolm bench frontier``)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="[LABEL=]MODEL",
                   help="trained model folders (AR, MDLM, BD3-LM, Eso-LM ...), optionally labelled")
    p.add_argument("--steps", default="16,32,64,128", help="sampling steps T to sweep (comma-separated)")
    p.add_argument("--alpha0", default=None,
                   help="sampling alpha0 values for Eso-LM models (comma-separated; default: the trained one)")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: all at once)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus filtering (1 disables)")
    p.add_argument("--sampler", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer for every model (default: saved with each)")
    p.add_argument("--judge", default=None, help="judge LM for Gen PPL (default: smollm2, offline)")
    p.add_argument("--judge-context", type=int, default=None)
    p.add_argument("--judge-batch-size", type=int, default=8)
    p.add_argument("--no-gen-ppl", action="store_true", help="skip generative perplexity")
    p.add_argument("--no-mauve", action="store_true", help="skip MAUVE")
    p.add_argument("--mauve-data", default=None,
                   help="reference text source, held-out split (default: each model's training source)")
    p.add_argument("--val-fraction", type=float, default=None, help="default: the training recipe's")
    p.add_argument("--split-seed", type=int, default=None, help="default: the training recipe's")
    p.add_argument("--features", default=None, help="sentence-embedding folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--no-warmup", action="store_true", help="time the first call of each model too")
    p.add_argument("--repeats", type=int, default=1,
                   help="draw each batch this many times (same samples) and report the fastest time")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="frontier", help="output folder")


def run(args) -> int:
    from esolm.evaluation import metrics

    steps = parse_int_list(args.steps, "--steps")
    alpha0s = parse_float_list(args.alpha0, "--alpha0") if args.alpha0 else None
    for name in ("num_samples", "batch_size", "judge_context", "judge_batch_size", "repeats"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.no_mauve and args.num_samples < 2:
        raise UserError("MAUVE needs --num-samples >= 2 (or pass --no-mauve)")
    models = [parse_model_spec(s) for s in args.models]
    labels = [lbl for lbl, _ in models]
    if len(set(labels)) != len(labels):
        raise UserError(f"model labels must be distinct, got {labels}; use LABEL=PATH")
    for _, path in models:
        if not Path(path).exists():
            raise UserError(f"model not found: {path}")
    device = args.device or default_device()
    judge = None if args.no_gen_ppl else metrics.Judge.load(
        args.judge, device=device, context=args.judge_context, batch_size=args.judge_batch_size)
    featurizer = None if args.no_mauve else metrics.Featurizer.load(args.features, device=device)
    out = Path(args.out)
    points = run_frontier(models, steps=steps, alpha0s=alpha0s, num_samples=args.num_samples,
                          batch_size=args.batch_size, top_p=None if args.top_p == 1.0 else args.top_p,
                          seed=args.seed, sampler=args.sampler, tokenizer_name=args.tokenizer, judge=judge,
                          featurizer=featurizer, mauve_data=args.mauve_data, val_fraction=args.val_fraction,
                          split_seed=args.split_seed, device=device, samples_dir=out / "samples",
                          warmup=not args.no_warmup, repeats=args.repeats)
    meta = {"models": {lbl: str(p) for lbl, p in models}, "steps": steps, "alpha0": alpha0s,
            "num_samples": args.num_samples, "batch_size": args.batch_size, "top_p": args.top_p,
            "seed": args.seed, "repeats": args.repeats, "device": str(device),
            "judge": judge.name if judge is not None else None}
    files = write_outputs(points, out, meta)
    print(to_markdown(points), end="")
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0
