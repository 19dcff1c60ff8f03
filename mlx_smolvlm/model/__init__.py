"""The SmolVLM / Idefics3 model in pure MLX: config, vision tower, connector, decoder, the joined model."""

from .config import ConfigError, ModelConfig, TextConfig, VisionConfig, load_config
from .model import Model

__all__ = ["ConfigError", "Model", "ModelConfig", "TextConfig", "VisionConfig", "load_config"]
