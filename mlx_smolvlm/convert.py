"""Convert a SmolVLM checkpoint to MLX safetensors: cast, quantize or dequantize, shard, and
write it atomically together with its config, tokenizer and processor files."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click
import mlx.core as mx
import mlx.nn as nn
from huggingface_hub import HfApi
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model as mlx_lm_dequantize
from mlx_lm.utils import quantize_model as mlx_lm_quantize
from tqdm import tqdm

from . import __version__
from .loading import DTYPES, copy_side_files, get_model_path, load_model, load_weights, stored_dtype
from .model import ConfigError, Model, load_config
from .utils import atomic
from .utils.options import dtype_option
from .utils.validation import Command

QUANT_BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
MAX_SHARD_BYTES = 5 << 30
# The vision tower and connector stay float unless asked: their error reaches every image
# token, and quantizing them roughly doubles the 4-bit drift (see tests/test_convert.py).
VISION_PREFIXES = ("vision_model.", "connector.")
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


class ConvertError(ValueError):
    """Bad convert input; `param` names the argument at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = "mlx_model",
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    quantize_vision: bool = False,
    dequantize: bool = False,
    upload_repo: str | None = None,
    force: bool = False,
    revision: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Convert `hf_path` (a directory or Hub id) into an MLX checkpoint at `mlx_path`."""
    check_options(dtype, quantize, q_bits, q_group_size, quantize_vision, dequantize, upload_repo)
    target = Path(mlx_path).expanduser()
    source = find_source(hf_path, revision)
    check_target(target, force, source)
    model, raw, dtype = read_model(source, dtype, quantize, dequantize)
    quantization = raw.get("quantization") or raw.get("quantization_config")
    if quantize:
        if quantize_vision and not mx.metal.is_available():
            print(
                "Warning: --quantize-vision: on MLX's CPU backend (no Metal here) quantized "
                "vision layers make image encoding ~50x slower than float ones; quantize only "
                "the language model (the default) for CPU use",
                file=sys.stderr,
            )
        quantization = quantize_model(model, q_group_size, q_bits, quantize_vision)
    elif dequantize:
        dequantize_model(model)
        quantization = None
    config = output_config(raw, model, dtype, quantization)
    write_checkpoint(target, force, model, config, source, str(hf_path), max_shard_bytes)
    if upload_repo:
        upload(target, upload_repo)
    return target


def check_options(
    dtype: str | None,
    quantize: bool,
    q_bits: int,
    q_group_size: int,
    quantize_vision: bool,
    dequantize: bool,
    upload_repo: str | None,
) -> None:
    """Reject unsupported or contradictory options before anything is read or written."""
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError("--dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    if quantize and dequantize:
        raise ConvertError("--dequantize", "cannot be combined with --quantize")
    if quantize and q_bits not in QUANT_BITS:
        raise ConvertError("--q-bits", f"{q_bits} is not one of {QUANT_BITS}")
    if quantize and q_group_size not in GROUP_SIZES:
        raise ConvertError("--q-group-size", f"{q_group_size} is not one of {GROUP_SIZES}")
    if quantize_vision and not quantize:
        raise ConvertError("--quantize-vision", "only applies together with --quantize")
    if upload_repo is not None and not REPO_ID.fullmatch(upload_repo):
        raise ConvertError("--upload-repo", f"{upload_repo!r} is not a Hub repo id (owner/name)")


def check_target(target: Path, force: bool, source: Path) -> None:
    """Refuse an output folder that may not be written (see `utils.atomic`)."""
    atomic.recover(target)
    try:
        atomic.check_target(target, force, source)
    except atomic.TargetError as e:
        raise ConvertError("--mlx-path", str(e)) from e


def find_source(hf_path: str | Path, revision: str | None) -> Path:
    """The source checkpoint directory, downloaded if `hf_path` is a Hub id."""
    try:
        return get_model_path(hf_path, revision)
    except (OSError, ValueError) as e:
        raise ConvertError("--hf-path", str(e)) from e


def read_model(
    source: Path, dtype: str | None, quantize: bool, dequantize: bool
) -> tuple[Model, dict, str]:
    """The source model lazily loaded and cast to `dtype` (default: the checkpoint's own),
    its raw config and the dtype's name; refuses a source the options do not apply to."""
    try:
        _, raw = load_config(source)
        dtype = dtype or source_dtype(source, raw)
        model = load_model(source, dtype=dtype, lazy=True)
    except (OSError, ConfigError, ValueError) as e:
        raise ConvertError("--hf-path", str(e)) from e
    quantized = bool(raw.get("quantization") or raw.get("quantization_config"))
    if quantize and quantized:
        raise ConvertError(
            "--quantize", f"{source} is already quantized; convert it with --dequantize first"
        )
    if dequantize and not quantized:
        raise ConvertError("--dequantize", f"{source} is not quantized")
    return model, raw, dtype


def source_dtype(source: Path, raw: dict) -> str:
    """The checkpoint's float dtype: from config.json, else from its first float tensor."""
    if stored := stored_dtype(raw):
        return stored
    names = {v: k for k, v in DTYPES.items()}
    for value in load_weights(source).values():
        if value.dtype in names:
            return names[value.dtype]
    return "float32"


def quantize_model(model: Model, group_size: int, bits: int, quantize_vision: bool) -> dict:
    """Quantize `model` in place; return the config's `quantization` entry.

    Layers left in float are listed as `false`, which both mlx-lm's and mlx-vlm's loaders
    read as "not quantized" (mlx-vlm's would otherwise guess from the weight size).
    """

    def predicate(path: str, module: nn.Module) -> bool:
        # mlx-lm's wrapper already skips layers whose input dims the group size does not divide.
        return quantize_vision or not path.startswith(VISION_PREFIXES)

    _, config = mlx_lm_quantize(model, {}, group_size, bits, quant_predicate=predicate)
    quantization = config["quantization"]
    for path, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if hasattr(module, "to_quantized"):
            quantization[path] = False
    return quantization


def dequantize_model(model: Model) -> None:
    """Replace quantized layers with float ones in place."""
    mlx_lm_dequantize(model)


def output_config(raw: dict, model: Model, dtype: str, quantization: dict | None) -> dict:
    """The source config.json with the output's dtype and quantization, keys sorted."""
    dropped = {"_name_or_path", "quantization", "quantization_config"}
    config = {k: v for k, v in raw.items() if k not in dropped}
    text = dict(config["text_config"])
    # mlx-vlm reads only a flat rope_theta; transformers 5 writes it under rope_parameters.
    text["rope_theta"] = model.config.text_config.rope_theta
    config["text_config"] = text
    for section in (config, text):
        for key in ("torch_dtype", "dtype"):
            if key in section:
                section[key] = dtype
    config.setdefault("torch_dtype", dtype)
    if quantization:
        # mlx-lm writes both keys; some hub tooling reads only quantization_config.
        config["quantization"] = config["quantization_config"] = quantization
    return dict(sorted(config.items()))


def write_checkpoint(
    target: Path,
    force: bool,
    model: Model,
    config: dict,
    source: Path,
    hf_path: str,
    max_shard_bytes: int,
) -> None:
    """Write weights, config, side files and model card into `target`, all or nothing."""
    try:
        with atomic.model_folder(target, force, source) as tmp:
            write_weights(tmp, model, max_shard_bytes)
            (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")
            copy_side_files(source, tmp)
            write_model_card(tmp, target.name, hf_path, config)
    except atomic.TargetError as e:
        raise ConvertError("--mlx-path", str(e)) from e
    except OSError as e:
        raise ConvertError("--mlx-path", f"cannot write {target}: {e}") from e


def write_weights(out: Path, model: Model, max_shard_bytes: int) -> None:
    """Evaluate (read, cast, quantize) every tensor, then save safetensors shards and an index."""
    weights = dict(tree_flatten(model.parameters()))
    for value in tqdm(weights.values(), desc="Converting", unit="tensor"):
        mx.eval(value)
    shards = make_shards(weights, max_shard_bytes)
    name = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="Writing", unit="shard"), start=1):
        file = name.format(i, len(shards))
        save_shard(out / file, shard)
        weight_map.update(dict.fromkeys(shard, file))
    # mlx-lm and mlx-vlm write the index for a single file too; loaders that read it agree.
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")


