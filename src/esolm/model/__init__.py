"""The method-agnostic network: the DiT backbone, its attention and KV cache, and the attention masks
whose order, positions and visibility define each method."""

from esolm.model.attention import KVCache
from esolm.model.backbone import DiT

__all__ = ["DiT", "KVCache"]
