"""The main job end to end on a tiny model: train, evaluate, sample, cached vs uncached timing, results."""

import json

from esolm.cli import main
from esolm.demo import run_demo

TINY = ("model.hidden_size=32", "model.n_layers=1", "model.n_heads=2", "model.cond_dim=16",
        "data.length=32", "data.max_documents=200", "data.val_fraction=0.1", "trainer.global_batch=8",
        "trainer.max_steps=6", "trainer.val_every=3", "trainer.ckpt_every=3", "trainer.val_batches=2",
        "trainer.precision=32-true", "trainer.progress=false", "trainer.log_every=1")


def test_demo_end_to_end(tmp_path):
    lines = []
    res = run_demo(str(tmp_path / "out"), str(tmp_path / "run"), minutes=2.0, overrides=TINY, num_samples=2,
                   iw_ks=(1, 2), eval_batches=1, log=lines.append)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["eval"]["tokens"] == res["eval"]["tokens"] > 0
    assert saved["final_metrics"]["step"] == 6
    assert set(saved["eval"]["iw"]) == {"1", "2"}
    assert len(saved["samples"]["texts"]) == 2
    # the KV cache changes the cost, never the tokens
    assert all(r["same_tokens"] for r in saved["sampling_speed"])
    assert all(r["nfe"] == 32 for r in saved["sampling_speed"])
    assert {"training_curve.png", "sampling_speed.png"} <= set(saved["plots"])
    for name in saved["plots"]:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("identical tokens: True" in line for line in lines)
    # then the shipped, trained model decodes, with no training here
    assert saved["shipped"]["model"] == "esolm-small" and len(saved["shipped"]["texts"]) == 2
    assert saved["shipped"]["nfe"] > 0 and "esolm-small sample 1" in (tmp_path / "out" / "samples.txt").read_text()


def test_demo_rejects_bad_overrides(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "o"), "--run-dir", str(tmp_path / "r"), "method.alpha0=1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "alpha0" in err[0]
