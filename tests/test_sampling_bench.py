"""``esolm bench latency``: records, NFE ~ L for every method, one-line errors."""

import json

import torch

from esolm.cli import main

SMALL = ["--hidden", "16", "--layers", "1", "--heads", "2", "--vocab", "17"]


def test_bench_latency_writes_records(tmp_path, capsys):
    out = tmp_path / "lat.json"
    threads = torch.get_num_threads()
    rc = main(["bench", "latency", "--methods", "esolm-b,mdlm,bd3lm,ar", "--lengths", "16,32", *SMALL,
               "--repeats", "2", "--threads", "1", "--json", str(out)])
    assert rc == 0
    records = json.loads(out.read_text())
    assert len(records) == 8
    for r in records:
        assert {"method", "length", "batch_size", "nfe", "seconds"} <= set(r)
        assert r["batch_size"] == 1 and r["seconds"] > 0 and r["runs"] == 2
        assert r["nfe"] == (r["length"] - 1 if r["method"] == "ar" else r["length"])
    assert "Eso-LM(B)/AR" in capsys.readouterr().out
    assert torch.get_num_threads() == threads  # --threads does not leak into the caller


def test_bench_latency_unknown_method_is_a_usage_error(capsys):
    assert main(["bench", "latency", "--methods", "esolm-b,gpt", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esolm bench latency: error: argument --methods: unknown gpt")


def test_bench_latency_bad_length_is_one_line(capsys):
    assert main(["bench", "latency", "--methods", "bd3lm", "--lengths", "30", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multiple of the BD3-LM block size" in err[0]
