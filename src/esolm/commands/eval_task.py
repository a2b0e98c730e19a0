"""``esolm eval-task MODEL TASK`` — held-out accuracy of a diffusion LM on a verifiable task.

``--samples N`` samples (default 1) per held-out prompt (``--prompts``, at most 100,000; fixed ``--seed``: the
same prompts and draws every time) at the given law (``--temperature``, ``--greedy`` (= temperature 0),
``--top-p``, ``--alpha0``, ``--steps``: one :class:`~esolm.sampling.params.SamplingParams`, checked against the
model before any sampling); accuracy = fraction of the samples with reward > 0.5 (d1-sudoku, whose reward is
the fraction of blank cells right: every blank cell right), plus a task's own metric (d1-sudoku: d1's
``cell_accuracy``, correct blank cells over all blank cells); ``--pass-at K`` (K <= N)
adds the unbiased pass@K, ``1 - C(N - c, K) / C(N, K)`` for a prompt with ``c`` correct samples, averaged over
the prompts. A user's reward function runs in a guarded thread: one call may take at most
``--reward-timeout`` seconds (default 60).

    esolm eval-task runs/task-arithmetic/checkpoints/last.ckpt arithmetic
    esolm eval-task runs/rl-arithmetic/policy arithmetic --prompts 500 --json
    esolm eval-task MODEL arithmetic --greedy
    esolm eval-task MODEL arithmetic --samples 8 --pass-at 4
    esolm eval-task runs/task-d1-sudoku/checkpoints/last.ckpt d1-sudoku --prompts 500   # d1's test set
    esolm eval-task MODEL my_prompts.jsonl --reward rewards.py:score
"""

from __future__ import annotations

import json

from esolm.commands import _args


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a checkpoint or exported folder (with its tokenizer)")
    parser.add_argument("task", help="arithmetic, sudoku, countdown, d1-countdown, d1-sudoku, or a prompt file "
                                     "(.txt / .jsonl) with --reward")
    parser.add_argument("--reward", default=None, help="reward callable module:function or file.py:function")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts (default 200, at most 100000)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--temperature", type=float, default=None, help="default 1; 0: greedy")
    parser.add_argument("--greedy", action="store_true", help="decode greedily (temperature 0)")
    parser.add_argument("--samples", type=_args.int_at_least(1), default=1,
                        help="samples per held-out prompt (default 1)")
    parser.add_argument("--pass-at", type=_args.int_at_least(1), default=None, metavar="K",
                        help="also report the unbiased pass@K over the --samples per prompt (K <= samples)")
    parser.add_argument("--top-p", type=_args.top_p, default=None)
    parser.add_argument("--alpha0", type=float, default=None, help="Eso-LM sampling alpha0 (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps (default: completion length)")
    parser.add_argument("--max-new-tokens", type=_args.int_at_least(1), default=None,
                        help="completion tokens per sample (default: to the model's length)")
    parser.add_argument("--show", type=int, default=0,
                        help="print this many of the evaluated prompts with their completions")
    parser.add_argument("--reward-timeout", type=float, default=60.0,
                        help="seconds one call of the reward function may take (default 60)")
    parser.add_argument("--split", choices=["test", "validation"], default="test",
                        help="held-out split: test (default) or a shipped task's validation split (for tuning)")
    parser.add_argument("--prompt-style", choices=["compact", "instruction"], default="compact",
                        help="compact prompts (default; the tiny task models') or a d1 task's natural-language "
                             "instructions (for a pretrained LM such as esolm-smol)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from esolm.errors import UserError
    from esolm.rl.run import evaluate_task
    from esolm.rl.tasks import TASKS
    from esolm.sampling.params import SamplingParams

    shipped = args.task in TASKS
    if not shipped and args.reward is None:
        raise UserError(f"'{args.task}' is not a shipped task ({', '.join(TASKS)}); a prompt file needs --reward")
    if args.greedy and args.temperature not in (None, 0.0):
        raise UserError(f"--greedy decodes at temperature 0; drop --temperature {args.temperature}")
    if args.greedy:
        args.temperature = 0.0
    params = SamplingParams.from_cli(args)  # temperature, top_p, seed, steps, alpha0: checked once, there
    res = evaluate_task(args.model, args.task if shipped else None, None if shipped else args.task, args.reward,
                        n=args.prompts, params=params, device=args.device, show=args.show,
                        reward_timeout=args.reward_timeout, samples=args.samples, pass_at=args.pass_at,
                        split=args.split, max_new_tokens=args.max_new_tokens, prompt_style=args.prompt_style)
    if args.json:
        print(json.dumps(res))
    else:
        k = f"pass@{args.pass_at}"
        extra = f", {k} {res[k]:.3f}" if k in res else ""
        extra += "".join(f", {m.replace('_', ' ')} {res[m]:.3f}" for m in ("cell_accuracy", "valid_solutions")
                         if m in res)
        each = f" x {args.samples} samples" if args.samples > 1 else ""
        where = "held-out" if args.split == "test" else "validation"
        print(f"{args.task}: accuracy {res['accuracy']:.3f} (mean reward {res['reward']:.3f}{extra}) on "
              f"{res['prompts']} {where} prompts{each}, seed {args.seed}")
        for ex in res.get("examples", []):
            print(f"  {ex['prompt']!r} -> {ex['completion']!r}")
    return 0
