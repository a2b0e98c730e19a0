"""Eso-LM samplers: parallel diffusion decoding with an exact KV cache (variant B) and the (A) ablation.

Everything happens in *sorted order* (``plan.order``: given tokens, then diffusion positions in a random
order, then sequential positions left to right). Each token is fed with its original rotary position.

**Eso-LM (B), fully cached.** Training uses causal attention over the sorted sequence, so the keys and
values of a clean token depend only on the clean tokens before it in the order: once computed they never
change. Step ``k`` decoding sorted range ``[lo, hi)`` therefore feeds only

    [ tokens decoded at step k-1 (now clean) ; the hi - lo masks of step k ]

at their original positions, attending to the whole cache and causally among themselves
(``masks.cached_step``). The K/V of the step-(k-1) tokens are kept (``commit``); those of the masks are
dropped. Given tokens (prompt / infill) are the "previous step" of step 1, so their K/V are computed
once, inside the first call. The diffusion and sequential phases are the same loop: the sequential phase
is just steps of one token in left-to-right order. One network call per step; the logits equal those
of an uncached causal pass over the sorted sequence (``tests/test_sampling_cache.py``).

**Eso-LM (A).** Clean tokens attend bidirectionally among themselves (``masks.prefix_lm``), so their K/V
change whenever a token becomes clean: the diffusion phase runs a full pass per step over
``[clean tokens ; masks of this step]`` (later masks are invisible to earlier ones, so they are not fed).
The sequential phase (``masks.sequential_prefix``) is cached: the clean prefix attends bidirectionally
within itself and never to later tokens, so its K/V are fixed once the diffusion phase ends. They are
computed in the first sequential call, which feeds ``[clean prefix ; first mask]`` with the mask
``prefix_lm(c, c + 1)`` and commits the prefix; every later step is a (B)-style cached step.
"""

from __future__ import annotations

import torch

from esolm.errors import UserError
from esolm.model import masks
from esolm.model.shift import check_start, is_shifted, predecessors, step_inputs
from esolm.sampling.common import SampleResult, Step, StepCallback, Stopwatch
from esolm.sampling.draw import draw
from esolm.sampling.schedule import Plan

Tensor = torch.Tensor


def _prepare(model, x: Tensor, plan: Plan) -> tuple[Tensor, Tensor]:
    device = model.device
    order = plan.order.to(device)
    if x.shape != order.shape:
        raise UserError(f"tokens {tuple(x.shape)} and order {tuple(order.shape)} differ in shape")
    return x.to(device).gather(1, order), order


def _finish(tokens_sorted: Tensor, order: Tensor, nfe: int, sw: Stopwatch, trace) -> SampleResult:
    tokens = torch.empty_like(tokens_sorted).scatter_(1, order, tokens_sorted)
    tr = [t.cpu() for t in trace] if trace is not None else None  # Step records
    return SampleResult(tokens, nfe, sw.seconds, tr)


def _causal_steps(model, tokens: Tensor, order: Tensor, use_cache: bool):
    """``logits(lo, hi)`` of each step under the DiT's convention (module docstring): cached, ``[tokens decoded at
    the previous step ; this step's masks]``; uncached, a causal pass over every sorted token up to ``hi``."""
    length = tokens.shape[1]
    cache = model.new_cache(length)
    # masks.cached_step(start, n) == causal[start:start + n, :start + n]: slice one mask, allocate none
    causal = masks.causal(length, tokens.device)
    cond = model.frozen_conditioning(tokens.shape[0])  # sigma = 0 at every step
    start = 0  # first sorted index not yet in the cache

    def logits(lo: int, hi: int) -> Tensor:
        nonlocal start
        if use_cache:
            mask = None if hi - start == 1 else causal[:, :, start:hi, :hi]
            out = model(tokens[:, start:hi], order[:, start:hi], mask=mask, cache=cache, commit=lo - start,
                        cond=cond, logits_slice=slice(lo - start, None))
        else:
            out = model(tokens[:, :hi], order[:, :hi], mask=causal[:, :, :hi, :hi], cond=cond)[:, lo:]
        start = lo
        return out

    return logits


def _shifted_steps(model, tokens: Tensor, order: Tensor, use_cache: bool):
    """``logits(lo, hi)`` of each step under the shifted query convention (:mod:`esolm.model.shift`): a call feeds
    the clean tokens not yet cached (committed) and one query row per target; a one-token step whose predecessor
    is the token just decoded feeds that token alone and reads its logits (a cached AR step)."""
    mask_id = model.config.mask_id
    prev = predecessors(order)
    cache = model.new_cache(tokens.shape[1])
    start = 0  # first sorted index not yet in the cache

    def logits(lo: int, hi: int) -> Tensor:
        nonlocal start
        if use_cache and hi - lo == 1 and start == lo - 1 and bool((prev[:, lo] == lo - 1).all()):
            out = model(tokens[:, start:lo], order[:, start:lo], cache=cache, commit=1)
        else:
            first = start if use_cache else 0
            ids, pos, mask = step_inputs(tokens, order, prev, first, lo, hi, mask_id)
            out = model(ids, pos, mask=mask, cache=cache if use_cache else None, commit=lo - first,
                        logits_slice=slice(lo - first, None))
        start = lo
        return out

    return logits


