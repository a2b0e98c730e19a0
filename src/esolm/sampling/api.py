"""``generate``: one entry point for every model esolm trains.

The ``method`` dict (saved with each model) selects the sampler:

==========  ===========================================================================================
``esolm``   variant B: KV-cached parallel diffusion + sequential decoding; variant A: the ablation.
            ``sampler``: ``auto``/``ancestral`` (binomial schedule, ``steps`` = T, default L),
            ``first_hitting`` (one token per step), ``strided``/``subcontext`` (``steps`` strides).
``mdlm``    ``auto``/``ancestral`` (``steps``, default L), ``first_hitting``, ``left_to_right``.
``bd3lm``   block by block over a KV cache; ``auto``/``ancestral`` (``steps`` per block, default the
            block size) or ``first_hitting`` (one token per in-block step).
``ar``      KV-cached next-token decoding.
==========  ===========================================================================================

Conditioning: ``prompt_ids`` (clean tokens at the start; every method) and ``infill`` (clean tokens at any
positions; the diffusion methods). ``max_length`` generates sequences shorter than the model's length;
with ``eos_id`` everything after the first generated EOS is replaced by EOS and ``lengths`` says where
each sample ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from esolm.errors import UserError
from esolm.methods import Method, as_method, check_alpha0, check_top_p
from esolm.sampling.ar import sample_ar
from esolm.sampling.bd3 import sample_bd3
from esolm.sampling.common import StepCallback
from esolm.sampling.esolm import sample_esolm_a, sample_esolm_b
from esolm.sampling.mdlm import sample_mdlm
from esolm.sampling.schedule import plan_binomial, plan_one_per_step, plan_strided

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


def _as_rows(ids, name: str) -> Tensor:
    t = torch.as_tensor(ids, dtype=torch.long).cpu()
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise UserError(f"{name} must be a list of ids or a [batch, n] tensor, got shape {tuple(t.shape)}")
    return t


def _initial_tokens(length: int, fill: int, vocab: int, prompt_ids, infill, num_samples: int | None
                    ) -> tuple[Tensor, int]:
    """[N, L] tokens with the given ones in place and ``fill`` elsewhere; returns it and the prompt length."""
    rows = [1]
    prompt = None
    if prompt_ids is not None:
        prompt = _as_rows(prompt_ids, "prompt_ids")
        if prompt.shape[1] > length:
            raise UserError(
                f"prompt of {prompt.shape[1]} tokens is longer than the sequence length {length}")
        rows.append(prompt.shape[0])
    fill_in = None
    if infill is not None:
        if isinstance(infill, Mapping):
            fill_in = torch.full((1, length), -1, dtype=torch.long)
            for pos, tok in infill.items():
                if not 0 <= int(pos) < length:
                    raise UserError(f"infill position {pos} is outside [0, {length})")
                fill_in[0, int(pos)] = int(tok)
        else:
            fill_in = _as_rows(infill, "infill")
            if fill_in.shape[1] != length:
                raise UserError(f"infill must give {length} entries (-1 = free), got {fill_in.shape[1]}")
        rows.append(fill_in.shape[0])
    n = num_samples if num_samples is not None else max(rows)
    if n < 1:
        raise UserError(f"num_samples must be positive, got {n}")
    for r in rows:
        if r not in (1, n):
            raise UserError(f"conditioning has {r} rows but {n} samples are requested")
    x = torch.full((n, length), fill, dtype=torch.long)
    p = 0
    if prompt is not None:
        p = prompt.shape[1]
        x[:, :p] = prompt.expand(n, p)
    if fill_in is not None:
        given = (fill_in >= 0).expand(n, length)
        x = torch.where(given, fill_in.expand(n, length), x)
    given_ids = x[x != fill] if fill >= 0 else x
    if given_ids.numel() and (given_ids.min() < 0 or given_ids.max() >= vocab):
        raise UserError(f"given token ids must lie in [0, {vocab})")
    return x, p


def generate(model, method: Method | dict, num_samples: int | None = None, prompt_ids=None, infill=None,
             steps: int | None = None, alpha0: float | None = None, top_p: float | None = None, seed: int = 0,
             batch_size: int | None = None, max_length: int | None = None, eos_id: int | None = None,
             sampler: str = "auto", trace: bool = False, greedy: bool = False, bos_id: int | None = None,
             step_callback: StepCallback | None = None) -> GenerationOutput:
    """Sample from ``model`` with the sampler that its ``method`` dict calls for (see module docstring).

    ``alpha0`` (Eso-LM) defaults to the method's training value and may differ from it. ``top_p`` enables
    nucleus filtering; ``greedy`` takes the argmax. ``seed`` fixes every random choice (schedule, order
    and token draws). AR models need a first token: ``prompt_ids`` or ``bos_id`` (default ``eos_id``).
    """
    method = as_method(method)
    name = method.name
    if sampler not in SAMPLERS[name]:
        choices = ", ".join(SAMPLERS[name])
        raise UserError(f"sampler {sampler!r} does not apply to {name} (choose from {choices})")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    top_p = check_top_p(top_p)
    cfg = model.config
    length = int(max_length) if max_length is not None else cfg.length
    if not 1 <= length <= cfg.length:
        raise UserError(f"max_length must lie in [1, {cfg.length}] (the model's length), got {max_length!r}")
    if name == "esolm":
        a0 = method.alpha0 if alpha0 is None else check_alpha0(alpha0)
    elif alpha0 is not None:
        check_alpha0(alpha0)
        raise UserError(f"alpha0 applies to Eso-LM only, not to {name}")
    if name != "ar" and cfg.mask_id is None:
        raise UserError(f"a {name} model needs a mask token (config.mask_id)")
    if name == "ar":
        if infill is not None:
            raise UserError("infilling needs a diffusion model; an AR model only takes a prompt")
        if prompt_ids is None or _as_rows(prompt_ids, "prompt_ids").shape[1] == 0:
            start = bos_id if bos_id is not None else eos_id
            if start is None:
                raise UserError("AR sampling needs prompt_ids or a bos_id (or eos_id) to start from")
            prompt_ids = [int(start)]
    fill = cfg.mask_id if cfg.mask_id is not None else 0
    x, prompt_len = _initial_tokens(length, fill, cfg.vocab_size, prompt_ids, infill, num_samples)
    n = x.shape[0]
    bs = batch_size or n
    if bs < 1:
        raise UserError(f"batch_size must be positive, got {bs}")

    device = model.device
    plan_gen = torch.Generator().manual_seed(seed)
    draw_gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(top_p=top_p, generator=draw_gen, greedy=greedy, trace=trace, step_callback=step_callback)
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
                    if a0 != 1.0:
                        raise UserError("the strided (subcontext) schedule decodes everything by diffusion: "
                                         "use alpha0=1")
                    plan = plan_strided(free, steps or length, generator=plan_gen)
                fn = sample_esolm_a if method.variant == "A" else sample_esolm_b
                outs.append(fn(model, xb, plan, **kw))
            elif name == "mdlm":
                s = "ancestral" if sampler == "auto" else sampler
                outs.append(sample_mdlm(model, xb, steps=steps, sampler=s, plan_generator=plan_gen, **kw))
            elif name == "bd3lm":
                s = "ancestral" if sampler == "auto" else sampler
                outs.append(sample_bd3(model, xb, method.block_size, steps=steps, sampler=s,
                                       plan_generator=plan_gen, **kw))
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
