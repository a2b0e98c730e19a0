"""The method-agnostic network: the DiT backbone (and the Llama-family EsoLlama), its attention and KV
cache, and the attention masks whose order, positions and visibility define each method."""

from esolm.model.attention import KVCache
from esolm.model.backbone import DiT
from esolm.model.llama import EsoLlama, EsoLlamaConfig  # the Llama-family backbone (docs/llama.md)

__all__ = ["DiT", "KVCache", "EsoLlama", "EsoLlamaConfig"]
