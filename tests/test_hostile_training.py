"""``esolm train`` under hostile conditions: exploding weights, changed overrides on resume, Ctrl-C, a writer
killed mid-checkpoint, a missing GPU, too many devices, unusable output folders and a full disk.

Each is a one-line error with exit code 2 (Ctrl-C: 130), before any training work where that can be
checked, never a traceback; and no checkpoint on disk is ever unreadable or holds non-finite weights.
"""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from esolm.cli import main
from esolm.errors import NonFiniteLossError
from esolm.recipes import resolve
from esolm.training import AtomicCheckpointIO, prepare, read_checkpoint, train
from esolm.training.checkpoints import nonfinite_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", "cpu-tiny", f"trainer.out_dir={out}", f"data.cache_dir={cache}", "trainer.logger=none",
            "trainer.val_every=0", *extra]


def error_line(err: str) -> str:
    """The error: the last line of stderr, the only one from esolm, and no traceback anywhere."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [ln for ln in lines if ln.startswith("esolm")] == lines[-1:], err
    return lines[-1]


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("*.ckpt"))


def test_exploding_weights_stop_and_every_checkpoint_is_finite(tmp_path, cache, capsys):
    """lr = 1e30 without clipping: the loss of step 2 is still finite but its update makes the embedding and
    adaLN weights inf. The run stops there; the checkpoints on disk (raw and EMA weights) are all finite."""
    out = tmp_path / "nan"
    rc = main(args(out, cache, "optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0",
                   "trainer.ckpt_every=1"))
    line = error_line(capsys.readouterr().err)
    files = checkpoints(out)
    assert rc == 2 and files, line
    for f in files:
        ckpt = read_checkpoint(f)
        assert set(ckpt) >= {"state_dict", "current_model_state"} and nonfinite_weights(ckpt) == [], f
    last = read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"]
    assert f"non-finite weights after optimizer step {last + 1}" in line
    assert f"last good checkpoint kept: {out / 'checkpoints' / 'last.ckpt'}" in line
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_checkpoint_writer_refuses_nonfinite_weights(tmp_path):
    """Raw or EMA weights with an inf or NaN are never written; the previous file stays as it was."""
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    good = {"state_dict": {"w": torch.ones(3)}, "current_model_state": {"w": torch.ones(3)}, "global_step": 6}
    io.save_checkpoint(good, path)
    before = path.read_bytes()
    for key, bad in (("current_model_state", float("inf")), ("state_dict", float("nan"))):
        ckpt = {**good, "global_step": 7, key: {"w": torch.tensor([1.0, bad, 1.0])}}
        with pytest.raises(NonFiniteLossError, match=rf"non-finite weights at step 7 \({key}/w\)"):
            io.save_checkpoint(ckpt, path)
        assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_resume_refuses_changed_overrides_and_applies_allowed_ones(tmp_path, cache, capsys):
    out = tmp_path / "run"
    base = args(out, cache, "trainer.max_steps=2", "trainer.ckpt_every=2")[2:]
    train(resolve("cpu-tiny", base))
    config = (out / "config.yaml").read_text()
    rc = main(["train", "cpu-tiny", *base, "optim.lr=0.5", "model.dropout=0.1", "trainer.max_steps=3"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "model.dropout: 0.0 -> 0.1, optim.lr: 0.001 -> 0.5)" in line, line
    assert "max_steps" not in line  # allowed on resume: not refused
    assert (out / "config.yaml").read_text() == config
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 2
    longer = resolve("cpu-tiny", [*base, "trainer.max_steps=3", "trainer.ckpt_every=1"])
    assert prepare(longer).changes == {"trainer.max_steps": (2, 3), "trainer.ckpt_every": (2, 1)}
    assert main(["train", "cpu-tiny", *base, "trainer.max_steps=3", "trainer.ckpt_every=1"]) == 0
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert resolve(str(out / "config.yaml")).trainer.max_steps == 3  # config.yaml records what ran


def test_sigint_exits_130_and_the_checkpoint_stays_loadable(tmp_path, cache):
    out = tmp_path / "sigint"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "esolm.cli", *args(out, cache, "trainer.max_steps=100000",
                                                                           "trainer.ckpt_every=2")],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
        last, deadline = out / "checkpoints" / "last.ckpt", time.monotonic() + 240
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.is_file(), "no checkpoint appeared"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        err.seek(0)
        text = err.read()
    assert rc == 130, text[-2000:]
    assert error_line(text) == "esolm: interrupted"
    assert read_checkpoint(last)["global_step"] >= 2
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]


def test_stale_orphans_of_a_killed_writer_are_removed_at_start(tmp_path, cache):
    out = tmp_path / "orphans"
    folder = out / "checkpoints"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [folder / f".last.ckpt.tmp{dead.pid}", folder / f".step00000001.ckpt.0badc0de.tmp{dead.pid}"]
    live = folder / f".step00000002.ckpt.1a2b3c4d.tmp{os.getpid()}"  # a writer that still runs: left alone
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    assert main(args(out, cache, "trainer.max_steps=1")) == 0
    assert not any(p.exists() for p in stale) and live.exists()
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 1


def _read_only_is_denied() -> bool:
    """Whether chmod 555 denies writing here (not for root)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o555)
        try:
            return not os.access(d, os.W_OK)
        finally:
            os.chmod(d, 0o755)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                            reason="this machine has a GPU")


