"""esolm: Esoteric Language Models (Eso-LMs) — masked diffusion and autoregression in one transformer."""

from esolm.config import ModelConfig
from esolm.errors import CheckpointError, ConfigError, EsoLMError, UserError
from esolm.model.backbone import DiT

__all__ = ["DiT", "ModelConfig", "EsoLMError", "ConfigError", "CheckpointError", "UserError"]
__version__ = "0.1.0"
