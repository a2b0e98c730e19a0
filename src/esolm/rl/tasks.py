"""Verifiable tasks for RL: generators of instances, one reference solution each, and exact checkers.

Each :class:`Task` has a fixed-width prompt ending with a separator, so in a batch every completion starts
at the same position. One instance is the sequence ``[BOS] prompt solution [EOS] [EOS]...`` of ``task.length
= 1 + prompt_length + completion_length + 1`` tokens with the character tokenizer (``chars``): supervised
fine-tuning trains on it (data source ``task:NAME``, mode ``pad-eos``) and RL completes the
``length - 1 - prompt_length`` positions after ``[BOS] prompt``.

* ``arithmetic`` — ``"203+141="`` -> ``"344"``: the sum of two 3-digit numbers with digits 0..4 (no carries;
  the reference answer has 3 digits, so each answer digit has a fixed position; any decimal form counts).
* ``sudoku`` — 4x4 Sudoku: 16 digits row by row, ``0`` for a blank, then ``>``; the answer is the 16-digit
  solved grid. Any grid that is a valid Sudoku and keeps the givens counts (puzzles are generated with a
  unique solution, the one used for fine-tuning).
* ``countdown`` — as in d1: ``"7,3,2:017="``, three numbers and a target; the answer is an expression
  using each number exactly once with ``+ - *`` and parentheses, equal to the target (``"7+3*2"``, or
  ``"3*2+7"``). The generator builds the target from a random expression, so a solution exists. The checker has its own
  tiny parser (digits, ``+ - *``, parentheses; nothing else): no ``eval``.

Rewards follow TRL's convention, ``reward(prompts, completions) -> list[float]`` (1.0 correct, 0.0
otherwise), and parse the prompt strings themselves, so the bound method is a plain reward callable.
Train and test instances are disjoint: an instance is in the test split when a keyed hash of its prompt
falls below ``TEST_FRACTION``. A user's reward function is loaded and called by :mod:`esolm.rl.rewards`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from collections.abc import Sequence

from esolm.errors import UserError

TEST_FRACTION = 0.1
SPLITS = ("train", "test")


class Task:
    """A verifiable task; subclasses define the instances, prompts, solutions and the checker."""

    name: str
    prompt_length: int       # characters of every prompt (separator included)
    completion_length: int   # characters reserved for the longest answer

    @property
    def length(self) -> int:
        """Tokens of one sequence: BOS, prompt, answer space and at least one EOS."""
        return 1 + self.prompt_length + self.completion_length + 1

    def draw(self, rng: random.Random):  # pragma: no cover - abstract
        """One random instance (any split)."""
        raise NotImplementedError

    def prompt(self, instance) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def solution(self, instance) -> str:  # pragma: no cover - abstract
        """One valid answer (the one supervised fine-tuning trains on)."""
        raise NotImplementedError

    def check(self, prompt: str, completion: str) -> bool:  # pragma: no cover - abstract
        """Whether ``completion`` answers ``prompt`` correctly (raises UserError if the prompt is not one)."""
        raise NotImplementedError

    def in_test(self, prompt: str) -> bool:
        h = hashlib.blake2b(prompt.encode(), digest_size=8, key=self.name.encode()).digest()
        return int.from_bytes(h, "little") < TEST_FRACTION * 2.0**64

    def generate(self, n: int, seed: int = 0, split: str = "train") -> list:
        """``n`` instances of ``split`` (train or test), a deterministic function of ``(n, seed, split)``."""
        if split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise UserError(f"number of instances must be >= 0, got {n}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        want_test = split == "test"
        out = []
        while len(out) < n:
            inst = self.draw(rng)
            if self.in_test(self.prompt(inst)) == want_test:
                out.append(inst)
        return out

    def texts(self, n: int, seed: int = 0, split: str = "train") -> list[str]:
        """Solved instances ``prompt + solution`` (supervised fine-tuning data)."""
        return [self.prompt(i) + self.solution(i) for i in self.generate(n, seed, split)]

    def reward(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """TRL-style reward: 1.0 for each correct completion, else 0.0."""
        if len(prompts) != len(completions):
            raise UserError(f"{len(prompts)} prompts but {len(completions)} completions")
        return [1.0 if self.check(p, c) else 0.0 for p, c in zip(prompts, completions, strict=True)]

    def _parse(self, pattern: re.Pattern, prompt: str) -> re.Match:
        m = pattern.fullmatch(prompt)
        if m is None:
            raise UserError(f"not a {self.name} prompt: {prompt[:60]!r}")
        return m

    def __repr__(self) -> str:
        return f"Task({self.name!r}, length={self.length})"


# -- arithmetic ------------------------------------------------------------------------------------------

class Arithmetic(Task):
    """``a+b=`` with 3-digit ``a, b`` whose digits are 0..4 (no carries: each answer digit is the sum of the
    two digits above it, a rule a tiny model learns in minutes); the answer is the sum in decimal (3 digits).
    The checker accepts any 3-digit ``a, b``."""

    name = "arithmetic"
    prompt_length = 8
    completion_length = 3
    _prompt = re.compile(r"(\d{3})\+(\d{3})=")

    def draw(self, rng: random.Random) -> tuple[int, int]:
        def number() -> int:
            return int("".join(rng.choice("01234") for _ in range(3)))

        return number(), number()

    def prompt(self, instance: tuple[int, int]) -> str:
        a, b = instance
        return f"{a:03d}+{b:03d}="

    def solution(self, instance: tuple[int, int]) -> str:
        return f"{sum(instance):03d}"

    def check(self, prompt: str, completion: str) -> bool:
        a, b = map(int, self._parse(self._prompt, prompt).groups())
        return re.fullmatch(r"\d{1,8}", completion) is not None and int(completion) == a + b


# -- 4x4 sudoku -------------------------------------------------------------------------------------------

def sudoku_ok(grid: str) -> bool:
    """Whether a 16-character row-major grid is a solved 4x4 Sudoku (rows, columns, 2x2 boxes)."""
    if len(grid) != 16 or set(grid) - set("1234"):
        return False
    units = [[4 * r + c for c in range(4)] for r in range(4)]
    units += [[4 * r + c for r in range(4)] for c in range(4)]
    units += [[4 * (br + r) + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
    return all({grid[i] for i in u} == set("1234") for u in units)


@functools.lru_cache(maxsize=1)
def sudoku_solutions() -> tuple[str, ...]:
    """All 288 solved 4x4 Sudoku grids, sorted."""
    rows = ["".join(p) for p in itertools.permutations("1234")]
    grids = [""]
    for r in range(4):  # add rows whose columns (and, in the second row of a band, boxes) stay distinct
        grids = [g + row for g in grids for row in rows
                 if all(row[c] not in g[c::4] for c in range(4))
                 and (r % 2 == 0 or all(len({*g[-4:][b:b + 2], *row[b:b + 2]}) == 4 for b in (0, 2)))]
    return tuple(sorted(grids))


@functools.lru_cache(maxsize=1)
def _cell_sets() -> tuple[dict[str, int], ...]:
    """Per cell and digit, the set of solution grids with that digit there (bit ``k`` = grid ``k``)."""
    return tuple({d: sum(1 << k for k, g in enumerate(sudoku_solutions()) if g[i] == d) for d in "1234"}
                 for i in range(16))


def count_solutions(puzzle: Sequence[str]) -> int:
    """How many solved grids keep the givens of ``puzzle`` (``0`` = blank)."""
    cand = (1 << len(sudoku_solutions())) - 1
    for cell, d in zip(_cell_sets(), puzzle, strict=True):
        if d != "0":
            cand &= cell[d]
    return cand.bit_count()


def fits(puzzle: str, grid: str) -> bool:
    """Whether ``grid`` keeps every given (non-``0``) cell of ``puzzle``."""
    return all(p in ("0", g) for p, g in zip(puzzle, grid, strict=True))


class Sudoku(Task):
    """4x4 Sudoku with a unique solution and ``min_blanks..max_blanks`` blanks."""

    name = "sudoku"
    prompt_length = 17
    completion_length = 16
    min_blanks, max_blanks = 4, 10
    _prompt = re.compile(r"([0-4]{16})>")

    def draw(self, rng: random.Random) -> tuple[str, str]:
        solutions = sudoku_solutions()
        grid = rng.choice(solutions)
        puzzle = list(grid)
        blanks = rng.randint(self.min_blanks, self.max_blanks)
        removed = 0
        for i in rng.sample(range(16), 16):  # blank cells in random order while the solution stays unique
            if removed == blanks:
                break
            puzzle[i] = "0"
            if count_solutions(puzzle) == 1:
                removed += 1
            else:
                puzzle[i] = grid[i]
        return "".join(puzzle), grid

    def prompt(self, instance: tuple[str, str]) -> str:
        return instance[0] + ">"

    def solution(self, instance: tuple[str, str]) -> str:
        return instance[1]

    def check(self, prompt: str, completion: str) -> bool:
        puzzle = self._parse(self._prompt, prompt).group(1)
        return sudoku_ok(completion) and fits(puzzle, completion)


# -- countdown ----------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\d+|[-+*()]")
MAX_EXPRESSION = 64


def parse_expression(text: str) -> tuple[int, list[int]] | None:
    """Value and numbers (in order) of an expression of digits, ``+ - *`` and parentheses; ``None`` if it
    is anything else (other characters, unary signs, unbalanced parentheses, longer than 64 characters)."""
    if not text or len(text) > MAX_EXPRESSION or "".join(_TOKEN.findall(text)) != text:
        return None
    toks = _TOKEN.findall(text)
    pos = 0
    numbers: list[int] = []

    def peek() -> str | None:
        return toks[pos] if pos < len(toks) else None

    def factor() -> int:
        nonlocal pos
        t = peek()
        if t is None:
            raise ValueError
        pos += 1
        if t == "(":
            v = expr()
            if peek() != ")":
                raise ValueError
            pos += 1
            return v
        if not t.isdigit():
            raise ValueError
        numbers.append(int(t))
        return int(t)

    def term() -> int:
        nonlocal pos
        v = factor()
        while peek() == "*":
            pos += 1
            v *= factor()
        return v

    def expr() -> int:
        nonlocal pos
        v = term()
        while peek() in ("+", "-"):
            op = toks[pos]
            pos += 1
            v = v + term() if op == "+" else v - term()
        return v

    try:
        value = expr()
    except ValueError:
        return None
    return (value, numbers) if pos == len(toks) else None


@functools.lru_cache(maxsize=4096)
def expressions(nums: tuple[int, ...]) -> tuple[tuple[str, int], ...]:
    """Every ``(text, value)`` combining three numbers with two of ``+ - *``, in a fixed order (the numbers in
    the given order first); parentheses only where they change the value."""
    out = []
    for a, b, c in itertools.permutations(nums):
        for left, (o1, o2) in itertools.product((True, False), itertools.product("+-*", repeat=2)):
            text = f"({a}{o1}{b}){o2}{c}" if left else f"{a}{o1}({b}{o2}{c})"
            value = parse_expression(text)[0]
            flat = text.replace("(", "").replace(")", "")
            out.append(((flat if parse_expression(flat)[0] == value else text), value))
    return tuple(out)


class Countdown(Task):
    """Three numbers in ``1..9`` and a target in ``1..999`` made from them with ``+ - *``.

    The target comes from a random expression; the reference solution is the first expression of
    :func:`expressions` that reaches it (a function of the prompt, which makes fine-tuning easier).
    """

    name = "countdown"
    prompt_length = 10
    completion_length = 7
    _prompt = re.compile(r"(\d),(\d),(\d):(\d{3})=")

    def draw(self, rng: random.Random) -> tuple[tuple[int, int, int], int, str]:
        while True:
            nums = tuple(rng.randint(1, 9) for _ in range(3))
            target = rng.choice(expressions(nums))[1]
            if 1 <= target <= 999:
                return nums, target, next(e for e, v in expressions(nums) if v == target)

    def prompt(self, instance) -> str:
        (a, b, c), target, _ = instance
        return f"{a},{b},{c}:{target:03d}="

    def solution(self, instance) -> str:
        return instance[2]

    def check(self, prompt: str, completion: str) -> bool:
        *nums, target = map(int, self._parse(self._prompt, prompt).groups())
        parsed = parse_expression(completion)
        return parsed is not None and parsed[0] == target and sorted(parsed[1]) == sorted(nums)


TASKS: dict[str, Task] = {t.name: t for t in (Arithmetic(), Sudoku(), Countdown())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}' (choose from {', '.join(TASKS)})")
    return TASKS[name]


# -- token sequences --------------------------------------------------------------------------------------

def encode_prompt(task: Task, tokenizer, instance) -> list[int]:
    """``[BOS] prompt`` as token ids (``1 + task.prompt_length`` of them with the ``chars`` tokenizer)."""
    return [tokenizer.bos_id, *tokenizer.encode_text(task.prompt(instance), "the task prompt")]


def decode_completion(tokenizer, ids: Sequence[int]) -> str:
    """The text of completion ``ids`` up to (not including) the first EOS; other specials are kept."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=False)
