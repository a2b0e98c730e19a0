"""The model shipped with the package (``esolm-small``): present, small, loadable by name offline, the weights
that were measured (a fixed evaluation re-computed), and usable from the command line."""

import json
import math

import pytest
import torch

from esolm.cli import main
from esolm.io import load_model, save_pretrained, shipped_models

NAME = "esolm-small"


@pytest.fixture(scope="module")
def folder():
    found = shipped_models()
    assert NAME in found, f"{NAME} is not installed with the package ({found})"
    return found[NAME]


def test_shipped_folder_is_complete_and_small(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "esolm_tokenizer.json", "training_config.yaml",
            "metrics.json", "MODEL_CARD.md"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 20 * 2**20
    card = (folder / "MODEL_CARD.md").read_text()
    assert "CC BY-SA 4.0" in card and "training_config.yaml" in card
    recipe = (folder / "training_config.yaml").read_text()
    assert "chars" in recipe and "esolm" in recipe


def test_load_by_name_is_eso_lm_b_with_its_tokenizer(folder):
    loaded = load_model(NAME, require_tokenizer=True)
    assert loaded.method.name == "esolm" and loaded.method.variant == "B"
    assert loaded.tokenizer.name == "chars" and loaded.model.config.vocab_size == 97
    assert not loaded.model.training
    assert loaded.recipe["data"]["tokenizer"] == "chars"


def test_shipped_weights_are_the_measured_ones(folder, tmp_path):
    """``metrics.json`` records the NELBO of a fixed small evaluation; recomputing it through the command line
    gives the same figure (float32 kernels differ per CPU: a relative tolerance)."""
    check = json.loads((folder / "metrics.json").read_text())["check"]
    out = tmp_path / "eval.json"
    assert main(["eval", NAME, "--json", str(out), "--batch-size", str(check["batch_size"]),
                 "--max-batches", str(check["max_batches"]), "--seed", str(check["seed"])]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["tokens"] == check["tokens"]
    assert math.isclose(row["nelbo"], check["nelbo"], rel_tol=1e-4)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert math.isclose(metrics["validation"]["bits_per_char"], metrics["validation"]["nelbo_nats"] / math.log(2))


def test_sample_by_name_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["sample", NAME, "--num-samples", "4", "--steps", "32", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["token_ids"]) == 256 and isinstance(r["text"], str) for r in rows)
    assert all(1 not in r["token_ids"] for r in rows)  # no mask token left


def test_a_local_folder_of_the_same_name_wins(tmp_path, monkeypatch):
    from esolm.config import ModelConfig
    from esolm.model.backbone import DiT

    model = DiT(ModelConfig(vocab_size=11, mask_id=10, hidden_size=16, cond_dim=8, n_layers=1, n_heads=2,
                            length=8))
    save_pretrained(model, tmp_path / NAME, {"name": "mdlm"})
    monkeypatch.chdir(tmp_path)
    loaded = load_model(NAME)
    assert loaded.method.name == "mdlm" and loaded.model.config.vocab_size == 11
    got = loaded.model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def test_unknown_name_lists_the_shipped_models():
    from esolm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="shipped models: .*esolm-small"):
        load_model("esolm-nonexistent")
