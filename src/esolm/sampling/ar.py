"""AR baseline sampler: next-token decoding with a KV cache.

The AR model (``adaln=False``, causal) reads tokens ``x_<i`` and its logits at position ``i - 1`` predict
``x_i``. Decoding needs at least one given first token (a prompt or a BOS token). The first call
processes the whole prompt (causal) and keeps its keys/values; every later call feeds only the token
decoded last. NFE = L - prompt length.
"""

from __future__ import annotations

import torch

from esolm.errors import UserError
from esolm.model import masks
from esolm.sampling.common import SEQUENTIAL, SampleResult, Step, StepCallback, Stopwatch
from esolm.sampling.draw import draw

Tensor = torch.Tensor


@torch.inference_mode()
def sample_ar(model, x: Tensor, prompt_len: int, *, top_p=None, generator: torch.Generator | None = None,
              greedy: bool = False, temperature: float = 1.0, trace: bool = False,
              step_callback: StepCallback | None = None) -> SampleResult:
    """Complete ``x`` [B, L] whose first ``prompt_len`` (>= 1) tokens are given."""
    if prompt_len < 1:
        raise UserError("AR sampling needs at least one given token (a prompt or a BOS token)")
    mask_id = model.config.mask_id
    tokens = x.to(model.device).clone()
    b, length = tokens.shape
    positions = torch.arange(length, device=tokens.device).expand(b, length)
    cache = model.new_cache(length)
    steps = [] if trace else None
    start = 0
    with Stopwatch(model.device) as sw:
        cond = model.frozen_conditioning(b)  # folded weights (AR too)
        for k, i in enumerate(range(prompt_len, length)):
            n_new = i - start
            mask = None if n_new == 1 else masks.causal(n_new, tokens.device)
            logits = model(tokens[:, start:i], positions[:, start:i], mask=mask, cache=cache, commit=n_new,
                           cond=cond)
            logits = logits[:, -1:]
            if step_callback is not None:
                step_callback(k, i, i + 1, logits, tokens)
            tokens[:, i:i + 1] = draw(logits, mask_id, top_p, generator, greedy, temperature)
            if steps is not None:
                steps.append(Step(k, SEQUENTIAL, positions[:, i:i + 1]))
            start = i
    tr = [t.cpu() for t in steps] if steps is not None else None
    return SampleResult(tokens, length - prompt_len, sw.seconds, tr)
