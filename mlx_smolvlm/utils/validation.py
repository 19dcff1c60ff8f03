"""The one layer that checks what a user passes in, shared by the CLIs, the Python API and the server.

Every check raises `ValidationError` (a `ValueError`) whose message names the parameter and
the accepted range; `param` carries the name so that the CLI can print its flag and the
server its JSON field. Misspelled keyword arguments become a `TypeError` with close matches.
`read_json` is the one reader of JSON config and metadata files, with one-line errors.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click

MAX_SEED = 2**64 - 1
KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize accepts
KV_GROUP_SIZES = (32, 64, 128)
DEBUG_ENV = "MLX_SMOLVLM_DEBUG"  # "1": show tracebacks instead of one-line errors

# Keyword arguments the processor takes per call (image tiling and video sampling).
IMAGE_KWARGS = (
    "do_image_splitting",
    "longest_edge",
    "max_image_size",
    "max_tiles",
    "upscale",
    "fps",
    "max_frames",
    "do_sample_frames",
)


class ValidationError(ValueError):
    """A parameter outside what it accepts; `param` is its name."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param} {message}")
        self.param = param
        self.detail = message


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high]; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, f"must be an integer{_range(low, high)}, got {value!r:.40}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValidationError(name, f"must be an integer{_range(low, high)}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with `low_open`)."""
    accepted = _range(low, high, low_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(name, f"must be a number{accepted}, got {value!r:.40}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or too_low or (high is not None and value > high):
        raise ValidationError(name, f"must be a finite number{accepted}, got {value}")
    return value


def _range(low: Any, high: Any, low_open: bool = False) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" > {low}" if low_open else f" >= {low}"
    if low is None:
        return f" <= {high}"
    high_text = "2**64-1" if high == MAX_SEED else high
    return f" in {'(' if low_open else '['}{low}, {high_text}]"


def check_text(name: str, value: Any) -> str:
    """A string that is valid Unicode (no lone surrogates, e.g. from undecodable bytes)."""
    if not isinstance(value, str):
        raise ValidationError(name, f"must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else repr(bad)
        raise ValidationError(
            name, f"is not valid UTF-8 text ({byte} at character {e.start})"
        ) from None
    return value


def check_sampling(
    max_tokens: Any = 256,
    temperature: Any = 0.0,
    top_p: Any = 1.0,
    top_k: Any = 0,
    min_p: Any = 0.0,
    repetition_penalty: Any = None,
    seed: Any = None,
) -> None:
    """Check the sampling parameters of a generation."""
    check_int("max_tokens", max_tokens, 0)
    check_float("temperature", temperature, 0.0)
    check_float("top_p", top_p, 0.0, 1.0, low_open=True)
    check_int("top_k", top_k, 0)
    check_float("min_p", min_p, 0.0, 1.0)
    if repetition_penalty is not None:
        check_float("repetition_penalty", repetition_penalty, 0.0, low_open=True)
    if seed is not None:
        check_int("seed", seed, 0, MAX_SEED)


def check_kv(kv_bits: Any, kv_group_size: Any, max_kv_size: Any, head_dim: int) -> None:
    """Check the KV cache options against what mlx-lm's caches support."""
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise ValidationError("kv_bits", f"must be one of {KV_BITS}, got {kv_bits!r:.40}")
    if kv_group_size is not None:
        if kv_group_size not in KV_GROUP_SIZES or head_dim % kv_group_size:
            raise ValidationError(
                "kv_group_size",
                f"must be one of {KV_GROUP_SIZES} dividing head_dim {head_dim}, "
                f"got {kv_group_size!r:.40}",
            )
    if max_kv_size is not None:
        check_int("max_kv_size", max_kv_size, 1)
    if kv_bits is not None and max_kv_size is not None:
        raise ValidationError(
            "kv_bits",
            "cannot be combined with max_kv_size (mlx-lm has no rotating quantized cache)",
        )


