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
* ``d1-countdown`` and ``d1-sudoku`` — the Countdown (3 numbers) and 4x4 Sudoku tasks of d1 (Zhao et al. 2025,
  diffu-GRPO), scored with d1's metrics, their test sets shipped (``esolm/rl/data/d1/PROVENANCE.md``) and their
  training instances generated (module :class:`D1Countdown`, :class:`D1Sudoku`). Their answers are read as d1
  reads a model's text (:func:`d1_answer`: the last ``\\boxed{...}`` or ``<answer>...</answer>``, else the
  whole completion), so a bare answer (what a tiny character model writes) and a chat model's tagged answer
  score alike.

Rewards follow TRL's convention, ``reward(prompts, completions) -> list[float]`` (1.0 correct, 0.0
otherwise; ``d1-sudoku``: the fraction of the empty cells filled correctly; ``d1-countdown``: d1's 0.1 for
a marked wrong answer), and parse the prompt strings
themselves, so the bound method is a plain reward callable. :meth:`Task.correct` says which rewards count as
solved (accuracy, pass@k) and :meth:`Task.metrics` adds a task's own aggregate (d1's cell accuracy).
The three splits are disjoint: an instance is in the test split when a keyed hash of its prompt falls below
``TEST_FRACTION`` (a d1 task: when it is one of d1's test instances), else in the validation split (for tuning
RL hyperparameters without looking at the test split) when a second, independently keyed hash falls below
``VALIDATION_FRACTION``, else in the training split. A user's reward function
is loaded and called by :mod:`esolm.rl.rewards`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import torch

from esolm.errors import UserError

TEST_FRACTION = 0.1
VALIDATION_FRACTION = 0.1  # of the instances not in the test split
SPLITS = ("train", "validation", "test")
PROMPT_STYLES = ("compact", "instruction")  # a task's prompts as is, or as natural-language instructions
FORMAT_SCORE = 0.1  # d1-countdown's reward for a marked but wrong answer (d1's)


def _hash_below(prompt: str, key: str, fraction: float) -> bool:
    h = hashlib.blake2b(prompt.encode(), digest_size=8, key=key.encode()).digest()
    return int.from_bytes(h, "little") < fraction * 2.0**64


