"""GRPO (``esolm.rl.grpo``) and the ``esolm rl`` / ``esolm eval-task`` commands on tiny policies.

* advantages and the clipped loss against their formulas (float64), and the loss's gradient at ratio 1 is
  the policy gradient ``-mean_tokens A grad log pi``;
* a run writes checkpoints, logs, held-out evaluations and an exported policy; resuming is bit-exact;
* bad input (G < 2, an empty prompt file, reward functions that raise / return NaN / the wrong length,
  exact likelihood for an (A) model) -> one line, exit 2, and the last checkpoint survives a failure.
"""

import json
import math

import pytest
import torch

from esolm import DiT, ModelConfig, cli
from esolm.data.tokenizers import get_tokenizer
from esolm.io import load_model, save_pretrained
from esolm.rl import grpo
from esolm.rl.grpo import group_advantages, grpo_loss, merge_stats
from esolm.training.checkpoints import read_checkpoint


def make_policies(root):
    """Tiny length-14 policies with the character tokenizer (Eso-LM (B), (A), MDLM) and a parity reward."""
    tok = get_tokenizer("chars")
    out = {}
    for name, method in {"b": {"name": "esolm", "variant": "B", "alpha0": 0.5},
                         "a": {"name": "esolm", "variant": "A", "alpha0": 0.5},
                         "mdlm": {"name": "mdlm"}}.items():
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=tok.vocab_size, mask_id=tok.mask_id, hidden_size=32, cond_dim=16, n_layers=2,
                          n_heads=2, length=14, adaln=True)
        model = DiT(cfg).randomize_zero_init(0.2)
        save_pretrained(model, root / name, method, tokenizer=tok)
        out[name] = root / name
    (root / "parity.py").write_text("def score(prompts, completions):\n"
                                    "    return [float(sum(map(ord, c)) % 2) for c in completions]\n")
    out["root"] = root
    out["reward"] = f"{root / 'parity.py'}:score"  # varies across a random policy's completions
    return out


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    return make_policies(tmp_path_factory.mktemp("rl"))


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def last_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def rl_args(policy, out, *extra):
    return ["rl", "arithmetic", f"policy={policy}", f"trainer.out_dir={out}", "trainer.progress=false",
            "trainer.logger=csv", "task.eval_prompts=8", "task.eval_every=2", "rl.prompts_per_step=2",
            "rl.group_size=4", "trainer.ckpt_every=2", *extra]


