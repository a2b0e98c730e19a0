"""Where RL prompts and rewards come from: a shipped task, or a user's prompt file plus reward callable.

Rewards follow TRL's convention ``reward(prompts, completions) -> list[float]``; they are called through
:func:`esolm.rl.rewards.checked_rewards` (a guarded worker thread with a timeout), which turns anything else a
user's function does (raising, hanging, NaN, the wrong length or type) into a one-line
:class:`~esolm.errors.UserError`. Prompts are user text: every one is encoded with
:meth:`~esolm.data.tokenizers.Tokenizer.encode_text` (special-token strings such as ``<|mask|>`` stay plain
text), and a prompt file is read with every line checked (:func:`read_prompts`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from esolm.data.datasets import is_validation
from esolm.data.tokenizers import check_text
from esolm.errors import UserError
from esolm.rl.rewards import DEFAULT_REWARD_TIMEOUT, Reward, check_timeout, checked_rewards, load_reward
from esolm.rl.tasks import PROMPT_STYLES, decode_completion, get_task


def _record(p: Path, i: int, line: str) -> str:
    """The ``prompt`` of JSONL line ``i``; UserError (one line) for anything else (invalid JSON, integers past
    Python's digit limit, nesting past the stack, a prompt that is not a valid UTF-8 string)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{p}:{i} is not a JSON object") from None
    except ValueError as e:  # an integer literal past Python's digit limit
        raise UserError(f"{p}:{i} cannot be read: {str(e).split(':')[0][:100]}") from None
    except RecursionError:
        raise UserError(f"{p}:{i} nests JSON too deeply to be read") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
        raise UserError(f"{p}:{i} needs a string field 'prompt'")
    return check_text(rec["prompt"], f"{p}:{i} prompt")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a ``.txt`` file (one per non-empty line) or ``.jsonl`` file (``{"prompt": ...}`` per line)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file not found: {p}")
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise UserError(f"prompt file {p} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"prompt file {p} cannot be read ({e.strerror or type(e).__name__})") from None
    if p.suffix == ".jsonl":
        lines = [_record(p, i, ln) for i, ln in enumerate(lines, 1)]
    if not lines:
        raise UserError(f"prompt file {p} holds no prompts")
    return lines


def solved(rewards: torch.Tensor) -> torch.Tensor:
    """Which rewards count as a solved prompt when nothing else says: ``> 0.5`` (a 0/1 reward's 1)."""
    return rewards > 0.5


@dataclass
class PromptSource:
    """Training and held-out prompts (deterministic in their seed) and the reward function.

    ``pool``: every prompt of a prompt file (``None`` for a shipped task, whose prompts are generated);
    ``timeout``: seconds one call of the reward may take; ``correct``: which rewards count as solved (a
    shipped task's :meth:`~esolm.rl.tasks.Task.correct` with its own reward, else :func:`solved`);
    ``metrics``: the task's own aggregates over prompts and completions (``None``: none); ``test_size``: the
    held-out prompts there are (``None``: as many as asked)."""

    name: str
    reward: Reward
    _train: Callable[[int, int], list[str]]
    _test: Callable[[int, int], list[str]]
    pool: list[str] | None = None
    timeout: float = DEFAULT_REWARD_TIMEOUT
    correct: Callable[[torch.Tensor], torch.Tensor] = solved
    metrics: Callable[[Sequence[str], Sequence[str]], dict[str, float]] | None = None
    test_size: int | None = None
    _validation: Callable[[int, int], list[str]] | None = None

    def train(self, n: int, seed: int) -> list[str]:
        return self._train(n, seed)

    def test(self, n: int, seed: int) -> list[str]:
        return self._test(n, seed)

    def held_out(self, n: int, seed: int, split: str = "test") -> list[str]:
        """``n`` prompts of the test split, or of the validation split (a shipped task's; for tuning)."""
        if split == "test":
            return self.test(n, seed)
        if split != "validation":
            raise UserError(f"the held-out split must be test or validation, got {split!r}")
        if self._validation is None:
            raise UserError(f"{self.name} has no validation split (a prompt file has training and held-out "
                            f"prompts only); evaluate on the test split")
        return self._validation(n, seed)

    def check_held_out(self, n: int, what: str, split: str = "test") -> None:
        """UserError (one line, before any work) when ``split`` is not one this source has, or ``n`` test
        prompts are more than there are."""
        if split == "validation" and self._validation is None:
            self.held_out(0, 0, split)  # its one-line error
        if split not in ("test", "validation"):
            raise UserError(f"the held-out split must be test or validation, got {split!r}")
        if split == "test" and self.test_size is not None and n > self.test_size:
            raise UserError(f"{what} = {n} but {self.name}'s test set has {self.test_size} prompts; ask for at "
                            f"most {self.test_size}")

    def rewards(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """float64 rewards, checked (:func:`~esolm.rl.rewards.checked_rewards`, with this source's timeout)."""
        return checked_rewards(self.reward, prompts, completions, self.timeout)


def _on_compact(fn: Callable, back: Callable[[Sequence[str]], list[str]]) -> Callable:
    """``fn(prompts, completions)`` called with the compact prompt behind each instruction."""
    def call(prompts: Sequence[str], completions: Sequence[str]):
        return fn(back(prompts), completions)

    return call


def prompt_source(task: str | None = None, prompts: str | None = None, reward: str | None = None,
                  reward_timeout: float = DEFAULT_REWARD_TIMEOUT, style: str = "compact") -> PromptSource:
    """A shipped task by name (its exact checker as reward unless ``reward`` is given), or a prompt file
    split 90/10 into training and held-out prompts by a hash of each prompt. ``style``: a shipped task's
    compact prompts (what its tiny character models are trained on), or ``instruction``: the same instances
    as natural-language instructions for a pretrained LM (:meth:`~esolm.rl.tasks.Task.instruction`); its
    reward and metrics see the compact prompt behind each instruction."""
    timeout = check_timeout(reward_timeout)
    if style not in PROMPT_STYLES:
        raise UserError(f"the prompt style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    fn = load_reward(reward, timeout) if reward is not None else None
    if task is not None:
        t = get_task(task)
        compact: dict[str, str] = {}  # instruction -> the compact prompt it renders

        def render(instances: list) -> list[str]:
            out = [t.prompt(i) for i in instances]
            if style == "compact":
                return out
            shown = [t.instruction(p) for p in out]
            compact.update(zip(shown, out))
            return shown

        def back(ps: Sequence[str]) -> list[str]:
            return [compact.get(p, p) for p in ps]

        score, metrics = fn or t.reward, t.metrics
        if style != "compact":
            t.instruction(t.prompt(t.generate(1, 0, "train")[0]))  # its one-line error for a task without any
            score = _on_compact(fn or t.reward, back)
            metrics = _on_compact(t.metrics, back)
        return PromptSource(t.name, score, lambda n, s: render(t.generate(n, s, "train")),
                            lambda n, s: render(t.generate(n, s, "test")), timeout=timeout,
                            correct=solved if fn is not None else t.correct, metrics=metrics,
                            test_size=t.test_size, _validation=lambda n, s: render(t.generate(n, s, "validation")))
    if style != "compact":
        raise UserError("the instruction prompt style is a shipped task's (d1-countdown, d1-sudoku)")
    if prompts is None or fn is None:
        raise UserError("give a shipped task, or a prompt file and a reward function")
    texts = read_prompts(prompts)
    held = [x for x in texts if is_validation(x, 0.1)]
    train = [x for x in texts if not is_validation(x, 0.1)] or texts
    held = held or train

    def pick(pool: list[str]) -> Callable[[int, int], list[str]]:
        return lambda n, s: random.Random(s).choices(pool, k=n)

    return PromptSource(Path(prompts).stem, fn, pick(train), pick(held), texts, timeout)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """``[BOS] prompt`` ids for each prompt (plain text: special-token strings stay text, never the mask or a
    control EOS; UserError for text that is not valid UTF-8)."""
    return [[tokenizer.bos_id, *tokenizer.encode_text(p, f"prompt {p[:40]!r}")] for p in prompts]


def decode_completions(tokenizer, tokens: torch.Tensor, prompt_len: int) -> list[str]:
    return [decode_completion(tokenizer, row[prompt_len:].tolist()) for row in tokens]
