"""BD3-LM sampler: block by block, each block an MDLM sampler over a KV cache of the finished blocks.

The training mask (``masks.block_diffusion``) lets a noisy block attend bidirectionally within itself and
to the clean blocks before it, and a clean block attend to clean blocks up to its own. So the keys and
values of a finished (clean) block depend only on clean blocks up to it: they are computed once and
cached. While block ``b`` is sampled, each network call feeds only block ``b`` (cache + bidirectional
within the block: ``masks.cached_block_step``).

The K/V of finished blocks are computed inside the first call of the next block: that call feeds
``[finished, not yet cached blocks ; block b]`` with a block-causal mask (a clean block sees the cache
and clean blocks up to its own; block ``b`` sees everything) and commits the finished blocks. This is
exactly the 2L training pass restricted to the tokens that matter and saves one call per block; prompt
blocks are cached the same way.
"""

from __future__ import annotations

import torch

from esolm.errors import UserError
from esolm.orders import free_order
from esolm.sampling.common import SampleResult, StepCallback, Stopwatch
from esolm.sampling.mdlm import ancestral_window, one_per_call_window

Tensor = torch.Tensor


def block_causal_step(cache_len: int, block_ids: Tensor) -> Tensor:
    """Mask [1, 1, n, cache_len + n]: each new token sees the cache and new tokens of blocks <= its own."""
    n = block_ids.shape[0]
    within = block_ids[None, :] <= block_ids[:, None]
    cache = torch.ones(n, cache_len, dtype=torch.bool, device=block_ids.device)
    return torch.cat([cache, within], dim=-1)[None, None]


@torch.inference_mode()
def sample_bd3(model, x: Tensor, block_size: int, *, steps: int | None = None, sampler: str = "ancestral",
               top_p=None, generator: torch.Generator | None = None,
               plan_generator: torch.Generator | None = None, greedy: bool = False, temperature: float = 1.0,
               trace: bool = False,
               step_callback: StepCallback | None = None, ignore_bos: bool = False) -> SampleResult:
    """Sample the masked positions of ``x`` [B, L] block by block (L must be a multiple of the block size).

    ``sampler``: ``"ancestral"`` (``steps`` MDLM steps per block, default the block size) or
    ``"first_hitting"`` (one token per call, random order within the block). ``ignore_bos`` (a model
    trained with ``BD3LM.ignore_bos``, which never learnt to predict token 0): position 0 must be
    given (the BOS token), and is never sampled.
    """
    if sampler not in ("ancestral", "first_hitting"):
        raise UserError(f"unknown BD3-LM sampler {sampler!r} (ancestral, first_hitting)")
    mask_id = model.config.mask_id
    tokens = x.to(model.device).clone()
    b, length = tokens.shape
    if block_size < 1 or length % block_size:
        raise UserError(f"block size {block_size} must divide the sequence length {length}")
    free = tokens == mask_id
    if (free != free[:1]).any():
        raise UserError("every sample of a batch must have the same given positions")
    if ignore_bos and bool(free[0, 0]):
        raise UserError("this BD3-LM model ignores position 0 (ignore_bos): give the BOS token there")
    device = tokens.device
    positions = torch.arange(length, device=device).expand(b, length)
    block_of = torch.arange(length, device=device) // block_size
    free_blocks = free[0].view(-1, block_size).any(dim=1).tolist()
    cache = model.new_cache(length)
    steps_trace = [] if trace else None
    nfe = 0
    with Stopwatch(device) as sw:
        cond = model.frozen_conditioning(b)  # sigma = 0 at every step
        for blk, has_free in enumerate(free_blocks):
            if not has_free:
                continue  # clean (given) block: cached by the next block's first call
            lo, hi = blk * block_size, (blk + 1) * block_size
            state = {"first": True}

            def call(lo=lo, hi=hi, state=state) -> Tensor:
                if state["first"]:
                    start = cache.length
                    mask = None if start == lo else block_causal_step(start, block_of[start:hi])
                    out = model(tokens[:, start:hi], positions[:, start:hi], mask=mask, cache=cache,
                                commit=lo - start, cond=cond)
                    state["first"] = False
                    return out[:, lo - start:]
                return model(tokens[:, lo:hi], positions[:, lo:hi], cache=cache, commit=0, cond=cond)

            kw = dict(top_p=top_p, generator=generator, greedy=greedy, temperature=temperature,
                      step_callback=step_callback,
                      step0=nfe, trace=steps_trace)
            if sampler == "ancestral":
                nfe += ancestral_window(call, tokens, lo, hi, steps or block_size, mask_id, **kw)
            else:
                order = free_order(free[:, lo:hi], True, plan_generator)
                nfe += one_per_call_window(call, tokens, lo, hi, order, mask_id, **kw)
    tr = [t.cpu() for t in steps_trace] if steps_trace is not None else None
    return SampleResult(tokens, nfe, sw.seconds, tr)
