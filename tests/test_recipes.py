"""Recipes: presets, typed key=value overrides, validation errors as one line."""

import datetime as dt

import pytest
import yaml

from esolm.config import ConfigError
from esolm.recipes import RunConfig, apply_overrides, available_presets, load_preset, resolve


def test_presets_load_and_validate():
    assert {"paper-lm1b-small", "paper-owt-small", "cpu-tiny", "cpu-small"} <= set(available_presets())
    for name in available_presets():
        cfg = resolve(name)
        assert cfg.preset == name
    lm1b, owt = resolve("paper-lm1b-small"), resolve("paper-owt-small")
    for c in (lm1b, owt):  # the paper's recipe
        m, o = c.model, c.optim
        assert (m.hidden_size, m.n_layers, m.n_heads, m.cond_dim, m.dropout) == (768, 12, 12, 128, 0.1)
        assert (o.lr, o.warmup_steps, o.ema, c.trainer.global_batch) == (3e-4, 2500, 0.9999, 512)
    assert (lm1b.data.length, lm1b.data.tokenizer) == (128, "bert-base-uncased")
    assert (owt.data.length, owt.data.tokenizer) == (1024, "gpt2")


def test_overrides_are_typed():
    cfg = resolve("cpu-tiny", ["method.alpha0=1", "optim.lr=2e-3", "trainer.max_time=00:01:30:00",
                               "optim.betas=[0.9, 0.95]", "data.max_documents=null", "trainer.progress=true"])
    assert cfg.method.alpha0 == 1.0 and isinstance(cfg.method.alpha0, float)
    assert cfg.method_spec().batch_split == 1.0  # paper default at alpha0 = 1
    assert cfg.optim.lr == 2e-3 and cfg.optim.betas == [0.9, 0.95] and cfg.data.max_documents is None
    assert cfg.max_time() == dt.timedelta(hours=1, minutes=30)
    assert resolve("cpu-tiny", ["trainer.max_time=90"]).max_time() == dt.timedelta(seconds=90)
    # method.name starts a fresh method section
    assert resolve("cpu-tiny", ["method.name=ar"]).method_spec().to_dict() == {"name": "ar"}  # preset alpha0 dropped
    assert resolve("cpu-tiny", ["method.name=mdlm"]).method_spec().to_dict() == {"name": "mdlm", "low_var": False}
    with pytest.raises(ConfigError, match="unknown keys for method 'ar': alpha0"):
        resolve("cpu-tiny", ["method.alpha0=0.5", "method.name=ar"])  # explicit keys apply on top
    bd3 = resolve("cpu-tiny", ["method.name=bd3lm", "method.block_size=4"]).method_spec().to_dict()
    assert bd3 == {"name": "bd3lm", "block_size": 4, "clip": None, "ignore_bos": False}


def test_batch_geometry():
    cfg = resolve("cpu-tiny", ["trainer.global_batch=16", "trainer.micro_batch=2", "trainer.devices=2"])
    assert (cfg.micro_batch, cfg.accumulate, cfg.world_size) == (2, 4, 2)
    with pytest.raises(ConfigError, match="multiple of micro_batch"):
        resolve("cpu-tiny", ["trainer.global_batch=10", "trainer.micro_batch=4"])


@pytest.mark.parametrize("override,match", [
    ("method.alpha0=1.5", "alpha0 must lie in"),
    ("method.alpha0=-0.01", "alpha0 must lie in"),
    ("method.batch_split=2", "batch_split must lie in"),
    ("model.n_heads=3", "must divide hidden_size"),
    ("trainer.nope=1", "unknown config key 'trainer.nope'"),
    ("nosection.x=1", "unknown config key"),
    ("model.n_layers=two", "expects int"),
    ("method.name=foo", "method name must be one of"),
    ("optim.ema=1.0", "optim.ema"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("method.block_size=4", "unknown keys for method 'esolm'"),
    ("trainer.max_time=abc", "max_time"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve("cpu-tiny", [override])


def test_unknown_preset_and_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*cpu-tiny"):
        load_preset("nope")
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"model": {"hidden_size": 64}, "trainer": {"max_steps": 3}}))
    cfg = load_preset(str(f))
    assert cfg.preset == "mine" and cfg.model.hidden_size == 64 and cfg.trainer.max_steps == 3
    f.write_text(yaml.safe_dump({"model": {"hidden": 64}}))
    with pytest.raises(ConfigError, match="model.hidden"):
        load_preset(str(f))


def test_round_trip_through_dict():
    cfg = resolve("cpu-small", ["method.alpha0=0.125"])
    back = RunConfig.from_dict(cfg.to_dict())
    assert back == cfg and yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()
    with pytest.raises(ConfigError):
        apply_overrides(RunConfig(), ["novalue"])


def test_model_section_is_a_subset_of_model_config():
    """The recipe's model section names ModelConfig fields with the same types (no second architecture spec)."""
    import dataclasses
    import typing

    from esolm.config import ModelConfig
    from esolm.recipes import ModelSection

    section = typing.get_type_hints(ModelSection)
    config = typing.get_type_hints(ModelConfig)
    assert set(section) <= set(config) - {"vocab_size", "mask_id", "length"}
    assert all(section[k] == config[k] for k in section)
    cfg = resolve("cpu-tiny").model_config(vocab_size=50, mask_id=49)
    assert all(getattr(cfg, f.name) == getattr(resolve("cpu-tiny").model, f.name)
               for f in dataclasses.fields(ModelSection))
