"""Verifiable RL tasks: the character tokenizer, generators, exact checkers, rewards and the task data source."""

import itertools
import random
import string

import numpy as np
import pytest

from esolm.data.datasets import build_datasets, pad_eos_documents, source_texts
from esolm.data.tokenizers import Tokenizer, get_tokenizer
from esolm.errors import ConfigError, UserError
from esolm.recipes import resolve
from esolm.rl.rewards import load_reward
from esolm.rl.tasks import (
    TASKS,
    Countdown,
    decode_completion,
    encode_prompt,
    expressions,
    get_task,
    parse_expression,
    sudoku_ok,
    sudoku_solutions,
)

PRINTABLE = "".join(chr(c) for c in range(32, 127))


@pytest.fixture(scope="module")
def chars():
    return get_tokenizer("chars")


# -- tokenizer ---------------------------------------------------------------------------------------------

def test_chars_vocabulary_and_round_trip(chars, tmp_path):
    assert (chars.vocab_size, chars.eos_id, chars.bos_id, chars.pad_id, chars.mask_id) == (97, 0, 0, 0, 1)
    assert chars.encode(PRINTABLE) == list(range(2, 97))  # one id per character, in ASCII order
    rng = random.Random(0)
    texts = ["", " ", "  a  b  ", "1+2=3", PRINTABLE[::-1]]
    texts += ["".join(rng.choices(PRINTABLE, k=rng.randint(1, 40))) for _ in range(200)]
    for t in texts:
        ids = chars.encode(t)
        assert len(ids) == len(t) and chars.decode(ids) == t
    loaded = Tokenizer.load(chars.save(tmp_path))
    assert loaded.fingerprint == chars.fingerprint
    assert [loaded.decode(loaded.encode(t)) for t in texts] == texts
    assert chars.decode([0, 1, 19], skip_special_tokens=False) == "<|endoftext|><|mask|>1"


# -- generators ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TASKS))
def test_generators_are_deterministic_fixed_width_and_splits_disjoint(name):
    task = get_task(name)
    a, b = task.generate(300, seed=3), task.generate(300, seed=3)
    assert a == b and task.generate(300, seed=4) != a
    train = {task.prompt(i) for i in task.generate(1000, seed=0, split="train")}
    val = {task.prompt(i) for i in task.generate(300, seed=0, split="validation")}
    test = {task.prompt(i) for i in task.generate(min(300, task.test_size or 300), seed=0, split="test")}
    assert train and val and test and not train & test and not train & val and not val & test
    assert {task.split_of(p) for p in val} == {"validation"} and {task.split_of(p) for p in train} == {"train"}
    assert {len(p) for p in train | val | test} == {task.prompt_length}
    sols = [task.solution(i) for i in task.generate(1000, seed=0)]
    assert max(map(len, sols)) <= task.completion_length
    assert task.length == 1 + task.prompt_length + task.completion_length + 1
    with pytest.raises(UserError, match="split must be one of"):
        task.generate(3, split="dev")


def test_unknown_task():
    with pytest.raises(UserError, match="unknown task"):
        get_task("chess")


# -- checkers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TASKS))
def test_reward_accepts_solutions_and_rejects_corruptions(name):
    task = get_task(name)
    inst = task.generate(300, seed=1)
    prompts, sols = [task.prompt(i) for i in inst], [task.solution(i) for i in inst]
    r = task.reward(prompts, sols)
    assert r == [1.0] * len(inst) and all(type(x) is float for x in r)
    rng = random.Random(0)
    bad = []
    for s in sols:  # change one character to another digit
        j = rng.randrange(len(s))
        digits = [d for d in "0123456789" if d != s[j] and s[j].isdigit()] or ["9"]
        bad.append(s[:j] + rng.choice(digits) + s[j + 1:] if s[j].isdigit() else s[:j] + "+" + s[j + 1:])
    wrong = [c for c, p in zip(bad, prompts, strict=True) if task.check(p, c)]
    if name == "arithmetic" or name == "sudoku":  # unique answers: any change is wrong
        assert wrong == []
    assert task.reward(prompts, ["", *bad[1:]])[0] == 0.0
    if not name.startswith("d1-"):  # d1's reading drops spaces and cuts a grid to 16 cells (test_rl_d1.py)
        assert task.reward(prompts[:2], [sols[0] + "1", " " + sols[1]]) == [0.0, 0.0]
    with pytest.raises(UserError, match="completions"):
        task.reward(prompts, sols[:-1])
    with pytest.raises(UserError, match=f"not a {name} prompt"):
        task.reward(["hello"], ["1"])


