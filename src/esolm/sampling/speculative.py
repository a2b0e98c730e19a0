"""Lossless self-speculative decoding for Eso-LM (B): diffusion drafts, any-order AR verification.

The *target law* is the plain one-token-per-call sampler's: in sorted order (``plan.order``), the token at
sorted index ``j`` is drawn from ``p_j = p(x_j | x_<j)``, a mask query at ``j`` that sees every token sorted
before it. The diffusion conditional ``q`` of a mask that also sees earlier *masks* (one diffusion step) is
the drafter. Every network call feeds, per row,

    [ pending: accepted tokens not yet cached ; drafts d_c..d_{c+n-1} as clean tokens ;
      verify masks at c..c+n-1 ; chain masks at c+n..c+n+m-1 ]

(``masks.slot_step``): the verify mask at ``c+i`` sees the cache, the pending tokens and the drafts before
``c+i``, so it gives ``p_{c+i}``; the chain masks see everything clean and earlier chain masks, i.e. they are
one diffusion step starting at ``c+n``. Drafts are accepted left to right with probability
``min(1, p/q)``; at the first rejection the token is drawn from ``norm(max(0, p - q))`` and the chain is
dropped. If every draft is accepted, the chain is drawn: its head has ``q = p`` and is final, the rest
become the next drafts (ASSD's reuse of the verification call; Guo & Ermon, arXiv 2504.20456). So every
call finalises at least one token per row: NFE <= number of free tokens.

Only accepted tokens enter the cache (:class:`SlotCache`, one slot per sorted index and row, so rows may
accept different lengths); their keys/values saw exactly the tokens sorted before them, as in the plain
sampler. Steps of the plan that decode several tokens (the diffusion phase) run first, as plain diffusion
steps through the same calls; the trailing run of one-token steps is decoded speculatively. With
``adaptive``, a row's draft length grows by one with each call that accepts all its drafts (the chain of a
call with drafts is drawn one longer, as it is used only then) and shrinks by one after a rejection, within
``[2, 2k]``. With ``eos_id`` a row stops once an EOS it generated precedes every
position it has not decoded (those are EOS after ``generate``'s cut anyway).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from esolm.errors import UserError
from esolm.model import masks
from esolm.model.shift import check_start, is_shifted, predecessors, slot_mask
from esolm.sampling.common import DIFFUSION, SEQUENTIAL, SampleResult, Step, Stopwatch
from esolm.sampling.draw import gumbel_noise, mask_logit, sampling_logits
from esolm.sampling.params import DEFAULT_DRAFT, check_integer
from esolm.sampling.schedule import Plan

Tensor = torch.Tensor

class SlotCache:
    """Keys/values by sorted index, per row: slot ``j`` of row ``b`` holds the K/V of that row's token at
    sorted index ``j`` once it is accepted (:meth:`keep`); nothing else is ever written (other slots stay 0).

    Duck-types :class:`esolm.model.attention.KVCache` for ``DiT.forward``: ``update`` returns every slot
    followed by the call's new keys/values (the mask decides what is visible) and remembers the new ones.
    """

    def __init__(self, n_layers: int, capacity: int):
        self.capacity = capacity
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self._new: list[tuple[Tensor, Tensor] | None] = [None] * n_layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k[layer] is None:
            b, h, _, d = k.shape
            self.k[layer] = k.new_zeros(b, h, self.capacity, d)
            self.v[layer] = v.new_zeros(b, h, self.capacity, d)
        self._new[layer] = (k, v)
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)

    def commit(self, n: int) -> None:
        if n:
            raise ValueError("a SlotCache stores tokens with keep(), not commit()")

    def keep(self, rows: Tensor, src: Tensor, dst: Tensor) -> None:
        """Store new token ``src[i]`` of row ``rows[i]`` of the last call in slot ``dst[i]`` (1-D, equal length)."""
        for layer, new in enumerate(self._new):
            if new is not None:
                self.k[layer][rows, :, dst] = new[0][rows, :, src]
                self.v[layer][rows, :, dst] = new[1][rows, :, src]


@dataclass
class SpeculativeResult(SampleResult):
    """:class:`SampleResult` plus acceptance counts of the verified drafts.

    ``proposed[j]`` / ``accepted[j]``: drafts verified / accepted at sorted index ``j`` (summed over rows);
    ``depth_proposed[i]`` / ``depth_accepted[i]``: the same by place in the draft (``i = 0``: first draft
    after the exact chain head). ``trace[k]`` is the :class:`~esolm.sampling.common.Step` of call ``k`` (the positions
    each row finalised).
    """

    proposed: Tensor | None = None
    accepted: Tensor | None = None
    depth_proposed: Tensor | None = None
    depth_accepted: Tensor | None = None


def _law(logits: Tensor, mask_id: int, top_p: float | None, greedy: bool, temperature: float = 1.0) -> Tensor:
    """float64 probabilities the sampler draws from (one-hot argmax when ``greedy``)."""
    if greedy:
        x = mask_logit(logits, mask_id)
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(torch.float64)
    return sampling_logits(logits, mask_id, top_p, temperature).softmax(-1)


def _sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of (unnormalised) ``probs`` [..., V]: Gumbel-max on the log-probabilities."""
    return (probs.log() + gumbel_noise(probs.shape, probs.device, generator)).argmax(-1)


