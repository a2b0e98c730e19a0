"""Bad input to ``esolm rl`` and ``esolm eval-task``: one line, exit 2, before any work (or, for a reward that
fails mid-run, with the last checkpoint intact); and every surface resolves model names like ``load_model``.

* counts bounded by what they can mean: rollout steps (``SamplingParams.resolve``), held-out prompts (a
  documented cap), rollouts per step (a memory check);
* reward functions that hang (``task.reward_timeout``), call ``sys.exit``, fail at import, raise from a
  generator, return a dict, an endless generator or values past a float;
* prompt files with integers past Python's digit limit, deep nesting, lone surrogates; binary or hostile
  YAML configs; special-token text in prompts stays plain text;
* ``esolm-small`` by name for ``rl``, ``eval-task`` and lm-eval; a local name that cannot be read is an error,
  never silently the shipped model.
"""

import ast
import json
import os
from pathlib import Path

import pytest
import torch

import esolm.rl
from esolm import DiT, ModelConfig
from esolm.data.tokenizers import get_tokenizer
from esolm.io import save_pretrained
from test_rl_grpo import last_line, make_policies, run_cli, write_reward

ESOLM_RL = Path(esolm.rl.__file__).resolve().parent  # the package imported (PYTHONPATH)


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """The tiny length-14 policies of ``test_rl_grpo`` and an Eso-LM (B) of length 24 (room for longer prompts)."""
    out = make_policies(tmp_path_factory.mktemp("rl"))
    torch.manual_seed(0)
    tok = get_tokenizer("chars")
    cfg = ModelConfig(vocab_size=tok.vocab_size, mask_id=tok.mask_id, hidden_size=32, cond_dim=16, n_layers=2,
                      n_heads=2, length=24, adaln=True)
    out["b24"] = save_pretrained(DiT(cfg).randomize_zero_init(0.2), out["root"] / "b24",
                                 {"name": "esolm", "variant": "B", "alpha0": 0.5}, tokenizer=tok)
    return out


def one_line_error(rc, err, command, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"esolm {command}: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def prompt_file(tmp_path, *prompts, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def file_args(policy, tmp_path, prompts, reward, *extra):
    return ["rl", "arithmetic", f"policy={policy}", f"trainer.out_dir={tmp_path / 'o'}", "task.name=null",
            f"task.prompts={prompts}", f"task.reward={reward}", *extra]


# ------------------------------------------------------------------------------------------------------
# 1. Counts bounded by what they can mean


@pytest.mark.parametrize("argv, needle", [
    (["rl.steps=1000000000"], "rl.steps (for a sequence of 14 tokens) must be an integer in [1, 4096]"),
    (["rl.group_size=100000"], "rl.prompts_per_step x rl.group_size = 800,000 rollouts"),
    (["rl.prompts_per_step=100000"], "rl.prompts_per_step x rl.group_size = 1,600,000 rollouts"),
    (["task.eval_prompts=1000000000"], "task.eval_prompts must be an integer in [1, 100000]"),
    (["rl.temperature=0"], "decodes greedily"),
    (["rl.top_p=2"], "rl.top_p must lie in (0, 1]"),
    (["task.reward_timeout=0"], "task.reward_timeout must be a positive, finite number"),
])
def test_rl_counts_are_bounded_before_work(policies, tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.setattr("esolm.rl.trajectory.available_memory", lambda device: 8 << 30)
    rc, _, err = run_cli(["rl", "arithmetic", f"policy={policies['b']}", f"trainer.out_dir={tmp_path / 'o'}",
                          *argv], capsys)
    one_line_error(rc, err, "rl", needle)
    assert not (tmp_path / "o" / "checkpoints" / "last.ckpt").exists()


def test_the_default_rollout_batch_passes_the_memory_check(policies, tmp_path, monkeypatch):
    from esolm.rl.config import load_rl_config
    from esolm.rl.run import prepare_rl

    monkeypatch.setattr("esolm.rl.trajectory.available_memory", lambda device: 8 << 30)
    cfg = load_rl_config("arithmetic", [f"policy={policies['b']}", f"trainer.out_dir={tmp_path / 'o'}"])
    assert prepare_rl(cfg).loaded.model.config.length == 14


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "1000000000"], "steps (for a sequence of 14 tokens) must be an integer in [1, 4096]"),
    (["--prompts", "1000000000"], "held-out prompts must be an integer in [1, 100000]"),
    (["--prompts", "0"], "held-out prompts must be an integer in [1, 100000]"),
    (["--prompts", "4", "--show", "1000000000"], "show must be an integer in [0, 4]"),
    (["--seed", "-1"], "seed must be an integer in [0,"),
    (["--reward-timeout", "nan"], "positive, finite number"),
])
def test_eval_task_counts_are_bounded_before_work(policies, capsys, argv, needle):
    rc, _, err = run_cli(["eval-task", policies["b"], "arithmetic", *argv], capsys)
    one_line_error(rc, err, "eval-task", needle)


