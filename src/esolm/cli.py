"""The ``esolm`` command line.

Each subcommand lives in ``esolm.commands.<name>`` and provides ``add_arguments(parser)`` and
``run(args) -> int``. Errors the user can fix (bad arguments, config, input, missing file:
:class:`esolm.errors.EsoLMError` and argparse's usage errors) are reported as one line on stderr,
``esolm CMD: error: MESSAGE``, with exit code 2, before any work starts. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from esolm.errors import EsoLMError, one_line

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("esolm.commands.train", "train a model from a preset with key=value overrides"),
    "adapt": ("esolm.commands.adapt", "fine-tune a pretrained Llama (SmolLM2-135M) into an Eso-LM (B)"),
    "export": ("esolm.commands.export", "export a training checkpoint to a from_pretrained folder"),
    "eval": ("esolm.commands.eval", "NELBO / importance-weighted perplexity of a model"),
    "sample": ("esolm.commands.sample", "generate samples (KV-cached Eso-LM sampler and baselines)"),
    "bench": ("esolm.commands.bench", "latency and speed-quality benchmarks"),
    "demo": ("esolm.commands.demo", "train, evaluate and sample a small Eso-LM (B) on the embedded corpus"),
    "lm-eval": ("esolm.commands.lm_eval", "lm-evaluation-harness's CLI with the esolm model registered"),
    "rl": ("esolm.commands.rl", "GRPO with verifiable rewards, exact trajectory likelihood (Eso-LM (B))"),
    "eval-task": ("esolm.commands.eval_task", "held-out accuracy of a model on a verifiable task"),
    "serve": ("esolm.commands.serve", "OpenAI-compatible HTTP server: continuous batching, per-step streaming"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like esolm's own errors (``prog: error: message``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="esolm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_run=mod.run, _prog=p.prog)  # a command's own sub-commands may refine _prog
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 2 usage or esolm error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (one line, code 2) and --help (code 0)
        return int(e.code or 0)
    try:
        return int(args._run(args) or 0)
    except EsoLMError as e:  # only esolm's own errors are one line; anything else is a bug: traceback
        print(f"{args._prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esolm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
