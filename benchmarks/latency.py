"""Sampling latency of Eso-LM (B) against MDLM, BD3-LM (L' = 16) and AR (the paper's Table 11, on a CPU).

Writes ``benchmarks/results/latency.json`` (the records of ``esolm bench latency``) and ``latency.md``.

Main table: every method on one random network (2 layers x 128 hidden, 4 heads, vocabulary 1024),
L = 1024 and 2048, batch 1, NFE ~ L, one CPU thread. The network is small so that MDLM (L full passes
over L tokens) finishes in minutes. A second table repeats the cached methods on a wider network
(6 layers x 384 hidden, vocabulary 4096), where per-call overheads weigh less.

    .venv/bin/python benchmarks/latency.py [--device cpu] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from esolm.commands.bench import LABELS, ratios, run_latency, write_json

RESULTS = Path(__file__).resolve().parent / "results"
MAIN = dict(hidden=128, layers=2, heads=4, vocab=1024)
WIDE = dict(hidden=384, layers=6, heads=6, vocab=4096)
GOALS = "goals: MDLM/Eso-LM(B) >= 20x at L=1024 and >= 40x at L=2048; BD3-LM/Eso-LM(B) >= 2x at L=2048; " \
        "Eso-LM(B)/AR <= 1.10"


def table(records: list[dict]) -> list[str]:
    lines = ["| method | L | batch | NFE | seconds (best) | median | runs |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['length']} | {r['batch_size']} | {r['nfe']} | "
                     f"{r['seconds']:.2f} | {r['median_seconds']:.2f} | {r['runs']} |")
    return lines


def ratio_lines(records: list[dict]) -> list[str]:
    lines = ["| L | MDLM / Eso-LM(B) | BD3-LM / Eso-LM(B) | Eso-LM(B) / AR |", "|---|---|---|---|"]
    def fmt(row, key, unit="x"):
        return f"{row[key]:.2f}{unit}" if key in row else "-"

    for row in ratios(records):
        lines.append(f"| {row['length']} | {fmt(row, 'mdlm_over_esolm')} | {fmt(row, 'bd3lm_over_esolm')} | "
                     f"{fmt(row, 'esolm_over_ar', '')} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the machine is shared)")
    ap.add_argument("--quick", action="store_true", help="L = 256, 512 only (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [256, 512] if args.quick else [1024, 2048]

    def progress(r):
        print(f"{r['method']:>8} {r['hidden']}x{r['layers']} L={r['length']:<5} NFE={r['nfe']:<5} "
              f"{r['seconds']:.2f} s", flush=True)

    t0 = time.time()
    main_records = run_latency(["esolm-b", "mdlm", "bd3lm", "ar"], lengths, batch_size=1, repeats=3,
                               device=args.device, max_repeat_seconds=20.0, progress=progress, **MAIN)
    wide_records = run_latency(["esolm-b", "bd3lm", "ar"], lengths, batch_size=1, repeats=3,
                               device=args.device, max_repeat_seconds=20.0, progress=progress, **WIDE)
    elapsed = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "latency.json", main_records + wide_records)

    dev = main_records[0]["device"]
    md = [
        "# Sampling latency (batch 1, NFE ~ L)",
        "",
        f"Produced by `benchmarks/latency.py` ({elapsed / 60:.1f} min) on {dev} "
        f"({platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}; "
        "the machine is shared, so times are the best of up to 3 runs interleaved across methods; "
        "runs longer than 20 s are run once).",
        "Random networks; diffusion methods use the adaLN DiT, AR the plain causal transformer. Eso-LM (B): "
        "alpha0 = 1, one token per step, KV cache. MDLM: first-hitting (one full bidirectional pass per "
        "token). BD3-LM: block size 16, one token per in-block step, cached blocks. AR: KV cache from one BOS "
        "token. Every method runs the folded inference path (adaLN and LayerNorm weights folded into the "
        "linear layers once per sample: an Eso-LM (B) step is an AR step on 2 tokens, the last layer on 1). "
        "Times are wall times of `esolm.sampling.generate`.",
        "",
        f"## All methods: {MAIN['layers']} layers x {MAIN['hidden']} hidden, {MAIN['heads']} heads, "
        f"vocabulary {MAIN['vocab']}",
        "",
        *table(main_records),
        "",
        *ratio_lines(main_records),
        "",
        GOALS + ".",
        "",
        f"## Cached methods on a wider network: {WIDE['layers']} layers x {WIDE['hidden']} hidden, "
        f"{WIDE['heads']} heads, vocabulary {WIDE['vocab']}",
        "",
        *table(wide_records),
        "",
        *ratio_lines(wide_records),
        "",
        "Paper (Table 11, one A6000, 12 x 768, L = 2048): AR 13.3 s, MDLM 201.3 s, BD3-LM (L'=16) 21.3 s, "
        "Eso-LM (B) 14.6 s.",
        "",
    ]
    tmp = args.out / "latency.md.tmp"
    tmp.write_text("\n".join(md))
    tmp.replace(args.out / "latency.md")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
