"""Caption a collection of images into JSONL: `python -m mlx_smolvlm.caption INPUT --output F`.

INPUT is a folder (searched recursively for images), a .jsonl or .csv table with an image
column, or a list file with one image per line. A rerun with the same output skips what is
done. Under `mlx.launch -n N` every rank captions its own share and rank 0 merges them.
"""

from __future__ import annotations

from pathlib import Path

import click

from mlx_smolvlm import load

from .captioning import InputError, caption_dataset, read_items, read_records, select
from .utils import distributed
from .utils.options import (
    dtype_option,
    image_kwargs,
    image_options,
    model_option,
    sampling_options,
)
from .utils.validation import Command, check_generation_options


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", metavar="INPUT", type=click.Path(path_type=Path))
@click.option(
    "--output", "-o", required=True, type=click.Path(path_type=Path), help="JSONL file to write."
)
@click.option(
    "--prompt", default=None, help="Question asked about every image [Describe this image.]"
)
@click.option("--image-column", default="image", show_default=True, help="Table column of images.")
@click.option("--prompt-column", default=None, help="Table column holding each image's prompt.")
@click.option("--id-column", default=None, help="Table column of unique ids [the image column].")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images at once."
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Caption at most N images.")
@click.option("--shuffle", is_flag=True, help="Pick images in a random order drawn from --seed.")
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse (record an error for) images with more pixels than this.",
)
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@model_option()
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-tokens", default=256, show_default=True, help="Most tokens per caption.")
@sampling_options
@click.option(
    "--adapter-path", default=None, help="LoRA adapters to apply (from mlx_smolvlm.lora)."
)
@dtype_option()
@image_options
def main(
    source,
    output,
    prompt,
    image_column,
    prompt_column,
    id_column,
    batch_size,
    limit,
    shuffle,
    max_pixels,
    quiet,
    resize_shape,
    no_image_splitting,
    image_splitting,
    longest_edge,
    max_tiles,
    no_upscale,
    model,
    system,
    max_tokens,
    temperature,
    top_p,
    top_k,
    min_p,
    repetition_penalty,
    seed,
    adapter_path,
    dtype,
):
    """Caption every image of INPUT into the JSONL file --output, resumably and in batches."""
    if repetition_penalty is not None:
        raise click.UsageError("--repetition-penalty is not available for batched captioning")
    sampler = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
    tiling = image_kwargs(no_image_splitting, longest_edge, max_tiles, no_upscale, image_splitting)
    # Checked before the model loads: a bad option fails at once, naming its flag.
    check_generation_options(
        max_tokens, {**sampler, "seed": seed}, tiling, resize_shape, prompt=prompt, system=system
    )
    try:
        check_output(output)
        items = read_items(source, prompt, image_column, prompt_column, id_column)
        items = select(items, shuffle, seed or 0, limit)
        vlm, processor = load(model, adapter_path=adapter_path, dtype=dtype)
        summary = caption_dataset(
            vlm,
            processor,
            items,
            output,
            batch_size=batch_size,
            progress=not quiet,
            max_pixels=max_pixels,
            resize_shape=resize_shape,
            max_tokens=max_tokens,
            seed=seed,
            system=system,
            **sampler,
            **tiling,
        )
    except (FileNotFoundError, ValueError, OSError, ImportError) as e:
        raise click.ClickException(str(e)) from e
    except KeyboardInterrupt:
        raise click.ClickException(
            "interrupted: the finished batches are kept; rerun the same command to resume"
        ) from None
    if not quiet and distributed.is_main():
        ranks = distributed.size()
        click.echo(
            f"Captioned {summary.captioned} images ({summary.failed} failed, {summary.skipped} "
            f"already done) on {ranks} rank{'s' * (ranks > 1)} in {summary.seconds:.1f} s "
            f"({summary.images_per_second:.2f} images/s); {output} holds {summary.records} records",
            err=True,
        )


def check_output(output: Path) -> None:
    """Refuse an output that is a folder, has no folder, or is some other file (kept intact)."""
    if output.is_dir():
        raise InputError(f"--output {output} is a folder; give a .jsonl file path")
    if not output.parent.is_dir():
        raise InputError(f"--output {output}: folder {output.parent} does not exist")
    read_records(output)  # an existing file must be an earlier run's output


if __name__ == "__main__":
    main()
