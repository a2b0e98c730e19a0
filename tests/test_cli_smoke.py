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