def make_shards(weights: dict[str, mx.array], max_bytes: int) -> list[dict[str, mx.array]]:
    """Split weights into groups of at most `max_bytes` (a larger tensor gets a group alone)."""
    shards: list[dict[str, mx.array]] = []
    size = 0
    for key, value in weights.items():
        if not shards or size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    return shards


def save_shard(file: Path, shard: dict[str, mx.array]) -> None:
    """Write one safetensors file, marked as MLX layout like mlx-lm's."""
    mx.save_safetensors(str(file), shard, metadata={"format": "mlx"})


def write_model_card(out: Path, name: str, hf_path: str, config: dict) -> None:
    """A short README.md saying where the weights came from and how to use them."""
    base = "" if Path(hf_path).expanduser().exists() else f"base_model: {hf_path}\n"
    form = dtype = config["torch_dtype"]
    if quantization := config.get("quantization"):
        form = f"{quantization['bits']}-bit, group size {quantization['group_size']}, {dtype}"
    card = f"""---
library_name: mlx
pipeline_tag: image-text-to-text
{base}tags:
- mlx
- smolvlm
---

# {name}

Converted to MLX ({form}) from `{hf_path}` with mlx-smolvlm {__version__}.

```python
from mlx_smolvlm import generate, load

model, processor = load("path/to/this/model")
print(generate(model, processor, "Describe the image.", image=["image.jpg"], max_tokens=128).text)
```
"""
    (out / "README.md").write_text(card)


def upload(path: Path, repo: str) -> None:
    """Create `repo` on the Hub if needed and upload the converted folder."""
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(path), repo_id=repo, repo_type="model")


def _to_int(ctx: click.Context, param: click.Parameter, value: str) -> int:
    return int(value)


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hf-path", required=True, help="Source checkpoint: a local directory or Hub id.")
@click.option("--mlx-path", default="mlx_model", show_default=True, help="Output directory.")
@dtype_option(help="Float dtype of the output (default: the checkpoint's own).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the weights.")
@click.option(
    "--q-bits",
    type=click.Choice([str(b) for b in QUANT_BITS]),
    default="4",
    show_default=True,
    callback=_to_int,
    help="Bits per quantized weight.",
)
@click.option(
    "--q-group-size",
    type=click.Choice([str(g) for g in GROUP_SIZES]),
    default="64",
    show_default=True,
    callback=_to_int,
    help="Weights sharing one scale and bias.",
)
@click.option(
    "--quantize-vision", is_flag=True, help="Quantize the vision tower and connector too."
)
@click.option("--dequantize", is_flag=True, help="Turn a quantized checkpoint back into float.")
@click.option("--upload-repo", default=None, help="Hub repo (owner/name) to upload the result to.")
@click.option("--revision", default=None, help="Hub revision of --hf-path.")
@click.option("--force", is_flag=True, help="Replace an existing --mlx-path.")
def main(**options) -> None:
    """Convert a SmolVLM / Idefics3 checkpoint to MLX."""
    try:
        out = convert(**options)
    except ConvertError as e:
        raise click.BadParameter(e.message, param_hint=f"'{e.param}'") from e
    click.echo(f"Wrote {out}")


if __name__ == "__main__":
    main()