@pytest.mark.parametrize("case", [
    pytest.param("gpu", marks=NO_GPU), pytest.param("cuda", marks=NO_GPU), "devices", "accelerator-name",
    "out-is-file", "out-under-file",
    pytest.param("read-only", marks=pytest.mark.skipif(not _read_only_is_denied(),
                                                       reason="chmod 555 cannot deny writing to root")),
])
def test_unusable_machine_or_output_folder_fails_before_any_work(case, tmp_path, cache, capsys):
    out, extra, match = tmp_path / "out", [], ""
    if case in ("gpu", "cuda"):
        extra, match = [f"trainer.accelerator={case}"], f"trainer.accelerator={case} but this machine has no"
    elif case == "devices":
        extra, match = ["trainer.devices=100000", "trainer.global_batch=100000"], "trainer.devices=100000 but"
    elif case == "accelerator-name":
        extra, match = ["trainer.accelerator=tpu"], "trainer.accelerator must be one of"
    elif case == "out-is-file":
        out.write_text("not a folder")
        match = f"{out} exists and is not a folder"
    elif case == "out-under-file":
        (tmp_path / "file").write_text("x")
        out, match = tmp_path / "file" / "run", f"{tmp_path / 'file'} is not a folder"
    else:
        out.mkdir()
        out.chmod(0o555)
        match = f"{out} is not writable"
    before = sorted(tmp_path.rglob("*"))
    rc = main(args(out, cache, *extra))
    err = capsys.readouterr().err
    if case == "read-only":
        out.chmod(0o755)
    line = error_line(err)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and match in line, err
    assert line.startswith("esolm train: error: ")
    assert sorted(tmp_path.rglob("*")) == before  # nothing was started


def test_full_disk_while_writing_a_checkpoint_is_one_line(tmp_path, cache, monkeypatch, capsys):
    """ENOSPC from the writer: one line, exit 2; no partial or temporary file is left."""
    out = tmp_path / "full"

    def no_space(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    rc = main(args(out, cache, "trainer.max_steps=2", "trainer.ckpt_every=1"))
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "could not write checkpoint" in line and "No space left on device" in line, line
    assert list((out / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("override, match", [
    ("model.hidden_size=100000", "GiB as float32, but only"),   # ~1e11 parameters: refused before allocation
    ("data.length=1000000000", "larger than esolm accepts"),    # refused in validation, before any data work
])
def test_models_too_big_for_the_machine_fail_before_allocating(override, match, tmp_path, cache, capsys):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc = main(args(tmp_path / "out", cache, override))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and match in error_line(err), err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing big was allocated
    assert not (tmp_path / "out").exists()
