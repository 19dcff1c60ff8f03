"""Merge LoRA adapters into their base model: `python -m mlx_smolvlm.fuse`.

The result is a standalone checkpoint (config, tokenizer and processor files, safetensors in
this package's weight layout) that `mlx_smolvlm.load` reads without the adapters. Fusing
happens in float32; a quantized base is re-quantized with its own settings (an
approximation of base + adapters) unless `--dequantize` writes float weights instead.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.utils import dequantize_model

from .config import load_config
from .loading import DTYPES, get_model_path, load_model, resolve_model
from .lora import AdapterError, apply_adapters

# Tokenizer, processor, chat template and generation files travel with the weights.
SIDE_FILES = ("*.json", "*.txt", "*.jinja", "tokenizer.model")
NOT_COPIED = {"config.json", "model.safetensors.index.json"}


def fuse_lora(model: nn.Module, dequantize: bool = False) -> None:
    """Replace every LoRA layer by a plain (or re-quantized) linear layer."""
    fused = [
        (name, m.fuse(dequantize=dequantize))
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))


def stored_dtype(raw: dict) -> str:
    """The checkpoint's float dtype as its config.json names it (float32 when it does not)."""
    for section in (raw, raw.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            if section.get(key) in DTYPES:
                return section[key]
    return "float32"


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
    if target.exists() and not force:
        raise FileExistsError(f"--save-path {target} already exists; pass --force to replace it")
    model, settings = resolve_model(model, adapter_path)
    source = get_model_path(model)
    _, raw = load_config(source)
    if dequantize and not (raw.get("quantization") or raw.get("quantization_config")):
        raise ValueError(f"--dequantize: {source} is not quantized")
    dtype = dtype or stored_dtype(raw)
    vlm = load_model(source, dtype="float32")
    apply_adapters(vlm, adapter_path)
    fuse_lora(vlm, dequantize)
    if dequantize:
        dequantize_model(vlm)
    weights = tree_map(
        lambda v: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v,
        dict(tree_flatten(vlm.parameters())),
    )
    with staging(target) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        config = output_config(raw, dtype, dequantize)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(source, tmp)
        write_image_settings(tmp / "preprocessor_config.json", settings)
    return target


def write_image_settings(file: Path, settings: dict) -> None:
    """Record an adapter's training image settings as the preprocessor config's defaults."""
    if not settings or not file.exists():
        return
    config = json.loads(file.read_text())
    if "do_image_splitting" in settings:
        config["do_image_splitting"] = bool(settings["do_image_splitting"])
    if settings.get("longest_edge") is not None:
        config["size"] = {"longest_edge": int(settings["longest_edge"])}
    for key in ("max_tiles", "upscale"):
        if settings.get(key) is not None:
            config[key] = settings[key]
    file.unlink()  # the copy may be read-only, as the source was
    file.write_text(json.dumps(config, indent=2) + "\n")


@contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A temporary directory beside `target` that replaces `target` when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so the same filesystem: the renames are atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        tmp.rename(target)
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old)


def copy_side_files(source: Path, out: Path) -> None:
    """Copy the tokenizer, processor, chat template and generation config files."""
    for pattern in SIDE_FILES:
        for file in source.glob(pattern):
            if file.is_file() and file.name not in NOT_COPIED:
                shutil.copy2(file, out / file.name)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    default=None,
    help="The base model [default: the one recorded in the adapters' adapter_config.json].",
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
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default=None,
    help="Float dtype of the output (default: the base's).",
)
@click.option("--force", is_flag=True, help="Replace an existing --save-path.")
def main(**options) -> None:
    """Fuse LoRA adapters into a SmolVLM model and save a standalone checkpoint."""
    try:
        out = fuse(**options)
    except (AdapterError, FileNotFoundError, FileExistsError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"Wrote {out}")


if __name__ == "__main__":
    main()
