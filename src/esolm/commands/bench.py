"""``esolm bench latency``: wall time of sampling, every method on one random-initialised network size.

(``esolm bench frontier``, the speed-quality sweep of trained models: :mod:`esolm.evaluation.frontier`.)

Each method decodes about one token per network call (NFE ~ L), as in the paper's latency table:

* ``esolm-b``: Eso-LM (B), alpha0 = 1, one token per step, KV cache (NFE = L);
* ``esolm-a``: Eso-LM (A), same schedule, uncached diffusion phase (NFE = L; optional, slow);
* ``mdlm``: MDLM first-hitting, one full bidirectional pass per token (NFE = L);
* ``bd3lm``: BD3-LM with block size 16, one token per in-block step, cached blocks (NFE = L);
* ``ar``: AR with a KV cache, starting from one BOS token (NFE = L - 1).

The networks are random (latency does not depend on the weights); diffusion models use the adaLN DiT,
AR the plain causal transformer, all with the same width, depth, heads and vocabulary. Batch size 1 by
default; no nucleus filtering. Every sampler runs the network's folded inference path
(``DiT.frozen_conditioning``: adaLN and LayerNorm weights folded into the linear layers), so an Eso-LM (B)
step and an AR step are the same operations on 2 and 1 tokens. A time is the wall time of the whole
``generate`` call (planning, sampling, copy to the host), best of ``--repeats`` interleaved runs. The
default size (2 layers x 128 hidden, 4 heads, vocabulary 1024) keeps MDLM at L = 2048 (2048 full passes
over 2048 tokens) to a few minutes on one CPU core; the paper's is 12 x 768 on a GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from esolm.commands import _args
from esolm.config import ModelConfig
from esolm.devices import resolve_device
from esolm.errors import UserError
from esolm.io import atomic_json, check_writable
from esolm.methods import as_method
from esolm.model.backbone import DiT

METHODS = {
    "esolm-b": ({"name": "esolm", "variant": "B", "alpha0": 1.0}, "first_hitting"),
    "esolm-a": ({"name": "esolm", "variant": "A", "alpha0": 1.0}, "first_hitting"),
    "mdlm": ({"name": "mdlm"}, "first_hitting"),
    "bd3lm": ({"name": "bd3lm", "block_size": 16}, "first_hitting"),
    "ar": ({"name": "ar"}, "auto"),
}
LABELS = {"esolm-b": "Eso-LM (B)", "esolm-a": "Eso-LM (A)", "mdlm": "MDLM", "bd3lm": "BD3-LM (L'=16)",
          "ar": "AR (KV cache)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    p = sub.add_parser("latency", help="sampling wall time per method and length (random networks)",
                       description=__doc__.splitlines()[0])
    p.set_defaults(_prog=p.prog)
    p.add_argument("--methods", type=_args.choice_list(tuple(METHODS)), default=["esolm-b", "mdlm", "bd3lm", "ar"],
                   help=f"comma-separated, from {', '.join(METHODS)} (default esolm-b,mdlm,bd3lm,ar)")
    p.add_argument("--lengths", type=_args.positive_int_list, default=[1024, 2048],
                   help="sequence lengths (default 1024,2048)")
    p.add_argument("--batch-size", type=_args.positive_int, default=1)
    p.add_argument("--hidden", type=_args.positive_int, default=128)
    p.add_argument("--layers", type=_args.positive_int, default=2)
    p.add_argument("--heads", type=_args.positive_int, default=4)
    p.add_argument("--vocab", type=_args.int_at_least(2), default=1024,
                   help="vocabulary size including the mask token (at least 2)")
    p.add_argument("--block-size", type=_args.positive_int, default=16, help="BD3-LM block size L'")
    p.add_argument("--repeats", type=_args.positive_int, default=3,
                   help="timed runs per cell, interleaved across methods; the best is reported (default 3)")
    p.add_argument("--max-repeat-seconds", type=_args.positive_float, default=60.0,
                   help="run a cell only once when its first run takes longer than this (default 60)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps ...")
    p.add_argument("--threads", type=_args.positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")

    f = sub.add_parser("frontier", help="sample quality against sampling time for trained models",
                       description="The speed-quality frontier: sample quality against sampling time "
                                   "(esolm.evaluation.frontier).")
    f.set_defaults(_prog=f.prog)
    f.add_argument("models", nargs="+", metavar="[LABEL=]MODEL",
                   help="trained model folders (AR, MDLM, BD3-LM, Eso-LM ...), optionally labelled")
    f.add_argument("--steps", type=_args.positive_int_list, default=[16, 32, 64, 128],
                   help="sampling steps T to sweep (comma-separated; default 16,32,64,128)")
    f.add_argument("--alpha0", type=_args.unit_interval_list, default=None,
                   help="sampling alpha0 values for Eso-LM models (comma-separated; default: the trained one)")
    f.add_argument("--num-samples", type=_args.positive_int, default=32)
    f.add_argument("--batch-size", type=_args.positive_int, default=None,
                   help="samples per batch (default: min(--num-samples, 64))")
    f.add_argument("--top-p", type=_args.top_p, default=0.9, help="nucleus filtering, in (0, 1] (1 disables)")
    f.add_argument("--sampler", default="auto")
    f.add_argument("--seed", type=_args.int_at_least(0), default=0)
    f.add_argument("--tokenizer", default=None, help="tokenizer for every model (default: saved with each)")
    f.add_argument("--judge", default=None,
                   help="judge LM for Gen PPL (default: smollm2, offline); an esolm AR model folder or checkpoint "
                        "gives the judge-free metric (NLL of the samples under an AR model trained here)")
    f.add_argument("--judge-context", type=_args.int_at_least(2), default=None)
    f.add_argument("--judge-batch-size", type=_args.positive_int, default=8)
    f.add_argument("--no-gen-ppl", action="store_true", help="skip generative perplexity")
    f.add_argument("--no-mauve", action="store_true", help="skip MAUVE")
    f.add_argument("--mauve-data", default=None,
                   help="reference text source, held-out split (default: each model's training source)")
    f.add_argument("--val-fraction", type=_args.open_fraction, default=None, help="default: the training recipe's")
    f.add_argument("--split-seed", type=int, default=None, help="default: the training recipe's")
    f.add_argument("--features", default=None, help="sentence-embedding folder (default: all-MiniLM-L6-v2)")
    f.add_argument("--no-warmup", action="store_true", help="time the first call of each model too")
    f.add_argument("--repeats", type=_args.positive_int, default=1,
                   help="draw each batch this many times (same samples) and report the fastest time")
    f.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N, mps ... (default: the available accelerator, else cpu)")
    f.add_argument("--out", default="frontier", help="output folder")


def _method(name: str, block_size: int):
    """The spec and sampler of benchmark entry ``name`` (BD3-LM gets ``block_size``)."""
    method, sampler = METHODS[name]
    if "block_size" in method:
        method = dict(method, block_size=block_size)
    return as_method(method), sampler


def build_model(name: str, length: int, hidden: int, layers: int, heads: int, vocab: int, device) -> DiT:
    """A random network of the benchmark size for ``name`` (zero-initialised weights made random)."""
    adaln = as_method(METHODS[name][0]).is_diffusion
    cfg = ModelConfig(vocab_size=vocab, mask_id=vocab - 1 if adaln else None, hidden_size=hidden,
                      cond_dim=min(128, hidden), n_layers=layers, n_heads=heads, length=length, dropout=0.0,
                      adaln=adaln)
    model = DiT(cfg)
    model.randomize_zero_init(0.02)
    return model.to(device).eval()


def _run_once(name: str, model: DiT, length: int, batch_size: int, block_size: int, seed: int
              ) -> tuple[float, int]:
    """Wall time of one ``generate`` call (planning, sampling, copy to host) and its NFE."""
    from esolm.sampling import generate
    from esolm.sampling.common import synchronize

    method, sampler = _method(name, block_size)
    synchronize(model.device)
    t0 = time.perf_counter()
    out = generate(model, method, num_samples=batch_size, max_length=length, seed=seed, sampler=sampler,
                   bos_id=0 if method.needs_start_token else None)
    return time.perf_counter() - t0, out.nfe


def run_latency(methods: list[str], lengths: list[int], batch_size: int = 1, hidden: int = 128,
                layers: int = 2, heads: int = 4, vocab: int = 1024, block_size: int = 16, repeats: int = 3,
                device: str = "cpu", seed: int = 0, max_repeat_seconds: float = 60.0,
                progress=None) -> list[dict]:
    """Time every (method, length); returns records {method, length, batch_size, nfe, seconds, ...}.

    Repeats are interleaved across methods (so a burst of load on a shared machine hits all methods
    alike) and ``seconds`` is the best of them; a cell whose first run takes longer than
    ``max_repeat_seconds`` is run once.
    """
    if batch_size < 1 or repeats < 1:
        raise UserError("batch size and repeats must be positive")
    if "bd3lm" in methods and any(n % block_size for n in lengths):
        raise UserError(f"every length must be a multiple of the BD3-LM block size {block_size}")
    dev = resolve_device(device)
    size = {"hidden": hidden, "layers": layers, "heads": heads, "vocab": vocab, "device": str(dev),
            "threads": torch.get_num_threads() if dev.type == "cpu" else None}
    models = {}
    for name in methods:
        torch.manual_seed(seed)
        models[name] = build_model(name, max(lengths), hidden, layers, heads, vocab, dev)
        _run_once(name, models[name], min(max(lengths), 2 * block_size), batch_size, block_size, seed)  # warm-up
    records = []
    for length in lengths:
        times: dict[str, list[float]] = {name: [] for name in methods}
        nfes: dict[str, int] = {}
        for r in range(repeats):
            for name in methods:
                if r and times[name][0] > max_repeat_seconds:
                    continue
                sec, nfes[name] = _run_once(name, models[name], length, batch_size, block_size, seed + r)
                times[name].append(sec)
        for name in methods:
            ts = sorted(times[name])
            rec = {"method": name, "length": length, "batch_size": batch_size, "nfe": nfes[name],
                   "seconds": ts[0], "median_seconds": ts[len(ts) // 2], "runs": len(ts)}
            rec.update(size)
            if "block_size" in METHODS[name][0]:
                rec["block_size"] = block_size
            records.append(rec)
            if progress is not None:
                progress(rec)
    return records


def ratios(records: list[dict]) -> list[dict]:
    """Eso-LM (B) speed-ups: MDLM / Eso-LM, BD3-LM / Eso-LM, Eso-LM / AR, per length and batch size."""
    by = {(r["method"], r["length"], r["batch_size"]): r["seconds"] for r in records}
    out = []
    for (m, n, b), s in sorted(by.items()):
        if m != "esolm-b":
            continue
        row = {"length": n, "batch_size": b}
        for other, key in (("mdlm", "mdlm_over_esolm"), ("bd3lm", "bd3lm_over_esolm")):
            if (other, n, b) in by:
                row[key] = by[(other, n, b)] / s
        if ("ar", n, b) in by:
            row["esolm_over_ar"] = s / by[("ar", n, b)]
        out.append(row)
    return out


def write_json(path: Path, data) -> None:
    atomic_json(path, data)


def print_table(records: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Sampling latency (seconds; NFE = network calls)")
    for col in ("method", "L", "batch", "NFE", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in records:
        table.add_row(LABELS.get(r["method"], r["method"]), str(r["length"]), str(r["batch_size"]),
                      str(r["nfe"]), f"{r['seconds']:.2f}")
    console = Console()
    console.print(table)
    for row in ratios(records):
        parts = [f"L={row['length']}"]
        if "mdlm_over_esolm" in row:
            parts.append(f"MDLM/Eso-LM(B) = {row['mdlm_over_esolm']:.1f}x")
        if "bd3lm_over_esolm" in row:
            parts.append(f"BD3-LM/Eso-LM(B) = {row['bd3lm_over_esolm']:.2f}x")
        if "esolm_over_ar" in row:
            parts.append(f"Eso-LM(B)/AR = {row['esolm_over_ar']:.2f}")
        console.print("  ".join(parts))


def _progress(rec: dict) -> None:
    print(f"{rec['method']:>8}  L={rec['length']:<5}  NFE={rec['nfe']:<5}  {rec['seconds']:.2f} s", flush=True)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``LABEL=PATH`` or ``PATH`` (label: the folder name)."""
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        if not label or not path:
            raise UserError(f"model spec must be PATH or LABEL=PATH, got {spec!r}")
        return label, path
    return Path(spec.rstrip("/")).name or spec, spec


