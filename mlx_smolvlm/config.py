"""Model configuration read from a checkpoint's config.json (idefics3 and smolvlm)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("idefics3", "smolvlm")


class ConfigError(ValueError):
    """A config.json that cannot describe a SmolVLM model."""


def _from_dict(cls, params: Any, source: str, section: str):
    """Build dataclass `cls` from `params`, ignoring unknown keys and naming missing or mistyped ones."""
    if not isinstance(params, dict):
        raise ConfigError(
            f"{source}: '{section.rstrip('.')}' must be an object, not {_kind(params)}"
        )
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in params.items() if k in names}
    for f in fields(cls):
        if f.metadata.get("required") and f.name not in kwargs:
            raise ConfigError(f"{source}: missing required key '{section}{f.name}'")
        if f.name in kwargs:
            _check_value(kwargs[f.name], str(f.type), source, section + f.name)
    return cls(**kwargs)


def _kind(value: Any) -> str:
    """How a JSON value is called in an error message."""
    return "null" if value is None else type(value).__name__


def _check_value(value: Any, annotation: str, source: str, key: str) -> None:
    """A config value against its field's annotation: sizes are positive integers, numbers finite."""
    if value is None and "None" in annotation:
        return
    kind = annotation.split(" | ")[0]
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        expected = "a positive integer"
    elif kind == "float":
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        )
        expected = "a finite number >= 0"
    elif kind in ("str", "bool", "dict"):
        ok = isinstance(value, {"str": str, "bool": bool, "dict": dict}[kind])
        expected = {"str": "a string", "bool": "true or false", "dict": "an object"}[kind]
    else:
        return
    if not ok:
        raise ConfigError(f"{source}: '{key}' must be {expected}, not {value!r:.40}")


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
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: must hold a JSON object, not {_kind(config)}")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type is {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        for key in ("vision_config", "text_config", "image_token_id", "scale_factor"):
            if key not in config:
                raise ConfigError(f"{source}: missing required key '{key}'")
        vision = _from_dict(VisionConfig, config["vision_config"], source, "vision_config.")
        if not isinstance(config["text_config"], dict):
            raise ConfigError(
                f"{source}: 'text_config' must be an object, not {_kind(config['text_config'])}"
            )
        text_params = dict(config["text_config"])
        # transformers 5 writes rope_parameters instead of the flat rope_theta of older checkpoints.
        rope_parameters = text_params.get("rope_parameters")
        rope_parameters = rope_parameters if isinstance(rope_parameters, dict) else {}
        if "rope_theta" not in text_params and "rope_theta" in rope_parameters:
            text_params["rope_theta"] = rope_parameters["rope_theta"]
        if rope_parameters.get("rope_type", "default") != "default" and not text_params.get(
            "rope_scaling"
        ):
            text_params["rope_scaling"] = rope_parameters
        text = _from_dict(TextConfig, text_params, source, "text_config.")
        _check_value(config["scale_factor"], "int", source, "scale_factor")
        image_token = config["image_token_id"]
        if isinstance(image_token, bool) or not isinstance(image_token, int) or image_token < 0:
            raise ConfigError(f"{source}: 'image_token_id' must be a token id, not {image_token!r}")
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
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e
    return ModelConfig.from_dict(raw, source=str(path)), raw
