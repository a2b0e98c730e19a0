"""Where RL prompts and rewards come from: a shipped task, or a user's prompt file plus reward callable.

Rewards follow TRL's convention ``reward(prompts, completions) -> list[float]``; :func:`checked_rewards`
turns anything else a user's function does (raising, NaN, the wrong length or type) into a one-line
:class:`~esolm.errors.UserError`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from esolm.data.datasets import is_validation
from esolm.errors import UserError
from esolm.rl.tasks import decode_completion, get_task, load_reward

Reward = Callable[[list[str], list[str]], list[float]]


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a ``.txt`` file (one per non-empty line) or ``.jsonl`` file (``{"prompt": ...}`` per line)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file not found: {p}")
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise UserError(f"prompt file {p} is not UTF-8 text") from None
    if p.suffix == ".jsonl":
        out = []
        for i, ln in enumerate(lines, 1):
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                raise UserError(f"{p}:{i} is not a JSON object") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise UserError(f"{p}:{i} needs a string field 'prompt'")
            out.append(rec["prompt"])
        lines = out
    if not lines:
        raise UserError(f"prompt file {p} holds no prompts")
    return lines


@dataclass
class PromptSource:
    """Training and held-out prompts (deterministic in their seed) and the reward function."""

    name: str
    reward: Reward
    _train: Callable[[int, int], list[str]]
    _test: Callable[[int, int], list[str]]

    def train(self, n: int, seed: int) -> list[str]:
        return self._train(n, seed)

    def test(self, n: int, seed: int) -> list[str]:
        return self._test(n, seed)


def prompt_source(task: str | None = None, prompts: str | None = None, reward: str | None = None) -> PromptSource:
    """A shipped task by name (its exact checker as reward unless ``reward`` is given), or a prompt file
    split 90/10 into training and held-out prompts by a hash of each prompt."""
    fn = load_reward(reward) if reward is not None else None
    if task is not None:
        t = get_task(task)
        return PromptSource(t.name, fn or t.reward,
                            lambda n, s: [t.prompt(i) for i in t.generate(n, s, "train")],
                            lambda n, s: [t.prompt(i) for i in t.generate(n, s, "test")])
    if prompts is None or fn is None:
        raise UserError("give a shipped task, or a prompt file and a reward function")
    texts = read_prompts(prompts)
    held = [x for x in texts if is_validation(x, 0.1)]
    train = [x for x in texts if not is_validation(x, 0.1)] or texts
    held = held or train

    def pick(pool: list[str]) -> Callable[[int, int], list[str]]:
        return lambda n, s: random.Random(s).choices(pool, k=n)

    return PromptSource(Path(prompts).stem, fn, pick(train), pick(held))


def checked_rewards(reward: Reward, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """Call ``reward`` and return float64 rewards; UserError (one line) when it fails or returns garbage."""
    name = getattr(reward, "__qualname__", repr(reward))
    try:
        out = reward(list(prompts), list(completions))
    except Exception as e:  # a user's function: report it as their error, on one line
        raise UserError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise UserError(f"reward function {name} must return a list of numbers, got {type(out).__name__}") from None
    if len(values) != len(completions):
        raise UserError(f"reward function {name} returned {len(values)} rewards for {len(completions)} completions")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"reward function {name} returned a non-finite reward (NaN or inf)")
    return torch.tensor(values, dtype=torch.float64)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """``[BOS] prompt`` ids for each prompt (plain text: special-token strings stay text)."""
    return [[tokenizer.bos_id, *tokenizer.encode_text(p, f"prompt {i}")] for i, p in enumerate(prompts)]


def decode_completions(tokenizer, tokens: torch.Tensor, prompt_len: int) -> list[str]:
    return [decode_completion(tokenizer, row[prompt_len:].tolist()) for row in tokens]
