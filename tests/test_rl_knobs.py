"""The GRPO knobs (TRL's names): loss_type, epsilon / epsilon_high, scale_rewards, skip_zero_variance_groups,
mask_after_eos, num_iterations with fresh mean-field masks, the reference sync, the LR schedule, the logged
entropy / sampler-trainer mismatch, and ``esolm eval-task --greedy --samples N --pass-at K``; on hand-made
batches against hand computations, and on the tiny policies of ``test_rl_grpo``."""

import json
import math

import pytest
import torch

from esolm.io import load_model
from esolm.rl import grpo
from esolm.rl.config import RLConfig, apply_overrides, upgrade_legacy
from esolm.rl.grpo import (
    eos_mask,
    group_advantages,
    grpo_loss,
    loss_denominator,
    pass_at_k,
    sync_reference,
    tied_groups,
)
from esolm.training.checkpoints import read_checkpoint
from esolm.training.module import lr_factor
from test_rl_grpo import last_line, make_policies, rl_args, run_cli, write_reward

D = torch.float64


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    return make_policies(tmp_path_factory.mktemp("knobs"))


def metrics(out):
    logs = next((out / "logs").rglob("metrics.csv")).read_text().splitlines()
    head = logs[0].split(",")
    rows = [dict(zip(head, r.split(","))) for r in logs[1:]]
    return {int(r["step"]): {k: float(v) for k, v in r.items() if v} for r in rows}


# -- the loss, by hand ---------------------------------------------------------------------------------------
def hand_batch():
    """Two sequences: row 0 three tokens at ratio 1 with A = 1; row 1 one token (two masked) at ratio 1 with
    A = -2. Per-token losses -A: row 0 [-1, -1, -1], row 1 [2]."""
    old = torch.log(torch.tensor([[0.5, 0.2, 0.4], [0.3, 0.9, 0.1]], dtype=D))
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return old, mask, torch.tensor([1.0, -2.0], dtype=D)


@pytest.mark.parametrize("loss_type,want", [("grpo", (-1 + 2) / 2), ("bnpo", (-3 + 2) / 4),
                                            ("dapo", (-3 + 2) / 4), ("dr_grpo", (-3 + 2) / (2 * 5))])
def test_loss_types_reduce_as_trl_defines_them(loss_type, want):
    old, mask, adv = hand_batch()
    loss, stats = grpo_loss(old.clone(), old, adv, 0.2, loss_type=loss_type, mask=mask, max_completion_length=5)
    assert float(loss) == pytest.approx(want, abs=1e-15) and stats["tokens"] == 4
    # the batch split in two groups, each divided by the whole batch's denominator, sums to the same loss
    denom = loss_denominator(loss_type, tokens=4, rows=2, max_completion_length=5)
    parts = [grpo_loss(old[s].clone(), old[s], adv[s], 0.2, loss_type=loss_type, mask=mask[s], denominator=denom)[0]
             for s in (slice(0, 1), slice(1, 2))]
    assert float(sum(parts)) == pytest.approx(want, abs=1e-15)


def test_epsilon_high_clips_higher_only():
    old = torch.log(torch.tensor([[0.4, 0.4]], dtype=D))
    new = old + torch.log(torch.tensor([[1.25, 0.7]], dtype=D))  # rho = 1.25 and 0.7
    for adv, eps_high, want, high, low in [
        (1.0, None, -(1.2 + 0.7) / 2, 0.5, 0.0),   # symmetric: 1.25 clipped to 1.2; 0.7 with A > 0 not clipped
        (1.0, 0.28, -(1.25 + 0.7) / 2, 0.0, 0.0),  # clip-higher: 1.25 < 1.28 keeps its gradient
        (-1.0, 0.28, (1.25 + 0.8) / 2, 0.0, 0.5),  # A < 0: the lower clip (1 - epsilon) still holds at 0.8
    ]:
        loss, stats = grpo_loss(new, old, torch.tensor([adv], dtype=D), 0.2, epsilon_high=eps_high)
        assert float(loss) == pytest.approx(want, abs=1e-12), (adv, eps_high)
        assert (stats["clip_high"], stats["clip_low"]) == (high, low)


