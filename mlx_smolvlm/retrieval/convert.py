"""Write a ColIdefics3 retriever (adapter fused in, optionally quantized) as an MLX checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model

from .backbone import atomic, load_config
from .loading import apply_peft_adapter, fuse_adapter, load_colidefics3, resolve_checkpoint

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# The vision tower and connector stay in float: quantizing them costs accuracy for little memory.
FLOAT_PREFIXES = ("model.vision_model", "model.connector")
SIDE_FILES = ("*.json", "*.txt", "*.jinja")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "adapter_config.json"}


def convert_retriever(
    model: str | Path,
    mlx_path: str | Path,
    adapter_path: str | Path | None = None,
    base: str | Path | None = None,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    force: bool = False,
) -> Path:
    """Load (base + adapter, fused), cast, quantize and write `mlx_path`; return it."""
    target = Path(mlx_path)
    weights_dir, adapter, processor_dir = resolve_checkpoint(model, adapter_path, base)
    for source in {processor_dir, adapter or weights_dir}:  # the weights' folder: model_folder
        atomic.check_target(target, force, source, "--mlx-path")
    _, raw = load_config(weights_dir)
    dtype = dtype or raw.get("torch_dtype") or raw.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    retriever = load_colidefics3(weights_dir, dtype=DTYPES[dtype], lazy=True)
    if adapter is not None:
        fuse_adapter(apply_peft_adapter(retriever, adapter))
    config = {k: v for k, v in raw.items() if k not in ("quantization", "quantization_config")}
    config.update(architectures=["ColIdefics3"], torch_dtype=dtype, embedding_dim=retriever.dim)
    if quantize:

        def predicate(path: str, module: nn.Module) -> bool:
            return not path.startswith(FLOAT_PREFIXES)

        _, quantized = quantize_model(
            retriever, {}, q_group_size, q_bits, quant_predicate=predicate
        )
        config["quantization"] = config["quantization_config"] = quantized["quantization"]
    with atomic.model_folder(target, force, weights_dir, option="--mlx-path") as tmp:
        weights = dict(tree_flatten(retriever.parameters()))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4) + "\n")
        for pattern in SIDE_FILES:
            for file in processor_dir.glob(pattern):
                if file.is_file() and file.name not in NOT_COPIED:
                    shutil.copy2(file, tmp / file.name)
    return target
