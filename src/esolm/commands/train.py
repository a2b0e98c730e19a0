"""``esolm train PRESET [key=value ...]`` — train or resume a model from a recipe.

Examples::

    esolm train cpu-tiny
    esolm train cpu-small trainer.max_time=00:00:30:00 trainer.out_dir=runs/small
    esolm train cpu-small method.name=esolm method.alpha0=0.25 method.variant=B
    esolm train paper-owt-small trainer.devices=8 trainer.strategy=ddp trainer.micro_batch=64

A run writes ``OUT/config.yaml``, ``OUT/checkpoints/{stepNNNNNNNN,last}.ckpt`` and ``OUT/logs``; running
the same command again resumes from ``last.ckpt`` (``trainer.resume=auto``).
"""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("preset", help="preset name (cpu-tiny, cpu-small, paper-lm1b-small, "
                                       "paper-owt-small) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. method.alpha0=0.25 trainer.max_steps=1000")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args) -> int:
    from esolm.recipes import resolve

    cfg = resolve(args.preset, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from esolm.training import NonFiniteLossError, prepare, train

    prepared = prepare(cfg)  # config, resume checkpoint and data errors surface here, before any work
    try:
        train(cfg, prepared=prepared)
    except NonFiniteLossError as e:
        print(f"esolm train: error: {e}", file=sys.stderr)
        return 1
    return 0