def test_eval_task_decodes_greedily_at_temperature_zero_and_shows_the_evaluated_samples(policies, capsys):
    argv = ["eval-task", policies["b"], "arithmetic", "--prompts", "5", "--temperature", "0", "--json"]
    rc, out, err = run_cli([*argv, "--show", "5"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert len(res["examples"]) == 5 and res["prompts"] == 5
    rc, out, _ = run_cli([*argv, "--show", "2"], capsys)
    assert rc == 0 and json.loads(out)["examples"] == res["examples"][:2]  # the evaluated samples, not a new draw


# ------------------------------------------------------------------------------------------------------
# 2. and 4. Reward functions


HANG = "    import time\n    time.sleep(3600)\n    return [0.0] * len(completions)"


@pytest.mark.parametrize("body, needle", [
    (HANG, "did not return within 0.5 s"),
    ("    import sys\n    sys.exit(0)", "reward function score called sys.exit(0)"),
    ("    return {i: 1.0 for i in range(len(completions))}", "got a dict"),
    ("    return [10 ** 400] * len(completions)", "too large for a float"),
    ("    yield 1.0\n    raise ValueError('half way')", "raised ValueError: half way"),
    ("    import itertools\n    return itertools.repeat(1.0)", "returned more than 2 rewards for 2 completions"),
    ("    return [str(1.0)] * len(completions)", "must return numbers, got str"),
    ("    return {1.0, 0.0}", "got set"),
])
def test_bad_reward_functions_are_one_line_errors_before_work(policies, tmp_path, capsys, body, needle):
    spec = write_reward(tmp_path / "r.py", body)
    rc, _, err = run_cli(file_args(policies["b"], tmp_path, prompt_file(tmp_path, "12+34="), spec,
                                   "task.reward_timeout=0.5"), capsys)
    one_line_error(rc, err, "rl", needle)
    assert not (tmp_path / "o" / "checkpoints").exists() or not any((tmp_path / "o" / "checkpoints").iterdir())


@pytest.mark.parametrize("source, needle", [
    ("def score(prompts, completions)\n    return []\n", "importing reward file"),
    ("raise RuntimeError('at import')\n", "raised RuntimeError: at import"),
    ("import sys\nsys.exit(0)\n", "called sys.exit(0)"),
    ("import time\ntime.sleep(3600)\n", "did not return within 0.5 s"),
])
def test_reward_files_that_cannot_be_imported(policies, tmp_path, capsys, source, needle):
    (tmp_path / "r.py").write_text(source)
    rc, _, err = run_cli(file_args(policies["b"], tmp_path, prompt_file(tmp_path, "1+1="), f"{tmp_path / 'r.py'}:score",
                                   "task.reward_timeout=0.5"), capsys)
    line = one_line_error(rc, err, "rl", needle)
    if "def score" in source:
        assert "SyntaxError" in line


def test_eval_task_reward_timeout(policies, tmp_path, capsys):
    spec = write_reward(tmp_path / "r.py", HANG)
    rc, _, err = run_cli(["eval-task", policies["b"], prompt_file(tmp_path, "1+1="), "--reward", spec, "--prompts", "2",
                          "--reward-timeout", "0.5"], capsys)
    one_line_error(rc, err, "eval-task", "did not return within 0.5 s")


@pytest.mark.parametrize("failure", ["    import sys\n        sys.exit(0)",
                                     "    import time\n        time.sleep(3600)"])
def test_a_reward_exiting_or_hanging_mid_run_keeps_the_last_checkpoint(policies, tmp_path, capsys, failure):
    """Two good iterations; then the reward calls sys.exit(0) (or hangs) on training batches only: one line,
    exit 2 (not 0 with nothing written), and last.ckpt is the intact iteration-2 checkpoint."""
    path = tmp_path / "r.py"
    spec = write_reward(path, "    return [float(len(c) % 2) for c in completions]")
    args = ["rl", "arithmetic", f"policy={policies['b']}", f"trainer.out_dir={tmp_path / 'o'}", f"task.reward={spec}",
            "trainer.progress=false", "task.eval_prompts=4", "task.eval_every=0", "rl.prompts_per_step=2",
            "rl.group_size=4", "trainer.ckpt_every=1", "task.reward_timeout=1"]
    assert run_cli([*args, "trainer.max_steps=2"], capsys)[0] == 0
    last = tmp_path / "o" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    write_reward(path, f"    if len(completions) > 4:\n    {failure}\n    return [0.0] * len(completions)")
    rc, _, err = run_cli([*args, "trainer.max_steps=4"], capsys)
    assert rc == 2 and last_line(err).startswith("esolm rl: error: reward function score"), err
    assert last.read_bytes() == before
    assert json.loads((tmp_path / "o" / "final_metrics.json").read_text())["iterations"] == 2  # the first run's


# ------------------------------------------------------------------------------------------------------
# 3. Prompt files and configs


@pytest.mark.parametrize("line, needle", [
    ('{"prompt": "1+1=", "n": ' + "9" * 5000 + "}", "p.jsonl:1 cannot be read: Exceeds the limit"),
    ('{"prompt": ' + "[" * 200_000 + "]" * 200_000 + "}", "p.jsonl:1 nests JSON too deeply"),
    ('{"prompt": "1+\\ud800="}', "p.jsonl:1 prompt is not valid UTF-8"),
    ('{"prompt": 5}', "needs a string field 'prompt'"),
])
def test_hostile_prompt_files(policies, tmp_path, capsys, line, needle):
    (tmp_path / "p.jsonl").write_text(line + "\n")
    spec = write_reward(tmp_path / "r.py", "    return [0.0] * len(completions)")
    rc, _, err = run_cli(file_args(policies["b"], tmp_path, tmp_path / "p.jsonl", spec), capsys)
    one_line_error(rc, err, "rl", needle)
    rc, _, err = run_cli(["eval-task", policies["b"], tmp_path / "p.jsonl", "--reward", spec], capsys)
    one_line_error(rc, err, "eval-task", needle)


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe\x00rl:\n  group_size: 4\n", "is not UTF-8 text"),
    (b"rl:\n  group_size: " + b"9" * 5000 + b"\n", "cannot be read: ValueError"),
    (b"rl: " + b"[" * 100_000 + b"\n", "cannot be read: RecursionError"),
])
def test_hostile_rl_config_files(policies, tmp_path, capsys, content, needle):
    (tmp_path / "c.yaml").write_bytes(content)
    rc, _, err = run_cli(["rl", tmp_path / "c.yaml", f"policy={policies['b']}"], capsys)
    one_line_error(rc, err, "rl", needle)


