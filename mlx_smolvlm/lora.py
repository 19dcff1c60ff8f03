"""`python -m mlx_smolvlm.lora`: fine-tune LoRA adapters (QLoRA when the model is quantized).

`run_training` is what the command does: read and check the data, load the model, add LoRA,
train (`tuner.trainer`), save. `load(..., adapter_path=...)` puts the adapters back on a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import mlx.core as mx
from mlx.utils import tree_flatten

from .loading import get_model_path, load_model
from .processing.processor import Processor
from .tuner.adapters import (
    ADAPTER_FORMAT,
    AdapterError,
    add_lora,
    lora_parameters,
    recorded_base,
    select_modules,
)
from .tuner.datasets import TrainingError, data_files, load_dataset, warn_upscaled_images
from .tuner.trainer import (
    DEFAULT_ITERS,
    SCHEDULES,
    TrainingArgs,
    check_resumable,
    train,
)
from .tuner.trainer import learning_rate as learning_rate_schedule
from .utils import distributed
from .utils.options import dtype_option, image_kwargs, model_option, tiling_options
from .utils.validation import MAX_SEED, Command, check_image_kwargs, check_int


def run_training(
    model: str,
    data: str,
    valid_data: str | None = None,
    iters: int | None = None,
    epochs: int | None = None,
    batch_size: int = 4,
    learning_rate: float = 1e-4,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_layers: int = -1,
    target_modules: str = "all",
    train_vision: bool = False,
    grad_checkpoint: bool = False,
    max_seq_length: int = 2048,
    save_every: int = 100,
    resume: bool = False,
    adapter_path: str = "adapters",
    seed: int = 0,
    steps_per_eval: int = 100,
    val_batches: int = 25,
    train_on_all: bool = False,
    dtype: str | None = None,
    no_image_splitting: bool = False,
    longest_edge: int | None = None,
    max_tiles: int | None = None,
    grad_accumulation: int = 1,
    lr_schedule: str = "constant",
    warmup: int = 0,
    compile: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Everything `python -m mlx_smolvlm.lora` does: check data, add LoRA, train, save."""
    if iters is not None and epochs is not None:
        raise TrainingError("give --iters or --epochs, not both")
    kwargs = image_kwargs(no_image_splitting, longest_edge, max_tiles)
    path = get_model_path(model)
    processor = Processor.from_pretrained(path)
    train_file, valid_file = data_files(data, valid_data)
    train_set = load_dataset(train_file, processor, max_seq_length, kwargs, train_on_all)
    valid_set = (
        load_dataset(valid_file, processor, max_seq_length, kwargs, train_on_all)
        if valid_file
        else []
    )
    warn_upscaled_images(train_set, processor)
    vlm = load_model(path, dtype=dtype)
    config = {
        "format": ADAPTER_FORMAT,
        "fine_tune_type": "lora",
        "base_model": recorded_base(model),
        "lora_parameters": lora_parameters(lora_rank, lora_alpha, lora_dropout),
        "modules": select_modules(vlm, lora_layers, target_modules, train_vision),
        "num_layers": lora_layers,
        "target_modules": target_modules,
        "train_vision": train_vision,
        "train_on_all": train_on_all,
        "max_seq_length": max_seq_length,
        "image_kwargs": kwargs,
    }
    if not config["modules"]:
        raise TrainingError("no layer gets LoRA: check --lora-layers and --target-modules")
    check_resumable(Path(adapter_path), resume, config)
    mx.random.seed(seed)  # LoRA initialization
    vlm.freeze()
    add_lora(vlm, config["modules"], config["lora_parameters"])
    ranks = distributed.size()
    if batch_size % ranks:
        raise TrainingError(f"--batch-size {batch_size} does not split evenly over {ranks} ranks")
    if epochs is not None:
        iters = epochs * math.ceil(len(train_set) / (batch_size * grad_accumulation))
    args = TrainingArgs(
        iters=iters or DEFAULT_ITERS,
        batch_size=batch_size,
        learning_rate=learning_rate,
        steps_per_eval=steps_per_eval,
        val_batches=val_batches,
        save_every=save_every,
        grad_checkpoint=grad_checkpoint,
        seed=seed,
        grad_accumulation=grad_accumulation,
        lr_schedule=lr_schedule,
        warmup=warmup,
        compile=compile,
    )
    learning_rate_schedule(args)  # a bad schedule is reported before training starts
    trainable = sum(v.size for _, v in tree_flatten(vlm.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(vlm.parameters()))
    distributed.print_main(
        f"{len(train_set)} training / {len(valid_set)} validation records; LoRA on "
        f"{len(config['modules'])} layers: {trainable / 1e6:.3f}M trainable parameters "
        f"({100 * trainable / total:.2f}%); {args.iters} steps of {batch_size} records on "
        f"{ranks} rank{'s' * (ranks > 1)} × {batch_size // ranks} records ({asdict(args)})"
    )
    history = train(
        vlm, processor, train_set, valid_set, args, adapter_path, config, kwargs, resume, progress
    )
    distributed.print_main(f"Saved adapters to {adapter_path}")
    return history


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@model_option(help="Hub repo id or local path (quantized: QLoRA).")
@click.option(
    "--data",
    required=True,
    help="Directory with train.jsonl (and valid.jsonl), or a training JSONL file.",
)
@click.option(
    "--valid-data", default=None, help="Validation JSONL file (default: valid.jsonl beside --data)."
)
@click.option(
    "--iters",
    type=click.IntRange(min=1),
    default=None,
    help="Training steps [default: 1000 unless --epochs].",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Passes over the training set instead of --iters.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Records per step.",
)
@click.option(
    "--learning-rate", type=float, default=1e-4, show_default=True, help="Adam learning rate."
)
@click.option(
    "--lr-schedule",
    type=click.Choice(SCHEDULES),
    default="constant",
    show_default=True,
    help="Learning rate after the warm-up: constant, or decaying to 0 at the last step.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Steps of linear warm-up from 0 to --learning-rate.",
)
@click.option(
    "--grad-accumulation",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Batches whose gradients are averaged into each step (effective batch size x N).",
)
@click.option(
    "--compile/--no-compile",
    default=True,
    show_default=True,
    help="Compile the training step (model, optimizer and random state) with mx.compile.",
)
@click.option(
    "--lora-rank", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank r."
)
@click.option(
    "--lora-alpha",
    type=float,
    default=16.0,
    show_default=True,
    help="LoRA alpha (scale = alpha / r).",
)
@click.option(
    "--lora-dropout",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.0,
    show_default=True,
    help="Dropout on the LoRA input.",
)
@click.option(
    "--lora-layers",
    type=int,
    default=-1,
    show_default=True,
    help="Adapt the last N decoder blocks (-1: all).",
)
@click.option(
    "--target-modules",
    default="all",
    show_default=True,
    help="Comma-separated layer names (q_proj,v_proj,...) or 'all' linear layers.",
)
@click.option(
    "--train-vision", is_flag=True, help="LoRA on the vision tower and the connector too."
)
@click.option(
    "--grad-checkpoint",
    is_flag=True,
    help="Recompute decoder activations in the backward pass (less memory).",
)
@click.option(
    "--max-seq-length",
    type=click.IntRange(min=2),
    default=2048,
    show_default=True,
    help="Longer records are an error (never truncated).",
)
@click.option(
    "--save-every",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Checkpoint every N steps (and at the end).",
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --adapter-path.")
@click.option(
    "--adapter-path",
    default="adapters",
    show_default=True,
    help="Output directory for adapters and checkpoints.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for LoRA init, data order and dropout.",
)
@click.option(
    "--steps-per-eval",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Validation loss every N steps.",
)
@click.option(
    "--val-batches",
    type=int,
    default=25,
    show_default=True,
    help="Validation batches per evaluation (-1: all).",
)
@click.option(
    "--train-on-all",
    is_flag=True,
    help="Loss on every text token, not only the assistant's answers.",
)
@dtype_option(help="Compute dtype of the base model.")
@tiling_options
def main(**options: Any) -> None:
    """Fine-tune LoRA adapters for a SmolVLM model on image-text conversations."""
    check_int("seed", options["seed"], 0, MAX_SEED)
    check_image_kwargs(image_kwargs(**options))
    try:
        run_training(**options)
    except (TrainingError, AdapterError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted: rerun with --resume to continue from the last checkpoint in "
            f"{options['adapter_path']}"
        ) from None


if __name__ == "__main__":
    main()
