"""d1's tasks (``d1-countdown``, ``d1-sudoku``): the shipped test sets, the generators of training instances,
d1's answer reading and metrics on hand-made cases, and ``esolm eval-task`` / ``esolm rl`` on a tiny policy."""

import collections
import json
from fractions import Fraction

import pytest
import torch

from esolm import DiT, ModelConfig
from esolm.data.tokenizers import get_tokenizer
from esolm.errors import UserError
from esolm.io import save_pretrained
from esolm.rl.prompts import prompt_source
from esolm.rl.tasks import (
    D1_DATA,
    count_solutions,
    d1_equation,
    d1_grid,
    first_expression,
    fits,
    get_task,
    parse_expression,
    puzzle_solutions,
    sudoku_ok,
)
from test_rl_grpo import last_line, run_cli

CD, SU = get_task("d1-countdown"), get_task("d1-sudoku")
PUZZLE, SOLUTION = "3102200002100320", "3142243142131324"  # d1's first test puzzle (a unique solution)


# -- the shipped test sets ---------------------------------------------------------------------------------------

def test_countdown_test_set_is_d1s_and_every_target_is_reachable():
    rows = [json.loads(ln) for ln in (D1_DATA / "countdown_cd3_test.jsonl").read_text().splitlines()]
    assert len(rows) == CD.test_size == 256
    inst = CD.generate(256, split="test")
    assert [((*map(int, r["input"].split(",")),), int(r["output"])) for r in rows] == [i[:2] for i in inst]
    assert inst[0][:2] == ((30, 100, 93), 23)  # the file's order
    for nums, target, sol in inst:
        assert all(1 <= x <= 100 for x in nums) and 1 <= target <= 100
        value, used = parse_expression(sol, division=True)
        assert value == target and sorted(used) == sorted(nums)  # reachable, each number once
    assert CD.reward([CD.prompt(i) for i in inst], [CD.solution(i) for i in inst]) == [1.0] * 256
    assert CD.generate(3, seed=7, split="test") == inst[:3]  # the seed plays no part
    with pytest.raises(UserError, match="test set has 256 instances"):
        CD.generate(257, split="test")


def test_sudoku_test_set_is_d1s_valid_and_consistent():
    inst = SU.generate(500, split="test")
    assert SU.test_size == 500 and inst[0] == (PUZZLE, SOLUTION)
    for puzzle, solution in inst:
        assert sudoku_ok(solution) and fits(puzzle, solution) and puzzle.count("0") == 8
    assert len({p for p, _ in inst}) == 500
    many = collections.Counter(count_solutions(p) for p, _ in inst)
    assert many == {1: 376, 2: 115, 3: 8, 4: 1}  # PROVENANCE.md: 124 with more than one solution
    assert SU.reward([SU.prompt(i) for i in inst], [s for _, s in inst]) == [1.0] * 500


# -- the generators of training instances -------------------------------------------------------------------------

def test_countdown_training_instances_follow_the_test_distribution():
    inst = CD.generate(1500, seed=0)
    test = {CD.prompt(i) for i in CD.generate(256, split="test")}
    assert not {CD.prompt(i) for i in inst} & test
    for nums, target, sol in inst:
        assert all(1 <= x <= 100 for x in nums) and 1 <= target <= 100
        assert first_expression(nums, target, "+-*/") == sol and CD.check(CD.prompt((nums, target, sol)), sol)
    share = collections.Counter("+-" if first_expression(n, t, "+-") else "*/" for n, t, _ in inst)
    assert 0.80 < share["+-"] / len(inst) < 0.92  # the test set: 229 / 256 = 0.89 need only + and -
    assert 0.07 < sum(t < 10 for _, t, _ in inst) / len(inst) < 0.16  # the test set: 31 / 256 = 0.12
    assert max(len(s) for _, _, s in inst) <= CD.completion_length
    assert {len(CD.prompt(i)) for i in inst} == {CD.prompt_length}


def test_sudoku_training_puzzles_have_8_blanks_and_one_solution():
    test = {p for p, _ in SU.generate(500, split="test")}
    for puzzle, solution in SU.generate(300, seed=2):
        assert puzzle.count("0") == 8 and puzzle_solutions(puzzle) == [solution] and puzzle not in test


# -- d1's metrics and answer reading, by hand --------------------------------------------------------------------