def check_image_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Check the processor's image and video options (`IMAGE_KWARGS`)."""
    for name in ("longest_edge", "max_image_size", "max_tiles", "max_frames"):
        if kwargs.get(name) is not None:
            check_int(name, kwargs[name], 1)
    for name in ("do_image_splitting", "upscale", "do_sample_frames"):
        if kwargs.get(name) is not None and not isinstance(kwargs[name], bool):
            raise ValidationError(name, f"must be True or False, got {kwargs[name]!r:.40}")
    if kwargs.get("fps") is not None:
        check_float("fps", kwargs["fps"], 0.0, low_open=True)


def check_resize_shape(resize_shape: Any) -> None:
    """A (height, width) pair of positive integers, or None."""
    if resize_shape is None:
        return
    if not isinstance(resize_shape, (tuple, list)) or len(resize_shape) != 2:
        raise ValidationError("resize_shape", f"must be (height, width), got {resize_shape!r:.40}")
    for value in resize_shape:
        check_int("resize_shape", value, 1)


def check_generation_options(
    max_tokens: Any,
    sampling: Mapping[str, Any],
    image_kwargs: Mapping[str, Any],
    resize_shape: Any,
    **texts: Any,
) -> None:
    """Check a generating command's options (texts given by name) before its model loads."""
    for name, text in texts.items():
        if text is not None:
            check_text(name, text)
    check_sampling(max_tokens, **sampling)
    check_image_kwargs(image_kwargs)
    check_resize_shape(resize_shape)


def check_keywords(function: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """TypeError naming a keyword that `function` does not take, with the closest accepted ones."""
    accepted = sorted(accepted)
    for name in given:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}{hint}")


def fit_to_window(prompt_tokens: int, max_tokens: int, window: int) -> tuple[int, str | None]:
    """`max_tokens` lowered to what the context window leaves after the prompt, and a notice.

    A prompt that alone fills the window is refused: nothing could be generated after it.
    """
    if prompt_tokens >= window:
        raise ValidationError(
            "prompt",
            f"has {prompt_tokens} tokens; the model's context window (max_position_embeddings) "
            f"is {window} tokens: shorten the text or use fewer or smaller images",
        )
    room = window - prompt_tokens
    if max_tokens <= room:
        return max_tokens, None
    return room, (
        f"max_tokens lowered from {max_tokens} to {room}: the {prompt_tokens}-token prompt "
        f"leaves {room} of the model's {window}-token context window"
    )


def read_json(file: Path, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The JSON object in `file`, or a one-line error naming the file and what is wrong with it.

    A missing file is a `FileNotFoundError`, as the CLIs expect; anything else (unreadable, not
    UTF-8, not JSON, not an object) is `error`, so that each caller keeps its own error class.
    """
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{file}: not found") from e
    except OSError as e:
        raise error(f"{file}: cannot read it ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise error(
            f"{file}: invalid JSON: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from e
    except json.JSONDecodeError as e:
        raise error(f"{file}: invalid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except RecursionError as e:
        raise error(f"{file}: invalid JSON: nested too deeply") from e
    if not isinstance(data, dict):
        raise error(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def debug() -> bool:
    """Whether tracebacks were asked for (MLX_SMOLVLM_DEBUG=1)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class Command(click.Command):
    """A click command whose unexpected errors are one line on stderr, not a traceback.

    Expected failures are `click.ClickException`s already; anything else is reported with its
    type and message, and MLX_SMOLVLM_DEBUG=1 shows the traceback instead.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ValidationError as e:
            raise click.ClickException(f"--{e.param.replace('_', '-')} {e.detail}") from e
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if debug():
                raise
            message = " ".join(str(e).split()) or "no details"
            raise click.ClickException(
                f"{type(e).__name__}: {message} ({DEBUG_ENV}=1 shows the traceback)"
            ) from e


class Group(click.Group):
    """A click group whose subcommands are `Command`s."""

    command_class = Command


def print_error(message: str) -> None:
    """One line on stderr, as the CLIs print a failure."""
    print(f"Error: {message}", file=sys.stderr, flush=True)
