"""MDLM samplers (METHOD.md §6): bidirectional full passes, no cache.

*Ancestral* sampling with ``alpha_t = 1 - t`` on ``T`` steps: from ``t`` to ``s = t - 1/T`` each masked
token is unmasked with probability ``(alpha_s - alpha_t) / (1 - alpha_t)`` to a token drawn from
``p_theta(x0 | x_t)``, and otherwise stays masked (probability ``(1 - alpha_s) / (1 - alpha_t)``); clean
tokens are carried over. The network sees no time (sigma = 0), so ``p_theta(x0 | x_t)`` depends on
``x_t`` only: when a step changes nothing the next step reuses it. Here the unmask decisions are drawn
first and the network is called only when some token is about to change, so a step that changes
nothing costs no call and the NFE counts only real calls.

*One token per call*: ``first_hitting`` decodes one uniformly chosen masked position per call (the
first-hitting sampler's choice of position; its time is irrelevant for a time-free network) and
``left_to_right`` the leftmost one. NFE = number of masked tokens.

The window helpers are shared with BD3-LM, whose blocks are MDLM samplers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from esolm.errors import UserError
from esolm.noise import LogLinearSchedule, uniform
from esolm.orders import free_order
from esolm.sampling.common import DIFFUSION, SampleResult, Step, StepCallback, Stopwatch
from esolm.sampling.draw import draw

Tensor = torch.Tensor


def ancestral_window(call: Callable[[], Tensor], tokens: Tensor, lo: int, hi: int, steps: int, mask_id: int,
                     *, top_p=None, generator=None, greedy=False, temperature: float = 1.0,
                     step_callback: StepCallback | None = None,
                     step0: int = 0, trace: list | None = None) -> int:
    """MDLM ancestral sampling of ``tokens[:, lo:hi]`` in place; ``call()`` returns logits [B, hi-lo, V]
    for the current tokens. Returns the number of network calls."""
    window = tokens[:, lo:hi]
    schedule = LogLinearSchedule(1.0, eps=0.0)
    nfe = 0
    for k in range(steps, 0, -1):
        p = schedule.reveal_prob(k / steps, (k - 1) / steps)
        u = uniform(window.shape, generator, window.device, torch.float64)
        unmask = (window == mask_id) & (u < p)
        idx = unmask.nonzero(as_tuple=True)
        if idx[0].numel() == 0:
            continue  # nothing changes: no network call, p(x0 | x_t) stays valid
        logits = call()
        if step_callback is not None:
            step_callback(step0 + nfe, lo, hi, logits, tokens)
        window[idx] = draw(logits[idx], mask_id, top_p, generator, greedy, temperature)
        if trace is not None:  # rows decide different numbers of positions: (row, position) entries
            trace.append(Step(step0 + nfe, DIFFUSION, idx[1] + lo, idx[0]))
        nfe += 1
    return nfe


def one_per_call_window(call: Callable[[], Tensor], tokens: Tensor, lo: int, hi: int, order: Tensor,
                        mask_id: int, *, top_p=None, generator=None, greedy=False, temperature: float = 1.0,
                        step_callback: StepCallback | None = None, step0: int = 0,
                        trace: list | None = None) -> int:
    """Decode ``tokens[:, lo + order[:, k]]`` one per call, ``k = 0, 1, ...`` (``order`` [B, n], window
    offsets). Returns the number of network calls."""
    window = tokens[:, lo:hi]
    b = window.shape[0]
    vocab = None
    for k in range(order.shape[1]):
        logits = call()
        if step_callback is not None:
            step_callback(step0 + k, lo, hi, logits, tokens)
        vocab = vocab or logits.shape[-1]
        pos = order[:, k:k + 1]
        row = logits.gather(1, pos[:, :, None].expand(b, 1, vocab))
        window.scatter_(1, pos, draw(row, mask_id, top_p, generator, greedy, temperature))
        if trace is not None:
            trace.append(Step(step0 + k, DIFFUSION, pos + lo))
    return order.shape[1]


@torch.inference_mode()
def sample_mdlm(model, x: Tensor, *, steps: int | None = None, sampler: str = "ancestral", top_p=None,
                generator: torch.Generator | None = None, plan_generator: torch.Generator | None = None,
                greedy: bool = False, temperature: float = 1.0, trace: bool = False,
                step_callback: StepCallback | None = None) -> SampleResult:
    """MDLM sampling of the masked positions of ``x`` [B, L] (clean tokens are carried over).

    ``sampler``: ``"ancestral"`` (``steps`` steps, default L), ``"first_hitting"`` or ``"left_to_right"``.
    """
    mask_id = model.config.mask_id
    tokens = x.to(model.device).clone()
    b, length = tokens.shape
    steps_trace = [] if trace else None
    kw = dict(top_p=top_p, generator=generator, greedy=greedy, temperature=temperature, step_callback=step_callback,
              trace=steps_trace)

    def call() -> Tensor:
        return model(tokens, cond=cond)  # bidirectional: no mask

    with Stopwatch(model.device) as sw:
        cond = model.frozen_conditioning(b)  # sigma = 0 at every step
        if sampler == "ancestral":
            nfe = ancestral_window(call, tokens, 0, length, steps or length, mask_id, **kw)
        elif sampler in ("first_hitting", "left_to_right"):
            free = tokens == mask_id
            if (free.sum(1) != free[0].sum()).any():
                raise UserError("every sample of a batch must have the same number of given tokens")
            order = free_order(free, sampler == "first_hitting", plan_generator)
            nfe = one_per_call_window(call, tokens, 0, length, order, mask_id, **kw)
        else:
            raise UserError(f"unknown MDLM sampler {sampler!r} (ancestral, first_hitting, left_to_right)")
    tr = None
    if steps_trace is not None:
        tr = [t.cpu() for t in steps_trace]
    return SampleResult(tokens, nfe, sw.seconds, tr)
