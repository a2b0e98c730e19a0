"""The character-level reproduction's report (benchmarks/reproduce_char.py) states what the numbers say:
bits/char from nats, mean ± sd over seeds, the paper's ordering held or not, the IW trend."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rc():
    spec = importlib.util.spec_from_file_location("reproduce_char", ROOT / "benchmarks" / "reproduce_char.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(out: Path, job: str, nelbo: float, iw: dict | None = None):
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "runs" / job).mkdir(parents=True, exist_ok=True)
    (out / "runs" / job / "final_metrics.json").write_text(json.dumps({"step": 10, "fit_seconds": 5.0}))
    row = {"dataset": "wiki:validation", "sequences": 4, "tokens": 512, "nelbo": nelbo}
    (out / "eval" / f"{job}.json").write_text(json.dumps({"results": [row]}))
    if iw is not None:
        irow = dict(row, iw={str(k): {"nll": v, "perplexity": math.exp(v)} for k, v in iw.items()})
        (out / "eval" / f"{job}.iw.json").write_text(json.dumps({"results": [irow]}))


def test_ordering_and_iw_statements(rc, tmp_path):
    ln2 = math.log(2)
    names = ["ar", "esolm-b-0.125", "esolm-b-1"]
    base = {"ar": 2.0, "esolm-b-0.125": 2.2, "esolm-b-1": 2.5}  # bits/char
    for seed in (1, 2, 3):
        for n in names:
            iw = {1: (base[n] + 0.1) * ln2, 4: (base[n] + 0.05) * ln2} if n.startswith("esolm-b") else None
            _write(tmp_path, f"{n}-s{seed}", (base[n] + 0.01 * seed) * ln2, iw)
    data = rc.collect(tmp_path, names, [1, 2, 3])
    assert data["ar"]["bpc"] == pytest.approx([2.01, 2.02, 2.03])
    assert rc.fmt(data["ar"]["bpc"]) == "2.020 ± 0.010 (2.010–2.030)"
    lines = "\n".join(rc.ordering_lines(data))
    assert "ordering holds on the means" in lines and "holds in 3 of 3 seeds" in lines
    assert "separated (ranges disjoint)" in lines
    assert data["esolm-b-1"]["iw"][4] == pytest.approx([2.55] * 3)

    # swap one seed of alpha0 = 0.125 above alpha0 = 1: the report says so
    _write(tmp_path, "esolm-b-0.125-s2", 2.9 * ln2)
    lines = "\n".join(rc.ordering_lines(rc.collect(tmp_path, names, [1, 2, 3])))
    assert "holds in 2 of 3 seeds" in lines and "ranges overlap" in lines


def test_bd3_steps_keep_the_total(rc):
    assert rc.bd3_steps("16,32,64,128", 16) == "2,4,8,16"
    assert rc.bd3_steps("16,32,64,128", 4) == "1,2,4"


def test_merge_parts_joins_runs_and_replaces_the_folder(tmp_path):
    from esolm.evaluation.frontier import merge_parts

    def point(label, method, steps, ppl):
        return {"label": label, "description": label, "method": method, "train_alpha0": None, "alpha0": None,
                "steps": steps, "num_samples": 4, "nfe": steps or 7, "seconds": 1.0, "seconds_per_sample": 0.25,
                "gen_ppl": ppl, "mauve": None, "entropy": 2.0}

    a = {"num_samples": 4, "top_p": 0.9, "judge": "j", "models": {"ar": "x"}, "points": [point("ar", "ar", None, 9.0)]}
    b = {"num_samples": 4, "top_p": 0.9, "judge": "j", "models": {"bd3lm-4": "y"},
         "points": [point("bd3lm-4", "bd3lm", 1, 20.0), point("bd3lm-4", "bd3lm", 2, 15.0)]}
    out = tmp_path / "frontier"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    merged = merge_parts([a, b], out, steps="4,8", bd3lm_steps_per_block={"bd3lm-4": "1,2"})
    assert [p["label"] for p in merged["points"]] == ["ar", "bd3lm-4", "bd3lm-4"]
    assert merged["models"] == {"ar": "x", "bd3lm-4": "y"} and merged["steps"] == "4,8"
    assert sorted(f.name for f in out.iterdir()) == ["frontier.csv", "frontier.json", "frontier.md",
                                                    "frontier_gen_ppl.png"]
    with pytest.raises(ValueError):
        merge_parts([], out)
