"""Model configuration read from a checkpoint's config.json (idefics3 and smolvlm)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("idefics3", "smolvlm")


class ConfigError(ValueError):
    """A config.json that cannot describe a SmolVLM model."""


def _check_value(name: str, value: Any, kind: Any, source: str) -> Any:
    """`value` if it has the type `kind` asks for (positive for numbers), else a ConfigError naming `name`."""
    optional = kind is None or (isinstance(kind, tuple) and type(None) in kind)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{name}' is null; expected {_KIND_NAMES[kind]}")
    kind = kind[0] if isinstance(kind, tuple) else kind
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(f"{source}: '{name}' is {value!r}; expected {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {
    int: "a positive integer",
    float: "a positive number",
    bool: "true or false",
    str: "a string",
    dict: "an object",
}


def _from_dict(cls, params: Any, source: str, section: str):
    """Build dataclass `cls` from `params`: absent keys take the defaults, present ones are checked."""
    if not isinstance(params, dict):
        name = section.rstrip(".")
        raise ConfigError(f"{source}: '{name}' is {params!r}; expected an object")
    kwargs = {}
    for f in fields(cls):
        if f.name in params and "kind" in f.metadata:
            kwargs[f.name] = _check_value(
                section + f.name, params[f.name], f.metadata["kind"], source
            )
    return cls(**kwargs)


def _key(default: Any, kind: Any) -> Any:
    """A config key with transformers' default and the type its value must have."""
    return field(default=default, metadata={"kind": kind})


@dataclass
class VisionConfig:
    """SigLIP vision tower as used by Idefics3/SmolVLM; defaults are transformers'
    Idefics3VisionConfig / SmolVLMVisionConfig ones (hub configs leave default keys out)."""

    hidden_size: int = _key(1152, int)
    intermediate_size: int = _key(3072, int)
    num_hidden_layers: int = _key(12, int)
    num_attention_heads: int = _key(16, int)
    image_size: int = _key(224, int)
    patch_size: int = _key(32, int)
    num_channels: int = _key(3, int)
    layer_norm_eps: float = _key(1e-6, float)
    hidden_act: str = _key("gelu_pytorch_tanh", str)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """SmolLM2 (Llama) decoder; defaults are transformers' LlamaConfig ones."""

    hidden_size: int = _key(4096, int)
    intermediate_size: int = _key(11008, int)
    num_hidden_layers: int = _key(32, int)
    num_attention_heads: int = _key(32, int)
    vocab_size: int = _key(32000, int)
    num_key_value_heads: int | None = _key(None, (int, type(None)))
    head_dim: int | None = _key(None, (int, type(None)))
    rms_norm_eps: float = _key(1e-6, float)
    rope_theta: float = _key(10000.0, float)
    rope_scaling: dict | None = _key(None, (dict, type(None)))
    rope_traditional: bool = False
    max_position_embeddings: int = _key(2048, int)
    tie_word_embeddings: bool = _key(False, bool)
    attention_bias: bool = _key(False, bool)
    mlp_bias: bool = _key(False, bool)
    hidden_act: str = _key("silu", str)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


# What the model implements; other values are refused rather than computed wrongly.
SUPPORTED_ACTIVATIONS = {
    "vision_config.hidden_act": ("gelu_pytorch_tanh",),
    "text_config.hidden_act": ("silu",),
}


