"""`python -m mlx_smolvlm.random_checkpoint CONFIG_DIR OUT`: a random-weight checkpoint.

Builds the model that CONFIG_DIR's config.json describes with transformers (the reference
implementation), gives it random weights and saves it in the Hugging Face layout with
CONFIG_DIR's tokenizer, processor and chat-template files, so that every command of this
package can be tried offline (the answers are gibberish). Needs torch and transformers
(`pip install -e ".[test]"`). The tests and benchmarks build their checkpoints here too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click

from .utils import atomic
from .utils.options import dtype_option
from .utils.validation import Command, read_json

# Files of a checkpoint that travel with random weights (config.json is written by transformers).
SIDE_SUFFIXES = (".json", ".txt", ".jinja")
# A shrunk shape for quick trials: the family's patch geometry, tiny widths and depths.
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}
TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
MISSING_TORCH = (
    "random_checkpoint needs torch and transformers (the reference implementation): "
    "pip install torch transformers, or pip install -e '.[test]'"
)


def hf_model(config: dict, seed: int = 0) -> Any:
    """A float32 transformers model with random weights large enough to make logits distinct."""
    import torch  # optional dependency: only this module and the tests need it
    import transformers

    name = "Idefics3" if config["model_type"] == "idefics3" else "SmolVLM"
    hf_config = getattr(transformers, f"{name}Config")(**config)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(hf_config).float().eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.ndim == 1 and "norm" in pname:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif param.ndim == 1:
                param.copy_(0.02 * torch.randn_like(param))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn_like(param) / fan_in**0.5)
    return model


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Place a checkpoint's tokenizer, processor and template files (not config.json) in `dst`."""
    for file in Path(src).iterdir():
        if file.is_file() and file.name != "config.json" and file.suffix in SIDE_SUFFIXES:
            shutil.copyfile(file, Path(dst) / file.name)


def shrink(config: dict, tiny: bool = False, layers: int | None = None) -> dict:
    """`config` with tiny widths (`tiny`) and/or `layers` blocks in the decoder and vision tower."""
    config = json.loads(json.dumps(config))
    if tiny:
        config["text_config"].update(TINY_TEXT)
        config["vision_config"].update(TINY_VISION)
    if layers is not None:
        config["text_config"]["num_hidden_layers"] = layers
        config["vision_config"]["num_hidden_layers"] = layers
    return config


def save_random_checkpoint(
    config_dir: str | Path,
    out: str | Path,
    seed: int = 0,
    layers: int | None = None,
    tiny: bool = False,
    dtype: str = "float32",
    force: bool = False,
) -> Path:
    """Write a random-weight checkpoint of `config_dir`'s model to `out`; return `out`."""
    config_dir, out = Path(config_dir).expanduser(), Path(out).expanduser()
    file = config_dir / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: CONFIG_DIR must hold a model's config.json")
    if not (config_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{config_dir / 'tokenizer.json'} not found: no tokenizer to copy")
    config = read_json(file)
    if config.get("model_type") not in ("idefics3", "smolvlm"):
        raise ValueError(f"{file}: model_type {config.get('model_type')!r} is not idefics3/smolvlm")
    if layers is not None and layers < 1:
        raise ValueError(f"--layers must be at least 1, got {layers}")
    atomic.check_target(out, force, config_dir, "OUT")
    try:
        import torch  # optional dependency
        import transformers  # noqa: F401  (optional dependency)
    except ImportError as e:
        raise ImportError(MISSING_TORCH) from e
    model = hf_model(shrink(config, tiny, layers), seed)
    model = model.to(getattr(torch, dtype))
    with atomic.model_folder(out, force, config_dir, "OUT") as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(config_dir, tmp)
    return out


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights.")
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    default=None,
    help="Blocks in the decoder and the vision tower (default: the config's).",
)
@click.option("--tiny", is_flag=True, help="Tiny widths (64) and 2 layers: seconds, not minutes.")
@dtype_option(help="dtype of the saved weights.", default="float32")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
def main(config_dir, out, seed, layers, tiny, dtype, force) -> None:
    """Write a random-weight checkpoint of CONFIG_DIR's model (config and tokenizer) to OUT."""
    try:
        path = save_random_checkpoint(config_dir, out, seed, layers, tiny, dtype, force)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"Wrote a random-weight checkpoint to {path}")


if __name__ == "__main__":
    main()
