"""Weights in and out: esolm folders, the authors' Lightning / Hugging Face / fixture checkpoints."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from conftest import reference_files
from esolm import io
from esolm.config import ModelConfig
from esolm.io import (
    CheckpointError,
    load_authors_state_dict,
    load_pretrained,
    save_pretrained,
)
from esolm.methods import as_method
from esolm.model import masks
from esolm.model.backbone import DiT

FIXTURES = reference_files()
B_FIXTURE = next((p for p in FIXTURES if torch.load(p, weights_only=True)["mode"].upper() == "B"), None)
METHOD = {"name": "esolm", "variant": "B", "alpha0": 0.25, "batch_split": 0.5, "low_var": True}


def random_dit(seed=0, **kw):
    cfg = dict(vocab_size=29, mask_id=28, hidden_size=32, cond_dim=16, n_layers=2, n_heads=4, length=8)
    cfg.update(kw)
    model = DiT(ModelConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


def test_b_fixture_available():
    assert B_FIXTURE is not None, "the reference folder has no Eso-LM (B) fixture"


# ------------------------------------------------------------------ esolm format


@pytest.mark.parametrize("kw", [{}, {"adaln": False, "mask_id": None}])
def test_round_trip_is_bit_exact(tmp_path, kw):
    model = random_dit(**kw)
    save_pretrained(model, tmp_path / "m", method=METHOD)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary leftovers
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format"] == "esolm" and meta["version"] == 1 and meta["model"] == model.config.to_dict()
    loaded, method = load_pretrained(tmp_path / "m")
    assert method == as_method(METHOD) and loaded.config == model.config and not loaded.training
    _state_equal(model, loaded)
    x = torch.randint(0, 28, (2, 8))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_save_pretrained_overwrites(tmp_path):
    first, second = random_dit(seed=1), random_dit(seed=2)
    save_pretrained(first, tmp_path / "m")
    save_pretrained(second, tmp_path / "m", method={"name": "mdlm", "low_var": False})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(tmp_path / "m")[0]
    _state_equal(second, loaded)
    assert load_pretrained(tmp_path / "m" / "model.safetensors")[1] == as_method({"name": "mdlm", "low_var": False})


def test_wrapped_models_save_their_own_keys(tmp_path):
    model = random_dit()
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DDP-style wrappers look like
    save_pretrained(wrapper, tmp_path / "m")
    _state_equal(model, load_pretrained(tmp_path / "m")[0])
    with pytest.raises(CheckpointError, match="expects an esolm DiT"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")


def test_pt_file_with_esolm_config(tmp_path):
    model = random_dit()
    torch.save({"state_dict": model.state_dict(), "config": model.config.to_dict(), "method": METHOD},
               tmp_path / "step100.pt")
    loaded, method = load_pretrained(tmp_path / "step100.pt")
    assert method == as_method(METHOD)
    _state_equal(model, loaded)


def test_bf16_round_trip_keeps_precision(tmp_path):
    model = random_dit().to(torch.bfloat16)
    save_pretrained(model, tmp_path / "m")
    _state_equal(model, load_pretrained(tmp_path / "m")[0])


def test_shared_storage_is_saved_as_separate_tensors(tmp_path):
    model = random_dit()
    model.output_layer.linear.weight = model.vocab_embed.embedding  # [V, d] both: tie them
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")[0]
    assert torch.equal(loaded.output_layer.linear.weight, model.vocab_embed.embedding)
    assert loaded.output_layer.linear.weight.data_ptr() != loaded.vocab_embed.embedding.data_ptr()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io.pretrained, "save_file", boom)
    with pytest.raises(OSError):
        save_pretrained(random_dit(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_one_line_error_naming_the_file(tmp_path, damage):
    save_pretrained(random_dit(), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path / "m")
    assert "model.safetensors" in _one_line(info)


def test_weights_of_another_architecture(tmp_path):
    save_pretrained(random_dit(hidden_size=32), tmp_path / "m")
    other = ModelConfig(**{**random_dit().config.to_dict(), "hidden_size": 64})
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path / "m", config=other)
    msg = _one_line(info)
    assert "has shape [29, 32] in the checkpoint but [29, 64]" in msg
    assert "checkpoint is for hidden_size 32 but config says 64" in msg


def test_missing_path_and_unknown_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="neither"):
        load_pretrained(tmp_path / "f")


# ------------------------------------------------------------------ authors' state dicts


def _fixture():
    return torch.load(B_FIXTURE, weights_only=True)


def _fixture_config(fx):
    return io.config_from_authors(fx["config"], fx["vocab_size"], fx["mask_index"])


def _diffusion_logits(model, fx):
    d = fx["diffusion"]
    with torch.no_grad():
        return model(d["zt_sorted"], positions=d["sort_idx"], mask=masks.causal(d["zt_sorted"].shape[1]))


def test_config_and_method_from_authors():
    fx = _fixture()
    cfg = _fixture_config(fx)
    assert (cfg.hidden_size, cfg.cond_dim, cfg.n_layers, cfg.n_heads, cfg.length, cfg.dropout) == (
        64, 32, 2, 4, 32, 0.0)
    assert cfg.adaln and cfg.mask_id == fx["mask_index"]
    base = {"algo": {"diffusion_attn_mode": "causal"}}
    assert io.method_from_authors(base)["variant"] == "B"
    assert io.method_from_authors({"algo": {"diffusion_attn_mode": "mixed2"}})["variant"] == "A"
    full = {"algo": {"name": "esolm", "diffusion_attn_mode": "causal", "alpha_0": 0.125, "batch_split": 0.5,
                     "loss_type": "low_var"}}
    expected = {"name": "esolm", "variant": "B", "alpha0": 0.125, "batch_split": 0.5, "low_var": True}
    assert io.method_from_authors(full) == expected
    mdlm = io.method_from_authors({"algo": {"name": "mdlm", "loss_type": "elbo"}})
    assert mdlm == {"name": "mdlm", "low_var": False}
    ar = {"algo": {"name": "ar", "causal_attention": True}, "model": fx["config"]["model"]}
    assert io.method_from_authors(ar) == {"name": "ar"}
    ar_cfg = io.config_from_authors(ar, 50, 49)
    assert not ar_cfg.adaln and ar_cfg.mask_id is None
    with pytest.raises(CheckpointError, match="bidirectional"):
        io.method_from_authors({"algo": {"name": "esolm", "diffusion_attn_mode": "bidirectional"}})


def test_load_authors_state_dict_strips_prefix_and_drops_other_parts():
    fx = _fixture()
    state = {f"backbone.{k}": v for k, v in fx["state_dict"].items()}
    state["noise.something"] = torch.zeros(3)
    model = load_authors_state_dict(state, _fixture_config(fx))
    assert (_diffusion_logits(model.eval(), fx) - fx["diffusion"]["logits"]).abs().max() <= 1e-5
    # a bare (unprefixed) dict works too; the rotary buffer may be absent (it is a fixed function)
    bare = {k: v for k, v in fx["state_dict"].items() if k != "rotary_emb.inv_freq"}
    bare["noise.x"] = torch.zeros(1)
    model = load_authors_state_dict(bare, _fixture_config(fx))
    assert torch.equal(model.rotary_emb.inv_freq, fx["state_dict"]["rotary_emb.inv_freq"])


def test_load_authors_state_dict_errors():
    fx = _fixture()
    cfg = _fixture_config(fx)
    missing = dict(fx["state_dict"])
    del missing["blocks.1.attn_qkv.weight"]
    with pytest.raises(CheckpointError) as info:
        load_authors_state_dict(missing, cfg)
    assert "missing keys blocks.1.attn_qkv.weight" in _one_line(info)
    extra = dict(fx["state_dict"], **{"blocks.2.norm1.weight": torch.ones(64)})
    with pytest.raises(CheckpointError) as info:
        load_authors_state_dict(extra, cfg)
    assert "unexpected keys blocks.2.norm1.weight" in _one_line(info)
    small = ModelConfig(**{**cfg.to_dict(), "hidden_size": 32, "cond_dim": 32})
    with pytest.raises(CheckpointError) as info:
        load_authors_state_dict(fx["state_dict"], small)
    assert "checkpoint is for hidden_size 64 but config says 32" in _one_line(info)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_fixture_files_load_through_from_pretrained(path):
    fx = torch.load(path, weights_only=True)
    model = load_pretrained(path)[0]
    assert isinstance(model, DiT)
    for k, v in fx["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v)


def test_bare_state_dict_needs_a_config(tmp_path):
    fx = _fixture()
    torch.save(fx["state_dict"], tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="pass config="):
        load_pretrained(tmp_path / "w.pt")
    model = load_pretrained(tmp_path / "w.pt", config=fx["config"], mask_index=fx["mask_index"])[0]
    assert (_diffusion_logits(model, fx) - fx["diffusion"]["logits"]).abs().max() <= 1e-5


# ------------------------------------------------------------------ Lightning checkpoints


class FakeTokenizer:
    """Stands for the tokenizer the authors' LightningModule saves among its hyper-parameters."""

    ran = False

    def __init__(self, vocab):
        self.vocab = vocab

    def __setstate__(self, state):
        FakeTokenizer.ran = True
        self.__dict__.update(state)


