"""``esolm adapt``: a tiny random Llama (tests/test_llama_folder.py's Hugging Face folder: 2 layers, hidden 32, 4
heads sharing 2 key/value heads, the tiny BPE of tests/test_llama_tokenizer.py) fine-tuned into an Eso-LM (B) on
40 Wikipedia lead sections, L = 32, a few steps: the run writes a model esolm loads; ``--train adapter`` changes
only the deltas; a run stopped mid-way and resumed is bit for bit the uninterrupted one; bad flags, recipes and
bases are one line (exit 2) before any work. The SmolLM2 GGUF itself is only resolved (``--base``'s default),
never trained on here.
"""

import json
import re

import pytest
import torch

pytest.importorskip("transformers", reason="the tiny Llama base folders need transformers")
from lightning.pytorch.callbacks import Callback  # noqa: E402

from conftest import smollm2_gguf_or_skip  # noqa: E402
from esolm.cli import main  # noqa: E402
from esolm.io import llama as llama_io  # noqa: E402
from esolm.io import load_model  # noqa: E402
from esolm.methods import as_method  # noqa: E402
from esolm.model import EsoLlama  # noqa: E402
from esolm.training import adapt as adapt_mod  # noqa: E402
from esolm.training.adapt import LitAdapt, adapt, adapt_config  # noqa: E402
from esolm.training.checkpoints import read_checkpoint  # noqa: E402
from test_llama_folder import make_base  # noqa: E402

L = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one thread is the fastest on a shared machine (and the runs compare bit for bit anyway)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def flags(base, cache, out, *extra: str) -> list[str]:
    return ["adapt", "--base", str(base), "--out", str(out), "--length", str(L), "--max-documents", "40",
            "--val-fraction", "0.2", "--cache-dir", str(cache), "--batch", "4", "--micro-batch", "2", "--warmup", "1",
            "--logger", "none",
            "--no-progress", "--val-every", "2", "--val-batches", "2", "--ckpt-every", "2", *extra]


def overrides(base, cache, out, **extra) -> dict:
    """The config keys of :func:`flags`, for in-process runs (with the per-step trace of LitEsoLM)."""
    keys = {"adapt.base": str(base), "trainer.out_dir": str(out), "data.length": L, "data.max_documents": 40,
            "data.val_fraction": 0.2, "data.cache_dir": str(cache), "trainer.global_batch": 4,
            "trainer.micro_batch": 2, "optim.warmup_steps": 1, "trainer.logger": "none", "trainer.progress": False,
            "trainer.val_every": 2, "trainer.val_batches": 2, "trainer.ckpt_every": 2,
            "trainer.trace": str(out / "trace")}
    keys.update(extra)
    return keys


def trace(out) -> list[dict]:
    return [json.loads(line) for line in (out / "trace.rank0").read_text().splitlines()]


def states_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def test_full_run_writes_a_model_esolm_loads(base, cache, tmp_path, capsys):
    out = tmp_path / "full"
    assert main(flags(base, cache, out, "--train", "full", "--steps", "3", "--alpha0", "0.5")) == 0
    printed = capsys.readouterr().out
    assert "tokens/s (steps 2-3)" in printed and "the 0 remaining steps" in printed  # the step-cost estimate
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["steps"] == 3 and final["tokens_seen"] == 3 * 4 * L and final["seconds"] > 0
    assert final["tokens_per_s"] > 0 and final["val_nelbo"] > 0 and final["train"] == "full"
    loaded = load_model(out / "model")
    assert isinstance(loaded.model, EsoLlama)
    assert loaded.method == as_method({"name": "esolm", "variant": "B", "alpha0": 0.5})
    assert loaded.provenance["adapted"] is True and loaded.provenance["steps"] == 3
    assert loaded.tokenizer.mask_id == loaded.model.config.mask_id
    before = llama_io.from_hf_folder(base, length=L).state_dict()
    after = loaded.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if "layers.0." in k)  # every weight trained
    assert (out / "config.yaml").is_file()
    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in before}


def test_adapter_run_changes_only_the_deltas(base, cache, tmp_path):
    out = tmp_path / "adapter"
    module = adapt(adapt_config(None, overrides(base, cache, out, **{"trainer.max_steps": 3})))
    ref = llama_io.from_hf_folder(base, length=L).state_dict()
    state = module.model.state_dict()
    deltas = dict(module.model.adapter_parameters())
    assert deltas and set(ref) == set(state) - {k for k in state if k in deltas}
    assert all(torch.equal(state[k], ref[k]) for k in ref)  # the base, bit for bit
    assert all(not torch.equal(state[k], torch.zeros_like(state[k])) for k in deltas if "lora_b" in k)
    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in deltas}  # the deltas only
    loaded = load_model(out / "model")
    got = loaded.model.state_dict()
    assert states_equal({k: got[k] for k in state}, state)


