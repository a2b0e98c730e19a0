"""Sampling: the KV-cached Eso-LM sampler (the paper's headline) and the baselines' samplers.

* :mod:`.schedule` — plans: per-step unmask counts and per-sample orders (:mod:`esolm.orders`);
* :mod:`.draw` — mask-logit, top-p, Gumbel-max;
* :mod:`.esolm` — Eso-LM (B) with an exact KV cache, Eso-LM (A);
* :mod:`.speculative` — lossless self-speculative decoding of the sequential phase (Eso-LM (B));
* :mod:`.mdlm`, :mod:`.bd3`, :mod:`.ar` — baselines on the same backbone;
* :mod:`.params` — :class:`SamplingParams`, every decoding knob validated once;
* :mod:`.decoders` — the decoder of each method (plan + run), one registry;
* :mod:`.api` — :func:`generate`.
"""

from esolm.orders import random_order
from esolm.sampling.api import GenerationOutput, generate
from esolm.sampling.ar import sample_ar
from esolm.sampling.bd3 import sample_bd3
from esolm.sampling.common import SampleResult, Step
from esolm.sampling.decoders import decoder_for
from esolm.sampling.draw import draw, top_p_filter
from esolm.sampling.esolm import sample_esolm_a, sample_esolm_b
from esolm.sampling.mdlm import sample_mdlm
from esolm.sampling.params import SamplingParams
from esolm.sampling.schedule import (
    Plan,
    binomial_counts,
    plan_binomial,
    plan_from_counts,
    plan_one_per_step,
    plan_strided,
)
from esolm.sampling.speculative import sample_speculative

__all__ = [
    "GenerationOutput", "generate", "SamplingParams", "Step", "decoder_for",
    "SampleResult", "Plan", "binomial_counts", "plan_binomial",
    "plan_from_counts", "plan_one_per_step", "plan_strided", "random_order", "draw", "top_p_filter",
    "sample_esolm_a", "sample_esolm_b", "sample_mdlm", "sample_ar", "sample_bd3", "sample_speculative",
]
