"""The speed-quality frontier (``esolm bench frontier``): sample quality against sampling time.

For a set of trained models (AR, MDLM, BD3-LM, Eso-LM at several alpha0) and a sweep of sampling
steps T, draw the same number of samples per point, time them, and score them with the metrics of
:mod:`esolm.evaluation.metrics`: generative perplexity under one judge LM (loaded once), MAUVE against held-out
text (features of the reference computed once per tokenizer) and unigram entropy (to expose
repetitive, low-perplexity collapse). Eso-LM models can also be sampled at alpha0 values other than
the trained one (``alpha0s``; the paper's best: train 0.25, sample 0.0625). The AR model has no step
count: it contributes a single point (NFE = L).

Outputs (:func:`write_outputs`, in one folder): ``frontier.csv``, ``frontier.md`` (a markdown table), ``frontier.json``,
``frontier_gen_ppl.png`` (Gen PPL vs seconds, log-log) and ``frontier_mauve.png`` (MAUVE vs seconds),
and (:func:`run_frontier`) the samples of every point as JSONL. Lower-left is better on the first plot, upper-left on
the second: the paper's Figure of Eso-LM's frontier against MDLM and BD3-LM.

Timings include only sampling (device-synchronised wall time reported by ``generate``); each model is
warmed up with one short untimed call first, and ``repeats=R`` keeps the fastest of R identical draws.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from esolm.devices import resolve_device
from esolm.evaluation import metrics
from esolm.evaluation.datasets import reference_texts, resolve_data
from esolm.evaluation.samples import JsonlWriter, SampleStats, sample_batches
from esolm.io import atomic_json, atomic_write, atomic_writer, load_model

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


def run_frontier(models: list[tuple[str, str]], *, steps: list[int], alpha0s: list[float] | None = None,
                 num_samples: int = 32, batch_size: int | None = None, top_p: float | None = 0.9, seed: int = 0,
                 sampler: str = "auto", tokenizer_name: str | None = None, judge: metrics.Judge | None = None,
                 featurizer: metrics.Featurizer | None = None, mauve_data: str | None = None,
                 val_fraction: float | None = None, split_seed: int | None = None, device=None,
                 samples_dir: Path, warmup: bool = True, repeats: int = 1,
                 log=print) -> list[FrontierPoint]:
    """Sample every (model, sampling alpha0, steps) point and score it; see the module docstring.

    ``models``: (label, path) pairs; ``judge``/``featurizer``: loaded metric models (None skips Gen PPL /
    MAUVE); ``samples_dir``: the folder where each point's samples are written as JSONL.
    """
    device = resolve_device(device)
    points: list[FrontierPoint] = []
    ref_features: dict[tuple[str, int, str], np.ndarray] = {}
    for label, path in models:
        loaded = load_model(path, tokenizer=tokenizer_name, device=device, require_tokenizer=True)
        model, method, tok = loaded.model, loaded.method, loaded.tokenizer
        train_a0 = method.alpha0 if method.takes_alpha0 else None
        a0_list = (alpha0s or [train_a0]) if method.takes_alpha0 else [None]
        step_list: list[int | None] = list(steps) if method.is_diffusion else [None]
        if warmup:
            for _ in sample_batches(model, method, tok, num_samples=1, steps=2 if method.is_diffusion else None,
                                    seed=seed):
                pass
        ref = None
        if featurizer is not None:
            data = resolve_data(loaded.data, mauve_data, val_fraction, split_seed)
            key = (tok.fingerprint, model.config.length, json.dumps(data, sort_keys=True))
            if key not in ref_features:
                ref_features[key] = featurizer(reference_texts(data, tok, model.config.length, num_samples))
            ref = ref_features[key]
        for a0 in a0_list:
            for t in step_list:
                draws = sample_batches(model, method, tok, num_samples=num_samples, batch_size=batch_size, steps=t,
                                       alpha0=a0, top_p=top_p, seed=seed, sampler=sampler, repeats=repeats)
                stats = SampleStats(entropy=True, judge=judge, featurizer=featurizer,
                                    reference_features=ref)
                a0_tag = f"-a{a0:g}" if a0 is not None else ""
                with JsonlWriter(Path(samples_dir) / f"{label}{a0_tag}-T{t or 'L'}.jsonl") as writer:
                    for batch in draws:
                        stats.add(batch)
                        writer.write(batch.rows)
                summary = stats.summary()
                p = FrontierPoint(label=label, description=method.label, method=method.name,
                                  train_alpha0=train_a0,
                                  alpha0=a0, steps=t, num_samples=stats.num_samples, nfe=stats.nfe,
                                  seconds=stats.seconds, seconds_per_sample=stats.seconds / stats.num_samples,
                                  gen_ppl=summary.get("gen_ppl"), mauve=summary.get("mauve"),
                                  entropy=summary["entropy"])
                points.append(p)
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
    with atomic_writer(path) as fh:
        fig.savefig(fh, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def write_outputs(points: list[FrontierPoint], out: Path, meta: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, text in (("frontier.csv", to_csv(points)), ("frontier.md", to_markdown(points))):
        files[name] = atomic_write(out / name, text)
    files["frontier.json"] = atomic_json(out / "frontier.json", {**meta, "points": [asdict(p) for p in points]})
    judge = meta.get("judge") or "judge"
    for metric, title in (("gen_ppl", f"Gen PPL ({judge}) vs sampling time"), ("mauve", "MAUVE vs sampling time")):
        f = plot(points, metric, out / f"frontier_{metric}.png", title)
        if f is not None:
            files[f.name] = f
    return files


def merge_parts(parts: list[dict], out: Path, **meta) -> dict:
    """One set of outputs (:func:`write_outputs`) in the folder ``out`` from the ``frontier.json`` of several
    runs (e.g. BD3-LM, whose steps count per block, run apart from the others): their points and models
    together, the first part's settings, then ``meta``. ``out`` is replaced as a whole, by one rename of a
    folder assembled beside it; returns the merged ``frontier.json``."""
    if not parts:
        raise ValueError("merge_parts needs at least one frontier.json")
    points = [FrontierPoint(**pt) for p in parts for pt in p["points"]]
    merged = {k: v for k, v in parts[0].items() if k != "points"}
    merged["models"] = {k: v for p in parts for k, v in p["models"].items()}
    merged.update(meta)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_outputs(points, tmp, merged)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return json.loads((out / "frontier.json").read_text())
