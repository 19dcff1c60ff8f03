"""Command-line options shared by the CLIs: model, image handling, dtype, PDF dpi, sampling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..processing.pages import DEFAULT_DPI

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
DTYPE_NAMES = ("float32", "float16", "bfloat16")

TILING = [
    click.option(
        "--no-image-splitting",
        is_flag=True,
        help="Encode each image as one tile (fewer tokens, less detail).",
    ),
    click.option(
        "--longest-edge",
        type=int,
        default=None,
        help="Resize images to this longest edge before tiling (checkpoint default otherwise).",
    ),
    click.option(
        "--max-tiles",
        type=int,
        default=None,
        help="At most this many tiles per image (plus the global view): saves tokens.",
    ),
]
IMAGE = [
    click.option(
        "--resize-shape",
        type=int,
        nargs=2,
        default=None,
        help="Resize every input image to HEIGHT WIDTH before processing.",
    ),
    *TILING,
    click.option(
        "--image-splitting",
        is_flag=True,
        help="Split images into tiles even where adapters were trained without (a flag wins).",
    ),
    click.option(
        "--no-upscale",
        is_flag=True,
        help="Do not upscale images smaller than the longest edge.",
    ),
]
SAMPLING = [
    click.option("--temperature", "--temp", default=0.0, show_default=True, help="0 is greedy."),
    click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling threshold."),
    click.option(
        "--top-k", default=0, show_default=True, help="Sample from the k likeliest (0: off)."
    ),
    click.option("--min-p", default=0.0, show_default=True, help="Minimum relative probability."),
    click.option(
        "--repetition-penalty", type=float, default=None, help="e.g. 1.1; off by default."
    ),
    click.option("--seed", type=int, default=None, help="Random seed for reproducible sampling."),
]


KV_CACHE = [
    click.option(
        "--kv-bits", type=click.Choice(["4", "8"]), default=None, help="Quantize the KV cache."
    ),
    click.option("--max-kv-size", type=int, default=None, help="Bound the KV cache (images kept)."),
]


def _apply(options: list[Callable]) -> Callable:
    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


tiling_options = _apply(TILING)  # --no-image-splitting, --longest-edge, --max-tiles
image_options = _apply(IMAGE)  # the tiling options plus --resize-shape and --no-upscale
sampling_options = _apply(SAMPLING)
kv_cache_options = _apply(KV_CACHE)  # --kv-bits, --max-kv-size


def model_option(
    help: str = "Hub repo id or local path.",
    default: str | None = DEFAULT_MODEL,
    adapter_default: bool = False,
) -> Callable:
    """--model with `default` shown in --help; `default=None` or `adapter_default` (the base model
    --adapter-path records, else the hub default: `loading.load` decides) leave it unset."""
    if adapter_default:
        help = f"{help} [default: the base model of --adapter-path, else {DEFAULT_MODEL}]"
        default = None
    return click.option("--model", default=default, show_default=default is not None, help=help)


def dtype_option(
    help: str = "Compute dtype (default: float32 on the CPU backend, the checkpoint's on Metal).",
    default: str | None = None,
) -> Callable:
    """--dtype, one of DTYPE_NAMES; unset unless a `default` is given (then shown in --help)."""
    return click.option(
        "--dtype",
        type=click.Choice(DTYPE_NAMES),
        default=default,
        show_default=default is not None,
        help=help,
    )


def dpi_option(help: str, default: float | None = DEFAULT_DPI) -> Callable:
    """--dpi, the resolution PDF pages are rendered at; unset when `default` is None."""
    # One range for docling and retrieve (they had (0, 600] and [1, 1200]): the union of both,
    # so that no command line that worked before stops working.
    return click.option(
        "--dpi",
        type=click.FloatRange(min=0, min_open=True, max=1200),
        default=default,
        show_default=default is not None,
        help=help,
    )


def image_kwargs(
    no_image_splitting: bool = False,
    longest_edge: int | None = None,
    max_tiles: int | None = None,
    no_upscale: bool = False,
    image_splitting: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """Processor keyword arguments for the image options given on the command line."""
    if image_splitting and no_image_splitting:
        raise click.UsageError("give --image-splitting or --no-image-splitting, not both")
    kwargs: dict[str, Any] = {}
    if no_image_splitting or image_splitting:
        kwargs["do_image_splitting"] = image_splitting
    if longest_edge is not None:
        kwargs["longest_edge"] = longest_edge
    if max_tiles is not None:
        kwargs["max_tiles"] = max_tiles
    if no_upscale:
        kwargs["upscale"] = False
    return kwargs