def _lightning_ckpt(path, fx, omegaconf, with_config=True):
    cfg = omegaconf.OmegaConf.create({
        "data": {"seq_len": fx["length"]},
        "model": {**fx["config"]["model"], "length": "${data.seq_len}"},
        "algo": {**fx["config"]["algo"], "name": "esolm", "alpha_0": 0.25, "batch_split": 0.5,
                 "loss_type": "low_var"},
        "loader": {"batch_size": 4, "eval_batch_size": "${.batch_size}", "sizes": [1, 2]},
    })
    model = DiT(_fixture_config(fx))
    model.load_state_dict(fx["state_dict"])
    params = [p.detach() for _, p in model.named_parameters()]
    shadow = [p * 0.5 + 0.01 for p in params]
    hp = {"tokenizer": FakeTokenizer(["a", "b"]), "vocab_size": fx["vocab_size"]}
    if with_config:
        hp["config"] = cfg
    ckpt = {
        "epoch": 3, "global_step": 100, "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"backbone.{k}": v for k, v in fx["state_dict"].items()},
        "ema": {"decay": 0.9999, "num_updates": 100, "shadow_params": shadow},
        "hyper_parameters": hp,
        "loops": {"fit_loop": {"state_dict": {}}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(100.0)}}, "param_groups": [{"lr": 3e-4}]}],
    }
    torch.save(ckpt, path)
    return shadow