def test_arithmetic_checker_exhaustive_small():
    task = get_task("arithmetic")
    for a, b in itertools.product(range(0, 1000, 7), range(0, 1000, 11)):
        p = task.prompt((a, b))
        assert task.check(p, str(a + b))
        assert not task.check(p, str(a + b + 1)) and not task.check(p, str(a + b) + "1")
    assert task.check("005+007=", "012") and task.check("999+999=", "1998")  # any 3-digit operands


def test_every_4x4_sudoku_solution_is_valid_and_single_changes_are_not():
    sols = sudoku_solutions()
    assert len(sols) == len(set(sols)) == 288  # the known count of 4x4 Sudoku grids
    rows = ["".join(p) for p in itertools.permutations("1234")]
    rng = random.Random(0)
    others = ["".join(rng.choices(rows, k=4)) for _ in range(3000)]  # grids with valid rows only
    assert {g for g in others if sudoku_ok(g)} <= set(sols)
    task = get_task("sudoku")
    blank = "0" * 16 + ">"
    for g in sols:
        assert sudoku_ok(g) and task.check(blank, g)  # no givens: every solution counts
        for i in range(16):
            for d in "1234":
                if d != g[i]:
                    assert not sudoku_ok(g[:i] + d + g[i + 1:])
    assert not sudoku_ok(sols[0][:15]) and not sudoku_ok(sols[0][:15] + "5")


def test_sudoku_checker_requires_the_givens_and_accepts_any_valid_solution():
    task = get_task("sudoku")
    for puzzle, grid in task.generate(100, seed=2):
        fitting = [s for s in sudoku_solutions() if all(p in ("0", c) for p, c in zip(puzzle, s, strict=True))]
        assert fitting == [grid]  # generated puzzles have a unique solution
        assert 4 <= puzzle.count("0") <= 10
        assert [task.check(puzzle + ">", s) for s in sudoku_solutions()].count(True) == 1
    # a puzzle with two solutions: both count
    g = sudoku_solutions()[0]
    two = [s for s in sudoku_solutions() if sum(a != b for a, b in zip(g, s, strict=True)) == 4][0]
    puzzle = "".join(a if a == b else "0" for a, b in zip(g, two, strict=True))
    assert task.check(puzzle + ">", g) and task.check(puzzle + ">", two)


def test_countdown_parser_is_exact_and_safe():
    assert parse_expression("1+2*3") == (7, [1, 2, 3])
    assert parse_expression("(1+2)*3") == (9, [1, 2, 3])
    assert parse_expression("10-(4-3)") == (9, [10, 4, 3])
    assert parse_expression("2*(3-7)") == (-8, [2, 3, 7])
    assert parse_expression("((5))") == (5, [5])
    for bad in ["", "1+", "+1", "-1+2", "1 + 2", "(1+2", "1+2)", "()", "1/2", "2**3", "1e3", "__import__('os')",
                "abs(1)", "1,2", "1+2\n", "0x10", "1_000", "(" * 40 + "1" + ")" * 40]:
        assert parse_expression(bad) is None, bad
    rng = random.Random(0)
    for _ in range(2000):  # agrees with Python's arithmetic on random well-formed expressions
        nums = [rng.randint(0, 50) for _ in range(rng.randint(1, 5))]
        ops = rng.choices("+-*", k=len(nums) - 1)
        parts = [str(nums[0])] + [o + str(x) for o, x in zip(ops, nums[1:], strict=True)]
        i, j = sorted(rng.sample(range(len(nums) + 1), 2)) if len(nums) > 1 else (0, 1)
        lead = parts[i][:-len(str(nums[i]))]  # the operator before number i stays outside the parentheses
        expr = "".join(parts[:i]) + lead + "(" + parts[i][len(lead):] + "".join(parts[i + 1:j]) + ")" + \
            "".join(parts[j:])
        assert parse_expression(expr) == (eval(expr), nums), expr  # eval only on generated text
    junk = string.ascii_letters + "/%.=<>[]{}!&|^~ _\t"
    for c in junk:
        assert parse_expression("1" + c + "2") is None


def test_countdown_uses_each_number_exactly_once():
    task = Countdown()
    p = "3,5,7:022="
    assert not task.check(p, "3+5*7-16")  # 16 is not given
    assert task.check(p, "5*3+7") and task.check(p, "7+3*5") and task.check(p, "(7)+5*3")
    assert not task.check(p, "5*3+7+0") and not task.check(p, "5*3+7*1")  # extra numbers
    assert not task.check("3,5,7:015=", "5*3")  # a number left out
    assert not task.check("3,3,7:016=", "3*3+7+0") and not task.check("3,3,7:016=", "3+3+3+7")
    assert task.check("3,3,7:016=", "3*3+7") and not task.check("3,3,7:016=", "3*7-5")
    for inst in task.generate(500, seed=5):
        nums, target, expr = inst
        value, used = parse_expression(expr)
        assert value == target and 1 <= target <= 999 and sorted(used) == sorted(nums)
        assert expr == next(e for e, v in expressions(nums) if v == target)  # a function of the prompt