def test_group_advantages_and_clipped_loss_follow_their_formulas():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    a = group_advantages(r, 4)
    g = r.view(2, 4)
    ref = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)
    torch.testing.assert_close(a, ref, rtol=0, atol=1e-15)
    assert a[4:].abs().max() == 0  # a group with equal rewards teaches nothing
    torch.testing.assert_close(group_advantages(r, 4, scale="none"), (g - g.mean(1, keepdim=True)).reshape(-1))
    old = torch.log(torch.tensor([[0.5, 0.2], [0.3, 0.9]], dtype=torch.float64))
    new = old + torch.tensor([[0.5, -0.5], [-0.5, 0.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, stats = grpo_loss(new, old, adv, 0.2)
    rho = (new - old).exp()
    want = -torch.minimum(rho * adv[:, None], rho.clamp(0.8, 1.2) * adv[:, None]).mean()
    assert float(loss) == pytest.approx(float(want), abs=1e-15)
    # the clip is active where it removes the gradient (TRL): rho > 1 + eps with A > 0 (token [0, 0]) and
    # rho < 1 - eps with A < 0 (token [1, 0]); rho < 1 - eps with A > 0 (token [0, 1]) is not clipped
    assert (stats["clip_high"], stats["clip_low"], stats["clip_frac"]) == (0.25, 0.25, 0.5)
    assert stats["ratio_max"] == pytest.approx(math.exp(0.5), abs=1e-15) and stats["tokens"] == 4
    ref_lp = old - 0.3
    loss_kl, stats = grpo_loss(new, old, adv, 0.2, ref_lp, beta=0.1)
    d = ref_lp - new
    assert float(loss_kl - loss) == pytest.approx(0.1 * float((d.exp() - d - 1).mean()), abs=1e-15)


def test_loss_gradient_at_ratio_one_is_the_policy_gradient():
    theta = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([0.7, -1.1, 0.4], dtype=torch.float64)
    logp = theta.log_softmax(-1)[:, :4]
    loss, _ = grpo_loss(logp, logp.detach(), adv, 0.2)
    (g1,) = torch.autograd.grad(loss, theta)
    pg = -(adv[:, None] * theta.log_softmax(-1)[:, :4]).mean()
    (g2,) = torch.autograd.grad(pg, theta)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-15)


def test_zero_probability_tokens_never_make_the_loss_nan():
    """-inf log-probabilities (a truncated law): a token the old law rules out has no ratio and is left out; one
    the new policy rules out has ratio 0; in the KL a token the policy rules out weighs 0 (ref = new = -inf is not
    NaN), one only the reference rules out is clamped. Loss and gradient stay finite."""
    inf = float("inf")
    theta = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ruled_out = torch.zeros(3, 4, dtype=torch.bool)
    ruled_out[0, 1] = ruled_out[1, 2] = ruled_out[2, 0] = True
    new = torch.where(ruled_out, -inf, theta.log_softmax(-1))
    old = (theta.detach() + 0.1).log_softmax(-1)
    old[0, 1] = -inf  # old and new both rule out token [0, 1]: it was not drawn from old, no ratio
    ref = old.clone()
    ref[1, 2] = -inf  # reference and new rule out [1, 2] (old does not: its ratio is 0)
    ref[2, 3] = -inf  # only the reference rules out [2, 3]
    adv = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    loss, stats = grpo_loss(new, old, adv, 0.2, ref, beta=0.1)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in stats.values())
    (g,) = torch.autograd.grad(loss, theta)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    assert stats["tokens"] == 11  # token [0, 1] left out
    # the same loss as the batch without token [0, 1], written out
    live = torch.ones(3, 4, dtype=torch.bool)
    live[0, 1] = False
    rho = (new - old)[live].exp()
    a = adv[:, None].expand(3, 4)[live]
    d = (ref - new)[live]
    kl = torch.where(torch.isneginf(new[live]), 0.0, (d.clamp(-20, 20).exp() - d.clamp(-20, 20) - 1))
    want = (-torch.minimum(rho * a, rho.clamp(0.8, 1.2) * a) + 0.1 * kl).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    assert stats["kl"] == pytest.approx(float(kl.mean()), rel=1e-12)
    assert stats["kl"] * 11 > 19 - 1e-6  # [2, 3], ruled out by the reference only: clamped, e^-20 + 20 - 1


def test_stats_of_groups_merge_to_the_stats_of_the_batch():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(7, 5, dtype=torch.float64, generator=g).log_softmax(-1)
    new = old + 0.4 * torch.randn(7, 5, dtype=torch.float64, generator=g)
    ref = old + 0.2 * torch.randn(7, 5, dtype=torch.float64, generator=g)
    adv = torch.randn(7, dtype=torch.float64, generator=g)
    _, whole = grpo_loss(new, old, adv, 0.2, ref, 0.1)
    parts = [grpo_loss(new[s], old[s], adv[s], 0.2, ref[s], 0.1)[1] for s in (slice(0, 2), slice(2, 7))]
    assert parts[0]["clip_frac"] != parts[1]["clip_frac"] and whole["clip_low"] > 0 and whole["clip_high"] > 0
    merged = merge_stats(parts)
    assert merged.keys() == whole.keys()
    for k in whole:
        assert merged[k] == pytest.approx(whole[k], rel=1e-12), k


def test_mean_field_passes_share_one_prompt_mask_and_stats_cover_every_group(policies, tmp_path, capsys,
                                                                            monkeypatch):
    """Mean-field with prompt masking, top-p, KL and two inner updates, on prompts of three lengths (three groups
    per batch): at every first inner update old and new are the same pass (ratio exactly 1, nothing clipped), at
    the first the reference too (KL exactly 0); every loss is finite; the logged stats are those of all groups."""
    calls: list[list[dict]] = []
    step, loss = grpo.LitGRPO.training_step, grpo.grpo_loss

    def training_step(self, *args):
        calls.append([])
        return step(self, *args)

    def recording_loss(*args, **kwargs):
        out = loss(*args, **kwargs)
        calls[-1].append(out[1])
        return out

    monkeypatch.setattr(grpo.LitGRPO, "training_step", training_step)
    monkeypatch.setattr(grpo, "grpo_loss", recording_loss)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(["1+1=", "2+2=", "3+5=", "12+34=", "40+21=", "11+11=", "7=", "8=", "9="]) + "\n")
    out = tmp_path / "o"
    rc, _, err = run_cli(rl_args(policies["b"], out, "task.name=null", f"task.prompts={prompts}",
                                 f"task.reward={policies['reward']}", "rl.likelihood=mean-field", "rl.mask_prompt=0.5",
                                 "rl.top_p=0.5", "rl.beta=0.05", "rl.num_iterations=2", "rl.prompts_per_step=6",
                                 "rl.group_size=2", "optim.lr=0.05", "trainer.max_steps=3"), capsys)
    assert rc == 0, err
    logs = next((out / "logs").rglob("metrics.csv")).read_text().splitlines()
    head = logs[0].split(",")
    rows = [dict(zip(head, r.split(","))) for r in logs[1:]]
    rows = {int(r["step"]): {k: float(v) for k, v in r.items() if v} for r in rows}
    assert sorted(rows) == list(range(6)) and len(calls) == 6
    assert all(math.isfinite(r["loss"]) for r in rows.values())
    for k, r in rows.items():
        if k % 2 == 0:
            assert r["ratio_max"] == 1.0 and r["clip_frac"] == 0.0, (k, r)
        merged = merge_stats(calls[k])
        for key in ("clip_frac", "clip_low", "clip_high", "ratio_max", "kl"):
            assert r[key] == pytest.approx(merged[key], rel=1e-6, abs=1e-12), (k, key)
    assert rows[0]["kl"] == 0.0
    assert max(len(c) for c in calls) >= 2
    assert any(len({round(s["ratio_max"], 12) for s in c}) > 1 for c in calls)  # groups differ: all of them count


