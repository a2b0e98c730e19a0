"""``esolm bench latency``: wall time of sampling, every method on one random-initialised network size.

(``esolm bench frontier``, the speed-quality sweep of trained models, lives in :mod:`esolm.evaluation.frontier`.)

Each method decodes about one token per network call (NFE ~ L), as in the paper's latency table:

* ``esolm-b``: Eso-LM (B), alpha0 = 1, one token per step, KV cache (NFE = L);
* ``esolm-a``: Eso-LM (A), same schedule, uncached diffusion phase (NFE = L; optional, slow);
* ``mdlm``: MDLM first-hitting, one full bidirectional pass per token (NFE = L);
* ``bd3lm``: BD3-LM with block size 16, one token per in-block step, cached blocks (NFE = L);
* ``ar``: AR with a KV cache, starting from one BOS token (NFE = L - 1).

The networks are random (latency does not depend on the weights); diffusion models use the adaLN DiT,
AR the plain causal transformer, all with the same width, depth, heads and vocabulary. Batch size 1 by
default; no nucleus filtering. A time is the wall time of the whole ``generate`` call (planning,
sampling, copy to the host), best of ``--repeats`` interleaved runs. The default size (2 layers x 128
hidden, 4 heads, vocabulary 1024) keeps MDLM at L = 2048 (2048 full passes over 2048 tokens) to a few
minutes on one CPU core; the paper's is 12 x 768 on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from esolm.config import ModelConfig
from esolm.errors import UserError
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


def _int_list(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _method_list(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(bad) or repr(text)}; choose from "
                                         f"{', '.join(METHODS)}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    p = sub.add_parser("latency", help="sampling wall time per method and length (random networks)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--methods", type=_method_list, default=["esolm-b", "mdlm", "bd3lm", "ar"],
                   help=f"comma-separated, from {', '.join(METHODS)} (default esolm-b,mdlm,bd3lm,ar)")
    p.add_argument("--lengths", type=_int_list, default=[1024, 2048], help="sequence lengths (default 1024,2048)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size including the mask token")
    p.add_argument("--block-size", type=int, default=16, help="BD3-LM block size L'")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per cell, interleaved across methods; the best is reported (default 3)")
    p.add_argument("--max-repeat-seconds", type=float, default=60.0,
                   help="run a cell only once when its first run takes longer than this (default 60)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, mps, ...)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    from esolm.evaluation import frontier  # the speed-quality frontier of trained models (its own module)

    f = sub.add_parser("frontier", help="sample quality against sampling time for trained models",
                       description=frontier.__doc__.splitlines()[0])
    frontier.add_arguments(f)


def build_model(name: str, length: int, hidden: int, layers: int, heads: int, vocab: int, device) -> DiT:
    """A random network of the benchmark size for ``name`` (zero-initialised weights made random)."""
    adaln = name != "ar"
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

    method, sampler = METHODS[name]
    if name == "bd3lm":
        method = dict(method, block_size=block_size)
    synchronize(model.device)
    t0 = time.perf_counter()
    out = generate(model, method, num_samples=batch_size, max_length=length, seed=seed, sampler=sampler,
                   bos_id=0 if name == "ar" else None)
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
    dev = torch.device(device)
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
            if name == "bd3lm":
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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


def run(args) -> int:
    if args.bench == "frontier":
        from esolm.evaluation import frontier

        return frontier.run(args)
    if args.bench != "latency":
        raise UserError(f"unknown benchmark {args.bench!r}")
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