def test_reward_is_a_plain_callable_for_any_prompt_list():
    reward = get_task("arithmetic").reward
    assert reward(["001+002=", "099+099="], ["3", "199"]) == [1.0, 0.0]
    assert reward([], []) == []


# -- sequences and data ---------------------------------------------------------------------------------------

def test_encode_prompt_and_decode_completion(chars):
    task = get_task("countdown")
    inst = task.generate(1, seed=0)[0]
    ids = encode_prompt(task, chars, inst)
    assert ids[0] == chars.bos_id and len(ids) == 1 + task.prompt_length
    assert chars.decode(ids[1:]) == task.prompt(inst)
    comp = chars.encode("12+3") + [chars.eos_id, 19, chars.eos_id]
    assert decode_completion(chars, comp) == "12+3"
    assert decode_completion(chars, chars.encode("7*2")) == "7*2"
    assert decode_completion(chars, [chars.mask_id, 19]) == "<|mask|>1"  # never silently dropped


def test_pad_eos_mode_fills_with_eos_and_marks_everything_valid():
    ids, valid = pad_eos_documents([[5, 6, 7], [8]], 6, bos_id=0, eos_id=0, pad_id=3)
    assert ids.tolist() == [[0, 5, 6, 7, 0, 0], [0, 8, 0, 0, 0, 0]]
    assert valid.all()
    with pytest.raises(ConfigError, match="does not fit"):
        pad_eos_documents([[5] * 5], 6, bos_id=0, eos_id=0, pad_id=0)


@pytest.mark.parametrize("name", list(TASKS))
def test_task_source_decodes_back_to_solved_instances(name, chars, tmp_path):
    task = get_task(name)
    train, val = source_texts(f"task:{name}", 0.02, split_seed=0, max_documents=200)
    assert len(train) == 200 and len(val) == min(500, task.test_size or 500)
    assert source_texts(f"task:{name}", 0.5, split_seed=0, max_documents=200) == (train, val)
    assert train == task.texts(200, 0, "train") and not {t[:task.prompt_length] for t in train} & \
        {t[:task.prompt_length] for t in val}
    splits = build_datasets(f"task:{name}", chars, task.length, "pad-eos", max_documents=200, cache_dir=tmp_path)
    rows = np.asarray(splits.train.ids)
    assert rows.shape == (200, task.length) and np.asarray(splits.train.valid).all()
    for row, text in zip(rows, train, strict=True):
        assert row[0] == chars.bos_id
        body = row[1:].tolist()
        assert decode_completion(chars, body) == text
        assert body[len(text):] == [chars.eos_id] * (task.length - 1 - len(text))
        prompt = text[:task.prompt_length]
        assert task.check(prompt, decode_completion(chars, body[task.prompt_length:]))
    with pytest.raises(UserError, match="unknown task"):
        source_texts("task:nope", 0.02)


# -- user reward functions ------------------------------------------------------------------------------------

def test_load_reward_from_file_and_module(tmp_path, monkeypatch):
    f = tmp_path / "my_reward.py"
    f.write_text("def length_reward(prompts, completions):\n    return [float(len(c)) for c in completions]\n"
                 "NOT_CALLABLE = 3\n")
    fn = load_reward(f"{f}:length_reward")
    assert fn(["a", "b"], ["xy", ""]) == [2.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_reward:length_reward")(["a"], ["abc"]) == [3.0]
    assert load_reward("esolm.rl.tasks:parse_expression") is parse_expression
    for spec, msg in [(f"{f}:missing", "no function"), (f"{f}:NOT_CALLABLE", "no function"),
                      (f"{tmp_path}/nope.py:f", "not found"), ("no_such_module_xyz:f", "not found"),
                      ("justaname", "module:function"), (f"{f}:", "module:function")]:
        with pytest.raises(UserError, match=msg):
            load_reward(spec)


@pytest.mark.parametrize("name", list(TASKS))
def test_task_presets_fit_their_task(name):
    cfg = resolve(f"task-{name}")
    assert cfg.data.source == f"task:{name}" and cfg.data.length == get_task(name).length
    assert (cfg.data.tokenizer, cfg.data.mode, cfg.method.name, cfg.method.variant) == ("chars", "pad-eos",
                                                                                         "esolm", "B")
