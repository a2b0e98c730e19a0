"""``esolm rl TASK_OR_CONFIG [key=value ...]`` — GRPO with verifiable rewards on a diffusion LM.

Examples::

    esolm train task-arithmetic                      # the starting policy (supervised, ~3 min on 2 cores)
    esolm rl arithmetic                              # GRPO from it with the exact trajectory likelihood
    esolm rl arithmetic rl.likelihood=mean-field trainer.out_dir=runs/rl-arith-mf
    esolm rl my_rl.yaml policy=runs/sft/policy task.prompts=prompts.jsonl task.reward=rewards.py:score
    esolm rl arithmetic rl.loss_type=dapo rl.epsilon_high=0.28 rl.skip_zero_variance_groups=true \
        rl.num_iterations=2 optim.schedule=cosine optim.warmup_steps=10   # TRL's GRPO knobs (README)

``TASK`` is a shipped task (arithmetic, sudoku, countdown, d1-countdown, d1-sudoku: preset ``rl-TASK``) or a
YAML file. The run writes
``OUT/checkpoints`` (resumable: the same command continues from ``last.ckpt``), ``OUT/logs``,
``OUT/eval.jsonl``, ``OUT/final_metrics.json`` and the final policy in ``OUT/policy``.

``policy`` is any model ``esolm sample`` loads (a path, a shipped model's name such as ``esolm-small``, a Hub
repo id). A user's reward function runs in a guarded worker thread: one call (one batch) may take at most
``task.reward_timeout`` seconds (default 60); raising, ``sys.exit``, hanging or returning anything but one
finite number per completion is a one-line error.

Exit codes: 0 done; 2 a one-line error (bad config, policy, task file, reward function — before any work —
or a reward function that fails or hangs during training; the last checkpoint is kept); 130 interrupted.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("task", metavar="TASK_OR_CONFIG", help="arithmetic, sudoku, countdown, d1-countdown, "
                                                                         "d1-sudoku, or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. rl.likelihood=mean-field rl.group_size=8 policy=PATH")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args) -> int:
    from esolm.rl.config import load_rl_config

    cfg = load_rl_config(args.task, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from esolm.rl.run import prepare_rl, train_rl

    prepared = prepare_rl(cfg)  # config, machine, folder, resume, policy, task and reward errors: before any work
    train_rl(cfg, prepared)
    return 0
