"""SamplingParams: every knob checked once, the same on every surface (CLI, HTTP body, lm-eval, RL)."""

import argparse
from types import SimpleNamespace

import pytest
import torch

from esolm.errors import UserError
from esolm.methods import as_method
from esolm.sampling.params import GREEDY_BELOW, MAX_SEED, SamplingParams, batch_seed, max_run_seed, max_steps

ESO_B = as_method({"name": "esolm", "variant": "B", "alpha0": 0.25})
MDLM = as_method({"name": "mdlm"})
AR = as_method({"name": "ar"})


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.seed, p.steps, p.alpha0, p.sampler) == (1.0, None, 0, None, None, "auto")
    assert SamplingParams(top_p=1.0).top_p is None  # 1 means no filtering
    assert SamplingParams(speculative=True).speculative == 4 and SamplingParams(speculative=False).speculative is None
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize("t", [5e-324, 1e-300, GREEDY_BELOW / 2])
def test_underflowing_temperatures_decode_greedily(t):
    p = SamplingParams(temperature=t)
    assert p.greedy and p.temperature == 0.0 and p.draw_temperature == 1.0
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy


@pytest.mark.parametrize("field, value, needle", [
    ("temperature", -1, "temperature must be >= 0"), ("temperature", float("inf"), "finite"),
    ("temperature", "hot", "number"), ("top_p", 0.0, "top_p"), ("seed", -1, "seed"), ("seed", MAX_SEED + 1, "seed"),
    ("seed", 1.5, "seed"), ("steps", 0, "steps"), ("steps", True, "steps"), ("alpha0", 2, "alpha0"),
    ("sampler", "", "sampler"), ("shuffle", 1, "shuffle"), ("draft", "wide", "draft"),
    ("speculative", 1, "speculative"),
])
def test_bad_values_are_one_line_user_errors(field, value, needle):
    with pytest.raises(UserError, match=needle) as e:
        SamplingParams(**{field: value})
    assert "\n" not in str(e.value)


def test_resolve_fills_alpha0_and_checks_against_the_method():
    assert SamplingParams().resolve(ESO_B, 32).alpha0 == 0.25  # the one place the default is chosen
    assert SamplingParams(alpha0=0.5).resolve(ESO_B, 32).alpha0 == 0.5
    with pytest.raises(UserError, match="alpha0 applies to Eso-LM only"):
        SamplingParams(alpha0=0.5).resolve(MDLM, 32)
    with pytest.raises(UserError, match="sampler 'strided' does not apply"):
        SamplingParams(sampler="strided").resolve(AR, 32)
    with pytest.raises(UserError, match="speculative decoding needs an Eso-LM"):
        SamplingParams(speculative=2).resolve(MDLM, 32)
    with pytest.raises(UserError, match="shuffle applies"):
        SamplingParams(shuffle=True)


def test_counts_are_bounded_by_what_the_length_can_mean():
    assert max_steps(32) == 4096 and max_steps(1024) == 16 * 1024
    SamplingParams(steps=4096).resolve(ESO_B, 32)
    with pytest.raises(UserError, match=r"steps \(for a sequence of 32 tokens\) must be an integer in \[1, 4096\]"):
        SamplingParams(steps=4097).resolve(ESO_B, 32)
    SamplingParams(speculative=32).resolve(ESO_B, 32)
    with pytest.raises(UserError, match="draft length"):
        SamplingParams(speculative=33).resolve(ESO_B, 32)


def test_batch_seeds_stay_below_2_to_63():
    top = max_run_seed(4)
    assert batch_seed(top, 3) <= MAX_SEED < batch_seed(top + 1, 3)
    torch.Generator().manual_seed(batch_seed(top, 3))


def test_constructors_of_every_surface():
    args = argparse.Namespace(temperature=0.7, top_p=0.9, seed=3, steps=8, alpha0=None, sampler="auto", shuffle=False,
                              speculative=None, draft=None, num_samples=4)
    assert SamplingParams.from_cli(args) == SamplingParams(temperature=0.7, top_p=0.9, seed=3, steps=8)
    body = SimpleNamespace(temperature=0.0, top_p=None, seed=5, steps=None, alpha0=0.5, schedule="first_hitting")
    p = SamplingParams.from_request(body, choice=2)
    assert p.greedy and p.seed == 7 and p.sampler == "first_hitting" and p.alpha0 == 0.5
    with pytest.raises(UserError, match="seed"):
        SamplingParams.from_request(SimpleNamespace(**{**vars(body), "seed": MAX_SEED}), choice=1)
    defaults = SamplingParams(temperature=0.8, seed=1)
    assert SamplingParams.from_lm_eval({"until": ["\n"]}, defaults) == defaults
    assert SamplingParams.from_lm_eval({"do_sample": False, "temperature": 0.6}, defaults).greedy
    assert SamplingParams.from_lm_eval({"temperature": 0.6, "top_p": 0.5}, defaults) == defaults.replace(
        temperature=0.6, top_p=0.5)
    rl = SimpleNamespace(temperature=1.0, top_p=0.95, steps=None, alpha0=0.25)
    assert SamplingParams.from_rl(rl, seed=4) == SamplingParams(top_p=0.95, alpha0=0.25, seed=4)
