"""Find a checkpoint (local or on the Hub), read its weights, build the model."""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub import HfApi, constants, snapshot_download
from mlx.utils import tree_flatten

from .backends.cpu import warm
from .model import Model, ModelConfig
from .model import load_config as read_config
from .processing import Processor
from .tuner.adapters import (
    adapter_base_model,
    apply_adapters,
    apply_image_settings,
    read_adapter_config,
)
from .utils.options import DEFAULT_MODEL
from .utils.validation import check_keywords

# Files a checkpoint needs: weights, configs, tokenizer and chat template.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]
# Tokenizer, processor, chat template and generation files travel with converted weights.
SIDE_FILE_PATTERNS = ("*.json", "*.txt", "*.jinja", "tokenizer.model")
NOT_COPIED = {"config.json", "model.safetensors.index.json"}

HUB_TIMEOUT = 10.0  # seconds, unless HF_HUB_ETAG_TIMEOUT says otherwise

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def get_model_path(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, downloading a Hub repo id (needed files only) if required."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; expected a checkpoint directory or a Hub repo id")
        return path
    repo = str(path_or_repo)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise FileNotFoundError(f"{repo} does not exist and is not a Hub repo id (owner/name)")
    try:
        return Path(download(repo, revision))
    except Exception as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise FileNotFoundError(
            f"could not find {repo!r} locally or download it from the Hub ({reason}). Download the "
            "checkpoint where the Hub is reachable and pass its local folder to --model, or "
            "set HF_HUB_OFFLINE=1 to use only what the Hugging Face cache holds"
        ) from e


def hub_timeout() -> float:
    """Seconds to wait for the Hub to connect or answer: HF_HUB_ETAG_TIMEOUT, else 10."""
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_TIMEOUT)
    except ValueError:
        return HUB_TIMEOUT


def download(repo: str, revision: str | None) -> str:
    """The local snapshot of `repo` with the files a checkpoint needs, fetched with timeouts.

    huggingface_hub asks the Hub for the repo's revision with no timeout at all, so the
    same question is asked here first, with one: a silent or unreachable Hub falls back to
    the local cache and otherwise fails within the timeout instead of hanging.
    """
    timeout = hub_timeout()
    # Read at import by huggingface_hub: set here so that file downloads time out too.
    if not os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT"):
        constants.HF_HUB_DOWNLOAD_TIMEOUT = timeout
    if constants.HF_HUB_OFFLINE:
        return snapshot_download(repo, revision=revision, allow_patterns=CHECKPOINT_PATTERNS)
    try:
        HfApi().repo_info(repo, revision=revision, timeout=timeout)
    except Exception as e:
        try:  # what an earlier download left in the cache, if anything
            return snapshot_download(
                repo, revision=revision, allow_patterns=CHECKPOINT_PATTERNS, local_files_only=True
            )
        except Exception:
            raise e from None
    return snapshot_download(
        repo, revision=revision, allow_patterns=CHECKPOINT_PATTERNS, etag_timeout=timeout
    )