def test_scale_rewards_and_tied_groups():
    r = torch.tensor([1.0, 0.0, 3.0, 3.0], dtype=D)
    centred = torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=D)
    torch.testing.assert_close(group_advantages(r, 2, "none"), centred, rtol=0, atol=1e-15)
    torch.testing.assert_close(group_advantages(r, 2, "group"), centred / torch.tensor([math.sqrt(0.5) + 1e-4,
                                                                                        math.sqrt(0.5) + 1e-4,
                                                                                        1e-4, 1e-4], dtype=D))
    torch.testing.assert_close(group_advantages(r, 2, "batch"), centred / (r.std() + 1e-4), rtol=0, atol=1e-15)
    assert tied_groups(r, 2).tolist() == [False, True]


def test_skipped_rows_leave_the_normalisation():
    old, mask, adv = hand_batch()
    kept = mask & torch.tensor([True, False])[:, None]  # row 1 skipped: the loss is row 0's alone
    for loss_type, want in [("grpo", -1.0), ("bnpo", -1.0), ("dr_grpo", -3 / 5)]:
        loss, _ = grpo_loss(old.clone(), old, adv, 0.2, old - 1, 0.5, loss_type=loss_type, mask=kept,
                            max_completion_length=5)
        d = -1.0  # ref - new: k3 = e^-1 + 1 - 1 on each of row 0's tokens
        kl = 0.5 * (math.exp(d) - d - 1)
        assert float(loss) == pytest.approx(want + kl * (1 if loss_type != "dr_grpo" else 3 / 5), abs=1e-12)


def test_eos_mask_keeps_tokens_up_to_the_first_eos():
    eos = 7
    tokens = torch.tensor([[1, 7, 2, 7, 3, 4], [1, 2, 3, 4, 5, 6], [7, 1, 2, 3, 7, 5]])
    got = eos_mask(tokens, 2, eos)  # completions from position 2; an EOS in the prompt does not count
    assert got.tolist() == [[True, True, False, False], [True] * 4, [True, True, True, False]]


def test_reference_sync_mixes_and_lr_schedules():
    ref, pol = torch.nn.Linear(2, 1).double(), torch.nn.Linear(2, 1).double()
    r0, p0 = ref.weight.detach().clone(), pol.weight.detach().clone()
    sync_reference(ref, pol, 0.6)
    torch.testing.assert_close(ref.weight.detach(), 0.6 * p0 + 0.4 * r0, rtol=0, atol=1e-15)
    assert [lr_factor(s, 2, "linear", 6, 0.1) for s in range(7)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1])


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 4, 2) == 1.0 and pass_at_k(4, 1, 1) == 0.25


def test_scale_rewards_takes_trls_booleans():
    assert apply_overrides(RLConfig(), ["rl.scale_rewards=false"]).rl.scale_rewards == "none"
    assert apply_overrides(RLConfig(), ["rl.scale_rewards=true"]).rl.scale_rewards == "group"


def test_legacy_config_keys_upgrade():
    old = {"rl": {"inner_updates": 2, "clip_eps": 0.1, "scale_rewards": False}, "policy": "x"}
    assert upgrade_legacy(old) == {"rl": {"num_iterations": 2, "epsilon": 0.1, "scale_rewards": "none"},
                                   "policy": "x"}


# -- runs -------------------------------------------------------------------------------------------------------
def test_knobs_in_a_run_are_logged(policies, tmp_path, capsys, monkeypatch):
    """dr_grpo, clip-higher, EOS masks, skipped groups, batch-scaled rewards and a linear schedule in one run: the
    loss masks are the EOS masks of the rollouts less the tied groups' rows; lr, entropy, mismatch are logged."""
    collect_, batches = grpo.LitGRPO._collect, []

    def collect(self):
        batches.append(collect_(self))
        return batches[-1]

    monkeypatch.setattr(grpo.LitGRPO, "_collect", collect)
    out = tmp_path / "o"
    rc, _, err = run_cli(rl_args(policies["b"], out, f"task.reward={policies['reward']}", "rl.loss_type=dr_grpo",
                                 "rl.epsilon_high=0.28", "rl.mask_after_eos=true", "rl.skip_zero_variance_groups=true",
                                 "rl.scale_rewards=batch", "optim.schedule=linear", "optim.warmup_steps=1",
                                 "optim.lr=0.01", "trainer.max_steps=3", "task.eval_every=0"), capsys)
    assert rc == 0, err
    rows = metrics(out)
    assert [rows[k]["lr"] for k in range(3)] == pytest.approx([0.01, 0.01, 0.005])
    for r in rows.values():
        assert 0.0 <= r["skipped_groups"] <= 2 and r["entropy"] > 0 and math.isfinite(r["loss"])
        assert r["logp_mismatch"] < 1e-5  # the sampler's log-probs are the trainer's, up to numerics
    eos = load_model(policies["b"]).tokenizer.eos_id
    for data, step in zip(batches, range(3)):
        tied = tied_groups(data["rewards"], 4).repeat_interleave(4)
        assert rows[step]["skipped_groups"] == float(tied.sum()) / 4
        for g in data["groups"]:
            r = g["rollouts"]
            want = eos_mask(r.tokens, r.prompt_len, eos) & ~tied[g["rows"]][:, None]
            assert torch.equal(g["mask"], want)


