"""`python -m mlx_smolvlm.generate`: answer a prompt about images or a video, streaming the text."""

from __future__ import annotations

import sys

import click

from .backends.cpu import report
from .generation import GenerationResult, generate, stream_generate
from .generation.generate import print_stats
from .loading import load
from .processing.image import load_images
from .utils.options import (
    dtype_option,
    image_kwargs,
    image_options,
    kv_cache_options,
    model_option,
    sampling_options,
)
from .utils.progress import terminal_progress
from .utils.validation import Command, check_generation_options, check_int

__all__ = ["generate", "main", "stream_generate"]


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@model_option(adapter_default=True)
@click.option("--image", multiple=True, help="Image path or URL; repeat for several images.")
@click.option("--video", default=None, help="Video file (mp4, mov, webm, gif...); needs PyAV.")
@click.option("--fps", type=float, default=None, help="Video frames sampled per second [1].")
@click.option("--max-frames", type=int, default=None, help="Most video frames sampled [64].")
@click.option(
    "--prompt", default=None, help="The question [Describe this image. / Describe this video.]"
)
@click.option("--system", default=None, help="System prompt.")
@click.option(
    "--max-tokens",
    default=256,
    show_default=True,
    help="Most tokens to generate.",
)
@sampling_options
@click.option(
    "--adapter-path",
    default=None,
    help="LoRA adapters to apply (from mlx_smolvlm.lora); their base model and image settings "
    "are the defaults.",
)
@dtype_option()
@image_options
@kv_cache_options
@click.option(
    "--verbose/--quiet",
    default=True,
    show_default=True,
    help="Progress of long prompts on the terminal, statistics and the backend's choices at "
    "the end.",
)
def main(
    model,
    image,
    video,
    fps,
    max_frames,
    prompt,
    system,
    max_tokens,
    adapter_path,
    dtype,
    resize_shape,
    kv_bits,
    max_kv_size,
    verbose,
    **options,
):
    """Answer PROMPT about the given images or video with a SmolVLM model, streaming the text."""
    if video is None and (fps is not None or max_frames is not None):
        raise click.UsageError("--fps and --max-frames apply to --video")
    prompt = prompt or ("Describe this video." if video else "Describe this image.")
    # Unset sampling options fall back to the checkpoint's video_sampling.
    sampling = {k: v for k, v in {"fps": fps, "max_frames": max_frames}.items() if v is not None}
    sampler = {k: options.pop(k) for k in ("temperature", "top_p", "top_k", "min_p")}
    repetition_penalty, seed = options.pop("repetition_penalty"), options.pop("seed")
    tiling = image_kwargs(**options)
    # Checked before the model loads: a bad option fails at once, naming its flag.
    check_generation_options(
        max_tokens,
        {**sampler, "repetition_penalty": repetition_penalty, "seed": seed},
        {**sampling, **tiling},
        resize_shape,
        prompt=prompt,
        system=system,
    )
    if max_kv_size is not None:
        check_int("max_kv_size", max_kv_size, 1)
    try:
        images = load_images(image, resize_shape)
        vlm, processor = load(model, adapter_path=adapter_path, dtype=dtype)
        result = GenerationResult()
        noted = False
        for result in stream_generate(
            vlm,
            processor,
            prompt,
            images,
            max_tokens=max_tokens,
            **sampler,
            repetition_penalty=repetition_penalty,
            seed=seed,
            system=system,
            kv_bits=int(kv_bits) if kv_bits else None,
            max_kv_size=max_kv_size,
            video=video,
            progress=terminal_progress(verbose),
            **sampling,
            **tiling,
        ):
            if result.notice and not noted:
                noted = True
                print(f"[{result.notice}]", file=sys.stderr, flush=True)
            print(result.text, end="", flush=True)
        print()
    except (FileNotFoundError, ValueError, OSError, ImportError) as e:
        raise click.ClickException(str(e)) from e
    if verbose:
        print_stats(result)
        click.echo(report(vlm), err=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