def test_a_run_writes_its_outputs_and_resumes_exactly(policies, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    extra = ("rl.num_iterations=2", "rl.beta=0.05", f"task.reward={policies['reward']}")
    rc, out, err = run_cli(rl_args(policies["b"], straight, "trainer.max_steps=4", *extra), capsys)
    assert rc == 0, err
    assert "held-out accuracy (8 prompts)" in out
    for name in ("config.yaml", "eval.jsonl", "final_metrics.json", "checkpoints/last.ckpt", "policy/config.json"):
        assert (straight / name).exists(), name
    evals = [json.loads(ln) for ln in (straight / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 2, 4]
    final = json.loads((straight / "final_metrics.json").read_text())
    assert final["iterations"] == 4 and final["likelihood"] == "exact"
    logs = next((straight / "logs").rglob("metrics.csv")).read_text().splitlines()
    head = logs[0].split(",")
    assert {"reward", "loss", "clip_frac", "kl", "rollout_s"} <= set(head) and len(logs) > 4
    kl = [float(row.split(",")[head.index("kl")]) for row in logs[1:] if row.split(",")[head.index("kl")]]
    assert max(kl) > 0  # the policy moved away from the reference
    loaded = load_model(straight / "policy")
    assert loaded.tokenizer is not None and loaded.method.variant == "B"
    # 2 iterations, then the same command with max_steps=4 resumes from last.ckpt
    assert run_cli(rl_args(policies["b"], split, "trainer.max_steps=2", *extra), capsys)[0] == 0
    assert read_checkpoint(split / "checkpoints" / "last.ckpt")["esolm_rl"]["iteration"] == 2
    assert run_cli(rl_args(policies["b"], split, "trainer.max_steps=4", *extra), capsys)[0] == 0
    a = read_checkpoint(straight / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_checkpoint(split / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = load_model(policies["b"]).model.state_dict()
    assert any(not torch.equal(a[f"policy.{k}"], v) for k, v in start.items())  # training changed the weights


@pytest.mark.parametrize("variant", ["a", "mdlm"])
def test_mean_field_runs_for_models_without_an_exact_likelihood(policies, tmp_path, capsys, variant):
    rc, _, err = run_cli(rl_args(policies[variant], tmp_path / "x", "rl.likelihood=exact"), capsys)
    assert rc == 2 and "needs an Eso-LM (B)" in last_line(err) and "mean-field" in last_line(err)
    assert not (tmp_path / "x" / "checkpoints" / "last.ckpt").exists()
    rc, _, err = run_cli(rl_args(policies[variant], tmp_path / "y", "rl.likelihood=mean-field",
                                 "trainer.max_steps=2"), capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "y" / "final_metrics.json").read_text())["likelihood"] == "mean-field"


def write_reward(path, body):
    path.write_text("import math\n\ndef score(prompts, completions):\n" + body + "\n")
    return f"{path}:score"


@pytest.mark.parametrize("body,needle", [
    ("    raise RuntimeError('boom')", "raised RuntimeError: boom"),
    ("    return [math.nan] * len(completions)", "non-finite"),
    ("    return [1.0]", "returned 1 rewards"),
    ("    return 'abc'", "must return a list of numbers"),
])
def test_bad_reward_functions_are_one_line_errors_before_work(policies, tmp_path, capsys, body, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text("12+34=\n")
    spec = write_reward(tmp_path / "r.py", body)
    rc, _, err = run_cli(["rl", "arithmetic", f"policy={policies['b']}", f"trainer.out_dir={tmp_path / 'o'}",
                          "task.name=null", f"task.prompts={prompts}", f"task.reward={spec}"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("esolm rl: error:"), err
    assert needle in lines[0]


@pytest.mark.parametrize("args,needle", [
    (["rl.group_size=1"], "group_size must be at least 2"),
    (["rl.likelihood=elbo"], "rl.likelihood must be one of"),
    (["policy=/nonexistent/policy"], "not found"),
    (["task.name=sudoku9"], "unknown task"),
])
def test_bad_configs_are_one_line_errors(policies, tmp_path, capsys, args, needle):
    rc, _, err = run_cli(["rl", "arithmetic", f"policy={policies['b']}", f"trainer.out_dir={tmp_path / 'o'}", *args],
                         capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert needle in lines[0]


def test_empty_prompt_file_is_a_one_line_error(policies, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    spec = write_reward(tmp_path / "r.py", "    return [0.0] * len(completions)")
    rc, _, err = run_cli(["rl", "arithmetic", f"policy={policies['b']}", f"trainer.out_dir={tmp_path / 'o'}",
                          "task.name=null", f"task.prompts={tmp_path / 'empty.jsonl'}", f"task.reward={spec}"], capsys)
    assert rc == 2 and "holds no prompts" in last_line(err)


def test_a_reward_failing_mid_run_keeps_the_last_checkpoint(policies, tmp_path, capsys):
    """Two good iterations, then the same run resumed while its reward function now fails on training
    batches: one line, exit 2, and last.ckpt is still the intact iteration-2 checkpoint."""
    path = tmp_path / "r.py"
    spec = write_reward(path, "    return [float(len(c) % 2) for c in completions]")
    args = ["rl", "arithmetic", f"policy={policies['b']}", f"trainer.out_dir={tmp_path / 'o'}", f"task.reward={spec}",
            "trainer.progress=false", "task.eval_prompts=4", "task.eval_every=0", "rl.prompts_per_step=2",
            "rl.group_size=4", "trainer.ckpt_every=1"]
    assert run_cli([*args, "trainer.max_steps=2"], capsys)[0] == 0
    last = tmp_path / "o" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    write_reward(path, "    if len(completions) > 4:\n        raise ValueError('bad batch')\n"
                       "    return [0.0] * len(completions)")
    rc, _, err = run_cli([*args, "trainer.max_steps=4"], capsys)
    assert rc == 2 and last_line(err).startswith("esolm rl: error: reward function") and "bad batch" in err
    assert last.read_bytes() == before
    assert read_checkpoint(last)["esolm_rl"]["iteration"] == 2
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_eval_task_reports_accuracy(policies, capsys):
    rc, out, err = run_cli(["eval-task", policies["b"], "arithmetic", "--prompts", "6", "--json", "--show", "2"],
                           capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert res["prompts"] == 6 and 0.0 <= res["accuracy"] <= 1.0 and len(res["examples"]) == 2
    assert math.isfinite(res["reward"])
    again = json.loads(run_cli(["eval-task", policies["b"], "arithmetic", "--prompts", "6", "--json", "--show", "2"],
                               capsys)[1])
    assert again == res  # fixed seed: the same prompts and draws
    rc, _, err = run_cli(["eval-task", policies["b"], "nosuchtask"], capsys)
    assert rc == 2 and "needs --reward" in err
