"""Reinforcement learning with verifiable rewards: tasks, rollouts, trajectory likelihoods and GRPO."""

from esolm.rl.rewards import checked_rewards, load_reward
from esolm.rl.tasks import (
    TASKS,
    Task,
    decode_completion,
    encode_prompt,
    get_task,
    parse_expression,
    sudoku_solutions,
)

__all__ = ["TASKS", "Task", "checked_rewards", "decode_completion", "encode_prompt", "get_task", "load_reward",
           "parse_expression", "sudoku_solutions"]
