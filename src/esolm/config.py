"""Model configuration: one explicit, serialisable object per network."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from esolm.errors import ConfigError

MAX_LENGTH = 1 << 20  # longest model length esolm accepts (rotary positions, masks and caches are O(L) to O(L^2))


@dataclass
class ModelConfig:
    """Architecture of an esolm backbone.

    ``adaln=True`` is the paper's DiT (Eso-LM, MDLM, BD3-LM); ``adaln=False`` is the AR baseline's
    plain causal transformer. ``mask_id`` is the id of the mask token (``None`` for pure AR models).
    """

    vocab_size: int = 101
    mask_id: int | None = 100
    hidden_size: int = 64
    cond_dim: int = 32
    n_layers: int = 2
    n_heads: int = 4
    length: int = 32
    dropout: float = 0.0
    mlp_ratio: int = 4
    adaln: bool = True
    rope_base: float = 10_000.0
    frequency_embedding_size: int = 256

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def validate(self) -> None:
        def req(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "length", "mlp_ratio"):
            v = getattr(self, name)
            req(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                f"{name} must be a positive integer, got {v!r}")
        req(self.length <= MAX_LENGTH, f"model length {self.length:,} is larger than esolm accepts ({MAX_LENGTH:,})")
        req(self.hidden_size % self.n_heads == 0,
            f"n_heads ({self.n_heads}) must divide hidden_size ({self.hidden_size})")
        req(self.head_dim % 2 == 0, f"head dimension hidden_size/n_heads = {self.head_dim} must be even for rotary")
        req(0.0 <= float(self.dropout) < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.adaln:
            req(isinstance(self.cond_dim, int) and self.cond_dim > 0,
                f"cond_dim must be positive, got {self.cond_dim!r}")
        if self.mask_id is not None:
            req(0 <= self.mask_id < self.vocab_size,
                f"mask_id {self.mask_id} is outside the vocabulary [0, {self.vocab_size})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
