"""LoRA adapters: which layers get them, adding them, saving, loading, applying and fusing them.

Adapters are mlx-lm's `LoRALinear` layers (QLoRA when the base layer is quantized), saved as
adapters.safetensors beside adapter_config.json.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from ..utils import atomic
from ..utils.validation import read_json

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
ADAPTER_FORMAT = "mlx-smolvlm-lora"
LINEAR = (nn.Linear, nn.QuantizedLinear)
CONNECTOR_MODULE = "connector.modality_projection.proj"


class AdapterError(ValueError):
    """A missing or unusable adapter directory; the message names the file at fault."""


def parse_targets(target_modules: str | list[str] | tuple[str, ...]) -> list[str] | None:
    """Module names from a comma-separated string; None ("all") means every linear layer."""
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",")]
    targets = [t for t in target_modules if t]
    if not targets or targets == ["all"]:
        return None
    return targets


def select_modules(
    model: nn.Module,
    num_layers: int = -1,
    target_modules: str | list[str] = "all",
    train_vision: bool = False,
) -> list[str]:
    """Paths of the linear layers to put LoRA on: those named by `target_modules` in the
    last `num_layers` decoder blocks (-1: all), and with `train_vision` in every vision
    block plus the connector's projection."""
    decoder = model.language_model.layers
    first = 0 if num_layers < 0 else max(len(decoder) - num_layers, 0)
    blocks = [f"language_model.layers.{i}." for i in range(first, len(decoder))]
    if train_vision:
        vision = model.vision_model.encoder.layers
        blocks += [f"vision_model.encoder.layers.{i}." for i in range(len(vision))]
    candidates = [
        path
        for path, module in model.named_modules()
        if isinstance(module, LINEAR) and path.startswith(tuple(blocks))
    ]
    targets = parse_targets(target_modules)
    paths = candidates
    if targets is not None:
        if unmatched := [t for t in targets if not any(_matches(p, t) for p in candidates)]:
            known = sorted({p.rsplit(".", 1)[-1] for p in candidates})
            raise ValueError(f"--target-modules {unmatched} match no layer; known names: {known}")
        paths = [p for p in candidates if any(_matches(p, t) for t in targets)]
    if train_vision:
        paths.append(CONNECTOR_MODULE)  # the projection into the decoder always adapts
    return sorted(paths)


def _matches(path: str, target: str) -> bool:
    """A target names a module by its last path components ("q_proj", "self_attn.q_proj")."""
    return path == target or path.endswith("." + target)


def lora_parameters(rank: int, alpha: float, dropout: float) -> dict[str, float]:
    """The LoRA hyperparameters as stored in adapter_config.json (scale = alpha / rank)."""
    return {"rank": rank, "alpha": alpha, "scale": alpha / rank, "dropout": dropout}


