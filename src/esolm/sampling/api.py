"""``generate``: one entry point for every model esolm trains.

How to decode is a :class:`~esolm.sampling.params.SamplingParams` (pass ``params=`` or its fields as keywords);
the method's decoder (:func:`esolm.sampling.decoders.decoder_for`) decodes it:

==========  ===========================================================================================
Eso-LM      variant B: KV-cached parallel diffusion + sequential decoding; variant A: the ablation.
            ``sampler``: ``auto``/``ancestral`` (binomial schedule, ``steps`` = T, default L),
            ``first_hitting`` (one token per step), ``strided``/``subcontext`` (``steps`` strides;
            ``shuffle`` randomises the stride order and the order within strides; ``alpha0 < 1``
            leaves a left-to-right tail, see :func:`~esolm.sampling.schedule.plan_strided`).
MDLM        ``auto``/``ancestral`` (``steps``, default L), ``first_hitting``, ``left_to_right``.
BD3-LM      block by block over a KV cache; ``auto``/``ancestral`` (``steps`` per block, default the
            block size) or ``first_hitting`` (one token per in-block step). A model trained with
            ``ignore_bos`` gets position 0 given: the prompt's first token, else ``bos_id``.
AR          KV-cached next-token decoding.
==========  ===========================================================================================

Conditioning: ``prompt_ids`` (clean tokens at the start; every method) and ``infill`` (clean tokens at any
positions; the diffusion methods). ``max_length`` generates sequences shorter than the model's length;
with ``eos_id`` everything after the first generated EOS is replaced by EOS and ``lengths`` says where
each sample ends (:func:`cut_at_eos`, which the serving engine applies too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from esolm.errors import UserError
from esolm.methods import Method, as_method
from esolm.model.shift import is_shifted
from esolm.sampling.common import Step, StepCallback
from esolm.sampling.decoders import Decoder, decoder_for
from esolm.sampling.params import SamplingParams, check_integer

Tensor = torch.Tensor


@dataclass
class GenerationOutput:
    """Samples and what they cost.

    * ``tokens`` [N, L] long on the CPU, original order (after the first EOS: EOS, when ``eos_id``);
    * ``nfe``: network calls summed over all batches (``nfe / num_batches`` per batch);
    * ``seconds``: sampling wall time summed over batches (device-synchronised);
    * ``trace``: with ``trace=True``, one list per batch of :class:`~esolm.sampling.common.Step` records, one
      per network call (its phase and the original positions each sample decided);
    * ``lengths`` [N]: tokens up to and including the first generated EOS (L when none).
    """

    tokens: Tensor
    nfe: int
    seconds: float
    trace: list[list[Step]] | None = None
    lengths: Tensor | None = None
    num_batches: int = 1
    nfe_per_batch: list[int] = field(default_factory=list)

    def sequences(self) -> list[list[int]]:
        """Token lists truncated after the first generated EOS."""
        lengths = self.lengths if self.lengths is not None else [self.tokens.shape[1]] * len(self.tokens)
        return [row[: int(n)].tolist() for row, n in zip(self.tokens, lengths)]


def _as_rows(ids, name: str) -> Tensor:
    try:
        t = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{name} must be a list of token ids or a [batch, n] tensor") from None
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise UserError(f"{name} must hold integer token ids, got {t.dtype}")
    t = t.to(torch.long).cpu()
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise UserError(f"{name} must be a list of ids or a [batch, n] tensor, got shape {tuple(t.shape)}")
    return t


def _check_ids(ids: Tensor, what: str, vocab: int, mask_id: int | None) -> None:
    """Given (clean) tokens: ids of the vocabulary, never the mask."""
    if ids.numel() == 0:
        return
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise UserError(f"{what} must be token ids in [0, {vocab}), got {int(bad[0])}")
    if mask_id is not None and bool((ids == mask_id).any()):
        raise UserError(f"{what} contains the mask id {mask_id}; leave a position free instead of giving a mask")


def _initial_tokens(length: int, vocab: int, mask_id: int | None, prompt_ids, infill, num_samples: int | None
                    ) -> tuple[Tensor, int]:
    """[N, L] tokens with the given ones in place and the mask (0 without one) elsewhere; returns it and the
    prompt length. UserError for ids outside the vocabulary, the mask id, or clashing positions."""
    rows = [1]
    prompt = None
    p = 0
    if prompt_ids is not None:
        prompt = _as_rows(prompt_ids, "prompt_ids")
        p = prompt.shape[1]
        if p > length:
            raise UserError(f"prompt of {p} tokens is longer than the sequence length {length}")
        _check_ids(prompt, "prompt_ids", vocab, mask_id)
        rows.append(prompt.shape[0])
    fill_in = None
    if infill is not None:
        if isinstance(infill, Mapping):
            fill_in = torch.full((1, length), -1, dtype=torch.long)
            for pos, tok in infill.items():
                i = check_integer(pos, "infill position", 0, length - 1)
                if fill_in[0, i] >= 0:
                    raise UserError(f"infill position {i} is given twice")
                fill_in[0, i] = check_integer(tok, f"infill token at position {i}", 0, vocab - 1)
        else:
            fill_in = _as_rows(infill, "infill")
            if fill_in.shape[1] != length:
                raise UserError(f"infill must give {length} entries (-1 = free), got {fill_in.shape[1]}")
            if bool((fill_in < -1).any()):
                raise UserError("infill entries must be token ids or -1 (free)")
        _check_ids(fill_in[fill_in >= 0], "infill", vocab, mask_id)
        if bool((fill_in[:, :p] >= 0).any()):
            raise UserError(f"infill gives a position inside the prompt (its first {p} positions)")
        rows.append(fill_in.shape[0])
    n = max(rows) if num_samples is None else check_integer(num_samples, "num_samples", 1)
    for r in rows:
        if r not in (1, n):
            raise UserError(f"conditioning has {r} rows but {n} samples are requested")
    x = torch.full((n, length), mask_id if mask_id is not None else 0, dtype=torch.long)
    if prompt is not None:
        x[:, :p] = prompt.expand(n, p)
    if fill_in is not None:
        given = (fill_in >= 0).expand(n, length)
        x = torch.where(given, fill_in.expand(n, length), x)
    return x, p


class Request(NamedTuple):
    """A checked ``generate`` call: what the decoder needs besides the network."""

    method: Method
    decoder: Decoder
    params: SamplingParams  # resolved against the method (alpha0 filled)
    length: int
    tokens: Tensor  # [N, length] initial tokens (given ones in place, the mask elsewhere)
    prompt_len: int
    batch_size: int


SAMPLING_KEYS = ("temperature", "top_p", "seed", "steps", "alpha0", "sampler", "shuffle", "speculative", "draft")


def sampling_params(params: SamplingParams | None = None, greedy: bool = False, **knobs) -> SamplingParams:
    """``params`` (default: the defaults) with the keyword ``knobs`` (SamplingParams' fields) applied;
    ``greedy=True`` is ``temperature=0``."""
    unknown = sorted(set(knobs) - set(SAMPLING_KEYS))
    if unknown:
        raise TypeError(f"unknown sampling arguments: {', '.join(unknown)}")
    if not isinstance(greedy, bool):
        raise UserError(f"greedy must be true or false, got {greedy!r}")
    if greedy:
        knobs["temperature"] = 0.0
    if params is None:
        return SamplingParams(**knobs)
    if not isinstance(params, SamplingParams):
        raise UserError(f"params must be a SamplingParams, got {type(params).__name__}")
    return params.replace(**knobs) if knobs else params


def prepare(model, method: Method | dict, params: SamplingParams, *, num_samples: int | None = None,
            prompt_ids=None, infill=None, batch_size: int | None = None, max_length: int | None = None,
            eos_id: int | None = None, bos_id: int | None = None) -> Request:
    """``generate``'s argument checks (UserError/ConfigError, before any work) and its initial tokens."""
    method = as_method(method)
    batch_size = None if batch_size is None else check_integer(batch_size, "batch_size", 1)
    cfg = model.config
    length = cfg.length if max_length is None else check_integer(
        max_length, f"max_length (the model's length is {cfg.length})", 1, cfg.length)
    params = params.resolve(method, length)
    if method.is_diffusion and cfg.mask_id is None:
        raise UserError(f"a {method.label} model needs a mask token (config.mask_id)")
    for what, i in (("eos_id", eos_id), ("bos_id", bos_id)):
        if i is not None and check_integer(i, what, 0, cfg.vocab_size - 1) == cfg.mask_id:
            raise UserError(f"{what} {i} is the mask id")
    if not method.is_diffusion and infill is not None:
        raise UserError("infilling needs a diffusion model; an AR model only takes a prompt")
    if needs_start_token(method, model) and (prompt_ids is None or _as_rows(prompt_ids, "prompt_ids").shape[1] == 0):
        start = bos_id if bos_id is not None else eos_id
        if start is None:
            raise UserError(f"{method.label} decoding needs prompt_ids or a bos_id (or eos_id) to start from")
        prompt_ids = [int(start)]
    x, prompt_len = _initial_tokens(length, cfg.vocab_size, cfg.mask_id, prompt_ids, infill, num_samples)
    return Request(method, decoder_for(method), params, length, x, prompt_len, batch_size or x.shape[0])


def needs_start_token(method: Method, model) -> bool:
    """Whether decoding must start from a given token: the method's own need (AR), or a network that reads the
    token before each position (the shifted query convention, :mod:`esolm.model.shift`)."""
    return as_method(method).needs_start_token or is_shifted(model)


def free_positions(x: Tensor, mask_id: int | None, prompt_len: int) -> Tensor:
    """[N, L] bool: the positions to decode (the masks; for a model without a mask token, AR, every position
    after the prompt)."""
    if mask_id is None:
        return (torch.arange(x.shape[1]) >= prompt_len).expand(x.shape).clone()
    return x == mask_id


def cut_at_eos(tokens: Tensor, prompt_len: int, eos_id: int) -> tuple[Tensor, Tensor]:
    """``tokens`` [N, L] with everything after the first EOS at or after ``prompt_len`` replaced by EOS, and
    each row's length up to and including that EOS (L when none)."""
    n, length = tokens.shape
    is_eos = tokens == eos_id
    is_eos[:, :prompt_len] = False
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((n,), length - 1))
    lengths = first + 1
    after = torch.arange(length)[None] >= lengths[:, None]
    return tokens.masked_fill(after, eos_id), lengths


