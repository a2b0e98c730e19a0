"""``generate``: one entry point for every model esolm trains.

The ``method`` dict (saved with each model) selects the sampler:

==========  ===========================================================================================
``esolm``   variant B: KV-cached parallel diffusion + sequential decoding; variant A: the ablation.
            ``sampler``: ``auto``/``ancestral`` (binomial schedule, ``steps`` = T, default L),
            ``first_hitting`` (one token per step), ``strided``/``subcontext`` (``steps`` strides;
            ``shuffle`` randomises the stride order and the order within strides; ``alpha0 < 1``
            leaves a left-to-right tail, see :func:`~esolm.sampling.schedule.plan_strided`).
``mdlm``    ``auto``/``ancestral`` (``steps``, default L), ``first_hitting``, ``left_to_right``.
``bd3lm``   block by block over a KV cache; ``auto``/``ancestral`` (``steps`` per block, default the
            block size) or ``first_hitting`` (one token per in-block step). A model trained with
            ``ignore_bos`` gets position 0 given: the prompt's first token, else ``bos_id``.
``ar``      KV-cached next-token decoding.
==========  ===========================================================================================

Conditioning: ``prompt_ids`` (clean tokens at the start; every method) and ``infill`` (clean tokens at any
positions; the diffusion methods). ``max_length`` generates sequences shorter than the model's length;
with ``eos_id`` everything after the first generated EOS is replaced by EOS and ``lengths`` says where
each sample ends.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from esolm.errors import UserError
from esolm.methods import Method, as_method, check_alpha0, check_temperature, check_top_p
from esolm.sampling.ar import sample_ar
from esolm.sampling.bd3 import sample_bd3
from esolm.sampling.common import StepCallback
from esolm.sampling.esolm import sample_esolm_a, sample_esolm_b
from esolm.sampling.mdlm import sample_mdlm
from esolm.sampling.schedule import plan_binomial, plan_one_per_step, plan_strided
from esolm.sampling.speculative import draft_length, sample_speculative

Tensor = torch.Tensor

SAMPLERS = {
    "esolm": ("auto", "ancestral", "first_hitting", "strided", "subcontext"),
    "mdlm": ("auto", "ancestral", "first_hitting", "left_to_right"),
    "bd3lm": ("auto", "ancestral", "first_hitting"),
    "ar": ("auto",),
}


@dataclass
class GenerationOutput:
    """Samples and what they cost.

    * ``tokens`` [N, L] long on the CPU, original order (after the first EOS: EOS, when ``eos_id``);
    * ``nfe``: network calls summed over all batches (``nfe / num_batches`` per batch);
    * ``seconds``: sampling wall time summed over batches (device-synchronised);
    * ``trace``: with ``trace=True``, one list per batch of per-call tensors of the original positions
      decoded by that call ([B, n] rows per sample; ``[n, 2]`` (row, position) pairs for MDLM-ancestral
      steps, whose positions differ per sample);
    * ``lengths`` [N]: tokens up to and including the first generated EOS (L when none).
    """

    tokens: Tensor
    nfe: int
    seconds: float
    trace: list | None = None
    lengths: Tensor | None = None
    num_batches: int = 1
    nfe_per_batch: list[int] = field(default_factory=list)

    def sequences(self) -> list[list[int]]:
        """Token lists truncated after the first generated EOS."""
        lengths = self.lengths if self.lengths is not None else [self.tokens.shape[1]] * len(self.tokens)
        return [row[: int(n)].tolist() for row, n in zip(self.tokens, lengths)]


def check_integer(value, what: str, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (bools, floats and strings refused: UserError)."""
    try:
        v = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        v = None
    if v is None or v < lo or (hi is not None and v > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise UserError(f"{what} must be an integer {span}, got {value!r}")
    return v


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


class _Request(NamedTuple):
    method: Method
    steps: int | None
    alpha0: float | None  # Eso-LM's sampling alpha0, else None
    top_p: float | None
    length: int
    tokens: Tensor  # [N, length] initial tokens (given ones in place, the mask elsewhere)
    prompt_len: int
    batch_size: int


def _prepare(model, method: Method | dict, *, num_samples: int | None = None, prompt_ids=None, infill=None,
             steps: int | None = None, alpha0: float | None = None, top_p: float | None = None, seed: int = 0,
             batch_size: int | None = None, max_length: int | None = None, eos_id: int | None = None,
             sampler: str = "auto", bos_id: int | None = None, shuffle: bool = False, speculative=None,
             draft: str = "fixed", temperature: float = 1.0) -> _Request:
    """``generate``'s argument checks (UserError/ConfigError) and its initial tokens."""
    method = as_method(method)
    name = method.name
    if not isinstance(sampler, str) or sampler not in SAMPLERS[name]:
        choices = ", ".join(SAMPLERS[name])
        raise UserError(f"sampler {sampler!r} does not apply to {name} (choose from {choices})")
    if shuffle and sampler not in ("strided", "subcontext"):
        raise UserError(f"shuffle applies to the strided (subcontext) sampler only, not to {sampler!r}")
    if draft_length(speculative, draft) is not None and not (name == "esolm" and method.variant == "B"):
        raise UserError(f"speculative decoding needs an Eso-LM (B) model, not {method.label}")
    steps = None if steps is None else check_integer(steps, "steps", 1)
    batch_size = None if batch_size is None else check_integer(batch_size, "batch_size", 1)
    check_integer(seed, "seed", -(2**63), 2**64 - 1)
    top_p = check_top_p(top_p)
    check_temperature(temperature)
    cfg = model.config
    length = cfg.length if max_length is None else check_integer(
        max_length, f"max_length (the model's length is {cfg.length})", 1, cfg.length)
    a0 = None
    if name == "esolm":
        a0 = method.alpha0 if alpha0 is None else check_alpha0(alpha0)
    elif alpha0 is not None:
        check_alpha0(alpha0)
        raise UserError(f"alpha0 applies to Eso-LM only, not to {name}")
    if name != "ar" and cfg.mask_id is None:
        raise UserError(f"a {name} model needs a mask token (config.mask_id)")
    for what, i in (("eos_id", eos_id), ("bos_id", bos_id)):
        if i is not None and check_integer(i, what, 0, cfg.vocab_size - 1) == cfg.mask_id:
            raise UserError(f"{what} {i} is the mask id")
    if name == "ar" and infill is not None:
        raise UserError("infilling needs a diffusion model; an AR model only takes a prompt")
    needs_start = name == "ar" or (name == "bd3lm" and method.ignore_bos)
    if needs_start and (prompt_ids is None or _as_rows(prompt_ids, "prompt_ids").shape[1] == 0):
        start = bos_id if bos_id is not None else eos_id
        if start is None:
            what = "AR sampling" if name == "ar" else "a BD3-LM model trained with ignore_bos"
            raise UserError(f"{what} needs prompt_ids or a bos_id (or eos_id) to start from")
        prompt_ids = [int(start)]
    x, prompt_len = _initial_tokens(length, cfg.vocab_size, cfg.mask_id, prompt_ids, infill, num_samples)
    return _Request(method, steps, a0, top_p, length, x, prompt_len, batch_size or x.shape[0])


def check_request(model, method: Method | dict, **kwargs) -> None:
    """Raise the UserError/ConfigError that ``generate(model, method, **kwargs)`` raises for bad arguments,
    without sampling (``kwargs``: generate's arguments other than ``trace``, ``greedy``, ``step_callback``)."""
    _prepare(model, method, **kwargs)


def generate(model, method: Method | dict, num_samples: int | None = None, prompt_ids=None, infill=None,
             steps: int | None = None, alpha0: float | None = None, top_p: float | None = None, seed: int = 0,
             batch_size: int | None = None, max_length: int | None = None, eos_id: int | None = None,
             sampler: str = "auto", trace: bool = False, greedy: bool = False, bos_id: int | None = None,
             step_callback: StepCallback | None = None, shuffle: bool = False,
             speculative: bool | int | None = None, draft: str = "fixed", temperature: float = 1.0) -> GenerationOutput:
    """Sample from ``model`` with the sampler that its ``method`` dict calls for (see module docstring).

    ``alpha0`` (Eso-LM) defaults to the method's training value and may differ from it. ``temperature``
    divides the logits and ``top_p`` then enables nucleus filtering (:func:`~esolm.sampling.draw.sampling_logits`);
    ``greedy`` takes the argmax. ``seed`` fixes every random choice (schedule, order
    and token draws). AR models (and BD3-LM models trained with ``ignore_bos``) need a first token:
    ``prompt_ids`` or ``bos_id`` (default ``eos_id``). ``shuffle`` applies to the strided sampler only.
    ``speculative`` (Eso-LM (B); ``True`` or a draft length ``k >= 2``, ``draft="fixed"|"adaptive"``) decodes
    the one-token steps (the sequential phase) by lossless self-speculative decoding: the same law, fewer
    calls (:mod:`esolm.sampling.speculative`).
    """
    req = _prepare(model, method, num_samples=num_samples, prompt_ids=prompt_ids, infill=infill, steps=steps,
                   alpha0=alpha0, top_p=top_p, seed=seed, batch_size=batch_size, max_length=max_length,
                   eos_id=eos_id, sampler=sampler, bos_id=bos_id, shuffle=shuffle, speculative=speculative,
                   draft=draft, temperature=temperature)
    spec = draft_length(speculative, draft)
    if spec is not None and step_callback is not None:
        raise UserError("step_callback does not apply to speculative decoding")
    method, steps, a0, top_p, length, x, prompt_len, bs = req
    name = method.name
    cfg = model.config
    n = x.shape[0]

    device = model.device
    plan_gen = torch.Generator().manual_seed(seed)
    draw_gen = torch.Generator(device=device).manual_seed(seed)
    temperature = check_temperature(temperature)
    kw = dict(top_p=top_p, generator=draw_gen, greedy=greedy, temperature=temperature, trace=trace,
              step_callback=step_callback)
    was_training = model.training
    model.eval()
    outs = []
    try:
        for i in range(0, n, bs):
            xb = x[i:i + bs]
            if name == "esolm":
                free = xb == cfg.mask_id
                if sampler in ("auto", "ancestral"):
                    plan = plan_binomial(free, steps or length, a0, plan_gen)
                elif sampler == "first_hitting":
                    plan = plan_one_per_step(free, a0, plan_gen)
                else:
                    plan = plan_strided(free, steps or length, a0, shuffle, plan_gen)
                fn = sample_esolm_a if method.variant == "A" else sample_esolm_b
                if spec is not None:
                    outs.append(sample_speculative(model, xb, plan, k=spec, adaptive=draft == "adaptive",
                                                   eos_id=eos_id, top_p=top_p, generator=draw_gen, greedy=greedy,
                                                   temperature=temperature, trace=trace))
                else:
                    outs.append(fn(model, xb, plan, **kw))
            elif name == "mdlm":
                s = "ancestral" if sampler == "auto" else sampler
                outs.append(sample_mdlm(model, xb, steps=steps, sampler=s, plan_generator=plan_gen, **kw))
            elif name == "bd3lm":
                s = "ancestral" if sampler == "auto" else sampler
                outs.append(sample_bd3(model, xb, method.block_size, steps=steps, sampler=s,
                                       plan_generator=plan_gen, ignore_bos=method.ignore_bos, **kw))
            else:
                outs.append(sample_ar(model, xb, prompt_len, **kw))
    finally:
        model.train(was_training)

    tokens = torch.cat([o.tokens.cpu() for o in outs])
    lengths = None
    if eos_id is not None:
        is_eos = tokens == eos_id
        is_eos[:, :prompt_len] = False
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((n,), length - 1))
        lengths = first + 1
        after = torch.arange(length)[None] >= lengths[:, None]
        tokens = tokens.masked_fill(after, eos_id)
    return GenerationOutput(
        tokens=tokens,
        nfe=sum(o.nfe for o in outs),
        seconds=sum(o.seconds for o in outs),
        trace=[o.trace for o in outs] if trace else None,
        lengths=lengths,
        num_batches=len(outs),
        nfe_per_batch=[o.nfe for o in outs],
    )