def test_sudoku_reward_is_the_fraction_of_blank_cells_right():
    prompt = PUZZLE + ">"
    blanks = [i for i, d in enumerate(PUZZLE) if d == "0"]
    assert len(blanks) == 8
    wrong3 = list(SOLUTION)
    for i in blanks[:3]:
        wrong3[i] = "4" if SOLUTION[i] != "4" else "1"
    wrong_given = "4" + SOLUTION[1:]  # cell 0 is a given: d1 does not score givens
    cases = [SOLUTION, "".join(wrong3), wrong_given, SOLUTION[:12], SOLUTION + "1234", "",
             "<reasoning>r1 c2 is 4</reasoning>\n<answer>\n3142\n2431\n4213\n1324\n</answer>",
             f"so the grid is {SOLUTION}.", "<answer>3142 2431</answer>"]
    got = SU.reward([prompt] * len(cases), cases)
    assert blanks == [2, 5, 6, 7, 8, 11, 12, 15]
    want = [1.0, 5 / 8, 1.0, 6 / 8, 1.0, 0.0, 1.0, 1.0, 4 / 8]  # 12 cells read: 6 blanks right; 8 cells: 4
    assert got == want
    assert SU.correct(torch.tensor(got, dtype=torch.float64)).tolist() == [g == 1.0 for g in got]
    assert d1_grid("<answer>31x4</answer>") == "314" + "0" * 13  # digits only, padded with 0


def test_sudoku_scores_against_d1s_solution_and_cell_accuracy_is_over_all_blank_cells():
    puzzle, stored = next((p, s) for p, s in SU.generate(500, split="test") if count_solutions(p) > 1)
    other = next(g for g in puzzle_solutions(puzzle) if g != stored)
    r = SU.reward([puzzle + ">"], [other])[0]
    assert r < 1.0 and SU.metrics([puzzle + ">"], [other])["valid_solutions"] == 1.0
    # a puzzle with 4 blanks (unique) beside d1's first (8 blanks): 6 of 8 and 1 of 4 right
    four = "0" + SOLUTION[1:4] + "0" + SOLUTION[5:8] + "0" + SOLUTION[9:12] + "0" + SOLUTION[13:]
    assert count_solutions(four) == 1
    six = list(SOLUTION)
    for i in [i for i, d in enumerate(PUZZLE) if d == "0"][:2]:
        six[i] = "4" if SOLUTION[i] != "4" else "1"
    one = list(SOLUTION)
    for i in (0, 4, 8):
        one[i] = "4" if SOLUTION[i] != "4" else "1"
    prompts, comps = [PUZZLE + ">", four + ">"], ["".join(six), "".join(one)]
    assert SU.reward(prompts, comps) == [0.75, 0.25]
    m = SU.metrics(prompts, comps)
    assert m["cell_accuracy"] == 7 / 12 and m["valid_solutions"] == 0.0  # d1's total, not the mean 0.5
    with pytest.raises(UserError, match="has 24 solutions"):
        SU.reward(["1200" + "0" * 12 + ">"], [SOLUTION])  # not d1's, not unique: no reference


def test_countdown_reads_d1_style_answers():
    prompt = "030,100,093:023="
    cases = {"30-100+93": 1.0, "93 - 100 + 30": 1.0, "<answer>\n93+30-100\n</answer>": 1.0,
             "<reasoning>try 93-100</reasoning><answer>(93 - 100) + 30</answer>": 1.0,
             "\\boxed{93 + 30 - 100}": 1.0, "The answer: \\boxed{30 + 93 - 100 = 23}": 1.0,
             "<answer>wrong</answer> then <answer>30+93-100</answer>": 1.0,
             "100-93+30": 0.0, "30+93-100-0": 0.0, "93+30-100+100-100": 0.0, "30+93": 0.0, "": 0.0,
             "-30+100-93+46": 0.0, "30**2": 0.0, "30//3": 0.0, "\\boxed{30+93-100": 0.0}
    assert CD.reward([prompt] * len(cases), list(cases)) == list(cases.values())
    # division, exact: 75 / (100 - 97) = 25; 100 / (3 - 3) divides by zero
    assert CD.reward(["075,100,097:025="] * 4, ["75/(100-97)", "75 \\div (100 - 97)", "75/100-97", "100/(97-97)+75"]) \
        == [1.0, 1.0, 0.0, 0.0]
    assert parse_expression("1/3*3", division=True) == (Fraction(1), [1, 3, 3])
    assert parse_expression("4/(2-2)", division=True) is None and parse_expression("4/2") is None
    assert d1_equation("\\boxed{7 \\times 3 \\cdot 2} = 42") == "7*3*2"