def _forbid_omegaconf(monkeypatch, omegaconf):
    def refuse(*a, **k):
        raise AssertionError("omegaconf code ran while loading a checkpoint")

    import omegaconf.base
    import omegaconf.nodes

    for cls in (omegaconf.base.Node, omegaconf.DictConfig, omegaconf.ListConfig, omegaconf.nodes.AnyNode,
                omegaconf.base.Metadata, omegaconf.base.ContainerMetadata):
        monkeypatch.setattr(cls, "__init__", refuse)
    monkeypatch.setattr(omegaconf.base.Node, "__setstate__", refuse)


def test_lightning_checkpoint_without_running_pickled_code(tmp_path, monkeypatch):
    omegaconf = pytest.importorskip("omegaconf")  # in the dev extra
    fx = _fixture()
    shadow = _lightning_ckpt(tmp_path / "last.ckpt", fx, omegaconf)
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only loading refuses this file
        torch.load(tmp_path / "last.ckpt", weights_only=True)
    _forbid_omegaconf(monkeypatch, omegaconf)
    FakeTokenizer.ran = False

    raw = io.read_checkpoint(tmp_path / "last.ckpt")
    cfg = raw["hyper_parameters"]["config"]
    assert type(cfg) is dict and cfg["model"]["length"] == fx["length"]  # interpolation resolved
    assert cfg["loader"] == {"batch_size": 4, "eval_batch_size": 4, "sizes": [1, 2]}
    assert isinstance(raw["hyper_parameters"]["tokenizer"], io.InertObject)

    model, method = load_pretrained(tmp_path / "last.ckpt")  # EMA by default
    assert method == as_method({"name": "esolm", "variant": "B", "alpha0": 0.25, "batch_split": 0.5, "low_var": True})
    assert model.config == _fixture_config(fx)
    for (name, p), s in zip(model.named_parameters(), shadow):
        assert torch.equal(p, s), name
    assert torch.equal(model.rotary_emb.inv_freq, fx["state_dict"]["rotary_emb.inv_freq"])

    raw_model = load_pretrained(tmp_path / "last.ckpt", use_ema=False)[0]
    assert (_diffusion_logits(raw_model, fx) - fx["diffusion"]["logits"]).abs().max() <= 1e-5
    assert not FakeTokenizer.ran