def _call(model, cond, cache: SlotCache, tokens: Tensor, order: Tensor, committed: Tensor, pending_end: Tensor,
          drafts: Tensor, n_draft: Tensor, chain: Tensor, mask_id: int):
    """One network call (layout in the module docstring). Returns the verify logits [B, K, V], the chain
    logits [B, M, V], and the pending block (sorted indices [B, P], validity [B, P])."""
    b, length = tokens.shape
    device = tokens.device
    n_pend = int((pending_end - committed).max())
    k, m = drafts.shape[1], int(chain.max())
    pend_idx = committed[:, None] + torch.arange(n_pend, device=device)
    pend_ok = pend_idx < pending_end[:, None]
    draft_idx = pending_end[:, None] + torch.arange(k, device=device)
    draft_ok = torch.arange(k, device=device) < n_draft[:, None]
    chain_idx = (pending_end + n_draft)[:, None] + torch.arange(m, device=device)
    chain_ok = (torch.arange(m, device=device) < chain[:, None]) & (chain_idx < length)
    idx = torch.cat([pend_idx, draft_idx, draft_idx, chain_idx], 1)
    valid = torch.cat([pend_ok, draft_ok, draft_ok, chain_ok], 1)
    kinds = torch.tensor([0] * (n_pend + k) + [1] * k + [2] * m, device=device).expand(b, -1)
    safe = idx.clamp(max=length - 1)
    ids = torch.cat([tokens.gather(1, safe[:, :n_pend]), drafts, torch.full((b, k + m), mask_id, device=device)], 1)
    mask = masks.slot_step(committed, idx, kinds == 0, kinds == 2, valid, length)
    logits = model(ids, order.gather(1, safe), mask=mask, cache=cache, cond=cond,
                   logits_slice=slice(n_pend + k, None))
    return logits[:, :k], logits[:, k:], pend_idx, pend_ok


