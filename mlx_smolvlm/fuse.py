"""Merge LoRA adapters into their base model: `python -m mlx_smolvlm.fuse`.

The result is a standalone checkpoint (config, tokenizer and processor files, safetensors in
this package's weight layout) that `mlx_smolvlm.load` reads without the adapters. Fusing
happens in float32; a quantized base is re-quantized with its own settings (an
approximation of base + adapters) unless `--dequantize` writes float weights instead.
"""

from __future__ import annotations

from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import dequantize_model

from .loading import (
    DTYPES,
    copy_side_files,
    get_model_path,
    load_model,
    resolve_model,
    stored_dtype,
)
from .model import load_config
from .tuner.adapters import AdapterError, apply_adapters, fuse_lora
from .utils import atomic
from .utils.options import dtype_option, model_option
from .utils.validation import Command, read_json


def output_config(raw: dict, dtype: str, dequantize: bool) -> dict:
    """The base config.json with the output's dtype, without quantization when dequantized."""
    config = {k: v for k, v in raw.items() if k != "_name_or_path"}
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    config.pop("dtype", None)
    return config


def fuse(
    model: str | Path | None,
    adapter_path: str | Path,
    save_path: str | Path,
    dequantize: bool = False,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Write base model + adapters as one checkpoint at `save_path`; return its path.

    `model` defaults to the adapters' recorded base; the image settings the adapters were
    trained with become the output's preprocessor defaults.
    """
    target = Path(save_path).expanduser()
    model, settings = resolve_model(model, adapter_path)
    source = get_model_path(model)
    atomic.recover(target)
    atomic.check_target(target, force, source, "--save-path")
    _, raw = load_config(source)
    if dequantize and not (raw.get("quantization") or raw.get("quantization_config")):
        raise ValueError(f"--dequantize: {source} is not quantized")
    dtype = dtype or stored_dtype(raw) or "float32"
    vlm = load_model(source, dtype="float32")
    apply_adapters(vlm, adapter_path)
    fuse_lora(vlm, dequantize)
    if dequantize:
        dequantize_model(vlm)
    weights = tree_map(
        lambda v: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v,
        dict(tree_flatten(vlm.parameters())),
    )
    with atomic.model_folder(target, force, source, "--save-path") as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        atomic.write_json(tmp / "config.json", output_config(raw, dtype, dequantize))
        copy_side_files(source, tmp)
        write_image_settings(tmp / "preprocessor_config.json", settings)
    return target


def write_image_settings(file: Path, settings: dict) -> None:
    """Record an adapter's training image settings as the preprocessor config's defaults."""
    if not settings or not file.exists():
        return
    config = read_json(file)
    if "do_image_splitting" in settings:
        config["do_image_splitting"] = bool(settings["do_image_splitting"])
    if settings.get("longest_edge") is not None:
        config["size"] = {"longest_edge": int(settings["longest_edge"])}
    for key in ("max_tiles", "upscale"):
        if settings.get(key) is not None:
            config[key] = settings[key]
    atomic.write_json(file, config)


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@model_option(
    help="The base model [default: the one recorded in the adapters' adapter_config.json].",
    default=None,
)
@click.option(
    "--adapter-path",
    required=True,
    help="Directory with adapters.safetensors and adapter_config.json.",
)
@click.option(
    "--save-path", default="fused_model", show_default=True, help="Output checkpoint directory."
)
@click.option(
    "--dequantize", is_flag=True, help="Write float weights for a quantized base (exact fusion)."
)
@dtype_option(help="Float dtype of the output (default: the base's).")
@click.option("--force", is_flag=True, help="Replace an existing --save-path.")
def main(**options) -> None:
    """Fuse LoRA adapters into a SmolVLM model and save a standalone checkpoint."""
    try:
        out = fuse(**options)
    except (AdapterError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:
        raise click.ClickException(f"cannot write {options['save_path']}: {e}") from e
    click.echo(f"Wrote {out}")


if __name__ == "__main__":
    main()