def test_lightning_checkpoint_with_unrecoverable_config(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    fx = _fixture()
    _lightning_ckpt(tmp_path / "last.ckpt", fx, omegaconf, with_config=False)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path / "last.ckpt")
    assert "pass config=" in _one_line(info)
    model = load_pretrained(tmp_path / "last.ckpt", config=_fixture_config(fx), use_ema=False)[0]
    assert (_diffusion_logits(model, fx) - fx["diffusion"]["logits"]).abs().max() <= 1e-5


def test_ema_of_wrong_size_is_refused(tmp_path):
    fx = _fixture()
    ckpt = {"state_dict": fx["state_dict"], "config": fx["config"], "vocab_size": fx["vocab_size"],
            "mask_index": fx["mask_index"], "ema": {"shadow_params": [torch.zeros(3)]}}
    torch.save(ckpt, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="EMA holds 1 tensors"):
        load_pretrained(tmp_path / "x.ckpt")
    assert load_pretrained(tmp_path / "x.ckpt", use_ema=False)[0] is not None


# ------------------------------------------------------------------ authors' Hugging Face layout


def _hf_folder(folder, fx, kind, weights="safetensors"):
    folder.mkdir()
    m = fx["config"]["model"]
    if kind == "esolm":  # s-sahoo/Eso-LMs models/hf/config.py (EsoLMConfig) + push_to_hf.py
        meta = {"model_type": "EsoLM", "vocab_size": fx["vocab_size"], "mask_index": fx["mask_index"],
                "model_length": m["length"], "hidden_size": m["hidden_size"], "hidden_dim": m["hidden_size"],
                "cond_dim": m["cond_dim"], "n_blocks": m["n_blocks"], "n_heads": m["n_heads"],
                "dropout": m["dropout"], "_name_or_path": "sahoo-diffusion/Eso-LM-B-alpha-0_25",
                "architectures": ["EsoLM"], "return_dict": False}
    else:  # MDLMConfig: hidden_dim, no mask_index (the mask is the last id)
        meta = {"model_type": "mdlm", "vocab_size": fx["vocab_size"], "model_length": m["length"],
                "hidden_dim": m["hidden_size"], "cond_dim": m["cond_dim"], "n_blocks": m["n_blocks"],
                "n_heads": m["n_heads"], "dropout": m["dropout"], "time_conditioning": False}
    (folder / "config.json").write_text(json.dumps(meta))
    state = {f"backbone.{k}": v.contiguous() for k, v in fx["state_dict"].items()}
    if weights == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    elif weights == "sharded":
        keys = sorted(state)
        half = len(keys) // 2
        save_file({k: state[k] for k in keys[:half]}, str(folder / "model-00001-of-00002.safetensors"))
        save_file({k: state[k] for k in keys[half:]}, str(folder / "model-00002-of-00002.safetensors"))
        weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("weights", ["safetensors", "sharded", "bin"])
def test_authors_hf_esolm_folder(tmp_path, weights):
    fx = _fixture()
    folder = _hf_folder(tmp_path / "hf", fx, "esolm", weights)
    model, method = load_pretrained(folder)
    assert method == as_method({"name": "esolm", "variant": "B", "alpha0": 0.25, "batch_split": 0.0, "low_var": False})
    assert model.config == _fixture_config(fx)
    assert (_diffusion_logits(model, fx) - fx["diffusion"]["logits"]).abs().max() <= 1e-5


