"""``esolm lm-eval ARGS...``: lm-evaluation-harness's own CLI, with esolm's ``esolm`` model registered.

lm-eval (0.4) has no plugin discovery, so ``lm_eval --model esolm`` cannot find esolm's model; this
command imports :mod:`esolm.integrations.lm_eval` (which registers it) and runs lm-eval's CLI on the
remaining arguments unchanged. Examples::

    esolm lm-eval --model esolm --model_args pretrained=runs/tiny/export \\
        --tasks esolm_wiki_ppl,esolm_wiki_choice --include_path "$(esolm lm-eval --tasks-dir)"
    esolm lm-eval -h                                   # lm-eval's help
"""

from __future__ import annotations

import argparse
import sys

from esolm.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.prefix_chars = "\0"  # every argument, -h included, is lm-eval's
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments of lm-eval's CLI")


def run(args: argparse.Namespace) -> int:
    if args.lm_eval_args == ["--tasks-dir"]:
        from esolm.integrations import TASKS_DIR

        print(TASKS_DIR)
        return 0
    try:
        from lm_eval.__main__ import cli_evaluate

        import esolm.integrations.lm_eval  # noqa: F401 - registers the "esolm" model
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("lm_eval"):
            raise
        raise UserError("lm-eval is not installed: pip install 'esolm[lm-eval]'") from None
    model_args = _option(args.lm_eval_args, "--model_args")
    if _option(args.lm_eval_args, "--model") == "esolm" and model_args is not None:
        from lm_eval.utils import simple_parse_args_string

        from esolm.integrations.lm_eval import check_model_args

        parsed = simple_parse_args_string(model_args)
        clash = sorted({"batch_size", "max_batch_size", "device"} & set(parsed))
        if clash:  # lm-eval's CLI always passes these itself
            raise UserError(f"give {', '.join('--' + k for k in clash)} as lm-eval options, not in --model_args")
        check_model_args(parsed)  # before lm-eval indexes its tasks
    saved = sys.argv
    sys.argv = ["lm-eval", *args.lm_eval_args]
    try:
        cli_evaluate()
    except SystemExit as e:  # lm-eval's argparse: --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.argv = saved
    return 0


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``name VALUE`` or ``name=VALUE`` in ``argv`` (the last one), else None."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a[len(name) + 1:]
    return value
