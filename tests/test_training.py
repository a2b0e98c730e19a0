"""Training: exact resume after SIGKILL, DDP equivalence, NaN stop, bad configs, corrupted checkpoints, export.

All runs use the cpu-tiny preset (2 x 32 DiT, L = 32, a few steps). Subprocesses are used only where a
real second process is the point (SIGKILL, two-process DDP on gloo); the other runs are in-process.
"""

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from esolm.cli import main
from esolm.noise import EPS, antithetic_times
from esolm.objectives import build_objective
from esolm.recipes import resolve
from esolm.training import (
    AtomicCheckpointIO,
    CheckpointError,
    LitEsoLM,
    lr_factor,
    noise_generators,
    read_checkpoint,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


def common(tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"trainer.out_dir={tmp / name}", f"trainer.trace={tmp / name / 'trace'}", "trainer.logger=none",
            f"data.cache_dir={tmp / 'cache'}", "trainer.max_steps=8", "trainer.ckpt_every=4",
            "trainer.val_every=4", "trainer.val_batches=1", *extra]


def trace(tmp: Path, name: str, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (tmp / name / f"trace.rank{rank}").read_text().splitlines()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-exact comparisons between in-process and subprocess runs need the same float reduction order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def reference_run(workdir):
    """An uninterrupted 8-step Eso-LM (B) run (in-process)."""
    train(resolve("cpu-tiny", common(workdir, "ref")))
    return workdir


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from lightning.pytorch.callbacks import Callback
    from esolm.recipes import resolve
    from esolm.training import train

    class KillAfterStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 6:
                os.kill(os.getpid(), signal.SIGKILL)

    train(resolve("cpu-tiny", sys.argv[1:]), callbacks=[KillAfterStep()])
""")


@pytest.fixture(scope="module")
def killed_and_resumed(reference_run):
    tmp = reference_run
    args = common(tmp, "crash")
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args], env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = tmp / "crash" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step00000004.ckpt"]
    killed = trace(tmp, "crash")
    train(resolve("cpu-tiny", args))  # trainer.resume=auto picks up last.ckpt (in-process)
    return tmp, killed


def test_resume_after_sigkill_is_exact(killed_and_resumed):
    tmp, killed = killed_and_resumed
    ref = trace(tmp, "ref")
    full = trace(tmp, "crash")
    assert [r["step"] for r in killed] == [1, 2, 3, 4, 5]  # killed during step 6, checkpoint at 4
    resumed = full[len(killed):]
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["step"] for r in ref] == list(range(1, 9))
    # step for step: the same losses and bit-identical parameters
    for a, b in zip(ref, killed[:4] + resumed):
        assert a["step"] == b["step"] and a["loss"] == b["loss"] and a["params"] == b["params"], (a, b)
    assert killed[4]["loss"] == resumed[0]["loss"]  # step 5 recomputed identically
    # final checkpoints agree too (EMA weights included), and no temporary files were left
    r = read_checkpoint(tmp / "ref" / "checkpoints" / "last.ckpt")
    c = read_checkpoint(tmp / "crash" / "checkpoints" / "last.ckpt")
    assert r["global_step"] == c["global_step"] == 8 and r["esolm"]["consumed"] == c["esolm"]["consumed"] == 8
    for k, v in r["state_dict"].items():
        assert torch.equal(v, c["state_dict"][k]), k
    assert not [p for p in (tmp / "crash" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_corrupted_checkpoint_is_a_clear_error_and_previous_stays(killed_and_resumed, capsys):
    tmp, _ = killed_and_resumed
    ckpts = tmp / "crash" / "checkpoints"
    last, prev = ckpts / "last.ckpt", ckpts / "step00000004.ckpt"
    before = sha(prev)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated
    rc = main(["train", "cpu-tiny", *common(tmp, "crash", "trainer.max_steps=12")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "corrupted or truncated" in err and "Traceback" not in err
    assert sha(prev) == before and read_checkpoint(prev)["global_step"] == 4
    last.write_bytes(b"\x00garbage" * 100)  # corrupted
    assert main(["export", str(last), str(tmp / "exp-bad")]) == 2
    assert "corrupted or truncated" in capsys.readouterr().err
    assert not (tmp / "exp-bad").exists()


def test_export_carries_ema_weights_and_tokenizer(reference_run, capsys):
    from esolm.data.tokenizers import Tokenizer, bpe8k
    from esolm.io import load_model, load_pretrained

    tmp = reference_run
    ckpt = tmp / "ref" / "checkpoints" / "last.ckpt"
    assert main(["export", str(ckpt), str(tmp / "exported")]) == 0
    model, method = load_pretrained(tmp / "exported")
    raw = read_checkpoint(ckpt)
    assert method == resolve("cpu-tiny").method_spec()
    ema = {k[6:]: v for k, v in raw["state_dict"].items() if k.startswith("model.")}
    cur = {k[6:]: v for k, v in raw["current_model_state"].items() if k.startswith("model.")}
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert any(not torch.equal(ema[k], cur[k]) for k in ema)  # EMA differs from the raw weights
    tok = Tokenizer.load(tmp / "exported")
    assert tok.fingerprint == bpe8k().fingerprint
    m2 = load_model(ckpt).model  # the training checkpoint itself: the same EMA weights
    assert all(torch.equal(a, b) for a, b in zip(m2.parameters(), model.parameters()))


DDP_ARGS = ["trainer.global_batch=8", "trainer.max_steps=3", "trainer.val_every=3", "trainer.ckpt_every=3",
            "optim.ema=0.5", "optim.eps=1e-3"]


def test_ddp_two_processes_match_single_process(workdir, monkeypatch):
    """Gloo DDP, 2 ranks x 4 rows vs 1 process x 8 rows, Eso-LM (B) (both terms, sampling noise), dropout 0.

    Each rank draws its own masks and orders (and the shared time offset), so the single process computes
    the loss of each rank's half of the micro-batch as that rank does (its generators, its time slice, its
    MDM/AR split) and merges the two: the same global loss, hence the same gradient. Step 2's batch holds
    the one partially padded row, so the ranks see different token counts: the per-term global
    normalisation must make the DDP gradient equal the single-process one anyway.

    Only the order of float32 reductions differs, so gradients agree to ~1e-7 relative. Adam with eps=1e-8
    turns gradients far smaller than eps-scale noise into +-lr updates (a sign flip of a 1e-9 gradient moves
    a weight by 2 lr), so the comparison uses eps=1e-3, which makes the update Lipschitz in the gradient.
    Tolerance: losses within 1e-6 relative and parameters within 1e-6 absolute after 3 steps; across ranks
    parameters are bit-identical after every step."""
    tmp = workdir
    ddp = common(tmp, "ddp", *DDP_ARGS, "trainer.devices=2", "trainer.strategy=ddp")
    proc = subprocess.run([sys.executable, "-m", "esolm.cli", "train", "cpu-tiny", *ddp], env=env(),
                          capture_output=True, text=True, timeout=400, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = LitEsoLM.micro_batch_loss

    def as_two_ranks(self, batch, k, rank, world_size):
        assert (rank, world_size) == (0, 1)
        halves = [{key: v[r * 4:(r + 1) * 4] for key, v in batch.items()} for r in range(2)]
        return per_rank(self, halves[0], k, 0, 2).merge(per_rank(self, halves[1], k, 1, 2))

    monkeypatch.setattr(LitEsoLM, "micro_batch_loss", as_two_ranks)
    train(resolve("cpu-tiny", common(tmp, "single", *DDP_ARGS)))
    r0, r1, single = trace(tmp, "ddp", 0), trace(tmp, "ddp", 1), trace(tmp, "single")
    assert [r["step"] for r in r0] == [r["step"] for r in r1] == [r["step"] for r in single] == [1, 2, 3]
    for a, b, s in zip(r0, r1, single):
        assert a["batch_sum"] + b["batch_sum"] == s["batch_sum"]  # the same global batch
        assert a["params"] == b["params"]  # identical across ranks after each step
        assert a["loss"] == b["loss"]
        assert math.isclose(a["loss"], s["loss"], rel_tol=1e-6), (a["loss"], s["loss"])
    d = read_checkpoint(tmp / "ddp" / "checkpoints" / "last.ckpt")
    s = read_checkpoint(tmp / "single" / "checkpoints" / "last.ckpt")
    for key in ("current_model_state", "state_dict"):
        for k, v in s[key].items():
            assert torch.allclose(v, d[key][k], atol=1e-6, rtol=0), (key, k)


def test_ranks_share_the_time_offset_but_draw_their_own_masks(monkeypatch):
    """Micro-batch k on two DDP ranks: the ranks' antithetic times form one stratified global batch (the same
    offset u), while masks come from each rank's own generator — with identical times they still differ."""
    import esolm.objectives as objectives

    cfg = resolve("cpu-tiny", ["method.name=mdlm"])
    lit = LitEsoLM(cfg.to_dict(), vocab_size=64, mask_id=63)
    x = torch.randint(0, 63, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "valid": torch.ones_like(x, dtype=torch.bool)}
    times, inputs = [], []
    real = objectives.antithetic_times
    monkeypatch.setattr(objectives, "antithetic_times", lambda *a, **k: times.append(real(*a, **k)) or times[-1])
    lit.model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    for rank in (0, 1):
        lit.micro_batch_loss(batch, k=5, rank=rank, world_size=2)
    grid = torch.cat(times).double() * 8  # (u + i) / 8 for i = 0..7, mapped to [eps, 1]
    i = torch.floor((grid - 8 * EPS) / (1 - EPS)).clamp(0, 7)
    u = (grid - 8 * EPS) / (1 - EPS) - i
    assert sorted(i.tolist()) == list(range(8)) and float(u.max() - u.min()) < 1e-5
    assert not torch.equal(inputs[0] == 63, inputs[1] == 63)
    # the same times on both ranks (rank 0's slice): the masks still differ, as the generators do
    obj = build_objective(cfg.method_spec())
    masks = []
    for rank in (0, 1):
        t_gen, noise = noise_generators(cfg.trainer.seed, 5, rank)
        obj(lit.model, x, generator=noise, time_generator=t_gen)
        masks.append(inputs[-1] == 63)
    assert not torch.equal(masks[0], masks[1])
    same = [noise_generators(cfg.trainer.seed, 5, rank)[0] for rank in (0, 1)]
    assert torch.equal(antithetic_times(4, same[0]), antithetic_times(4, same[1]))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(workdir, monkeypatch, capsys):
    import esolm.training.module as module

    real = module.build_objective

    def poisoned(method):
        obj = real(method)
        inner = obj.forward
        calls = {"n": 0}

        def forward(model, x0, valid, generator, rank, world_size, time_generator):
            out = inner(model, x0, valid, generator, rank, world_size, time_generator)
            calls["n"] += obj.training
            if obj.training and calls["n"] == 6:  # the 6th training micro-batch -> step 6
                nll, n = out.terms["ar"]
                out.terms["ar"] = (nll * float("nan"), n)
            return out

        obj.forward = forward
        return obj

    monkeypatch.setattr(module, "build_objective", poisoned)
    tmp = workdir
    rc = main(["train", "cpu-tiny", *common(tmp, "nan")])
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite training loss (nan) at step 6" in err and "last.ckpt" in err
    last = read_checkpoint(tmp / "nan" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert [r["step"] for r in trace(tmp, "nan")] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("args,match", [
    (["cpu-tiny", "method.alpha0=1.5"], "alpha0 must lie in [0, 1]"),
    (["cpu-tiny", "method.batch_split=-0.5"], "batch_split must lie in [0, 1]"),
    (["cpu-tiny", "model.n_heads=3"], "n_heads (3) must divide hidden_size (32)"),
    (["no-such-preset"], "unknown preset 'no-such-preset'"),
    (["cpu-tiny", "data.length=4096", "data.max_documents=20", "data.val_fraction=0.5"],
     "larger than the data allows"),
    (["cpu-tiny", "trainer.bogus=1"], "unknown config key 'trainer.bogus'"),
    (["cpu-tiny", "trainer.resume=/nonexistent/x.ckpt"], "not found"),
])
def test_bad_configs_fail_fast_with_one_line(args, match, tmp_path, capsys):
    out = tmp_path / "never"
    rc = main(["train", *args, f"trainer.out_dir={out}", f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err and "Traceback" not in err
    assert not out.exists()  # nothing was started


def test_atomic_checkpoint_io_keeps_old_file_on_failure(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "c.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = sha(path)

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*\(disk full\)"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    assert sha(path) == before and list(tmp_path.iterdir()) == [path]
    assert io.load_checkpoint(path)["global_step"] == 1
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        io.load_checkpoint(path)


def test_last_checkpoint_at_the_final_step_keeps_raw_weights(workdir):
    """Training that ends between periodic saves still leaves a resumable last.ckpt at its final step."""
    tmp = workdir
    train(resolve("cpu-tiny", common(tmp, "end", "trainer.max_steps=3", "trainer.ckpt_every=2",
                                     "trainer.val_every=0")))
    names = sorted(p.name for p in (tmp / "end" / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step00000002.ckpt"]
    last = read_checkpoint(tmp / "end" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and last["esolm"]["consumed"] == 3
    final = trace(tmp, "end")[-1]["params"]  # raw weights after step 3, as the module had them
    h = hashlib.sha1()
    for k, v in last["current_model_state"].items():
        if k.startswith("model.") and "inv_freq" not in k:
            h.update(v.float().numpy().tobytes())
    assert h.hexdigest() == final


def test_lr_schedule():
    assert [lr_factor(s, 4, "constant", 100, 0.0) for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, "cosine", 104, 0.1) == 1.0
    assert math.isclose(lr_factor(54, 4, "cosine", 104, 0.1), 0.55)
    assert math.isclose(lr_factor(104, 4, "cosine", 104, 0.1), 0.1)