def add_lora(model: nn.Module, modules: list[str], params: dict[str, Any]) -> None:
    """Wrap the linear layers at `modules` in mlx-lm's LoRALinear (quantized ones too)."""
    found = dict(model.named_modules())
    wrapped = []
    for path in modules:
        layer = found.get(path)
        if not isinstance(layer, LINEAR):
            kind = "missing" if layer is None else type(layer).__name__
            raise ValueError(f"cannot put LoRA on {path}: it is {kind}, not a linear layer")
        lora = LoRALinear.from_base(
            layer,
            r=int(params["rank"]),
            scale=float(params["scale"]),
            dropout=float(params["dropout"]),
        )
        wrapped.append((path, lora))
    model.update_modules(tree_unflatten(wrapped))
    # New modules start in training mode; follow the model's (dropout is off in eval).
    model.train(model.training)


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA matrices of `model`, by parameter path."""
    return {
        name: value
        for name, value in tree_flatten(model.parameters())
        if name.endswith((".lora_a", ".lora_b"))
    }


def save_adapters(model: nn.Module, adapter_path: str | Path, config: dict[str, Any]) -> None:
    """Write adapters.safetensors and adapter_config.json into `adapter_path` atomically."""
    path = Path(adapter_path)
    path.mkdir(parents=True, exist_ok=True)
    atomic.save_safetensors(path / ADAPTER_FILE, adapter_weights(model), {"format": "mlx"})
    atomic.write_json(path / CONFIG_FILE, config)


def read_adapter_config(adapter_path: str | Path) -> dict[str, Any]:
    """adapter_config.json of `adapter_path`, checked for the keys `apply_adapters` needs."""
    path = Path(adapter_path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    file = path / CONFIG_FILE
    if not file.exists():
        raise AdapterError(f"{file} not found: {path} is not an mlx-smolvlm adapter directory")
    config = read_json(file, AdapterError)
    if config.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{file}: not an {ADAPTER_FORMAT} adapter config")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or not {"rank", "scale", "dropout"} <= set(params):
        raise AdapterError(f"{file}: lora_parameters needs rank, scale and dropout")
    if not isinstance(config.get("modules"), list) or not config["modules"]:
        raise AdapterError(f"{file}: 'modules' must list the adapted layers")
    return config


def recorded_base(model: str | Path) -> str:
    """The base model as adapter_config.json records it: an absolute folder, or a Hub repo id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def same_model(a: str | Path, b: str | Path) -> bool:
    """Whether two model names (local folders or Hub repo ids) name the same checkpoint."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return str(a).rstrip("/") == str(b).rstrip("/")


def adapter_base_model(
    adapter_path: str | Path, config: dict[str, Any], model: str | Path | None
) -> str | Path:
    """The model to load under adapters: `model` if given (a differing recorded base is
    reported on stderr), else the base recorded in adapter_config.json."""
    base = config.get("base_model")
    if model is None:
        if not base:
            raise AdapterError(
                f"{Path(adapter_path) / CONFIG_FILE} records no base_model: pass --model"
            )
        return base
    if base and not same_model(model, base):
        print(
            f"Warning: the adapters in {adapter_path} were trained on {base}, "
            f"but --model is {model}",
            file=sys.stderr,
        )
    return model


def apply_image_settings(image_processor: Any, settings: dict[str, Any]) -> None:
    """Make an adapter's training image settings the image processor's defaults."""
    if "do_image_splitting" in settings:
        image_processor.do_image_splitting = bool(settings["do_image_splitting"])
    if settings.get("longest_edge") is not None:
        image_processor.size = {"longest_edge": int(settings["longest_edge"])}
    if settings.get("max_tiles") is not None:
        image_processor.max_tiles = int(settings["max_tiles"])
    if "upscale" in settings:
        image_processor.upscale = bool(settings["upscale"])


def load_adapter_weights(model: nn.Module, file: Path) -> None:
    """Load LoRA matrices from `file`, requiring exactly the model's adapter parameters."""
    if not file.exists():
        raise AdapterError(f"{file} not found")
    try:
        weights = mx.load(str(file))
    except Exception as e:  # mlx raises a bare RuntimeError/ValueError on bad files
        raise AdapterError(f"{file}: cannot read safetensors ({e})") from e
    expected = adapter_weights(model)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise AdapterError(
            f"{file} does not fit {CONFIG_FILE}: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise AdapterError(
                f"{file}: {name} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )
    model.load_weights(list(weights.items()), strict=False)


def apply_adapters(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Wrap the layers named in adapter_config.json with LoRA and load adapters.safetensors."""
    config = read_adapter_config(adapter_path)
    try:
        add_lora(model, config["modules"], config["lora_parameters"])
    except ValueError as e:
        raise AdapterError(f"{Path(adapter_path) / CONFIG_FILE}: {e}") from e
    load_adapter_weights(model, Path(adapter_path) / ADAPTER_FILE)
    return model


def fuse_lora(model: nn.Module, dequantize: bool = False) -> None:
    """Replace every LoRA layer by a plain (or re-quantized) linear layer."""
    fused = [
        (name, m.fuse(dequantize=dequantize))
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
