"""The decoder of each method, in one registry: how a method decodes, and nothing else decides it.

A :class:`Decoder` owns, for its method:

* ``plan(free, params, generator)`` — the :class:`~esolm.sampling.schedule.Plan` of a batch (order and
  per-call counts), for the methods whose schedule is fixed before decoding (Eso-LM, and AR as the
  left-to-right plan); ``None`` for MDLM / BD3-LM, whose ancestral steps decide while decoding;
* ``run(model, x, params, ...)`` — one uniform batch decoded by its sampler, emitting one typed
  :class:`~esolm.sampling.common.Step` per network call;
* ``shift`` — for the serving engine's ragged batch (``Decoder.batchable``): how far the tokens a step feeds
  lag behind the positions it decodes (AR feeds the token before each position, Eso-LM the masks
  themselves).

:func:`decoder_for` is the registry. ``generate`` and the serving engine both decode through it, so a plan is
built in one place for both.
"""

from __future__ import annotations

import torch

from esolm.methods import AR, BD3LM, MDLM, EsoLM, Method, as_method
from esolm.sampling.ar import sample_ar
from esolm.sampling.bd3 import sample_bd3
from esolm.sampling.common import SampleResult, StepCallback
from esolm.sampling.esolm import sample_esolm_a, sample_esolm_b
from esolm.sampling.mdlm import sample_mdlm
from esolm.sampling.params import SamplingParams
from esolm.sampling.schedule import Plan, plan_binomial, plan_left_to_right, plan_one_per_step, plan_strided
from esolm.sampling.speculative import sample_speculative

Tensor = torch.Tensor


class Decoder:
    """Base class (module docstring). ``params`` are always resolved against the method
    (:meth:`SamplingParams.resolve`) before they reach a decoder."""

    shift = 0

    def __init__(self, method: Method):
        self.method = method

    def plan(self, free: Tensor, prompt_len: int, params: SamplingParams,
             generator: torch.Generator | None) -> Plan | None:
        return None

    def run(self, model, x: Tensor, params: SamplingParams, *, prompt_len: int, plan: Plan | None,
            plan_generator: torch.Generator, generator: torch.Generator, eos_id: int | None = None,
            trace: bool = False, step_callback: StepCallback | None = None) -> SampleResult:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _draw_kw(params: SamplingParams, generator, trace: bool, step_callback) -> dict:
        return dict(top_p=params.top_p, generator=generator, greedy=params.greedy,
                    temperature=params.draw_temperature, trace=trace, step_callback=step_callback)


class ARDecoder(Decoder):
    """KV-cached next-token decoding (the left-to-right plan; a step feeds the token before its position)."""

    shift = 1

    def plan(self, free, prompt_len, params, generator) -> Plan:
        return plan_left_to_right(free.shape[1], prompt_len, free.shape[0])

    def run(self, model, x, params, *, prompt_len, plan, plan_generator, generator, eos_id=None, trace=False,
            step_callback=None) -> SampleResult:
        return sample_ar(model, x, prompt_len, **self._draw_kw(params, generator, trace, step_callback))


class EsoLMDecoder(Decoder):
    """Eso-LM's schedules: ``auto``/``ancestral`` (binomial, ``steps`` = T, default the length),
    ``first_hitting`` (one token per call) and ``strided``/``subcontext`` (``steps`` strides)."""

    def plan(self, free, prompt_len, params, generator) -> Plan:
        length = free.shape[1]
        if params.sampler in ("auto", "ancestral"):
            return plan_binomial(free, params.steps or length, params.alpha0, generator)
        if params.sampler == "first_hitting":
            return plan_one_per_step(free, params.alpha0, generator)
        return plan_strided(free, params.steps or length, params.alpha0, params.shuffle, generator)


class EsoLMBDecoder(EsoLMDecoder):
    """Eso-LM (B): every step one cached call; ``speculative`` decodes the sequential phase self-speculatively."""

    def run(self, model, x, params, *, prompt_len, plan, plan_generator, generator, eos_id=None, trace=False,
            step_callback=None) -> SampleResult:
        if params.speculative is not None:
            return sample_speculative(model, x, plan, k=params.speculative, adaptive=params.draft == "adaptive",
                                      eos_id=eos_id, top_p=params.top_p, generator=generator, greedy=params.greedy,
                                      temperature=params.draw_temperature, trace=trace)
        return sample_esolm_b(model, x, plan, **self._draw_kw(params, generator, trace, step_callback))


class EsoLMADecoder(EsoLMDecoder):
    """Eso-LM (A): full passes in the diffusion phase, then the cached sequential phase."""

    def run(self, model, x, params, *, prompt_len, plan, plan_generator, generator, eos_id=None, trace=False,
            step_callback=None) -> SampleResult:
        return sample_esolm_a(model, x, plan, **self._draw_kw(params, generator, trace, step_callback))


class MDLMDecoder(Decoder):
    """MDLM: ancestral (``steps``, default L), first-hitting or left-to-right, full bidirectional passes."""

    def run(self, model, x, params, *, prompt_len, plan, plan_generator, generator, eos_id=None, trace=False,
            step_callback=None) -> SampleResult:
        sampler = "ancestral" if params.sampler == "auto" else params.sampler
        return sample_mdlm(model, x, steps=params.steps, sampler=sampler, plan_generator=plan_generator,
                           **self._draw_kw(params, generator, trace, step_callback))


class BD3LMDecoder(Decoder):
    """BD3-LM: block by block over a KV cache; ancestral (``steps`` per block) or first-hitting in a block."""

    def run(self, model, x, params, *, prompt_len, plan, plan_generator, generator, eos_id=None, trace=False,
            step_callback=None) -> SampleResult:
        sampler = "ancestral" if params.sampler == "auto" else params.sampler
        return sample_bd3(model, x, self.method.block_size, steps=params.steps, sampler=sampler,
                          plan_generator=plan_generator, ignore_bos=self.method.ignore_bos,
                          **self._draw_kw(params, generator, trace, step_callback))


_DECODERS: dict[tuple[type[Method], bool], type[Decoder]] = {
    (AR, False): ARDecoder,
    (MDLM, False): MDLMDecoder,
    (EsoLM, True): EsoLMBDecoder,
    (EsoLM, False): EsoLMADecoder,
    (BD3LM, False): BD3LMDecoder,
}


def decoder_for(method: Method | dict) -> Decoder:
    """The decoder of ``method`` (the registry: keyed by the spec's class and its any-order capability)."""
    m = as_method(method)
    return _DECODERS[type(m), m.any_order](m)


__all__ = ["Decoder", "ARDecoder", "EsoLMBDecoder", "EsoLMADecoder", "MDLMDecoder", "BD3LMDecoder", "decoder_for"]