@torch.inference_mode()
def sample_esolm_b(model, x: Tensor, plan: Plan, *, top_p: float | None = None,
                   generator: torch.Generator | None = None, greedy: bool = False, temperature: float = 1.0,
                   trace: bool = False,
                   step_callback: StepCallback | None = None, use_cache: bool = True) -> SampleResult:
    """Eso-LM (B) with the KV cache.

    ``x`` [B, L]: given tokens at their positions, the mask id everywhere else (in original order).
    Returns the completed tokens in original order; ``nfe == plan.nfe``. ``use_cache=False`` runs the
    same plan without the cache (each step one pass over every sorted token up to the step's last
    mask): the same logits, for comparisons. A network under the shifted query convention (``config.shifted``)
    is queried by it (position 0 must then be given).
    """
    mask_id = model.config.mask_id
    tokens, order = _prepare(model, x, plan)
    if is_shifted(model):
        if plan.n_given < 1:
            raise UserError("this model reads the token before each position: position 0 must be given "
                            "(a start token)")
        check_start(order, "the plan's order")
    steps = [] if trace else None
    with Stopwatch(model.device) as sw:  # the cache and the folded conditioning are part of the timed work
        step_logits = (_shifted_steps if is_shifted(model) else _causal_steps)(model, tokens, order, use_cache)
        for k, (lo, hi) in enumerate(plan.bounds()):
            logits = step_logits(lo, hi)
            if step_callback is not None:
                step_callback(k, lo, hi, logits, tokens)
            tokens[:, lo:hi] = draw(logits, mask_id, top_p, generator, greedy, temperature)
            if steps is not None:
                steps.append(Step(k, plan.phase(lo), order[:, lo:hi]))
    return _finish(tokens, order, plan.nfe, sw, steps)


@torch.inference_mode()
def sample_esolm_a(model, x: Tensor, plan: Plan, *, top_p: float | None = None,
                   generator: torch.Generator | None = None, greedy: bool = False, temperature: float = 1.0,
                   trace: bool = False,
                   step_callback: StepCallback | None = None) -> SampleResult:
    """Eso-LM (A): uncached prefix-LM diffusion phase, then the cached sequential phase."""
    mask_id = model.config.mask_id
    tokens, order = _prepare(model, x, plan)
    b, length = tokens.shape
    device = tokens.device
    prefix = plan.n_given + plan.n_diffusion  # clean prefix once the diffusion phase is over
    if prefix < length and prefix not in {lo for lo, _ in plan.bounds()}:
        raise UserError("the diffusion phase of the plan must end on a step boundary")
    cache = model.new_cache(length)
    steps = [] if trace else None
    start = 0
    with Stopwatch(model.device) as sw:
        cond = model.frozen_conditioning(b)
        for k, (lo, hi) in enumerate(plan.bounds()):
            if lo < prefix:  # diffusion phase: full pass over [clean ; this step's masks]
                mask = masks.prefix_lm(torch.full((b,), lo, device=device), hi, device)
                logits = model(tokens[:, :hi], order[:, :hi], mask=mask, cond=cond)[:, lo:]
            elif lo == prefix:  # first sequential call: cache the bidirectional clean prefix
                mask = masks.prefix_lm(torch.full((b,), lo, device=device), hi, device)
                logits = model(tokens[:, :hi], order[:, :hi], mask=mask, cache=cache, commit=lo,
                               cond=cond)[:, lo:]
                start = lo
            else:  # cached sequential step: [previous token ; this mask]
                n_new = hi - start
                mask = None if n_new == 1 else masks.cached_step(start, n_new, device)
                logits = model(tokens[:, start:hi], order[:, start:hi], mask=mask, cache=cache,
                               commit=lo - start, cond=cond, logits_slice=slice(lo - start, None))
                start = lo
            if step_callback is not None:
                step_callback(k, lo, hi, logits, tokens)
            tokens[:, lo:hi] = draw(logits, mask_id, top_p, generator, greedy, temperature)
            if steps is not None:
                steps.append(Step(k, plan.phase(lo), order[:, lo:hi]))
    return _finish(tokens, order, plan.nfe, sw, steps)
