"""The shifted query convention (``docs/llama.md``): how a network adapted from an AR LM is queried.

An AR LM's row at position ``p - 1`` (token ``x_{p-1}``, rotary position ``p - 1``) predicts ``x_p``. Under the
shifted convention, Eso-LM (B) keeps that: **the query that predicts position ``p`` is the token at ``p - 1``, or
the mask token where ``p - 1`` is not visible yet, at rotary position ``p - 1``**. Position 0 has no predecessor and
is always given (a start token), first in every order.

Write a decoding state as the sorted sequence whose first ``c`` entries are clean. Clean rows are causal over the
order (as for the DiT). The query for target ``p`` (sorted index ``l >= c``) sees the clean rows ``j < c`` except
the row of ``p - 1`` (``prev``, which it re-reads at the same position), and itself; never another query. Hence:

* a query whose predecessor is the last clean row (``prev = c - 1``) *is* that row: a sequential step is one row,
  exactly a cached AR step, and in the natural order the network is the AR model it came from;
* clean rows never change once computed, so the KV cache is exact;
* one pass over ``[queries (L) ; x sorted (L)]`` (:func:`shift_mask`) gives every query row a sampler computes.

A network says it uses the convention by ``config.shifted`` (:func:`is_shifted`): :class:`esolm.model.llama.EsoLlama`
does by default, the DiT never does. The objectives, likelihoods and Eso-LM (B) samplers read it from there.
"""

from __future__ import annotations

import torch

from esolm.errors import UserError

Tensor = torch.Tensor


def is_shifted(model) -> bool:
    """Whether ``model`` is queried with the shifted convention (``model.config.shifted``)."""
    return bool(getattr(getattr(model, "config", None), "shifted", False))


def start_first(order: Tensor) -> Tensor:
    """``order`` [B, L] with position 0 moved to sorted index 0, every other position keeping its place relative to
    the rest (a stable partition)."""
    return order.gather(1, (order != 0).long().argsort(dim=1, stable=True))


def check_start(order: Tensor, what: str = "this order") -> None:
    """UserError unless position 0 comes first in every row of ``order`` (given: nothing predicts it)."""
    if order.shape[1] and bool((order[:, 0] != 0).any()):
        raise UserError(f"{what} must start with position 0: under the shifted query convention position 0 is "
                        "the given start token (nothing predicts it)")


def predecessors(order: Tensor) -> Tensor:
    """``prev`` [B, L]: the sorted index of position ``order[:, l] - 1`` (-1 where ``order[:, l]`` is 0)."""
    b, n = order.shape
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(b, n))
    return torch.where(order > 0, rank.gather(1, (order - 1).clamp_min(0)), -1)