def _call_shifted(model, cond, cache: SlotCache, tokens: Tensor, order: Tensor, committed: Tensor,
                  pending_end: Tensor, drafts: Tensor, n_draft: Tensor, chain: Tensor, mask_id: int, *, prev: Tensor):
    """:func:`_call` under the shifted query convention (:mod:`esolm.model.shift`), the same results.

    The query for sorted index ``s`` reads the token at ``prev[s]`` (the position before) at that position. A
    verify target ``s`` sees everything sorted before it, a chain target everything clean (the drafts included).
    When every verify target and the chain head have their predecessor just before them (``prev[s] = s - 1``: left
    to right), each such query *is* the clean row before it, so the call feeds ``[pending ; drafts ; the chain
    beyond its head]`` and reads the verify and head logits from the clean rows (an AR model's speculative
    verification). Otherwise it feeds one query row per target, as the general convention says."""
    b, length = tokens.shape
    device = tokens.device
    n_pend = int((pending_end - committed).max())
    k, m = drafts.shape[1], int(chain.max())
    ar_k, ar_m = torch.arange(k, device=device), torch.arange(m, device=device)
    pend_idx = committed[:, None] + torch.arange(n_pend, device=device)
    pend_ok = pend_idx < pending_end[:, None]
    draft_idx = pending_end[:, None] + ar_k
    draft_ok = ar_k < n_draft[:, None]
    head = pending_end + n_draft  # c0: first chain target
    chain_idx = head[:, None] + ar_m
    chain_ok = (ar_m < chain[:, None]) & (chain_idx < length)
    ctx = tokens.clone()  # the clean context of this call: finalised tokens and the drafts
    r, i = draft_ok.nonzero(as_tuple=True)
    ctx[r, draft_idx[r, i]] = drafts[r, i]
    safe = lambda idx: idx.clamp(max=length - 1)  # noqa: E731

    def prev_of(idx: Tensor) -> Tensor:
        return prev.gather(1, safe(idx))

    clean_idx, clean_ok = torch.cat([pend_idx, draft_idx], 1), torch.cat([pend_ok, draft_ok], 1)
    verify_ok = draft_ok
    targets_ok = torch.cat([verify_ok, chain_ok[:, :1]], 1)
    targets = torch.cat([draft_idx, chain_idx[:, :1]], 1)
    dedupe = m > 0 and bool(((prev_of(targets) == targets - 1) | ~targets_ok).all())
    if dedupe:  # [pending ; drafts ; chain beyond its head]
        q_idx, q_ok = chain_idx[:, 1:], chain_ok[:, 1:]
        q_lo = head[:, None].expand_as(q_idx)
    else:  # [pending ; drafts ; verify queries ; chain queries]
        q_idx, q_ok = torch.cat([draft_idx, chain_idx], 1), torch.cat([verify_ok, chain_ok], 1)
        q_lo = torch.minimum(q_idx, head[:, None])
    q_prev = prev_of(q_idx)
    q_ids = torch.where((q_prev >= 0) & (q_prev < q_lo), ctx.gather(1, q_prev.clamp_min(0)), mask_id)
    ids = torch.cat([ctx.gather(1, safe(clean_idx)), q_ids], 1)
    pos = torch.cat([order.gather(1, safe(clean_idx)), (order.gather(1, safe(q_idx)) - 1).clamp_min(0)], 1)
    key_idx = torch.cat([clean_idx, q_idx], 1)
    key_clean = torch.cat([clean_ok, torch.zeros_like(q_ok)], 1)
    lo = torch.cat([clean_idx, q_lo], 1)
    excl = torch.cat([torch.full_like(clean_idx, -1), torch.where(q_ok, q_prev, -1)], 1)
    mask = slot_mask(committed, key_idx, key_clean, lo, excl, length)
    logits = model(ids, pos, mask=mask, cache=cache, cond=cond)
    n_clean = n_pend + k
    if not dedupe:
        return logits[:, n_clean:n_clean + k], logits[:, n_clean + k:], pend_idx, pend_ok
    # the clean row before sorted index s: the last pending token (s = pending_end) or draft s - pending_end - 1
    def row_before(s: Tensor) -> Tensor:
        return torch.where(s > pending_end[:, None], n_pend + (s - pending_end[:, None] - 1),
                           (pending_end - 1 - committed)[:, None])

    rows_v = row_before(draft_idx).clamp(0, logits.shape[1] - 1)
    rows_h = row_before(head[:, None]).clamp(0, logits.shape[1] - 1)
    pick = lambda rows: logits.gather(1, rows[..., None].expand(-1, -1, logits.shape[-1]))  # noqa: E731
    return pick(rows_v), torch.cat([pick(rows_h), logits[:, n_clean:]], 1), pend_idx, pend_ok


def _keep(cache: SlotCache, pend_idx: Tensor, pend_ok: Tensor, draft_start: Tensor, n_kept: Tensor, k: int) -> None:
    """Cache the valid pending tokens and the first ``n_kept`` drafts of each row."""
    device = pend_idx.device
    keep = torch.cat([pend_ok, torch.arange(k, device=device) < n_kept[:, None]], 1)
    dst = torch.cat([pend_idx, draft_start[:, None] + torch.arange(k, device=device)], 1)
    rows, src = keep.nonzero(as_tuple=True)
    cache.keep(rows, src, dst[rows, src])