class StopAt(Callback):
    """Ctrl-C after optimizer step ``step`` (the checkpoint of step ``step - 1`` is the last on disk)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and pl_module.consumed % pl_module.cfg.accumulate == 0:
            raise KeyboardInterrupt


@pytest.mark.parametrize("train", ["adapter", "full"])
def test_resume_after_an_interruption_is_exact(base, cache, tmp_path, train):
    extra = {"trainer.max_steps": 6, "adapt.train": train, "adapt.alpha0_curriculum": 4}
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref = adapt(adapt_config(None, overrides(base, cache, ref_out, **extra)))
    with pytest.raises(KeyboardInterrupt):
        adapt(adapt_config(None, overrides(base, cache, cut_out, **extra)), callbacks=[StopAt(5)])
    stopped = trace(cut_out)  # step 5 was applied, not traced (the callback stops before the module's hook)
    assert [r["step"] for r in stopped] == [1, 2, 3, 4]
    assert read_checkpoint(cut_out / "checkpoints" / "last.ckpt")["global_step"] == 4
    resumed = adapt(adapt_config(None, overrides(base, cache, cut_out, **extra)))  # --resume auto: last.ckpt (4)
    full = trace(cut_out)[len(stopped):]
    assert [r["step"] for r in full] == [5, 6]
    for a, b in zip(trace(ref_out), stopped + full, strict=True):
        assert a["loss"] == b["loss"] and a["params"] == b["params"] and a["batch_sum"] == b["batch_sum"], (a, b)
    assert states_equal(ref.model.state_dict(), resumed.model.state_dict())
    assert json.loads((cut_out / "final_metrics.json").read_text())["tokens_seen"] == 6 * 4 * L


def test_alpha0_curriculum_ramps_the_training_objective_only(base):
    cfg = adapt_config(None, {"adapt.base": str(base), "adapt.train": "full", "adapt.alpha0": 0.5,
                              "adapt.alpha0_curriculum": 4, "trainer.global_batch": 4, "trainer.micro_batch": 2})
    module = LitAdapt(cfg.to_dict(), llama_io.from_hf_folder(base, length=L))
    assert [module.alpha0_at(s) for s in range(6)] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    # micro-batch k belongs to optimizer step k // 2 (two micro-batches a step)
    assert [module.training_objective(k).method.alpha0 for k in (0, 1, 2, 7, 8, 100)] == [0.0, 0.0, 0.125, 0.375,
                                                                                           0.5, 0.5]
    assert module.training_objective(8) is module.objective and module.objective.method.alpha0 == 0.5


# --------------------------------------------------------------------------------------------------
# Errors: one line, exit 2, before any work
# --------------------------------------------------------------------------------------------------


def test_bad_flags_and_bases_are_one_line_before_any_work(base, cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(adapt_mod, "load_base", lambda *a, **k: pytest.fail("the base was read"))
    (tmp_path / "file").write_text("x")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("adapt: {lora_rank: 0}\n")
    unknown_yaml = tmp_path / "unknown.yaml"
    unknown_yaml.write_text("model: {hidden_size: 8}\n")
    cases = [
        (["--train", "lora"], "invalid choice: 'lora'"),
        (["--lora-rank", "0"], "--lora-rank: must be an integer >= 1"),
        (["--alpha0", "1.5"], "--alpha0: must lie in \\[0, 1\\]"),
        (["--lora-gate", "some"], "invalid choice: 'some'"),
        (["--steps", "x"], "--steps: expected an integer"),
        (["--base", str(tmp_path / "absent")], "base model not found"),
        (["--base", str(no_config)], "no config.json"),
        (["--length", "64"], "exceeds the model's max_position_embeddings"),
        (["--batch", "6", "--micro-batch", "4"], "must be a multiple of micro_batch"),
        (["--resume", str(tmp_path / "absent.ckpt")], "checkpoint to resume from not found"),
        (["--out", str(tmp_path / "file")], "trainer.out_dir"),
        (["--max-time", "soon"], "trainer.max_time must be seconds or DD:HH:MM:SS"),
        (["--config", str(tmp_path / "absent.yaml")], "adapt recipe not found"),
        (["--config", str(bad_yaml)], "adapt.lora_rank must be positive"),
        (["--config", str(unknown_yaml)], "unknown config section 'model'"),
    ]
    for extra, match in cases:
        code = main(flags(base, cache, tmp_path / "out", *extra))
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("esolm adapt: error:"), (extra, err)
        assert re.search(match, lines[0]), (extra, lines[0])
    assert not (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(llama_io, "missing_gguf_packages", lambda: ["gguf"])
    assert main(flags(base, cache, tmp_path / "out", "--base", str(gguf))) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "reading a GGUF base needs gguf (not installed): make judge" in err


def test_resume_with_other_flags_is_refused_before_training(base, cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(flags(base, cache, out, "--train", "full", "--steps", "2", "--val-every", "0")) == 0
    capsys.readouterr()
    assert main(flags(base, cache, out, "--train", "full", "--steps", "2", "--alpha0", "0.75")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot resume" in err and "adapt.alpha0: 0.25 -> 0.75" in err
    assert "--resume none or another --out" in err
    # what may change (the run's length) does: the run continues from step 2 to 3
    assert main(flags(base, cache, out, "--train", "full", "--steps", "3")) == 0
    assert json.loads((out / "final_metrics.json").read_text())["steps"] == 3


def test_the_default_base_is_the_smollm2_gguf(tmp_path):
    path = smollm2_gguf_or_skip("the default base of esolm adapt")
    assert adapt_config(None, {"trainer.out_dir": str(tmp_path)}).adapt.base == str(path)