def test_a_tied_batch_is_skipped_entirely(policies, tmp_path, capsys):
    spec = write_reward(tmp_path / "r.py", "    return [1.0] * len(completions)")
    out = tmp_path / "o"
    rc, _, err = run_cli(rl_args(policies["b"], out, f"task.reward={spec}", "rl.skip_zero_variance_groups=true",
                                 "rl.beta=0.1", "optim.lr=0.05", "trainer.max_steps=2", "task.eval_every=0"), capsys)
    assert rc == 0, err
    rows = metrics(out)
    assert [rows[k]["skipped_groups"] for k in range(2)] == [2.0, 2.0] and all(r["loss"] == 0 for r in rows.values())
    state = read_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]
    for k, v in load_model(policies["b"]).model.state_dict().items():
        assert torch.equal(state[f"policy.{k}"], v), k  # no gradient (not even the KL's): no update


def test_mean_field_inner_iterations_draw_fresh_masks_shared_by_old_new_and_reference(policies, tmp_path, capsys,
                                                                                      monkeypatch):
    seen: list[tuple[str, int, int]] = []  # (which pass, inner iteration, generator seed)
    logprobs = grpo.LitGRPO._logprobs
    state = {"phase": "collect", "inner": 0}

    def recording(self, model, r, seed):
        kind = "ref" if model is self._reference[0] else "policy"
        seen.append((state["phase"] if kind == "policy" else "ref", state["inner"], seed))
        return logprobs(self, model, r, seed)

    step, collect_ = grpo.LitGRPO.training_step, grpo.LitGRPO._collect

    def collect(self):
        state["phase"] = "collect"
        out = collect_(self)
        state["phase"] = "new"
        return out

    def training_step(self, *args):
        state["inner"] = self.global_step % self.rl.num_iterations
        return step(self, *args)

    monkeypatch.setattr(grpo.LitGRPO, "_logprobs", recording)
    monkeypatch.setattr(grpo.LitGRPO, "training_step", training_step)
    monkeypatch.setattr(grpo.LitGRPO, "_collect", collect)
    rc, _, err = run_cli(rl_args(policies["b"], tmp_path / "o", "rl.likelihood=mean-field", "rl.num_iterations=3",
                                 "rl.beta=0.05", "rl.prompts_per_step=1", "trainer.max_steps=1", "task.eval_every=0",
                                 f"task.reward={policies['reward']}"), capsys)
    assert rc == 0, err
    collect = [s for p, _, s in seen if p == "collect"]
    ref = [s for p, _, s in seen if p == "ref"]
    new = [s for p, i, s in seen if p == "new"]
    assert len(set(new)) == 3  # a fresh prompt mask per inner iteration
    assert collect == ref == new  # old, reference and new share the mask of each inner iteration