def load_weights(model_path: Path) -> dict[str, mx.array]:
    """Read every safetensors shard in `model_path`, naming the file that fails."""
    files = sorted(glob.glob(str(model_path / "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{model_path} has no *.safetensors weight files")
    weights = {}
    for file in files:
        try:
            weights.update(mx.load(file))
        except Exception as e:
            raise ValueError(f"{file}: cannot read safetensors ({e}); is it truncated?") from e
    return weights


def stored_dtype(raw: dict) -> str | None:
    """The float dtype a config.json names (at the top or in text_config), if any."""
    for section in (raw, raw.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            if section.get(key) in DTYPES:
                return section[key]
    return None


def copy_side_files(source: Path, out: Path) -> None:
    """Copy the tokenizer, processor, chat template and generation config files."""
    for pattern in SIDE_FILE_PATTERNS:
        for file in source.glob(pattern):
            if file.is_file() and file.name not in NOT_COPIED:
                shutil.copy2(file, out / file.name)


def resolve_dtype(dtype: str | mx.Dtype | None, stored: str | None = None) -> mx.Dtype:
    """Compute dtype: the user's, else float32 on the CPU backend (its bf16/fp16 kernels are
    several times slower), else the checkpoint's own."""
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if mx.default_device() == mx.cpu or not mx.metal.is_available():
        return mx.float32
    return DTYPES.get(stored or "bfloat16", mx.bfloat16)


def quantize_like(model: Model, config: dict, weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers as the checkpoint's `quantization` config describes them.

    A per-layer entry (`false`, or a dict of `to_quantized` parameters, as mlx-lm and mlx-vlm
    write them) decides for its layer; any other layer is quantized when its `.scales` are
    stored, which also reads checkpoints that list no per-layer entries.
    """
    quantization = config.get("quantization") or config.get("quantization_config")
    if not quantization:
        return
    if "bits" not in quantization or "group_size" not in quantization:
        method = quantization.get("quant_method", "unknown")
        raise ValueError(
            f"quantization config {method!r} is not an MLX one (it needs bits and group_size): "
            "convert the original float checkpoint instead"
        )
    defaults = {
        "group_size": quantization["group_size"],
        "bits": quantization["bits"],
        "mode": quantization.get("mode", "affine"),
    }

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        override = quantization.get(path)
        if isinstance(override, dict):
            return {**defaults, **override}
        if isinstance(override, bool):
            return override
        return f"{path}.scales" in weights

    nn.quantize(model, **defaults, class_predicate=predicate)


def check_weights(model: Model, weights: dict[str, mx.array], model_path: Path) -> None:
    """Fail with the weight's name and both shapes on any missing, extra or mis-shaped weight."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise ValueError(f"{model_path}: missing weights {missing[:8]} ({len(missing)} in all)")
    if extra:
        raise ValueError(f"{model_path}: unexpected weights {extra[:8]} ({len(extra)} in all)")
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise ValueError(
                f"{model_path}: weight {name} has shape {tuple(value.shape)}; "
                f"the config expects {tuple(expected[name].shape)}"
            )


def load_config(path_or_repo: str | Path, revision: str | None = None) -> dict:
    """A checkpoint's config.json as a dict, checked to describe a SmolVLM model (mlx-vlm's
    `load_config`); `load(...)[0].config` holds the parsed `ModelConfig`."""
    return read_config(get_model_path(path_or_repo, revision))[1]


def load_model(
    model_path: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False
) -> Model:
    """Build the model described by `model_path/config.json` and load its weights."""
    model_path = Path(model_path)
    config, raw = read_config(model_path)
    model = Model(config)
    return load_into(model, model.sanitize(load_weights(model_path)), raw, model_path, dtype, lazy)


def load_into(
    model: nn.Module,
    weights: dict[str, mx.array],
    raw: dict,
    model_path: Path,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
) -> nn.Module:
    """Load a checkpoint's (sanitized) `weights` into `model`: quantized layers as its
    config.json describes, every weight checked, floats cast to the compute dtype, eval mode."""
    quantize_like(model, raw, weights)
    check_weights(model, weights, model_path)
    compute = resolve_dtype(dtype, raw.get("torch_dtype") or raw.get("dtype"))
    weights = {
        k: v.astype(compute) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model


def resolve_model(
    path_or_repo: str | Path | None, adapter_path: str | Path | None = None
) -> tuple[str | Path, dict[str, Any]]:
    """The model to load (given, else the adapters' base, else the default) and the
    adapters' training image settings; a given model that differs from the base is reported."""
    if adapter_path is None:
        return path_or_repo or DEFAULT_MODEL, {}
    config = read_adapter_config(adapter_path)
    return adapter_base_model(adapter_path, config, path_or_repo), config.get("image_kwargs") or {}


def load(
    path_or_repo: str | Path | None = None,
    adapter_path: str | Path | None = None,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
    revision: str | None = None,
    **processor_kwargs: Any,
) -> tuple[Model, Any]:
    """Load a SmolVLM checkpoint (local dir or Hub id) and its processor: `(model, processor)`.

    With `adapter_path`, the model defaults to the adapters' recorded base model and the
    processor's image defaults become those the adapters were trained with. Unless `lazy`, the
    backend's one-time work on the weights is done here (`backends.cpu.warm`).
    """
    accepted = ["adapter_path", "dtype", "lazy", "revision"]
    check_keywords(
        "load", processor_kwargs, [*accepted, *(f.name for f in dataclasses.fields(Processor))]
    )
    path_or_repo, settings = resolve_model(path_or_repo, adapter_path)
    model_path = get_model_path(path_or_repo, revision)
    model = load_model(model_path, dtype=dtype, lazy=True)
    if adapter_path is not None:
        apply_adapters(model, adapter_path)
    if not lazy:
        mx.eval(model.parameters())
        warm(model)  # what the backend would do at the first prompt, done now
    processor = Processor.from_pretrained(model_path, **processor_kwargs)
    apply_image_settings(processor.image_processor, settings)
    return model, processor


__all__ = [
    "ModelConfig",
    "get_model_path",
    "load",
    "load_config",
    "load_model",
    "load_weights",
    "resolve_model",
]