class Task:
    """A verifiable task; subclasses define the instances, prompts, solutions and the checker."""

    name: str
    prompt_length: int       # characters of every prompt (separator included)
    completion_length: int   # characters reserved for the longest answer
    test_size: int | None = None  # instances of a fixed test set (None: generated, as many as asked)

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

    def score(self, prompt: str, completion: str) -> float:
        """The reward of one completion: 1.0 if :meth:`check`, else 0.0 (a task with partial credit overrides)."""
        return 1.0 if self.check(prompt, completion) else 0.0

    def correct(self, rewards: torch.Tensor) -> torch.Tensor:
        """Which rewards count as a solved instance (accuracy, pass@k): ``> 0.5`` (a 0/1 reward's 1)."""
        return rewards > 0.5

    def metrics(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, float]:
        """A task's own aggregates over an evaluation's completions, beside accuracy and mean reward (none)."""
        return {}

    def instruction(self, prompt: str) -> str:
        """``prompt`` (this task's compact prompt) as a natural-language instruction for a pretrained LM
        (``task.prompt_style=instruction``); UserError for a task without one."""
        raise UserError(f"{self.name} has no instruction prompts (d1-countdown and d1-sudoku have); use "
                        f"prompt_style compact")

    def in_test(self, prompt: str) -> bool:
        return _hash_below(prompt, self.name, TEST_FRACTION)

    def split_of(self, prompt: str) -> str:
        """The split ``prompt`` belongs to: test, validation or train (module docstring)."""
        if self.in_test(prompt):
            return "test"
        return "validation" if _hash_below(prompt, f"{self.name}/validation", VALIDATION_FRACTION) else "train"

    def generate(self, n: int, seed: int = 0, split: str = "train") -> list:
        """``n`` instances of ``split`` (train, validation or test), a deterministic function of
        ``(n, seed, split)``."""
        if split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise UserError(f"number of instances must be >= 0, got {n}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out = []
        while len(out) < n:
            inst = self.draw(rng)
            if self.split_of(self.prompt(inst)) == split:
                out.append(inst)
        return out

    def texts(self, n: int, seed: int = 0, split: str = "train") -> list[str]:
        """Solved instances ``prompt + solution`` (supervised fine-tuning data)."""
        return [self.prompt(i) + self.solution(i) for i in self.generate(n, seed, split)]

    def reward(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """TRL-style reward: :meth:`score` of each completion (1.0 correct, else 0.0, unless partial credit)."""
        if len(prompts) != len(completions):
            raise UserError(f"{len(prompts)} prompts but {len(completions)} completions")
        return [float(self.score(p, c)) for p, c in zip(prompts, completions, strict=True)]

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


def _candidates(puzzle: Sequence[str]) -> int:
    """Bit set (over :func:`sudoku_solutions`) of the solved grids that keep the givens of ``puzzle``."""
    cand = (1 << len(sudoku_solutions())) - 1
    for cell, d in zip(_cell_sets(), puzzle, strict=True):
        if d != "0":
            cand &= cell[d]
    return cand


def count_solutions(puzzle: Sequence[str]) -> int:
    """How many solved grids keep the givens of ``puzzle`` (``0`` = blank)."""
    return _candidates(puzzle).bit_count()


def puzzle_solutions(puzzle: Sequence[str]) -> list[str]:
    """Every solved grid that keeps the givens of ``puzzle``, in :func:`sudoku_solutions` order."""
    cand = _candidates(puzzle)
    return [g for k, g in enumerate(sudoku_solutions()) if cand >> k & 1]


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

_TOKEN = re.compile(r"\d+|[-+*/()]")
MAX_EXPRESSION = 64


def parse_expression(text: str, division: bool = False) -> tuple[int | Fraction, list[int]] | None:
    """Value and numbers (in order) of an expression of digits, ``+ - *`` (and ``/`` with ``division``: exact,
    the value a :class:`~fractions.Fraction` once a division is made) and parentheses; ``None`` if it is
    anything else (other characters, unary signs, ``**`` or ``//``, a division by zero, unbalanced parentheses,
    longer than 64 characters)."""
    if not text or len(text) > MAX_EXPRESSION or "".join(_TOKEN.findall(text)) != text:
        return None
    if not division and "/" in text:
        return None
    toks = _TOKEN.findall(text)
    pos = 0
    numbers: list[int] = []

    def peek() -> str | None:
        return toks[pos] if pos < len(toks) else None

    def factor() -> int | Fraction:
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

    def term() -> int | Fraction:
        nonlocal pos
        v = factor()
        while peek() in ("*", "/"):
            op = toks[pos]
            pos += 1
            w = factor()
            if op == "*":
                v *= w
            elif w == 0:
                raise ValueError
            else:
                v = Fraction(v) / w
        return v

    def expr() -> int | Fraction:
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


def _apply(x: int | Fraction, op: str, y: int | Fraction) -> int | Fraction | None:
    """``x op y``, exact (a division gives a Fraction); ``None`` for a division by zero."""
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return None if y == 0 else Fraction(x) / y


def _combine(a: int, b: int, c: int, left: bool, o1: str, o2: str) -> int | Fraction | None:
    """``(a o1 b) o2 c`` (``left``) or ``a o1 (b o2 c)``; ``None`` if it divides by zero."""
    if left:
        ab = _apply(a, o1, b)
        return None if ab is None else _apply(ab, o2, c)
    bc = _apply(b, o2, c)
    return None if bc is None else _apply(a, o1, bc)


def _shapes(nums: tuple[int, ...], ops: str):
    """Every ``(a, b, c, left, o1, o2)`` of :func:`expressions`, in its order."""
    for a, b, c in itertools.permutations(nums):
        for left, (o1, o2) in itertools.product((True, False), itertools.product(ops, repeat=2)):
            yield a, b, c, left, o1, o2


def _text(a: int, b: int, c: int, left: bool, o1: str, o2: str, value: int | Fraction) -> str:
    """The expression's text, with parentheses only where they change ``value``."""
    flat_left = not (o1 in "+-" and o2 in "*/")  # how the text without parentheses groups
    flat = value if flat_left == left else _combine(a, b, c, flat_left, o1, o2)
    if flat == value:
        return f"{a}{o1}{b}{o2}{c}"
    return f"({a}{o1}{b}){o2}{c}" if left else f"{a}{o1}({b}{o2}{c})"


@functools.lru_cache(maxsize=4096)
def expressions(nums: tuple[int, ...], ops: str = "+-*") -> tuple[tuple[str, int | Fraction], ...]:
    """Every ``(text, value)`` combining three numbers with two of ``ops`` (``+ - *``, and ``/`` if given),
    in a fixed order (the numbers in the given order first); parentheses only where they change the value;
    none that divides by zero. Values are computed exactly (:func:`parse_expression` reads every text back to
    its value: ``tests/test_rl_tasks.py``)."""
    out = []
    for shape in _shapes(nums, ops):
        value = _combine(*shape)
        if value is not None:
            out.append((_text(*shape, value), value))
    return tuple(out)


def first_expression(nums: tuple[int, ...], target: int, ops: str = "+-*") -> str | None:
    """The first expression of :func:`expressions` whose value is ``target`` (``None`` if none is),
    without building the others."""
    for shape in _shapes(nums, ops):
        if _combine(*shape) == target:
            return _text(*shape, target)
    return None


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


# -- d1's tasks ------------------------------------------------------------------------------------------------

D1_DATA = Path(__file__).parent / "data" / "d1"  # d1's test files, as shipped there (PROVENANCE.md)
_BOXED = "\\boxed"
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` of ``text`` (braces balanced), ``None`` if there is none."""
    start = text.rfind(_BOXED + "{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len(_BOXED), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len(_BOXED) + 1:i]
    return None


def d1_answer(text: str) -> tuple[str, bool]:
    """The answer part of a completion, as d1 reads it, and whether it was marked: the content of the last
    ``\\boxed{...}`` (d1's evaluation), else of the last ``<answer>...</answer>`` (d1's training reward; an
    unclosed last ``<answer>`` runs to the end), else the whole text, unmarked."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed, True
    tagged = _ANSWER.findall(text)
    if tagged:
        return tagged[-1], True
    return text, False


def d1_equation(text: str) -> str:
    """The Countdown expression of a completion, as d1 reads it: :func:`d1_answer`, LaTeX ``\\times`` /
    ``\\cdot`` / ``\\div`` as ``* * /``, whitespace dropped, and ``expression = number`` cut to the
    expression (d1 drops a trailing ``= target``)."""
    eq, _ = d1_answer(text)
    for latex, op in (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/")):
        eq = eq.replace(latex, op)
    eq = "".join(eq.split())
    m = re.fullmatch(r"([^=]+)=\d+(?:\.\d*)?", eq)
    return m.group(1) if m else eq


def d1_grid(text: str) -> str:
    """The 16 cells of a Sudoku completion, as d1 reads them: the digits of :func:`d1_answer` (unmarked: of
    the first standalone 16-digit run if there is one, else of the whole text), cut or padded with ``0`` to 16."""
    ans, marked = d1_answer(text)
    if not marked:
        run = re.search(r"(?<!\d)\d{16}(?!\d)", ans)
        ans = run.group(0) if run else ans
    digits = "".join(ch for ch in ans if ch in "0123456789")
    return digits[:16].ljust(16, "0")


class _FixedTestSet(Task):
    """A task whose test split is a fixed list of instances (d1's files); training instances are generated
    by :meth:`draw` and never one of them."""

    def read_test_set(self) -> tuple:  # pragma: no cover - abstract
        """The test instances, read from the shipped file."""
        raise NotImplementedError

    @functools.cached_property
    def test_instances(self) -> tuple:
        """The test instances (read once)."""
        return self.read_test_set()

    @functools.cached_property
    def _test_prompts(self) -> frozenset[str]:
        return frozenset(self.prompt(i) for i in self.test_instances)

    @property
    def test_size(self) -> int:
        return len(self.test_instances)

    def in_test(self, prompt: str) -> bool:
        return prompt in self._test_prompts

    def generate(self, n: int, seed: int = 0, split: str = "train") -> list:
        """Training and validation: ``n`` generated instances, none of the test set (deterministic in
        ``(n, seed)``); test: the first ``n`` of the fixed test set, in its file's order (``seed`` plays no
        part; UserError past its size)."""
        if split == "test":
            if isinstance(n, int) and 0 <= n and n > self.test_size:
                raise UserError(f"{self.name}'s test set has {self.test_size} instances; asked for {n}")
            if n >= 0:
                return list(self.test_instances[:n])
        return super().generate(n, seed, split)


class D1Countdown(_FixedTestSet):
    """d1's Countdown with 3 numbers: ``"030,100,093:023="`` (numbers and target zero-padded to 3 digits: one
    prompt width), the answer any expression with ``+ - * /`` and parentheses that uses each number exactly
    once and equals the target (d1's metric; exact rational arithmetic, where d1 compares floats within
    1e-5: the same verdicts for three numbers up to 100, whose non-integer values are at least 1/10^4 from
    an integer). The expression is read with :func:`d1_equation`; unlike d1's ``eval``, unary signs, ``**``,
    ``//`` and decimals are refused (outside the game's rules).

    Test set: d1's 256 instances (``countdown_cd3_test.jsonl``): numbers 1..100, targets 1..100, every one
    reachable. d1 trains on the 3-number rows of the ``Jiayi-Pan/Countdown-Tasks-3to4`` Hub dataset, which
    esolm does not ship: training instances are generated instead, to match the test set's statistics: three
    numbers uniform in 1..100, an expression drawn uniformly from :func:`expressions` (``+ - * /``), kept
    when its value is an integer in 1..100 (on the test set, 89% of the targets need only ``+ -``, 4% also
    ``*``, 7% ``/``; this generator gives about 86%, 6%, 8%). The reference solution is the first expression
    of :func:`expressions` reaching the target."""

    name = "d1-countdown"
    prompt_length = 16
    completion_length = 13  # "(100-100)*100"
    max_number = max_target = 100
    _prompt = re.compile(r"(\d{3}),(\d{3}),(\d{3}):(\d{3})=")

    def read_test_set(self) -> tuple:
        rows = []
        for line in (D1_DATA / "countdown_cd3_test.jsonl").read_text().splitlines():
            rec = json.loads(line)
            nums = tuple(int(x) for x in rec["input"].split(","))
            rows.append((nums, int(rec["output"])))
        return tuple((nums, target, first_expression(nums, target, "+-*/")) for nums, target in rows)

    def draw(self, rng: random.Random):
        shapes = [(perm, left, o1, o2) for perm in itertools.permutations(range(3)) for left in (True, False)
                  for o1 in "+-*/" for o2 in "+-*/"]
        while True:  # uniform numbers and a uniform expression over them, kept when the value fits
            nums = tuple(rng.randint(1, self.max_number) for _ in range(3))
            perm, left, o1, o2 = rng.choice(shapes)
            value = _combine(*(nums[i] for i in perm), left, o1, o2)
            if value is not None and value == int(value) and 1 <= value <= self.max_target:
                return nums, int(value), first_expression(nums, int(value), "+-*/")

    def prompt(self, instance) -> str:
        (a, b, c), target, _ = instance
        return f"{a:03d},{b:03d},{c:03d}:{target:03d}="

    def solution(self, instance) -> str:
        return instance[2]

    def instruction(self, prompt: str) -> str:
        a, b, c, target = map(int, self._parse(self._prompt, prompt).groups())
        return (f"Write an arithmetic expression that equals {target}, using each of the numbers {a}, {b} and {c} "
                f"exactly once and only + - * / and parentheses. Give the expression, without '=', between "
                f"<answer> and </answer>.\n")

    def check(self, prompt: str, completion: str) -> bool:
        *nums, target = map(int, self._parse(self._prompt, prompt).groups())
        parsed = parse_expression(d1_equation(completion), division=True)
        return parsed is not None and parsed[0] == target and sorted(parsed[1]) == sorted(nums)

    def score(self, prompt: str, completion: str) -> float:
        """d1's training reward: 1.0 for a correct expression; 0.1 (d1's format score) for a wrong answer
        marked as one (``\\boxed{}`` or ``<answer>`` tags, what a pretrained LM is asked for); 0.0 otherwise
        (an unmarked wrong completion: every wrong answer of a tiny character model)."""
        if self.check(prompt, completion):
            return 1.0
        return FORMAT_SCORE if d1_answer(completion)[1] else 0.0

    def metrics(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, float]:
        """``answer_marked``: the fraction of completions whose answer is marked (tags or ``\\boxed{}``)."""
        return {"answer_marked": sum(d1_answer(c)[1] for c in completions) / max(len(completions), 1)}


class D1Sudoku(_FixedTestSet, Sudoku):
    """d1's 4x4 Sudoku: the prompt and answer of :class:`Sudoku` (16 cells, ``0`` a blank, then ``>``); the
    reward is d1's, the fraction of the blank cells whose digit equals the reference solution's (the grid read
    with :func:`d1_grid`), and an evaluation also reports d1's headline metric, ``cell_accuracy`` (correct
    blank cells over all blank cells of the evaluation), ``accuracy`` (every blank cell right) and
    ``valid_solutions`` (completions that are a solved grid keeping the givens, whichever).

    Test set: d1's 500 puzzles (``4x4_test_sudoku.csv``), 8 blanks each, with d1's solutions. 124 of them
    have more than one solution: d1 scores against its stored one, and so does this task (the others score
    a valid alternative as partly wrong; ``valid_solutions`` counts it). d1 trains on
    ``4x4_sudoku_unique_puzzles.csv`` (not in the repository snapshot read): training puzzles are generated
    instead, uniform over the puzzles with 8 blanks and a unique solution (a uniform solved grid, 8 uniform
    blank cells, redrawn until the solution is unique); a training puzzle's reference is its solution."""

    name = "d1-sudoku"
    blanks = 8

    def instruction(self, prompt: str) -> str:
        (puzzle,) = self._parse(self._prompt, prompt).groups()
        rows = " / ".join(puzzle[k:k + 4] for k in range(0, 16, 4))
        return (f"Solve this 4x4 Sudoku, given row by row with 0 for an empty cell: {rows}. Every row, column "
                f"and 2x2 box must hold the digits 1 to 4 once each. Give the 16 digits of the solved grid, row "
                f"by row, between <answer> and </answer>.\n")

    def read_test_set(self) -> tuple:
        lines = (D1_DATA / "4x4_test_sudoku.csv").read_text().splitlines()
        if lines[0] != "Puzzle,Solution":
            raise ValueError(f"unexpected header in {D1_DATA / '4x4_test_sudoku.csv'}: {lines[0]!r}")
        return tuple(tuple(line.split(",")) for line in lines[1:])

    @functools.cached_property
    def _reference(self) -> dict[str, str]:
        return dict(self.test_instances)

    def draw(self, rng: random.Random) -> tuple[str, str]:
        solutions = sudoku_solutions()
        while True:
            grid = rng.choice(solutions)
            blank = set(rng.sample(range(16), self.blanks))
            puzzle = "".join("0" if i in blank else d for i, d in enumerate(grid))
            if count_solutions(puzzle) == 1:
                return puzzle, grid

    def reference(self, puzzle: str) -> str:
        """The solution a completion is scored against: d1's for a test puzzle, else the unique one (UserError
        for a puzzle without exactly one)."""
        if puzzle in self._reference:
            return self._reference[puzzle]
        sols = puzzle_solutions(puzzle)
        if len(sols) != 1:
            raise UserError(f"{self.name} puzzle {puzzle!r} has {len(sols)} solutions and is not one of d1's "
                            f"test puzzles: no reference to score against")
        return sols[0]

    def cells(self, prompt: str, completion: str) -> tuple[int, int]:
        """(correct blank cells, blank cells) of one completion."""
        puzzle = self._parse(self._prompt, prompt).group(1)
        ref, grid = self.reference(puzzle), d1_grid(completion)
        empty = [i for i, d in enumerate(puzzle) if d == "0"]
        return sum(grid[i] == ref[i] for i in empty), len(empty)

    def score(self, prompt: str, completion: str) -> float:
        right, empty = self.cells(prompt, completion)
        return right / empty if empty else 0.0  # d1: a puzzle without blanks scores 0

    def check(self, prompt: str, completion: str) -> bool:
        return self.score(prompt, completion) == 1.0

    def correct(self, rewards: torch.Tensor) -> torch.Tensor:
        return rewards >= 1.0

    def metrics(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, float]:
        counts = [self.cells(p, c) for p, c in zip(prompts, completions, strict=True)]
        empty = sum(e for _, e in counts)
        valid = [Sudoku.check(self, p, d1_grid(c)) for p, c in zip(prompts, completions, strict=True)]
        return {"cell_accuracy": sum(r for r, _ in counts) / empty if empty else 0.0,
                "valid_solutions": sum(valid) / len(valid) if valid else 0.0}


TASKS: dict[str, Task] = {t.name: t for t in (Arithmetic(), Sudoku(), Countdown(), D1Countdown(), D1Sudoku())}


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