def shift_queries(x_sorted: Tensor, order: Tensor, n_clean: Tensor, mask_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """The query row of every sorted index ``l`` (target position ``p = order[:, l]``).

    ``n_clean`` [L] or [B, L]: how many sorted tokens are clean (visible) to the query of ``l``: ``l`` for the
    sequential conditionals ``p(x_order(l) | x_order(<l))``, ``lo`` for a decoding step ``[lo, hi)``. Returns
    ``ids`` (the token at ``p - 1`` if its sorted index is below ``n_clean[l]``, else ``mask_id``), ``positions``
    (``p - 1``) and ``prev`` (the sorted index of position ``p - 1``), each [B, L]. Position 0 has no predecessor:
    its row is a mask at position 0 with ``prev = -1``, to be ignored.
    """
    b, n = order.shape
    prev = predecessors(order)
    visible = (prev >= 0) & (prev < n_clean.expand(b, n))
    ids = torch.where(visible, x_sorted.gather(1, prev.clamp_min(0)), mask_id)
    return ids, (order - 1).clamp_min(0), prev


def shift_mask(prev: Tensor, n_clean: Tensor) -> Tensor:
    """Boolean mask [B, 1, 2L, 2L] of the one-pass input ``[queries (L) ; x sorted (L)]``: x-row ``i`` sees x-keys
    ``j <= i``; the query of ``l`` sees itself and the x-keys ``j < n_clean[l]`` except ``j = prev[l]`` (its own
    input token, re-read at the same position: keeping both would count that key twice); x never sees a query."""
    b, n = prev.shape
    j = torch.arange(n, device=prev.device)
    q_to_x = (j[None, None, :] < n_clean.expand(b, n)[..., None]) & (j[None, None, :] != prev[..., None])
    q_to_q = torch.eye(n, dtype=torch.bool, device=prev.device).expand(b, n, n)
    x_to_x = (j[None, :] <= j[:, None]).expand(b, n, n)
    top = torch.cat([q_to_q, q_to_x], dim=-1)
    bottom = torch.cat([torch.zeros_like(x_to_x), x_to_x], dim=-1)
    return torch.cat([top, bottom], dim=-2)[:, None]


def _natural(order: Tensor, n_clean: Tensor) -> bool:
    ar = torch.arange(order.shape[1], device=order.device)
    return bool((order == ar).all()) and bool((n_clean.expand_as(order) == ar).all())


def query_logits(model, x_sorted: Tensor, order: Tensor, n_clean: Tensor, valid: Tensor | None = None) -> Tensor:
    """Logits [B, L, V] of every sorted index's query (row ``l`` predicts ``x_sorted[:, l]``; row 0, position 0,
    is meaningless) from one pass over ``[queries ; x sorted]`` (:func:`shift_queries`, :func:`shift_mask`).

    ``valid`` [B, L] (sorted like ``x_sorted``): padding, hidden as keys. In the natural order with ``n_clean = l``
    every query is the clean row before it, so the pass is the plain causal one over ``x[:, :-1]`` (L rows, not
    2L): the AR model's own likelihood pass. With one clean count per row (``n_clean`` [B, 1], a diffusion draw),
    rows of targets below every row's count (clean: not scored) are zeros and not computed, nor the x-rows no
    query can see."""
    b, n = x_sorted.shape
    if _natural(order, n_clean):
        i = torch.arange(n - 1, device=x_sorted.device)
        mask = (i[None, :] <= i[:, None])[None, None]
        if valid is not None:
            mask = mask & valid[:, None, None, :-1].bool()
        out = model(x_sorted[:, :-1], order[:, :-1], mask=mask)
        return torch.cat([torch.zeros_like(out[:, :1]), out], 1)
    ids, pos, prev = shift_queries(x_sorted, order, n_clean, model.config.mask_id)
    mask = shift_mask(prev, n_clean)
    if valid is not None:
        v = valid.bool()
        mask = mask & torch.cat([v, v], 1)[:, None, None, :]
    lo, hi = 0, n
    if n_clean.dim() == 2 and n_clean.shape[1] == 1:  # one clean count per row (a diffusion draw): feed only the
        lo, hi = int(n_clean.min()), int(n_clean.max())  # queries of targets >= lo and the x-rows they can see (< hi)
        keep = torch.cat([torch.arange(lo, n, device=x_sorted.device), n + torch.arange(hi, device=x_sorted.device)])
        mask = mask[:, :, keep][..., keep]
    out = model(torch.cat([ids[:, lo:], x_sorted[:, :hi]], 1), torch.cat([pos[:, lo:], order[:, :hi]], 1),
                mask=mask, logits_slice=slice(0, n - lo))
    return torch.cat([out.new_zeros(b, lo, out.shape[-1]), out], 1)  # rows below lo: clean targets, never scored


def step_inputs(tokens: Tensor, order: Tensor, prev: Tensor, start: int, lo: int, hi: int,
                mask_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Input ids, positions and mask of one decoding step ``[lo, hi)`` over a KV cache holding the sorted tokens
    ``[0, start)``: the clean rows ``[start, lo)`` (to commit; causal over the order), then one query row per target
    (:func:`shift_queries` with ``n_clean = lo``), which sees the clean keys ``j < lo`` except its ``prev`` and
    itself. The mask is [B, 1, lo - start + (hi - lo), lo + (hi - lo)] over ``[cache ; new rows]``."""
    b = tokens.shape[0]
    dev = tokens.device
    nq = hi - lo
    p = prev[:, lo:hi]
    q_ids = torch.where((p >= 0) & (p < lo), tokens.gather(1, p.clamp_min(0)), mask_id)
    ids = torch.cat([tokens[:, start:lo], q_ids], 1)
    pos = torch.cat([order[:, start:lo], (order[:, lo:hi] - 1).clamp_min(0)], 1)
    j = torch.arange(lo, device=dev)
    i = torch.arange(start, lo, device=dev)
    clean = torch.cat([(j[None, :] <= i[:, None]), torch.zeros(lo - start, nq, dtype=torch.bool, device=dev)], 1)
    q_x = (j[None, None, :] != p[..., None])
    q_q = torch.eye(nq, dtype=torch.bool, device=dev).expand(b, nq, nq)
    mask = torch.cat([clean.expand(b, -1, -1), torch.cat([q_x, q_q], -1)], 1)[:, None]
    return ids, pos, mask


def slot_mask(committed: Tensor, key_idx: Tensor, key_clean: Tensor, lo: Tensor, excl: Tensor,
              capacity: int) -> Tensor:
    """Mask [B, 1, S, capacity + S] of a call over a per-row slot cache indexed by sorted position (speculative
    decoding): row ``u`` (all inputs [B, S]) sees the slots ``j < committed[b]`` and the valid clean new rows of sorted
    index ``key_idx < lo[b, u]``, except ``excl[b, u]`` (a query's ``prev``; -1 for none), and itself. A clean row
    has ``lo`` = its own sorted index (causal over the order); a query the clean prefix it reads."""
    b, s = key_idx.shape
    dev = key_idx.device
    j = torch.arange(capacity, device=dev)
    slots = (j[None, None, :] < committed[:, None, None]) & (j[None, None, :] != excl[..., None])
    new = key_clean[:, None, :] & (key_idx[:, None, :] < lo[..., None]) & (key_idx[:, None, :] != excl[..., None])
    new = new | torch.eye(s, dtype=torch.bool, device=dev)
    return torch.cat([slots, new], dim=-1)[:, None]


__all__ = ["is_shifted", "start_first", "check_start", "predecessors", "shift_queries", "shift_mask",
           "query_logits", "step_inputs", "slot_mask"]
