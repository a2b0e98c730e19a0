"""The README's workflow on the cpu-tiny preset, through the CLI: train -> eval / sample -> export -> eval."""

import json

import pytest

from esolm.cli import main


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["train", "cpu-tiny", f"trainer.out_dir={out}", "trainer.max_steps=4"]) == 0
    return out


def test_train_eval_sample_export(tiny_run, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    final = json.loads((tiny_run / "final_metrics.json").read_text())
    assert final["step"] == 4 and final["val_nelbo"] > 0

    run(["eval", ckpt, "--iw-k", "1,2", "--max-batches", 2, "--json", tmp_path / "ckpt.json"], capsys)
    run(["sample", ckpt, "--num-samples", 2, "--steps", 8, "--top-p", 0.9, "--out", tmp_path / "s.jsonl",
         "--entropy"], capsys)
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["token_ids"]) == 32 and r["nfe"] > 0 for r in rows)

    run(["export", ckpt, tmp_path / "model"], capsys)
    run(["eval", tmp_path / "model", "--iw-k", "1,2", "--max-batches", 2, "--json", tmp_path / "folder.json"],
        capsys)
    a, b = (json.loads((tmp_path / f).read_text())["results"][0] for f in ("ckpt.json", "folder.json"))
    # the exported folder is the checkpoint's EMA model: identical numbers, same seeds
    assert a["tokens"] == b["tokens"] > 0
    assert a["nelbo"] == pytest.approx(b["nelbo"], rel=1e-6)
    assert a["iw"]["2"]["nll"] == pytest.approx(b["iw"]["2"]["nll"], rel=1e-6)


def test_only_esolm_errors_are_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    """A ValueError/KeyError raised inside a command is a bug, not bad input: the real ``esolm`` process
    shows its traceback and exits 1; an esolm error is one line with exit 2."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "import esolm.commands.export as export\n"
        "from esolm.cli import main\n"
        "from esolm.errors import CheckpointError\n"
        "kind = sys.argv[1]\n"
        "def boom(args):\n"
        "    raise {'bug': KeyError('internal'), 'value': ValueError('bug'), "
        "'esolm': CheckpointError('bad file')}[kind]\n"
        "export.run = boom\n"
        "sys.exit(main(['export', 'a.ckpt', 'out']))\n")
    for kind, code, needle in (("bug", 1, "KeyError: 'internal'"), ("value", 1, "ValueError: bug"),
                               ("esolm", 2, "esolm export: error: bad file")):
        out = subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == code, out.stderr
        assert needle in out.stderr
        assert ("Traceback" in out.stderr) == (code == 1), out.stderr
        if code == 2:
            assert len(out.stderr.strip().splitlines()) == 1, out.stderr