@pytest.mark.parametrize("value", ["9" * 5000, "[" * 100_000])
def test_hostile_overrides(policies, tmp_path, capsys, value):
    rc, _, err = run_cli(["rl", "arithmetic", f"policy={policies['b']}", f"rl.group_size={value}"], capsys)
    line = one_line_error(rc, err, "rl", "config key 'rl.group_size' expects int")
    assert len(line) < 200


def test_special_token_text_in_rl_prompts_is_plain_text(policies, tmp_path, capsys):
    """``<|mask|>`` / ``<|endoftext|>`` in prompts (of different lengths, in one batch) are encoded as text: the
    rollouts' prompt ids never hold the mask or an EOS from text, and a run and an evaluation complete."""
    from esolm.io import load_model
    from esolm.rl.grpo import rollout_groups
    from esolm.sampling.params import SamplingParams

    texts = ["<|mask|>1=", "12+3=", "<|endoftext|>", "9"]
    loaded = load_model(policies["b24"])
    tok = loaded.tokenizer
    batches, rows = rollout_groups(loaded.model, loaded.method, tok, texts, 2, SamplingParams(), seed=0)
    assert sorted(i for idx in rows for i in idx) == list(range(8))
    assert len({r.prompt_len for r in batches}) == 4  # one sampler batch per prompt length
    for r, idx in zip(batches, rows):
        for row, i in zip(r.tokens, idx):
            prompt = row[:r.prompt_len].tolist()
            assert prompt == [tok.bos_id, *tok.encode_text(texts[i // 2])]
            assert tok.mask_id not in prompt and tok.eos_id not in prompt[1:]
            assert tok.decode(prompt[1:]) == texts[i // 2]
    prompts = prompt_file(tmp_path, *texts)
    spec = write_reward(tmp_path / "r.py", "    return [float(len(c) % 2) for c in completions]")
    rc, _, err = run_cli(file_args(policies["b24"], tmp_path, prompts, spec, "trainer.max_steps=1",
                                   "task.eval_prompts=4", "rl.group_size=2", "rl.prompts_per_step=4",
                                   "trainer.progress=false"), capsys)
    assert rc == 0, err
    rc, out, err = run_cli(["eval-task", policies["b24"], prompts, "--reward", spec, "--prompts", "4", "--show", "4",
                            "--json"], capsys)
    assert rc == 0, err
    assert {e["prompt"] for e in json.loads(out)["examples"]} <= set(texts)


# ------------------------------------------------------------------------------------------------------
# 5. Model names


def test_shipped_model_by_name_on_every_surface(tmp_path, capsys):
    from esolm.integrations.lm_eval import check_model_args
    from esolm.rl.config import load_rl_config
    from esolm.rl.run import prepare_rl

    rc, out, err = run_cli(["eval-task", "esolm-small", "arithmetic", "--prompts", "2", "--steps", "2", "--alpha0",
                            "1", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["prompts"] == 2
    cfg = load_rl_config("arithmetic", ["policy=esolm-small", f"trainer.out_dir={tmp_path / 'o'}"])
    assert prepare_rl(cfg).loaded.model.config.length == 256
    assert check_model_args({"pretrained": "esolm-small"})["pretrained"] == "esolm-small"


def test_a_local_name_that_cannot_be_read_never_falls_through_to_the_shipped_model(tmp_path, capsys, monkeypatch):
    from esolm.errors import CheckpointError
    from esolm.integrations.lm_eval import check_model_args
    from esolm.io.pretrained import resolve_model

    monkeypatch.chdir(tmp_path)
    os.symlink("loop-b", "loop-a")
    os.symlink("loop-a", "loop-b")
    os.symlink("loop-a", "esolm-small")
    for argv, command in [(["sample", "esolm-small", "--num-samples", "1", "--out", "x.jsonl"], "sample"),
                          (["eval-task", "esolm-small", "arithmetic"], "eval-task"),
                          (["rl", "arithmetic", "policy=esolm-small", "trainer.out_dir=o"], "rl")]:
        rc, _, err = run_cli(argv, capsys)
        one_line_error(rc, err, command, "esolm-small", "symbolic link loop")
    with pytest.raises(CheckpointError, match="symbolic link loop"):
        check_model_args({"pretrained": "esolm-small"})
    os.remove("esolm-small")
    os.symlink("nowhere", "esolm-small")
    with pytest.raises(CheckpointError, match="broken symbolic link"):
        resolve_model("esolm-small")
    os.remove("esolm-small")
    assert resolve_model("esolm-small").name == "esolm-small"  # the shipped one, now that nothing local is there
    assert resolve_model("owner/some-model") == "owner/some-model"  # a repo id: fetched by load_model, not here


# ------------------------------------------------------------------------------------------------------
# Structure


def _names(node) -> bool:
    """A string constant, or a tuple/list/set of them (what a method name is compared with)."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_names(e) for e in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def test_rl_never_switches_on_a_method_name():
    """Capabilities (``rl_likelihoods``, ``diffusion_attention``, ``any_order``) and the decoders registry decide;
    no ``x.name`` / ``x.variant`` compared with a name in ``esolm/rl``."""
    hits = []
    for f in sorted(ESOLM_RL.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(x, ast.Attribute) and x.attr in ("name", "variant") for x in sides) and \
                        any(_names(x) for x in sides):
                    hits.append(f"{f.name}:{node.lineno}")
    assert hits == []


def test_rollouts_follow_the_sampling_params(policies):
    """A rollout is ``SamplingParams`` resolved for its length: steps bounded, alpha0 only where it applies."""
    from esolm.errors import UserError
    from esolm.io import load_model
    from esolm.rl.trajectory import rollout
    from esolm.sampling.params import SamplingParams

    loaded = load_model(policies["mdlm"])
    prompt = torch.tensor([[0, 5, 6]]).expand(2, 3)
    with pytest.raises(UserError, match="alpha0 applies to Eso-LM only"):
        rollout(loaded.model, loaded.method, prompt, SamplingParams(alpha0=0.5))
    with pytest.raises(UserError, match="must be an integer in"):
        rollout(loaded.model, loaded.method, prompt, steps=10 ** 9)
    r = rollout(loaded.model, loaded.method, prompt, SamplingParams(steps=3))
    assert r.order is None and r.logprobs is None and r.tokens.shape == (2, 14)
    assert (r.tokens[:, :3] == prompt).all() and (r.completions != loaded.model.config.mask_id).all()
