"""Attention masks over *sorted* sequences (METHOD.md section 3).

Every builder returns a boolean tensor where ``True`` means "query may attend to key", shaped
``[B or 1, 1, Q, K]`` so that it broadcasts over heads in ``F.scaled_dot_product_attention``.
Positions are indices in the sorted (permuted) sequence, never original positions: the order carries
the method, rotary embeddings carry the original positions.

=====================  =========================================================  ==================
builder                who uses it                                                 shape
=====================  =========================================================  ==================
``causal``             Eso-LM (B) diffusion phase, AR                              [1, 1, L, L]
``bidirectional``      MDLM                                                        [1, 1, L, L]
``prefix_lm``          Eso-LM (A) diffusion phase (per-example clean count)        [B, 1, L, L]
``sequential``         Eso-LM (B) sequential phase, 2L tokens ``[z ; x]``          [1, 1, 2L, 2L]
``sequential_prefix``  Eso-LM (A) sequential phase (clean x-prefix bidirectional)  [B, 1, 2L, 2L]
``block_diffusion``    BD3-LM training, 2L tokens ``[x_t ; x_0]``, block size L'   [1, 1, 2L, 2L]
``cached_step``        one KV-cached decoding step: all cache + causal new tokens  [1, 1, n, c + n]
``slot_step``          speculative decoding: per-row cache + clean/draft/masks     [B, 1, S, C + S]
``slot_causal``        batched serving: each row's slots up to its own query slot  [B, 1, S, K]
``trajectory``         one-pass log-likelihood of a decoding plan, ``[x ; masks]``  [1, 1, L + N, L + N]
=====================  =========================================================  ==================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def _ar(n: int, device=None) -> Tensor:
    return torch.arange(n, device=device)


def causal(length: int, device=None) -> Tensor:
    i = _ar(length, device)
    return (i[None, :] <= i[:, None])[None, None]


def bidirectional(length: int, device=None) -> Tensor:
    return torch.ones(1, 1, length, length, dtype=torch.bool, device=device)


def _clean_counts(n_clean: Tensor | int, length: int, device=None) -> Tensor:
    n = torch.as_tensor(n_clean, device=device).reshape(-1).long()
    if (n < 0).any() or (n > length).any():
        raise ValueError(f"clean counts must lie in [0, {length}], got {n.tolist()}")
    return n


def prefix_lm(n_clean: Tensor | int, length: int, device=None) -> Tensor:
    """Eso-LM (A) diffusion phase (authors' ``mixed2``), built per example.

    Example ``b`` has its ``n_clean[b]`` clean tokens first: they attend bidirectionally among
    themselves; a mask attends to every clean token, to earlier masks and to itself.
    """
    c = _clean_counts(n_clean, length, device)[:, None, None]
    i = _ar(length, device)[:, None]
    j = _ar(length, device)[None, :]
    return ((j < c) | (j <= i))[:, None]


def sequential(length: int, device=None) -> Tensor:
    """Eso-LM (B) sequential phase on ``[z_sorted ; x_sorted]`` (block diffusion with block size 1).

    z-query i sees z-key i only and x-keys j < i; x-query i sees x-keys j <= i; x never sees z.
    """
    return block_diffusion(length, 1, device)


def sequential_prefix(n_clean: Tensor | int, length: int, device=None) -> Tensor:
    """Eso-LM (A) sequential phase (authors' ``mixed``): as :func:`sequential`, but the clean prefix
    of the x-half (the first ``n_clean[b]`` sorted tokens) attends bidirectionally within itself.
    z-queries are as in (B): z-key i and x-keys j < i (so a masked z-query sees every clean token)."""
    c = _clean_counts(n_clean, length, device)[:, None, None]
    i = _ar(length, device)[:, None]
    j = _ar(length, device)[None, :]
    x_vis = (j <= i) | ((j < c) & (i < c))  # x-query i -> x-key j
    z_to_x = (j < i).expand_as(x_vis)  # z-query i -> x-key j
    z_to_z = (j == i).expand_as(x_vis)
    none = torch.zeros_like(x_vis)
    top = torch.cat([z_to_z, z_to_x], dim=-1)
    bottom = torch.cat([none, x_vis], dim=-1)
    return torch.cat([top, bottom], dim=-2)[:, None]


def block_diffusion(length: int, block_size: int, device=None) -> Tensor:
    """BD3-LM training mask on ``[x_t ; x_0]`` (2L tokens), blocks of ``block_size`` tokens.

    x_t block b attends within itself (bidirectional) and to x_0 blocks < b; x_0 attends to x_0
    blocks <= its own (block-causal); x_0 never attends to x_t.
    """
    if block_size < 1 or length % block_size:
        raise ValueError(f"block size {block_size} must divide the length {length}")
    b = _ar(length, device) // block_size
    bq, bk = b[:, None], b[None, :]
    t_to_t = bq == bk
    t_to_0 = bk < bq
    o_to_o = bk <= bq
    top = torch.cat([t_to_t, t_to_0], dim=-1)
    bottom = torch.cat([torch.zeros_like(t_to_t), o_to_o], dim=-1)
    return torch.cat([top, bottom], dim=-2)[None, None]


def cached_step(cache_len: int, n_new: int, device=None) -> Tensor:
    """Mask of one KV-cached step: every new query sees the whole cache, and the new tokens causally."""
    i = _ar(n_new, device)[:, None]
    j = _ar(n_new, device)[None, :]
    return torch.cat(
        [torch.ones(n_new, cache_len, dtype=torch.bool, device=device), j <= i], dim=-1
    )[None, None]


def cached_block_step(cache_len: int, n_new: int, device=None) -> Tensor:
    """Mask of a cached block-diffusion step: the whole cache plus bidirectional attention in the block."""
    return torch.ones(1, 1, n_new, cache_len + n_new, dtype=torch.bool, device=device)


def slot_step(cache_len: Tensor, sorted_idx: Tensor, clean: Tensor, chain: Tensor, valid: Tensor,
              capacity: int) -> Tensor:
    """Mask of a call over a per-row cache indexed by sorted position (``esolm.sampling.speculative``).

    Keys are the ``capacity`` cache slots, then the ``S`` new tokens; new token ``u`` of row ``b`` sits at
    sorted index ``sorted_idx[b, u]``. Every query sees the slots below ``cache_len[b]`` and itself; it sees
    a valid new *clean* token with a smaller sorted index; a *chain* mask also sees the valid chain masks
    with a smaller sorted index. Other masks (verification queries) see no other mask. All inputs [B, S].
    """
    b, s = sorted_idx.shape
    device = sorted_idx.device
    slots = (_ar(capacity, device)[None, :] < cache_len[:, None])[:, None, :].expand(b, s, capacity)
    before = sorted_idx[:, None, :] < sorted_idx[:, :, None]  # [B, query, key]
    key_ok = valid[:, None, :] & (clean[:, None, :] | (chain[:, None, :] & chain[:, :, None]))
    new = (before & key_ok) | torch.eye(s, dtype=torch.bool, device=device)
    return torch.cat([slots, new], dim=-1)[:, None]


def slot_causal(query_slot: Tensor, n_keys: int) -> Tensor:
    """Mask of a batched call whose new tokens were written into a per-row slot cache first
    (``esolm.serving.engine``): query ``u`` of row ``b`` sits in slot ``query_slot[b, u]`` [B, S] and sees
    the keys of slots ``0 .. query_slot[b, u]`` of its row: the row's cache and its new tokens causally."""
    keys = _ar(n_keys, query_slot.device)
    return (keys[None, None, :] <= query_slot[:, :, None])[:, None]


def trajectory(length: int, bounds: Sequence[tuple[int, int]], device=None) -> Tensor:
    """Mask of the one-pass likelihood of a KV-cached Eso-LM (B) decoding plan (``esolm.rl.trajectory``).

    Input ``[x sorted (length) ; one mask per decoded sorted index (N = length - bounds[0][0])]``; ``bounds``
    are the plan's steps ``[lo, hi)`` in sorted indices, contiguous up to ``length``. x-query ``i`` sees
    x-keys ``j <= i`` (the clean keys/values of the cache); the mask of sorted index ``m`` decoded by step
    ``[lo, hi)`` sees x-keys ``j < lo`` and the masks ``lo..m`` of its own step: exactly what the cached
    sampler's query for ``m`` saw. x never sees a mask.
    """
    n0 = bounds[0][0] if bounds else length
    ends = [hi for _, hi in bounds]
    if any(lo != prev for (lo, _), prev in zip(bounds, [n0] + ends)) or (bounds and ends[-1] != length) \
            or any(hi <= lo for lo, hi in bounds):
        raise ValueError(f"steps {list(bounds)} must tile [{n0}, {length}) in order")
    n = length - n0
    lo_of = torch.empty(n, dtype=torch.long, device=device)
    for lo, hi in bounds:
        lo_of[lo - n0:hi - n0] = lo
    i = _ar(length, device)
    m = _ar(n, device) + n0
    x_to_x = i[None, :] <= i[:, None]
    z_to_x = i[None, :] < lo_of[:, None]
    z_to_z = (m[None, :] >= lo_of[:, None]) & (m[None, :] <= m[:, None])
    top = torch.cat([x_to_x, torch.zeros(length, n, dtype=torch.bool, device=device)], dim=-1)
    bottom = torch.cat([z_to_x, z_to_z], dim=-1)
    return torch.cat([top, bottom], dim=-2)[None, None]
