"""The KV-cached Eso-LM (B) sampler reproduces the authors' cached sampler step by step.

Each reference fixture with ``cached_generation`` holds the authors' sort order, unmask counts per step,
every step's logits (mask logit set to -1e6) and the greedy tokens. We replay the same plan through
:func:`esolm.sampling.sample_esolm_b` with ``greedy=True``.
"""

import pytest
import torch

from conftest import reference_files
from esolm.io import config_from_authors, load_authors_state_dict
from esolm.sampling import Plan, sample_esolm_b
from test_reference import assert_matches_fixture

CASES = [p for p in reference_files() if "cached_generation" in torch.load(p, weights_only=True)]


def test_reference_fixtures_present():
    assert CASES, "no authors_esolm_*.pt fixture with cached_generation found"


@pytest.mark.parametrize("path", CASES, ids=[p.name for p in CASES])
def test_cached_sampler_reproduces_authors_steps(path):
    d = torch.load(path, weights_only=True)
    cfg = config_from_authors(d["config"], d["vocab_size"], d["mask_index"])
    model = load_authors_state_dict(d["state_dict"], cfg).eval()
    gen = d["cached_generation"]
    order = gen["sort_idx"].long()
    counts = [int(c) for c in gen["unmask_per_step"]]
    b, length = order.shape
    plan = Plan(order, counts, n_given=0, n_diffusion=length)
    got = []

    def record(k, lo, hi, logits, tokens):
        got.append(logits.clone())

    x = torch.full((b, length), d["mask_index"], dtype=torch.long)
    out = sample_esolm_b(model, x, plan, greedy=True, step_callback=record)
    assert out.nfe == len(counts) == len(gen["step_logits"])
    for k, (mine, ref) in enumerate(zip(got, gen["step_logits"])):
        mine = mine.clone()
        mine[..., d["mask_index"]] = -1e6
        assert mine.shape == ref.shape and mine.dtype == ref.dtype == torch.float32, f"step {k}"
        assert_matches_fixture(mine, ref, d["mask_index"], f"step {k}")  # float32 fixture: scaled tolerance
    assert torch.equal(out.tokens.gather(1, order), gen["tokens_sorted"].long())
