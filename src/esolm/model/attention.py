"""Attention kernel and the per-layer KV cache.

Attention runs through ``F.scaled_dot_product_attention`` with boolean masks (``True`` = attend). It has
a backward pass on every device, which flex attention lacks on CPU, and it picks fused kernels by itself
(flash/memory-efficient on CUDA, a fused CPU kernel for ``attn_mask=None``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """q: [B, H, Q, D]; k, v: [B, H, K, D]; mask: bool broadcastable to [B, H, Q, K] or None (full)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class KVCache:
    """Preallocated keys/values for every layer, shared length across the batch.

    A cached forward writes the keys/values of *all* its new tokens at ``[length, length + n)`` and
    attends over ``[0, length + n)``; only the first ``commit`` of them are kept (``length += commit``).
    The rest (e.g. the masks queried at a sampling step) are overwritten by the next call. Storage is
    allocated on first use with the dtype/device of the keys, so autocast and devices need no setup.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.n_layers = n_layers
        self.max_len = max_len
        self.length = 0
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this layer's new keys/values after the cached ones; return all visible keys/values."""
        n = k.shape[-2]
        end = self.length + n
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} cached + {n} new > capacity {self.max_len}")
        if self.k[layer] is None or self.k[layer].shape[0] != k.shape[0] or self.k[layer].dtype != k.dtype:
            b, h, _, d = k.shape
            self.k[layer] = k.new_empty(b, h, self.max_len, d)
            self.v[layer] = v.new_empty(b, h, self.max_len, d)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def commit(self, n: int) -> None:
        if n < 0 or self.length + n > self.max_len:
            raise ValueError(f"cannot commit {n} tokens to a cache holding {self.length}/{self.max_len}")
        self.length += n