def _eos_stopped(tokens: Tensor, order: Tensor, final: Tensor, n_given: int, eos_id: int) -> Tensor:
    """Rows whose generated EOS precedes (in original position) every position they have not decoded."""
    length = tokens.shape[1]
    j = torch.arange(length, device=tokens.device)[None]
    decided = j < final[:, None]
    big = torch.full_like(order, length)
    eos = torch.where(decided & (j >= n_given) & (tokens == eos_id), order, big).min(1).values
    rest = torch.where(decided, big, order).min(1).values
    return eos < rest


@torch.inference_mode()
def sample_speculative(model, x: Tensor, plan: Plan, *, k: int = DEFAULT_DRAFT, adaptive: bool = False,
                       eos_id: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None, greedy: bool = False, temperature: float = 1.0,
                       trace: bool = False,
                       monitor: Callable[[SlotCache, Tensor], None] | None = None) -> SpeculativeResult:
    """Eso-LM (B) with speculative decoding of the plan's trailing one-token steps (module docstring).

    ``x`` [B, L]: given tokens in place, the mask id elsewhere (original order). Draws from the same law as
    :func:`esolm.sampling.esolm.sample_esolm_b` with ``plan``; ``nfe <= plan.nfe``. ``k``: draft length
    (chain head included; the start value when ``adaptive``). ``monitor(cache, committed)`` runs after every
    call with the cache and each row's number of cached tokens (for tests).
    """
    k = check_integer(k, "speculative (the draft length)", 2)
    mask_id = model.config.mask_id
    device = model.device
    order = plan.order.to(device)
    if x.shape != order.shape:
        raise UserError(f"tokens {tuple(x.shape)} and order {tuple(order.shape)} differ in shape")
    tokens = x.to(device).gather(1, order)
    b, length = tokens.shape
    vocab = model.config.vocab_size
    k_max = 2 * k if adaptive else k
    bounds = plan.bounds()
    n_par = len(bounds)
    while n_par and bounds[n_par - 1][1] - bounds[n_par - 1][0] == 1:
        n_par -= 1

    cache = SlotCache(model.config.n_layers, length)
    call = _call
    if is_shifted(model):
        if plan.n_given < 1:
            raise UserError("this model reads the token before each position: position 0 must be given "
                            "(a start token)")
        check_start(order, "the plan's order")
        call = functools.partial(_call_shifted, prev=predecessors(order))
    committed = torch.zeros(b, dtype=torch.long, device=device)
    final = torch.full((b,), plan.n_given, dtype=torch.long, device=device)
    drafts = tokens.new_zeros(b, 0)
    q_drafts = torch.zeros(b, 0, vocab, dtype=torch.float64, device=device)
    n_draft = torch.zeros(b, dtype=torch.long, device=device)
    klen = torch.full((b,), k, dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)
    proposed = torch.zeros(length, dtype=torch.long, device=device)
    accepted = torch.zeros_like(proposed)
    depth_proposed = torch.zeros(k_max, dtype=torch.long, device=device)
    depth_accepted = torch.zeros_like(depth_proposed)
    steps = [] if trace else None
    nfe = 0

    def record(old: Tensor, new: Tensor, phase: str) -> None:
        if steps is not None:
            j = torch.arange(length, device=device)[None]
            r, p = ((j >= old[:, None]) & (j < new[:, None])).nonzero(as_tuple=True)
            steps.append(Step(nfe - 1, phase, order[r, p].cpu(), r.cpu()))

    with Stopwatch(device) as sw:
        cond = model.frozen_conditioning(b)
        for lo, hi in bounds[:n_par]:  # diffusion steps: every row in lockstep
            _, logits, pend_idx, pend_ok = call(model, cond, cache, tokens, order, committed, final, drafts,
                                                 n_draft, torch.full_like(final, hi - lo), mask_id)
            tokens[:, lo:hi] = _sample(_law(logits, mask_id, top_p, greedy, temperature), generator)
            _keep(cache, pend_idx, pend_ok, final, n_draft, 0)
            nfe += 1
            record(final, final + hi - lo, DIFFUSION)
            committed, final = final, final + (hi - lo)
            if monitor is not None:
                monitor(cache, committed)

        active = final < length
        while bool(active.any()):
            kd = drafts.shape[1]
            end = torch.where(active, final, committed)
            tried = n_draft > 0  # rows with drafts: the chain is used only if all are accepted, so grow it now
            m = torch.where(tried, (klen + 1).clamp(max=k_max), klen) if adaptive else klen
            v_logits, c_logits, pend_idx, pend_ok = call(model, cond, cache, tokens, order, committed, end,
                                                          drafts, n_draft, torch.where(active, m, 0), mask_id)
            nfe += 1
            # verify the drafts left to right
            p = _law(v_logits, mask_id, top_p, greedy, temperature)
            d = drafts[..., None]
            ok = torch.rand(b, kd, dtype=torch.float64, device=device, generator=generator) * \
                q_drafts.gather(-1, d)[..., 0] < p.gather(-1, d)[..., 0]
            has = torch.arange(kd, device=device)[None] < n_draft[:, None]
            bad = has & ~ok
            rejected = bad.any(1)
            n_acc = torch.where(rejected, bad.long().argmax(1), n_draft) if kd else n_draft
            seen = has & (torch.arange(kd, device=device)[None] <= n_acc[:, None])
            hit = has & (torch.arange(kd, device=device)[None] < n_acc[:, None])
            pos = (final[:, None] + torch.arange(kd, device=device)).clamp(max=length - 1)
            proposed.index_put_((pos[seen],), torch.ones_like(pos[seen]), accumulate=True)
            accepted.index_put_((pos[hit],), torch.ones_like(pos[hit]), accumulate=True)
            depth_proposed[:kd] += seen.sum(0)
            depth_accepted[:kd] += hit.sum(0)
            for i in range(kd):  # accepted drafts become tokens
                write = hit[:, i]
                tokens[rows[write], final[write] + i] = drafts[write, i]
            _keep(cache, pend_idx, pend_ok, final, torch.where(active, n_acc, 0), kd)
            old = final
            committed = torch.where(active, final + n_acc, committed)
            # a rejection: draw the correction from norm(max(0, p - q))
            if bool(rejected.any()):
                r = rows[rejected]
                a = n_acc[rejected]
                resid = (p[r, a] - q_drafts[r, a]).clamp_min(0.0)
                resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p[r, a])
                tokens[r, final[r] + a] = _sample(resid, generator)
            # full acceptance: draw the chain; its head is exact, the rest are the next drafts
            full = active & ~rejected
            chain_probs = _law(c_logits, mask_id, top_p, greedy, temperature)
            chain = _sample(chain_probs, generator)
            head = final + n_draft
            n_chain = torch.minimum(m, (length - head).clamp_min(0))
            has_head = full & (n_chain > 0)
            tokens[rows[has_head], head[has_head]] = chain[has_head, 0]
            final = torch.where(rejected, final + n_acc + 1, torch.where(full, head + has_head.long(), final))
            drafts, q_drafts = chain[:, 1:], chain_probs[:, 1:]
            n_draft = torch.where(full, (n_chain - 1).clamp_min(0), 0)
            if adaptive:  # rows that had drafts: grow after full acceptance, shrink after a rejection
                klen = torch.where(tried & full, m, klen)
                klen = torch.where(tried & rejected, (klen - 1).clamp(min=2), klen)
            record(old, torch.where(active, final, old), SEQUENTIAL)
            if monitor is not None:
                monitor(cache, committed)
            active = final < length
            if eos_id is not None:
                active &= ~_eos_stopped(tokens, order, final, plan.n_given, eos_id)
            n_draft = torch.where(active, n_draft, 0)
        if eos_id is not None:
            j = torch.arange(length, device=device)[None]
            tokens = torch.where(j >= final[:, None], torch.full_like(tokens, eos_id), tokens)
    out = torch.empty_like(tokens).scatter_(1, order, tokens)
    return SpeculativeResult(out, nfe, sw.seconds, steps, proposed.cpu(), accepted.cpu(), depth_proposed.cpu(),
                             depth_accepted.cpu())
