"""Load ColIdefics3 checkpoints: full weights, or a PEFT LoRA adapter on its base checkpoint."""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from .backbone import get_model_path, load_config, load_into, load_weights, prepare, read_json
from .model import ColIdefics3
from .processing import RetrievalProcessor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def is_adapter(path: Path) -> bool:
    """A PEFT adapter folder: adapter_config.json and no weights but the adapter's."""
    weights = {file.name for file in path.glob("*.safetensors")}
    return (path / ADAPTER_CONFIG).exists() and weights <= {ADAPTER_WEIGHTS}


def read_peft_config(adapter_path: Path) -> dict:
    """adapter_config.json, checked for the LoRA variants this loader applies."""
    file = adapter_path / ADAPTER_CONFIG
    config = read_json(file)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise ValueError(f"{file}: {key}=true adapters are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={config['bias']!r} adapters are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{file}: per-module {key} is not supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{file}: {key} must be a positive number, got {value!r}")
    return config


def load_colidefics3(
    model_path: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False
) -> ColIdefics3:
    """Build a ColIdefics3 from a full checkpoint (colpali-engine's or a converted MLX one)."""
    model_path = Path(model_path)
    config, raw = load_config(model_path)
    weights = load_weights(model_path)
    if "linear.weight" not in weights:
        raise ValueError(
            f"{model_path}: no linear.weight (the retrieval projection): not a ColIdefics3 "
            "checkpoint; a plain SmolVLM model cannot embed pages"
        )
    model = ColIdefics3(config, dim=int(weights["linear.weight"].shape[0]))
    return load_into(model, model.sanitize(weights), raw, model_path, dtype, lazy)


def _module_name(model: ColIdefics3, hf_name: str) -> str:
    """This model's path of the module PEFT names `hf_name` (colpali-engine's naming)."""
    # The weight-name mapping decides: rename a stand-in weight of that module.
    renamed = list(model.sanitize({f"{hf_name}.weight": mx.zeros((1, 1))}))
    if not renamed:
        raise ValueError(f"adapter module {hf_name} has no counterpart in the model")
    return renamed[0][: -len(".weight")]


def apply_peft_adapter(model: ColIdefics3, adapter_path: str | Path) -> ColIdefics3:
    """Wrap the adapter's target layers in LoRA layers holding its matrices (PEFT's scaling)."""
    adapter_path = Path(adapter_path)
    config = read_peft_config(adapter_path)
    file = adapter_path / ADAPTER_WEIGHTS
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: the adapter has no weights")
    try:
        weights = mx.load(str(file))
    except Exception as e:
        raise ValueError(f"{file}: cannot read safetensors ({e})") from e
    pairs: dict[str, dict[str, mx.array]] = {}
    for key, value in weights.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{file}: unsupported adapter weight {key}")
        pairs.setdefault(match[1], {})[match[2]] = value
    if not pairs:
        raise ValueError(f"{file}: the adapter holds no LoRA weights")
    rank = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    layers = dict(model.named_modules())
    wrapped = []
    for hf_name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{file}: {hf_name} lacks lora_A or lora_B")
        path = _module_name(model, hf_name)
        layer = layers.get(path)
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            raise ValueError(f"{file}: adapter target {hf_name} is not a linear layer of the model")
        a, b = pair["A"], pair["B"]
        out_dims = layer.weight.shape[0]
        in_dims = a.shape[1]
        if a.shape[0] != b.shape[1] or b.shape[0] != out_dims:
            raise ValueError(
                f"{file}: {hf_name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"which do not fit the layer's {out_dims} outputs"
            )
        lora = LoRALinear.from_base(layer, r=a.shape[0], scale=scale, dropout=0.0)
        if lora.lora_a.shape[0] != in_dims:
            raise ValueError(f"{file}: {hf_name} lora_A has {in_dims} inputs; the layer has more")
        dtype = model.dtype
        lora.lora_a = a.T.astype(dtype)
        lora.lora_b = b.T.astype(dtype)
        wrapped.append((path, lora))
    model.update_modules(tree_unflatten(wrapped))
    model.eval()
    return model


def fuse_adapter(model: ColIdefics3) -> ColIdefics3:
    """Fold every LoRA layer into a plain (or still quantized) linear layer."""
    fused = [(n, m.fuse()) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def resolve_checkpoint(
    path_or_repo: str | Path,
    adapter_path: str | Path | None = None,
    base: str | Path | None = None,
    revision: str | None = None,
) -> tuple[Path, Path | None, Path]:
    """(weights folder, adapter folder or None, processor folder) for a model argument.

    A PEFT adapter folder (as released: vidore/colSmol-256M) names its base checkpoint in
    `base_model_name_or_path`; `base` overrides it.
    """
    path = get_model_path(path_or_repo, revision)
    if is_adapter(path):
        if adapter_path is not None:
            raise ValueError(f"{path} is itself an adapter; do not pass a second adapter")
        adapter_path = path
    adapter = None if adapter_path is None else get_model_path(adapter_path)
    if adapter is not None and not (adapter / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{adapter / ADAPTER_CONFIG} not found: not a PEFT adapter")
    weights = path
    if adapter is not None and adapter == path:
        base = base or read_peft_config(adapter).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"{adapter / ADAPTER_CONFIG} names no base_model_name_or_path: pass the base"
            )
        weights = get_model_path(base, revision)
    has_processor = all((path / name).exists() for name in PROCESSOR_FILES)
    return weights, adapter, path if has_processor else weights


def load_retriever(
    path_or_repo: str | Path,
    adapter_path: str | Path | None = None,
    base: str | Path | None = None,
    fuse: bool = False,
    dtype: str | mx.Dtype | None = None,
    revision: str | None = None,
) -> tuple[ColIdefics3, RetrievalProcessor]:
    """Load a ColIdefics3 retriever and its processor: `(model, processor)`."""
    weights, adapter, processor_path = resolve_checkpoint(
        path_or_repo, adapter_path, base, revision
    )
    model = load_colidefics3(weights, dtype=dtype, lazy=True)
    if adapter is not None:
        apply_peft_adapter(model, adapter)
        if fuse:
            fuse_adapter(model)
    mx.eval(model.parameters())
    model.model = prepare(model.model)  # the CPU backend's host kernels, where they apply
    return model, RetrievalProcessor.from_pretrained(processor_path)