def run_frontier_command(args) -> int:
    from esolm.evaluation import frontier, metrics
    from esolm.io import check_writable

    if not args.no_mauve and args.num_samples < 2:
        raise UserError("MAUVE needs --num-samples >= 2 (or pass --no-mauve)")
    models = [parse_model_spec(s) for s in args.models]
    labels = [lbl for lbl, _ in models]
    if len(set(labels)) != len(labels):
        raise UserError(f"model labels must be distinct, got {labels}; use LABEL=PATH")
    for _, path in models:
        if not Path(path).exists():
            raise UserError(f"model not found: {path}")
    device = resolve_device(args.device)
    out = check_writable(args.out, folder=True)
    judge = None if args.no_gen_ppl else metrics.Judge.load(
        args.judge, device=device, context=args.judge_context, batch_size=args.judge_batch_size)
    featurizer = None if args.no_mauve else metrics.Featurizer.load(args.features, device=device)
    points = frontier.run_frontier(models, steps=args.steps, alpha0s=args.alpha0, num_samples=args.num_samples,
                                   batch_size=args.batch_size, top_p=args.top_p, seed=args.seed,
                                   sampler=args.sampler, tokenizer_name=args.tokenizer, judge=judge,
                                   featurizer=featurizer, mauve_data=args.mauve_data,
                                   val_fraction=args.val_fraction, split_seed=args.split_seed, device=device,
                                   samples_dir=out / "samples", warmup=not args.no_warmup, repeats=args.repeats)
    meta = {"models": {lbl: str(p) for lbl, p in models}, "steps": args.steps, "alpha0": args.alpha0,
            "num_samples": args.num_samples, "batch_size": args.batch_size, "top_p": args.top_p,
            "seed": args.seed, "repeats": args.repeats, "device": str(device),
            "judge": judge.name if judge is not None else None}
    files = frontier.write_outputs(points, out, meta)
    print(frontier.to_markdown(points), end="")
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0


def run(args) -> int:
    if args.bench == "frontier":
        return run_frontier_command(args)
    if args.json is not None:
        check_writable(args.json)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        records = run_latency(args.methods, args.lengths, args.batch_size, args.hidden, args.layers,
                              args.heads, args.vocab, args.block_size, args.repeats, args.device, args.seed,
                              args.max_repeat_seconds, progress=_progress)
    finally:
        torch.set_num_threads(threads)
    print_table(records)
    if args.json is not None:
        write_json(args.json, records)
    return 0