@dataclass
class ModelConfig:
    """The joined model: vision tower, connector and decoder."""

    model_type: str
    vision_config: VisionConfig
    text_config: TextConfig
    image_token_id: int = 128257
    scale_factor: int = 2
    quantization: dict | None = None

    @property
    def image_seq_len(self) -> int:
        """Number of `<image>` tokens (features) per tile."""
        return self.vision_config.patches_per_side**2 // self.scale_factor**2

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> ModelConfig:
        """Read a config dict as found in an HF or mlx-community checkpoint.

        Keys the hub leaves out take transformers' defaults (Idefics3Config / SmolVLMConfig,
        their vision configs and LlamaConfig); keys present with a wrong type, null or a
        non-positive size raise a ConfigError naming the key. Unknown keys are ignored.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type is {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        vision = _from_dict(VisionConfig, config.get("vision_config", {}), source, "vision_config.")
        text = _from_dict(TextConfig, _text_params(config, source), source, "text_config.")
        quantization = config.get("quantization")
        model = cls(
            model_type=model_type,
            vision_config=vision,
            text_config=text,
            image_token_id=_check_value(
                "image_token_id", config.get("image_token_id", 128257), int, source
            ),
            scale_factor=_check_value("scale_factor", config.get("scale_factor", 2), int, source),
            quantization=_check_value("quantization", quantization, (dict, type(None)), source),
        )
        _check_geometry(model, source)
        return model


def _text_params(config: dict, source: str) -> dict:
    """text_config with the keys that transformers 4 and 5 spell differently made flat."""
    if "text_config" not in config:
        # Idefics3Config / SmolVLMConfig build a default LlamaConfig with rms_norm_eps 1e-5.
        params: Any = {"rms_norm_eps": 1e-5}
    else:
        params = config["text_config"]
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: 'text_config' is {params!r}; expected an object")
    params = dict(params)
    text_type = params.get("model_type", "llama")
    if text_type != "llama":
        raise ConfigError(
            f"{source}: text_config.model_type is {text_type!r}; only 'llama' decoders are supported"
        )
    # transformers 5 writes rope_parameters instead of the flat rope_theta / rope_scaling.
    rope = params.get("rope_parameters")
    if rope is not None:
        _check_value("text_config.rope_parameters", rope, dict, source)
        if "rope_theta" not in params and "rope_theta" in rope:
            params["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and not params.get("rope_scaling"):
            params["rope_scaling"] = rope
    # transformers 5 ties the head by the top-level key; checkpoints of 4.x by text_config's.
    if "tie_word_embeddings" in params:
        _check_value("text_config.tie_word_embeddings", params["tie_word_embeddings"], bool, source)
    if "tie_word_embeddings" in config:
        tie = _check_value("tie_word_embeddings", config["tie_word_embeddings"], bool, source)
        params["tie_word_embeddings"] = tie
    return params


def _check_geometry(model: ModelConfig, source: str) -> None:
    """Sizes that must divide each other, and activations the model implements."""
    vision, text = model.vision_config, model.text_config
    for name, value in (
        ("vision_config.hidden_act", vision.hidden_act),
        ("text_config.hidden_act", text.hidden_act),
    ):
        if value not in SUPPORTED_ACTIVATIONS[name]:
            raise ConfigError(
                f"{source}: '{name}' is {value!r}; supported: {SUPPORTED_ACTIVATIONS[name]}"
            )
    checks = [
        ("vision_config.hidden_size", vision.hidden_size, vision.num_attention_heads),
        ("text_config.num_attention_heads", text.num_attention_heads, text.num_key_value_heads),
    ]
    for name, value, divisor in checks:
        if value % divisor:
            raise ConfigError(f"{source}: '{name}' ({value}) is not a multiple of {divisor}")
    if text.head_dim == 0:
        raise ConfigError(
            f"{source}: 'text_config.hidden_size' ({text.hidden_size}) is smaller than "
            f"num_attention_heads ({text.num_attention_heads}) and no head_dim is given"
        )
    if vision.patch_size > vision.image_size:
        raise ConfigError(
            f"{source}: 'vision_config.patch_size' ({vision.patch_size}) exceeds image_size "
            f"({vision.image_size})"
        )
    patches = vision.patches_per_side
    if patches % model.scale_factor:
        raise ConfigError(
            f"{source}: scale_factor {model.scale_factor} does not divide the "
            f"{patches}x{patches} patch grid"
        )


def load_config(model_path: str | Path) -> tuple[ModelConfig, dict]:
    """Read `model_path/config.json`; return the parsed config and the raw dict."""
    path = Path(model_path) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a SmolVLM checkpoint directory")
    # Not utils.validation.read_json: the model package imports nothing outside itself.
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e
    return ModelConfig.from_dict(raw, source=str(path)), raw
