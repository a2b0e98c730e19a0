"""esolm: Esoteric Language Models (Eso-LMs) — masked diffusion and autoregression in one transformer."""

from .backbone import DiT
from .config import ConfigError, ModelConfig

__all__ = ["DiT", "ModelConfig", "ConfigError"]
__version__ = "0.1.0"