def test_authors_hf_mdlm_folder(tmp_path):
    fx = _fixture()
    folder = _hf_folder(tmp_path / "hf", fx, "mdlm")
    model, method = load_pretrained(folder)
    assert method == as_method({"name": "mdlm", "low_var": False})
    assert model.config.mask_id == fx["vocab_size"] - 1
    assert (_diffusion_logits(model, fx) - fx["diffusion"]["logits"]).abs().max() <= 1e-5


def test_repo_id_offline_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        load_pretrained("sahoo-diffusion/Eso-LM-B-alpha-1", cache_dir=tmp_path, local_files_only=True)
    msg = _one_line(info)
    assert "sahoo-diffusion/Eso-LM-B-alpha-1" in msg and "Hugging Face Hub" in msg


def test_repo_id_downloads_through_the_hub_client(tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub.snapshot_download (replaced here by a local copy)."""
    import huggingface_hub

    fx = _fixture()
    folder = _hf_folder(tmp_path / "snap", fx, "esolm")
    seen = {}

    def fake_snapshot_download(**kwargs):
        seen.update(kwargs)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, method = load_pretrained("sahoo-diffusion/Eso-LM-B-alpha-1", revision="main")
    assert seen["repo_id"] == "sahoo-diffusion/Eso-LM-B-alpha-1" and seen["revision"] == "main"
    assert method.alpha0 == 1.0
    assert (_diffusion_logits(model, fx) - fx["diffusion"]["logits"]).abs().max() <= 1e-5


@pytest.mark.slow
def test_checkpoint_written_by_lightning_trainer(tmp_path, monkeypatch):
    """A checkpoint saved by a real Lightning Trainer, hyper-parameters holding an omegaconf config the
    way the authors' LightningModule saves them (``save_hyperparameters()`` of config/tokenizer/vocab)."""
    omegaconf = pytest.importorskip("omegaconf")
    lightning = pytest.importorskip("lightning")

    class Authors(lightning.LightningModule):
        def __init__(self, config, tokenizer=None, vocab_size=None):
            super().__init__()
            self.save_hyperparameters()
            m = config.model
            self.backbone = DiT(ModelConfig(
                vocab_size=vocab_size, mask_id=vocab_size - 1, hidden_size=m.hidden_size, cond_dim=m.cond_dim,
                n_layers=m.n_blocks, n_heads=m.n_heads, length=m.length, dropout=m.dropout))

        def training_step(self, batch, batch_idx):
            return self.backbone(batch[0]).logsumexp(-1).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    cfg = omegaconf.OmegaConf.create({
        "model": {"hidden_size": 32, "cond_dim": 16, "n_blocks": 1, "n_heads": 4, "length": 8,
                  "dropout": 0.0},
        "algo": {"name": "esolm", "diffusion_attn_mode": "mixed2", "alpha_0": 0.5, "loss_type": "low_var"},
    })
    module = Authors(cfg, tokenizer=FakeTokenizer(["a"]), vocab_size=20)
    tokens = torch.utils.data.TensorDataset(torch.randint(0, 20, (4, 8)))
    data = torch.utils.data.DataLoader(tokens, batch_size=2)
    trainer = lightning.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    _forbid_omegaconf(monkeypatch, omegaconf)
    FakeTokenizer.ran = False
    model, method = load_pretrained(tmp_path / "last.ckpt")
    assert method == as_method({"name": "esolm", "variant": "A", "alpha0": 0.5, "batch_split": 0.0, "low_var": True})
    assert model.config == module.backbone.config
    _state_equal(module.backbone, model)
    assert not FakeTokenizer.ran


EVIL_RAN = []


def _evil(arg):
    EVIL_RAN.append(arg)
    return arg


class Payload:
    """An object whose unpickling would call a function of the checkpoint's choosing."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def test_pickled_calls_are_never_executed(tmp_path):
    import os

    fx = _fixture()
    base = {"state_dict": fx["state_dict"], "config": fx["config"], "vocab_size": fx["vocab_size"],
            "mask_index": fx["mask_index"]}
    torch.save({**base, "extra": Payload(_evil, "ran")}, tmp_path / "a.ckpt")
    assert load_pretrained(tmp_path / "a.ckpt")[0] is not None
    assert EVIL_RAN == []
    extra = io.read_checkpoint(tmp_path / "a.ckpt")["extra"]
    assert isinstance(extra, io.InertObject) and extra.qualname.endswith("_evil") and extra.args == ("ran",)
    # functions of blocked modules (os, sys) are refused outright
    torch.save({**base, "extra": Payload(os.system, "true")}, tmp_path / "b.ckpt")  # pickled as posix.system
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path / "b.ckpt")
    assert "b.ckpt" in _one_line(info)


def test_corrupt_pickle_checkpoint_is_one_line_error(tmp_path):
    fx = _fixture()
    torch.save({"state_dict": fx["state_dict"], "config": fx["config"]}, tmp_path / "c.ckpt")
    data = (tmp_path / "c.ckpt").read_bytes()
    (tmp_path / "c.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path / "c.ckpt")
    assert "c.ckpt" in _one_line(info)


# ------------------------------------------------------------------ one loader: every format, every entry point


WORDS = "the a river city old new king music war north south early modern language people land sea".split()


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """One Eso-LM (B) network saved in every format esolm reads, plus a tokenizer and a small text file."""
    import random

    omegaconf = pytest.importorskip("omegaconf")  # in the dev extra
    from esolm.data.tokenizers import train_bpe
    from esolm.methods import model_config_for
    from esolm.recipes import resolve

    root = tmp_path_factory.mktemp("formats")
    rng = random.Random(0)
    texts = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(2))
             for _ in range(60)]
    (root / "docs.txt").write_text("\n\n".join(texts) + "\n")
    tok = train_bpe(texts, vocab_size=300, name="tiny-bpe")
    tok.save(root / "tok")
    method = {"name": "esolm", "variant": "B", "alpha0": 0.25, "batch_split": 0.5, "low_var": False}
    cfg = model_config_for(method, vocab_size=tok.vocab_size, mask_id=tok.mask_id, hidden_size=32, cond_dim=16,
                           n_layers=2, n_heads=2, length=16)
    torch.manual_seed(3)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    ema = {k: v * 0.5 if k in params else v for k, v in state.items()}  # EMA weights, where a format has them
    out = {}

    run = resolve("cpu-tiny", ["data.length=16", "method.batch_split=0.5"]).to_dict()
    run["data"].update(source=str(root / "docs.txt"), val_fraction=0.5, max_documents=16)
    torch.save({"epoch": 0, "global_step": 4,
                "state_dict": {f"model.{k}": v for k, v in ema.items()},
                "current_model_state": {f"model.{k}": v for k, v in state.items()},
                "hyper_parameters": {"config": run, "vocab_size": tok.vocab_size, "mask_id": tok.mask_id,
                                     "tokenizer_meta": tok.meta()},
                "esolm": {"consumed": 4, "method": method, "tokenizer_json": tok.backend.to_str(),
                          "tokenizer_meta": tok.meta()}}, root / "train.ckpt")
    out["training_ckpt"] = dict(path=root / "train.ckpt", state=ema, raw=state, tokenizer=True, recipe=True)

    save_pretrained(model, root / "export", method=method, tokenizer=tok, recipe=run)
    out["esolm_folder"] = dict(path=root / "export", state=state, tokenizer=True, recipe=True)

    hydra = {"model": {"hidden_size": 32, "cond_dim": 16, "n_blocks": 2, "n_heads": 2, "length": 16, "dropout": 0.0},
             "algo": {"name": "esolm", "diffusion_attn_mode": "causal", "alpha_0": 0.25, "batch_split": 0.5}}
    backbone = {f"backbone.{k}": v for k, v in state.items()}
    # (mask_index: this tokenizer's mask is not the authors' default, the last id)
    torch.save({"state_dict": backbone, "ema": {"shadow_params": [ema[n] for n, _ in model.named_parameters()]},
                "hyper_parameters": {"config": omegaconf.OmegaConf.create(hydra), "tokenizer": FakeTokenizer(["a"])},
                "mask_index": tok.mask_id}, root / "authors.ckpt")
    out["lightning_ckpt"] = dict(path=root / "authors.ckpt", state=ema, raw=state)

    torch.save({"state_dict": state, "config": hydra, "vocab_size": tok.vocab_size, "mask_index": tok.mask_id},
               root / "fixture.pt")
    out["fixture_pt"] = dict(path=root / "fixture.pt", state=state)

    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text(json.dumps({
        "model_type": "EsoLM", "vocab_size": tok.vocab_size, "mask_index": tok.mask_id, "model_length": 16,
        "hidden_size": 32, "cond_dim": 16, "n_blocks": 2, "n_heads": 2, "dropout": 0.0,
        "_name_or_path": "sahoo-diffusion/Eso-LM-B-alpha-0_25"}))
    save_file({k: v.contiguous() for k, v in backbone.items()}, str(root / "hf" / "model.safetensors"))
    out["hf_folder"] = dict(path=root / "hf", state=state)
    out["hf_repo"] = dict(path="sahoo-diffusion/Eso-LM-B-alpha-0_25", state=state, snapshot=root / "hf")
    return {"root": root, "tok": tok, "cfg": cfg, "method": as_method(method), "formats": out}


FORMAT_NAMES = ["training_ckpt", "esolm_folder", "lightning_ckpt", "fixture_pt", "hf_folder", "hf_repo"]


def _offline_hub(monkeypatch, fmt):
    import huggingface_hub

    def fake_snapshot_download(**kwargs):
        assert kwargs["repo_id"] == fmt["path"]
        return str(fmt["snapshot"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_every_format_through_every_loader(formats, name, monkeypatch):
    fmt = formats["formats"][name]
    if "snapshot" in fmt:
        _offline_hub(monkeypatch, fmt)
    model = load_pretrained(fmt["path"])[0]
    assert model.config == formats["cfg"] and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, fmt["state"][k]), k
    loaded, method = load_pretrained(fmt["path"])
    hf_method = {"name": "esolm", "variant": "B", "alpha0": 0.25, "batch_split": 0.0, "low_var": False}
    assert method == (as_method(hf_method) if name.startswith("hf") else formats["method"])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    lm = io.load_model(fmt["path"])
    assert (lm.tokenizer is not None) == fmt.get("tokenizer", False)
    if lm.tokenizer is not None:
        assert lm.tokenizer.fingerprint == formats["tok"].fingerprint
    assert (lm.data.get("source") == str(formats["root"] / "docs.txt")) == fmt.get("recipe", False)
    if "raw" in fmt:  # use_ema=False: the raw weights
        raw = io.load_model(fmt["path"], use_ema=False).model
        for k, v in raw.state_dict().items():
            assert torch.equal(v, fmt["raw"][k]), k
    given = io.load_model(fmt["path"], tokenizer=formats["root"] / "tok")
    assert given.tokenizer.fingerprint == formats["tok"].fingerprint


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_every_format_through_the_cli(formats, name, tmp_path, monkeypatch, capsys):
    from esolm import cli

    fmt, root = formats["formats"][name], formats["root"]
    if "snapshot" in fmt:
        _offline_hub(monkeypatch, fmt)
    tok = [] if fmt.get("tokenizer") else ["--tokenizer", str(root / "tok")]
    data = [] if fmt.get("recipe") else ["--data", str(root / "docs.txt"), "--val-fraction", "0.5",
                                         "--max-documents", "16"]
    rc = cli.main(["eval", str(fmt["path"]), *tok, *data, "--batch-size", "4", "--max-batches", "1", "--device", "cpu",
                   "--json", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err
    assert rc == 0, err
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["data"]["source"] == str(root / "docs.txt") and res["results"][0]["tokens"] > 0
    assert 1.0 < res["results"][0]["perplexity"] < 10 * formats["tok"].vocab_size
    rc = cli.main(["sample", str(fmt["path"]), *tok, "--num-samples", "2", "--steps", "4", "--device", "cpu",
                   "--out", str(tmp_path / "s.jsonl")])
    err = capsys.readouterr().err
    assert rc == 0, err
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["token_ids"]) <= 16 for r in rows)


def test_export_of_any_format_round_trips(formats, tmp_path, capsys):
    from esolm import cli

    fmt = formats["formats"]["lightning_ckpt"]
    assert cli.main(["export", str(fmt["path"]), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    model, method = load_pretrained(tmp_path / "out")
    assert method == formats["method"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, fmt["state"][k]), k
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    assert cli.main(["export", str(fmt["path"]), str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a folder" in err and blocker.read_text() == "keep"


def test_missing_relative_path_is_not_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ("bad/x.ckpt", "bad/model.safetensors", "./bad/x"):
        with pytest.raises(CheckpointError, match="does not exist"):
            load_pretrained(text)
    (tmp_path / "runs").mkdir()
    assert not io.is_repo_id("runs/model")  # a local folder named like the owner: a path
    assert io.is_repo_id("sahoo-diffusion/Eso-LM-B-alpha-0_25") and io.is_repo_id("kuleshov-group/mdlm-owt")
    assert not io.is_repo_id("a/b/c") and not io.is_repo_id("owner/name.pt")


def test_stored_config_must_record_the_length(tmp_path):
    save_pretrained(random_dit(), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    del meta["model"]["length"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lacks length"):
        load_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="lacks length"):
        load_pretrained(tmp_path / "m", config=meta["model"])


def test_layout_and_parameter_count_match_the_model():
    for kw in ({}, {"adaln": False, "mask_id": None}, {"n_layers": 5, "mlp_ratio": 2}):
        cfg = random_dit(**kw).config
        model, layout = DiT(cfg), io.layout(cfg)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout.shapes
        assert layout.params == [n for n, _ in model.named_parameters()]
        assert io.parameter_count(cfg) == model.num_parameters() == layout.num_parameters


# ------------------------------------------------------------------ atomic writes


def test_atomic_write_json_and_failure_leave_no_temporary(tmp_path):
    target = tmp_path / "sub" / "x.json"
    io.atomic_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError), io.atomic_writer(target) as fh:
        fh.write(b"partial")
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.json"]
    io.atomic_write(target, "text é")
    assert target.read_text(encoding="utf-8") == "text é"


def test_atomic_dir_new_and_existing(tmp_path):
    with io.atomic_dir(tmp_path / "d") as d:
        (d / "a").write_text("1")
        assert not (tmp_path / "d").exists()  # nothing visible until the block ends
    assert (tmp_path / "d" / "a").read_text() == "1"
    (tmp_path / "d" / "old").write_text("kept")
    with pytest.raises(RuntimeError), io.atomic_dir(tmp_path / "d") as d:
        (d / "a").write_text("2")
        raise RuntimeError
    assert (tmp_path / "d" / "a").read_text() == "1"
    with io.atomic_dir(tmp_path / "d") as d:
        (d / "a").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert (tmp_path / "d" / "a").read_text() == "2" and (tmp_path / "d" / "old").read_text() == "kept"


def test_check_writable(tmp_path):
    from esolm.errors import UserError

    assert io.check_writable(tmp_path / "new" / "deeper" / "x.json") == tmp_path / "new" / "deeper" / "x.json"
    assert not (tmp_path / "new").exists()  # nothing is created
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a folder"):
        io.check_writable(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        io.check_writable(tmp_path / "f" / "x.json")
    with pytest.raises(UserError, match="not a folder"):
        io.check_writable(tmp_path / "f", folder=True)
    io.check_writable(tmp_path, folder=True)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # (root can write anywhere)
        with pytest.raises(UserError, match="not writable"):
            io.check_writable(locked / "x.json")
