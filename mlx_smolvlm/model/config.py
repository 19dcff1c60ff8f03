"""Model configuration read from a checkpoint's config.json (idefics3 and smolvlm)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("idefics3", "smolvlm")


class ConfigError(ValueError):
    """A config.json that cannot describe a SmolVLM model."""


def _from_dict(cls, params: dict, source: str, section: str):
    """Build dataclass `cls` from `params`, ignoring unknown keys and naming missing ones."""
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in params.items() if k in names}
    for f in fields(cls):
        if f.metadata.get("required") and f.name not in kwargs:
            raise ConfigError(f"{source}: missing required key '{section}{f.name}'")
    return cls(**kwargs)


def _required() -> Any:
    return field(default=None, metadata={"required": True})


@dataclass
class VisionConfig:
    """SigLIP vision tower as used by Idefics3/SmolVLM."""

    hidden_size: int = _required()
    intermediate_size: int = _required()
    num_hidden_layers: int = _required()
    num_attention_heads: int = _required()
    image_size: int = _required()
    patch_size: int = _required()
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """SmolLM2 (Llama) decoder."""

    hidden_size: int = _required()
    intermediate_size: int = _required()
    num_hidden_layers: int = _required()
    num_attention_heads: int = _required()
    vocab_size: int = _required()
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_traditional: bool = False
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class ModelConfig:
    """The joined model: vision tower, connector and decoder."""

    model_type: str
    vision_config: VisionConfig
    text_config: TextConfig
    image_token_id: int
    scale_factor: int
    quantization: dict | None = None

    @property
    def image_seq_len(self) -> int:
        """Number of `<image>` tokens (features) per tile."""
        return self.vision_config.patches_per_side**2 // self.scale_factor**2

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> ModelConfig:
        """Read a config dict as found in an HF or mlx-community checkpoint."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type is {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        for key in ("vision_config", "text_config", "image_token_id", "scale_factor"):
            if key not in config:
                raise ConfigError(f"{source}: missing required key '{key}'")
        vision = _from_dict(VisionConfig, config["vision_config"], source, "vision_config.")
        text_params = dict(config["text_config"])
        # transformers 5 writes rope_parameters instead of the flat rope_theta of older checkpoints.
        rope_parameters = text_params.get("rope_parameters") or {}
        if "rope_theta" not in text_params and "rope_theta" in rope_parameters:
            text_params["rope_theta"] = rope_parameters["rope_theta"]
        if rope_parameters.get("rope_type", "default") != "default" and not text_params.get(
            "rope_scaling"
        ):
            text_params["rope_scaling"] = rope_parameters
        text = _from_dict(TextConfig, text_params, source, "text_config.")
        model = cls(
            model_type=model_type,
            vision_config=vision,
            text_config=text,
            image_token_id=config["image_token_id"],
            scale_factor=config["scale_factor"],
            quantization=config.get("quantization"),
        )
        patches = vision.patches_per_side
        if patches % model.scale_factor:
            raise ConfigError(
                f"{source}: scale_factor {model.scale_factor} does not divide the "
                f"{patches}x{patches} patch grid"
            )
        return model


def load_config(model_path: str | Path) -> tuple[ModelConfig, dict]:
    """Read `model_path/config.json`; return the parsed config and the raw dict."""
    path = Path(model_path) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a SmolVLM checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e
    return ModelConfig.from_dict(raw, source=str(path)), raw