def check_request(model, method: Method | dict, params: SamplingParams | None = None, *, num_samples=None,
                  prompt_ids=None, infill=None, batch_size=None, max_length=None, eos_id=None, bos_id=None,
                  greedy: bool = False, **knobs) -> SamplingParams:
    """Raise the UserError/ConfigError that ``generate`` raises for these arguments, without sampling;
    returns the resolved :class:`SamplingParams`."""
    return prepare(model, method, sampling_params(params, greedy, **knobs), num_samples=num_samples,
                   prompt_ids=prompt_ids, infill=infill, batch_size=batch_size, max_length=max_length,
                   eos_id=eos_id, bos_id=bos_id).params


def generate(model, method: Method | dict, num_samples: int | None = None, prompt_ids=None, infill=None,
             params: SamplingParams | None = None, *, batch_size: int | None = None, max_length: int | None = None,
             eos_id: int | None = None, bos_id: int | None = None, trace: bool = False, greedy: bool = False,
             step_callback: StepCallback | None = None, **knobs) -> GenerationOutput:
    """Sample from ``model`` with its method's decoder (module docstring).

    How to decode: ``params`` (a :class:`~esolm.sampling.params.SamplingParams`) and/or its fields as keywords
    (``temperature`` (0: greedy), ``top_p``, ``seed``, ``steps``, ``alpha0``, ``sampler``, ``shuffle``,
    ``speculative``, ``draft``); ``greedy=True`` is ``temperature=0``. ``alpha0`` (Eso-LM) defaults to the
    method's training value. ``seed`` fixes every random choice (schedule, order and token draws). AR models
    (and BD3-LM models trained with ``ignore_bos``) need a first token: ``prompt_ids`` or ``bos_id`` (default
    ``eos_id``). ``speculative`` (Eso-LM (B); a draft length ``k >= 2`` or ``True``) decodes the one-token
    steps by lossless self-speculative decoding: the same law, fewer calls (:mod:`esolm.sampling.speculative`).
    """
    sp = sampling_params(params, greedy, **knobs)
    req = prepare(model, method, sp, num_samples=num_samples, prompt_ids=prompt_ids, infill=infill,
                  batch_size=batch_size, max_length=max_length, eos_id=eos_id, bos_id=bos_id)
    params = req.params
    if params.speculative is not None and step_callback is not None:
        raise UserError("step_callback does not apply to speculative decoding")
    x, n, bs = req.tokens, req.tokens.shape[0], req.batch_size
    plan_gen = torch.Generator().manual_seed(params.seed)
    draw_gen = torch.Generator(device=model.device).manual_seed(params.seed)
    was_training = model.training
    model.eval()
    outs = []
    try:
        for i in range(0, n, bs):
            xb = x[i:i + bs]
            plan = req.decoder.plan(free_positions(xb, model.config.mask_id, req.prompt_len), req.prompt_len, params,
                                    plan_gen)
            outs.append(req.decoder.run(model, xb, params, prompt_len=req.prompt_len, plan=plan,
                                        plan_generator=plan_gen, generator=draw_gen, eos_id=eos_id, trace=trace,
                                        step_callback=step_callback))
    finally:
        model.train(was_training)

    tokens = torch.cat([o.tokens.cpu() for o in outs])
    lengths = None
    if eos_id is not None:
        tokens, lengths = cut_at_eos(tokens, req.prompt_len, eos_id)
    return GenerationOutput(
        tokens=tokens,
        nfe=sum(o.nfe for o in outs),
        seconds=sum(o.seconds for o in outs),
        trace=[o.trace for o in outs] if trace else None,
        lengths=lengths,
        num_batches=len(outs),
        nfe_per_batch=[o.nfe for o in outs],
    )