def test_synced_reference_resumes_exactly(policies, tmp_path, capsys):
    extra = ("rl.beta=0.1", "rl.ref_sync_steps=1", "rl.ref_mixup_alpha=0.5", "optim.lr=0.05",
             f"task.reward={policies['reward']}", "task.eval_every=0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(rl_args(policies["b"], straight, "trainer.max_steps=4", *extra), capsys)[0] == 0
    assert run_cli(rl_args(policies["b"], split, "trainer.max_steps=2", *extra), capsys)[0] == 0
    ckpt = read_checkpoint(split / "checkpoints" / "last.ckpt")
    assert "reference" in ckpt["esolm_rl"]
    assert run_cli(rl_args(policies["b"], split, "trainer.max_steps=4", *extra), capsys)[0] == 0
    a = read_checkpoint(straight / "checkpoints" / "last.ckpt")
    b = read_checkpoint(split / "checkpoints" / "last.ckpt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    ra, rb = a["esolm_rl"]["reference"], b["esolm_rl"]["reference"]
    for k in ra:
        assert torch.equal(ra[k], rb[k]), k
    start = load_model(policies["b"]).model.state_dict()
    assert any(not torch.equal(ra[k], v) for k, v in start.items())  # the reference moved


def test_a_run_saved_with_the_old_key_names_resumes(policies, tmp_path, capsys):
    out = tmp_path / "o"
    extra = (f"task.reward={policies['reward']}", "task.eval_every=0", "rl.num_iterations=2")
    assert run_cli(rl_args(policies["b"], out, "trainer.max_steps=1", *extra), capsys)[0] == 0
    last = out / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(last)
    rl = ckpt["hyper_parameters"]["config"]["rl"]
    for new, old in (("num_iterations", "inner_updates"), ("epsilon", "clip_eps")):
        rl[old] = rl.pop(new)
    for key in ("epsilon_high", "loss_type", "ref_sync_steps", "ref_mixup_alpha", "skip_zero_variance_groups",
                "mask_after_eos"):
        del rl[key]
    rl["scale_rewards"] = True
    for key in ("schedule", "warmup_steps", "min_lr_ratio"):
        del ckpt["hyper_parameters"]["config"]["optim"][key]
    del ckpt["lr_schedulers"]  # earlier runs had none
    torch.save(ckpt, last)
    rc, _, err = run_cli(rl_args(policies["b"], out, "trainer.max_steps=2", *extra), capsys)
    assert rc == 0, err
    assert read_checkpoint(last)["esolm_rl"]["iteration"] == 2


@pytest.mark.parametrize("args,needle", [
    (["rl.epsilon=0.2", "rl.epsilon_high=0.1"], "rl.epsilon_high must be >= rl.epsilon"),
    (["rl.loss_type=ppo"], "rl.loss_type must be one of grpo, bnpo, dr_grpo, dapo"),
    (["rl.scale_rewards=std"], "rl.scale_rewards must be one of group, batch, none"),
    (["rl.ref_sync_steps=5"], "rl.ref_sync_steps needs rl.beta > 0"),
    (["rl.beta=0.1", "rl.ref_mixup_alpha=0"], "rl.ref_mixup_alpha must be in (0, 1]"),
    (["rl.num_iterations=0"], "rl.num_iterations must be positive"),
    (["rl.clip_eps=0.1"], "rl.clip_eps is now rl.epsilon"),
    (["rl.inner_updates=2"], "rl.inner_updates is now rl.num_iterations"),
    (["optim.schedule=step"], "optim.schedule must be one of constant, cosine, linear"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps must be >= 0"),
])
def test_bad_knobs_are_one_line_errors(policies, tmp_path, capsys, args, needle):
    rc, _, err = run_cli(["rl", "arithmetic", f"policy={policies['b']}", f"trainer.out_dir={tmp_path / 'o'}", *args],
                         capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err


def test_eval_task_samples_pass_at_k_and_greedy(policies, capsys):
    base = ["eval-task", policies["b"], "arithmetic", "--prompts", "4", "--json", "--samples", "3"]
    one = json.loads(run_cli([*base, "--pass-at", "1"], capsys)[1])
    three = json.loads(run_cli([*base, "--pass-at", "3"], capsys)[1])
    assert one["samples"] == 3 and one["pass@1"] == pytest.approx(one["accuracy"])  # pass@1 is the mean accuracy
    assert three["accuracy"] == one["accuracy"] and three["pass@3"] >= three["accuracy"]
    greedy = json.loads(run_cli(["eval-task", policies["mdlm"], "arithmetic", "--prompts", "3", "--json",
                                 "--samples", "2", "--greedy", "--pass-at", "2"], capsys)[1])
    zero = json.loads(run_cli(["eval-task", policies["mdlm"], "arithmetic", "--prompts", "3", "--json",
                               "--samples", "2", "--temperature", "0", "--pass-at", "2"], capsys)[1])
    assert greedy == zero and greedy["pass@2"] >= greedy["accuracy"]
    rc, _, err = run_cli([*base, "--pass-at", "4"], capsys)
    assert rc == 2 and "must be an integer in [1, 3]" in last_line(err)
    rc, _, err = run_cli([*base, "--greedy", "--temperature", "0.5"], capsys)
    assert rc == 2 and "--greedy decodes at temperature 0" in last_line(err)
