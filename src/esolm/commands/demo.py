"""``esolm demo``: train a small Eso-LM (B) on the embedded corpus, evaluate, sample, time the KV cache."""

from __future__ import annotations

import argparse

from esolm.commands import _args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/demo", help="results folder (JSON + PNG)")
    p.add_argument("--run-dir", default="runs/demo", help="training run folder (checkpoints, logs)")
    p.add_argument("--minutes", type=_args.positive_float, default=4.0, help="training time budget")
    p.add_argument("--num-samples", type=_args.positive_int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the cpu-small preset")


def run(args) -> int:
    from esolm.demo import run_demo
    from esolm.io import check_writable

    check_writable(args.out, folder=True)
    check_writable(args.run_dir, folder=True)
    run_demo(args.out, args.run_dir, args.minutes, tuple(args.overrides), args.num_samples, seed=args.seed)
    return 0
