"""``esolm demo``: train a small Eso-LM (B) on the embedded corpus, evaluate, sample, time the KV cache."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/demo", help="results folder (JSON + PNG)")
    p.add_argument("--run-dir", default="runs/demo", help="training run folder (checkpoints, logs)")
    p.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the cpu-small preset")


def run(args) -> int:
    from esolm.demo import run_demo
    from esolm.errors import UserError

    if args.minutes <= 0:
        raise UserError(f"--minutes must be positive, got {args.minutes}")
    run_demo(args.out, args.run_dir, args.minutes, tuple(args.overrides), args.num_samples, seed=args.seed)
    return 0