# -- the commands, on a tiny policy -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    tok = get_tokenizer("chars")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, mask_id=tok.mask_id, hidden_size=32, cond_dim=16, n_layers=2,
                      n_heads=2, length=SU.length, adaln=True)
    root = tmp_path_factory.mktemp("d1")
    save_pretrained(DiT(cfg).randomize_zero_init(0.2), root / "b", {"name": "esolm", "variant": "B", "alpha0": 0.5},
                    tokenizer=tok)
    return root / "b"


def test_eval_task_reports_d1s_metrics(policy, capsys):
    rc, out, err = run_cli(["eval-task", policy, "d1-sudoku", "--prompts", "4", "--show", "4", "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    prompts = [e["prompt"] for e in res["examples"]]
    comps = [e["completion"] for e in res["examples"]]
    assert prompts == [SU.prompt(i) for i in SU.generate(4, split="test")]
    rewards = SU.reward(prompts, comps)
    assert res["reward"] == pytest.approx(sum(rewards) / 4, abs=1e-12)
    assert res["accuracy"] == sum(r == 1.0 for r in rewards) / 4
    assert res["cell_accuracy"] == SU.metrics(prompts, comps)["cell_accuracy"] and "valid_solutions" in res
    rc, out, err = run_cli(["eval-task", policy, "d1-countdown", "--prompts", "3"], capsys)
    assert rc == 0 and out.startswith("d1-countdown: accuracy") and "3 held-out prompts" in out, err
    rc, _, err = run_cli(["eval-task", policy, "d1-countdown", "--prompts", "300"], capsys)
    assert rc == 2 and "test set has 256 prompts" in last_line(err)


def test_eval_task_and_rl_score_the_validation_split_when_asked(policy, tmp_path, capsys):
    """``--split validation`` / ``task.eval_split=validation`` score generated prompts of the validation split
    (never d1's test instances, never training prompts); a prompt file has none: one line, before work."""
    rc, out, err = run_cli(["eval-task", policy, "d1-countdown", "--prompts", "5", "--show", "5", "--json",
                            "--split", "validation"], capsys)
    assert rc == 0, err
    prompts = [e["prompt"] for e in json.loads(out)["examples"]]
    assert prompts == [CD.prompt(i) for i in CD.generate(5, seed=1234, split="validation")]
    assert all(CD.split_of(p) == "validation" and not CD.in_test(p) for p in prompts)
    rc, out, err = run_cli(["eval-task", policy, "d1-countdown", "--prompts", "300", "--split", "validation"],
                           capsys)  # the validation split is generated: no size limit of d1's test set
    assert rc == 0 and "300 validation prompts" in out, err
    prompts_file = tmp_path / "p.txt"
    prompts_file.write_text("1+1=\n2+2=\n")
    (tmp_path / "r.py").write_text("def score(prompts, completions):\n    return [0.0 for _ in prompts]\n")
    rc, _, err = run_cli(["eval-task", policy, str(prompts_file), "--reward", f"{tmp_path / 'r.py'}:score",
                          "--split", "validation"], capsys)
    assert rc == 2 and "has no validation split" in last_line(err)
    out_dir = tmp_path / "rl"
    rc, _, err = run_cli(["rl", "d1-countdown", f"policy={policy}", f"trainer.out_dir={out_dir}",
                          "trainer.progress=false", "task.eval_prompts=4", "task.eval_every=0",
                          "task.eval_split=validation", "rl.prompts_per_step=1", "rl.group_size=2",
                          "trainer.max_steps=1"], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["rl", "d1-countdown", f"policy={policy}", f"trainer.out_dir={tmp_path / 'x'}",
                          "task.eval_split=dev"], capsys)
    assert rc == 2 and "task.eval_split must be test or validation" in last_line(err)


def test_rl_runs_on_d1_sudoku_with_its_partial_reward(policy, tmp_path, capsys):
    out = tmp_path / "rl"
    rc, _, err = run_cli(["rl", "d1-sudoku", f"policy={policy}", f"trainer.out_dir={out}", "trainer.progress=false",
                          "trainer.logger=csv", "task.eval_prompts=3", "task.eval_every=0", "rl.prompts_per_step=2",
                          "rl.group_size=2", "trainer.max_steps=1", "trainer.ckpt_every=1"], capsys)
    assert rc == 0, err
    evals = [json.loads(ln) for ln in (out / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 2 and all("cell_accuracy" in e for e in evals)
    rc, _, err = run_cli(["rl", "d1-countdown", f"policy={policy}", f"trainer.out_dir={tmp_path / 'x'}",
                          "task.eval_prompts=257"], capsys)
    assert rc == 2 and "task.eval_prompts = 257" in last_line(err)


def test_the_task_source_keeps_d1s_metric_only_with_its_own_reward(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def half(prompts, completions):\n    return [0.75 for _ in completions]\n")
    own, user = prompt_source("d1-sudoku"), prompt_source("d1-sudoku", reward=f"{f}:half")
    r = torch.tensor([0.75], dtype=torch.float64)
    assert own.correct(r).tolist() == [False] and user.correct(r).tolist() == [True]  # a user's: reward > 0.5
    assert own.test_size == user.test_size == 500


# -- d1's format score, instruction prompts and completion lengths (for a pretrained LM such as esolm-smol) --------

def test_countdown_reward_gives_d1s_format_score_to_marked_wrong_answers():
    """d1's training reward: 1 correct, 0.1 a wrong answer in ``<answer>`` tags or ``\\boxed{}``, 0 an unmarked wrong
    completion; accuracy counts only the 1s; ``answer_marked`` is the fraction of marked completions."""
    prompt = "030,100,093:023="
    cases = {"<answer>30+93</answer>": 0.1, "\\boxed{1+1}": 0.1, "<answer>no idea</answer>": 0.1,
             "<answer>30+93-100</answer>": 1.0, "30+93-100": 1.0, "30+93": 0.0, "answer: 30+93": 0.0}
    comps = list(cases)
    assert CD.reward([prompt] * len(comps), comps) == list(cases.values())
    assert CD.correct(torch.tensor(list(cases.values()))).tolist() == [v == 1.0 for v in cases.values()]
    assert CD.metrics([prompt] * len(comps), comps) == {"answer_marked": 4 / 7}


@pytest.mark.parametrize("task", [CD, SU])
def test_instruction_prompts_are_the_same_instances_scored_on_their_compact_prompt(task, tmp_path):
    compact, shown = prompt_source(task.name), prompt_source(task.name, style="instruction")
    for split in ("test", "validation"):
        a, b = compact.held_out(6, 3, split), shown.held_out(6, 3, split)
        assert b == [task.instruction(p) for p in a] and len(set(b)) == len(set(a))
    assert shown.train(5, 9) == [task.instruction(p) for p in compact.train(5, 9)]
    a, b = compact.test(4, 0), shown.test(4, 0)
    answers = [task.solution(i) for i in task.generate(4, split="test")]
    answers = [f"<answer>{x}</answer>" for x in answers[:2]] + ["<answer>1</answer>", "nonsense"]
    assert shown.rewards(b, answers).tolist() == compact.rewards(a, answers).tolist()
    assert shown.metrics(b, answers) == compact.metrics(a, answers)
    with pytest.raises(UserError, match="arithmetic has no instruction prompts"):
        prompt_source("arithmetic", style="instruction")
    with pytest.raises(UserError, match="prompt style must be one of"):
        prompt_source(task.name, style="chat")
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    (tmp_path / "r.py").write_text("def score(prompts, completions):\n    return [0.0 for _ in prompts]\n")
    with pytest.raises(UserError, match="instruction prompt style is a shipped task's"):
        prompt_source(prompts=str(f), reward=f"{tmp_path / 'r.py'}:score", style="instruction")


def test_completion_length_and_prompt_style_on_the_command_line(policy, tmp_path, capsys):
    """``--max-new-tokens`` / ``rl.max_completion_length`` bound every completion; an instruction prompt that does
    not fit the tiny policy is a one-line error before work; bad values are one-line config errors."""
    rc, out, err = run_cli(["eval-task", policy, "d1-sudoku", "--prompts", "6", "--show", "6", "--json",
                            "--max-new-tokens", "3"], capsys)
    assert rc == 0, err
    assert all(len(e["completion"]) <= 3 for e in json.loads(out)["examples"])  # character tokenizer
    rc, _, err = run_cli(["eval-task", policy, "d1-sudoku", "--prompt-style", "instruction"], capsys)
    assert rc == 2 and "policy's length" in last_line(err), err
    rc, _, err = run_cli(["rl", "d1-sudoku", f"policy={policy}", f"trainer.out_dir={tmp_path / 'a'}",
                          "trainer.progress=false", "task.eval_prompts=2", "task.eval_every=0", "rl.prompts_per_step=1",
                          "rl.group_size=2", "trainer.max_steps=1", "rl.max_completion_length=4"], capsys)
    assert rc == 0, err
    for bad, needle in (("rl.max_completion_length=0", "rl.max_completion_length must be a positive integer"),
                        ("task.prompt_style=chat", "task.prompt_style must be one of compact, instruction")):
        rc, _, err = run_cli(["rl", "d1-sudoku", f"policy={policy}", f"trainer.out_dir={tmp_path / 'b'}", bad], capsys)
        assert rc == 2 and needle in last_line(err), err
