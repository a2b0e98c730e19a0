"""``esolm train PRESET [key=value ...]`` — train or resume a model from a recipe.

Examples::

    esolm train cpu-tiny
    esolm train cpu-small trainer.max_time=00:00:30:00 trainer.out_dir=runs/small
    esolm train cpu-small method.name=esolm method.alpha0=0.25 method.variant=B
    esolm train paper-owt-small trainer.devices=8 trainer.strategy=ddp trainer.micro_batch=64

A run writes ``OUT/config.yaml``, ``OUT/checkpoints/{stepNNNNNNNN,last}.ckpt`` and ``OUT/logs``; running
the same command again resumes from ``last.ckpt`` (``trainer.resume=auto``); overrides other than run
length, cadence, logging and paths must then match the checkpoint's config.

Exit codes: 0 done; 2 a one-line error — a bad config, machine, output folder, resume checkpoint or data
(before any work), or training stopped on a non-finite loss/weights or a failed checkpoint write (the last
good checkpoint is kept); 130 interrupted (Ctrl-C; the checkpoints on disk stay complete).
"""

from __future__ import annotations


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
    from esolm.training import prepare, train

    prepared = prepare(cfg)  # config, machine, output folder, resume and data errors: before any work
    train(cfg, prepared=prepared)
    return 0
