"""Training data: JSONL records -> tokens with a completion-only loss mask -> padded batches
of tokens and image tiles.

Every input problem (bad JSON, a missing image, a record too long...) is reported with its
file and line before the first step. Records longer than --max-seq-length are an error,
never truncated: cutting one could split an image's tokens from its features.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import TemplateError
from PIL import ExifTags, Image, UnidentifiedImageError

from ..processing.image import (
    ImageProcessor,
    edge_for_max_tiles,
    encoder_size,
    fetch_image,
    resized_size,
    tile_grid,
)
from ..processing.messages import record_messages
from ..processing.processor import IMAGE_TOKEN, Processor, image_prompt_string

MAX_REPORTED_PROBLEMS = 10
PAD_TO = 32  # batches are padded to a multiple of this many tokens (and loss positions)


class TrainingError(ValueError):
    """Bad training input or options, found before training starts."""


@dataclass
class Sample:
    """One record, tokenized: `mask[i]` says whether token i carries loss."""

    ids: list[int]
    mask: list[bool]
    images: list[Path]
    grids: list[tuple[int, int]]  # (rows, cols) of tiles per image, as the prompt expands it
    where: str  # "file:line", for error messages


# ---------------------------------------------------------------------------
# Records


def data_files(data: str | Path, valid_data: str | Path | None = None) -> tuple[Path, Path | None]:
    """The training file and the validation file (None when there is none)."""
    data = Path(data)
    if data.is_dir():
        train, valid = data / "train.jsonl", data / "valid.jsonl"
        if not train.exists():
            raise TrainingError(f"--data: {data} has no train.jsonl")
        valid = valid if valid.exists() else None
    elif data.exists():
        train, valid = data, None
    else:
        raise TrainingError(f"--data: {data} does not exist")
    if valid_data is not None:
        valid = Path(valid_data)
        if not valid.is_file():
            raise TrainingError(f"--valid-data: {valid} does not exist")
    return train, valid


def read_jsonl(file: Path) -> list[tuple[int, Any]]:
    """(line number, JSON value) for every non-blank line of `file`."""
    records = []
    for number, raw in enumerate(file.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TrainingError(
                f"{file}:{number}: not valid UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1})"
            ) from None
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise TrainingError(
                f"{file}:{number}: invalid JSON ({e.msg} at column {e.colno})"
            ) from e
        except RecursionError:
            raise TrainingError(f"{file}:{number}: JSON nested too deeply") from None
    if not records:
        raise TrainingError(f"{file} is empty: no records to train on")
    return records


# ---------------------------------------------------------------------------
# Tokens and the loss mask


def image_grid(image_processor: ImageProcessor, path: Path, image_kwargs: dict) -> tuple[int, int]:
    """(rows, cols) of tiles the processor will cut `path` into; the image is decoded in full
    so that a truncated or corrupt file is found before training starts."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(ExifTags.Base.Orientation)
            image.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    if orientation in (5, 6, 7, 8):  # loading transposes these to upright
        width, height = height, width
    split = image_kwargs.get("do_image_splitting", image_processor.do_image_splitting)
    if not split:
        return 0, 0
    tile = image_kwargs.get("max_image_size") or image_processor.tile_size
    if image_processor.do_resize:
        edge = image_kwargs.get("longest_edge") or image_processor.longest_edge
        upscale = image_kwargs.get("upscale", image_processor.upscale)
        max_tiles = image_kwargs.get("max_tiles", image_processor.max_tiles)
        if max_tiles is not None:
            edge = edge_for_max_tiles(height, width, edge, tile, upscale, max_tiles)
        height, width = resized_size(height, width, edge, upscale)
    return tile_grid(*encoder_size(height, width, tile), tile)


def expand_images(text: str, grids: list[tuple[int, int]], image_seq_len: int) -> str:
    """Replace each `<image>` of `text` by its tile tokens, as the processor does."""
    parts = text.split(IMAGE_TOKEN)
    if len(parts) - 1 != len(grids):
        raise ValueError(
            f"the rendered prompt has {len(parts) - 1} {IMAGE_TOKEN} but the record has "
            f"{len(grids)} images (is there a literal {IMAGE_TOKEN} in the text?)"
        )
    tokens = [image_prompt_string(r, c, image_seq_len) for r, c in grids]
    return parts[0] + "".join(t + p for t, p in zip(tokens, parts[1:]))


def render_ids(
    processor: Processor, messages: list[dict], grids: list[tuple[int, int]], prompt: bool
) -> list[int]:
    """Token ids of the chat template's rendering of `messages` (images expanded)."""
    text = processor.apply_chat_template(messages, add_generation_prompt=prompt)
    count = text.count(IMAGE_TOKEN)
    expanded = expand_images(text, grids[:count], processor.image_seq_len)
    return processor.tokenizer.encode_prompt(expanded)


def encode_conversation(
    processor: Processor,
    messages: list[dict],
    grids: list[tuple[int, int]],
    train_on_all: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask: the assistant tokens (text and end-of-turn token), or with
    `train_on_all` every token but the image placeholders."""
    ids = render_ids(processor, messages, grids, prompt=False)
    if train_on_all:
        return ids, [t != processor.image_token_id for t in ids]
    mask = [False] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = assistant_span(processor, messages, grids, turn, ids)
            mask[start:end] = [True] * (end - start)
    return ids, mask


def assistant_span(
    processor: Processor,
    messages: list[dict],
    grids: list[tuple[int, int]],
    turn: int,
    ids: list[int],
) -> tuple[int, int]:
    """Token range of assistant message `turn`: after the template's "Assistant:" prompt,
    through its end-of-turn token, found by rendering the turns before and through it."""
    prompt = render_ids(processor, messages[:turn], grids, prompt=True)
    through = render_ids(processor, messages[: turn + 1], grids, prompt=False)
    # Tokenizing a prefix of the text must give a prefix of the tokens, or the mask would be off.
    if through != ids[: len(through)] or prompt != through[: len(prompt)]:
        raise ValueError(
            f"assistant turn {turn}: the chat template's rendering up to this turn does not "
            "tokenize to a prefix of the whole conversation, so its tokens cannot be located"
        )
    # The turn ends at its last stop token (<end_of_utterance>, granite's <|end_of_text|>);
    # what the template writes after it ("\n") is not the model's to say.
    stops = processor.tokenizer.eos_token_ids
    span = through[len(prompt) :]
    ends = [i + 1 for i, token in enumerate(span) if token in stops]
    end = ends[-1] if ends else len(span)
    return len(prompt), len(prompt) + end


def encode_record(
    processor: Processor,
    record: Any,
    base: Path,
    image_kwargs: dict,
    train_on_all: bool,
) -> tuple[list[int], list[bool], list[Path], list[tuple[int, int]]]:
    """Everything training needs from one JSONL record but its pixels."""
    messages, images = record_messages(record, base)
    grids = [image_grid(processor.image_processor, path, image_kwargs) for path in images]
    ids, mask = encode_conversation(processor, messages, grids, train_on_all)
    return ids, mask, images, grids


def load_dataset(
    file: Path,
    processor: Processor,
    max_seq_length: int,
    image_kwargs: dict | None = None,
    train_on_all: bool = False,
) -> list[Sample]:
    """Read and tokenize every record of a JSONL file; all problems are raised together."""
    file = Path(file)
    samples, problems = [], []
    for number, record in read_jsonl(file):
        try:
            ids, mask, images, grids = encode_record(
                processor, record, file.parent, image_kwargs or {}, train_on_all
            )
            if len(ids) > max_seq_length:
                raise ValueError(
                    f"{len(ids)} tokens, more than --max-seq-length {max_seq_length} "
                    "(records are never truncated: raise the limit, shorten the text, or use "
                    "fewer or smaller images, e.g. --no-image-splitting / --max-tiles)"
                )
            samples.append(Sample(ids, mask, images, grids, f"{file}:{number}"))
        except (ValueError, TemplateError) as e:
            problems.append(f"{file}:{number}: {e}")
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED_PROBLEMS])
        more = len(problems) - MAX_REPORTED_PROBLEMS
        raise TrainingError(
            f"{len(problems)} bad record(s) in {file}:\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return samples


def warn_upscaled_images(samples: list[Sample], processor: Processor) -> None:
    """Warn when records are mostly image tokens because small images were upscaled into
    many tiles: training on them costs far more than the text they carry is worth."""
    tile = processor.image_processor.tile_size
    upscaled = []
    for sample in samples:
        image_tokens = sample.ids.count(processor.image_token_id)
        if image_tokens <= 10 * (len(sample.ids) - image_tokens):
            continue
        for path, (rows, cols) in zip(sample.images, sample.grids):
            if rows * cols > 1 and max(_image_size(path)) < tile:
                upscaled.append((sample, path, rows * cols + 1, image_tokens))
                break
    if not upscaled:
        return
    sample, path, tiles, image_tokens = upscaled[0]
    width, height = _image_size(path)
    print(
        f"Warning: {len(upscaled)} of {len(samples)} records are mostly image tokens "
        f"(e.g. {sample.where}: {image_tokens} image tokens for "
        f"{len(sample.ids) - image_tokens} text tokens) because images smaller than one "
        f"{tile}-pixel tile (e.g. {path.name}, {width}x{height}) are upscaled into {tiles} "
        "tiles: train with --no-image-splitting (one tile per image) or a smaller "
        "--longest-edge for much cheaper steps.",
        file=sys.stderr,
        flush=True,
    )


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from an image file's header."""
    with Image.open(path) as image:
        return image.size


# ---------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """Right-padded token ids, the flat positions whose next token carries loss, and pixels."""

    input_ids: np.ndarray  # (batch, length)
    positions: np.ndarray  # indices into the (batch * (length - 1)) next-token predictions
    targets: np.ndarray  # the token each of those positions must predict
    pixel_values: np.ndarray | None  # (batch, tiles, 3, H, W); all-zero tiles are padding
    pixel_attention_mask: np.ndarray | None
    tokens: int  # real (unpadded) tokens


def make_batch(
    samples: list[Sample], processor: Processor, image_kwargs: dict | None = None
) -> Batch:
    """Pad samples on the right (a causal model never attends to later padding) to a multiple
    of PAD_TO tokens (fewer distinct shapes for the compiled step) and their images with
    all-zero tiles (which the model drops) into one batch."""
    length = -(-max(len(s.ids) for s in samples) // PAD_TO) * PAD_TO
    ids = np.full((len(samples), length), processor.tokenizer.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(samples), length), dtype=bool)
    for row, sample in enumerate(samples):
        ids[row, : len(sample.ids)] = sample.ids
        mask[row, : len(sample.ids)] = sample.mask
    positions = np.flatnonzero(mask[:, 1:])  # token i is predicted at position i - 1
    targets = ids[:, 1:].reshape(-1)[positions]
    pixels = pixel_mask = None
    if any(s.images for s in samples):
        pixels, pixel_mask = batch_pixels(samples, processor.image_processor, image_kwargs or {})
    return Batch(ids, positions, targets, pixels, pixel_mask, sum(len(s.ids) for s in samples))


def batch_pixels(
    samples: list[Sample], image_processor: ImageProcessor, image_kwargs: dict
) -> tuple[np.ndarray, np.ndarray | None]:
    """Process the samples' images; the tiles must match the grids their prompts expanded."""
    groups = []
    for sample in samples:
        try:
            groups.append([fetch_image(path) for path in sample.images])
        except (OSError, ValueError) as e:
            raise TrainingError(f"{sample.where}: cannot load an image: {e}") from e
    out = image_processor(groups, **image_kwargs)
    for sample, rows, cols in zip(samples, out["rows"], out["cols"]):
        if list(zip(rows, cols)) != sample.grids:
            raise TrainingError(
                f"{sample.where}: images were cut into {list(zip(rows, cols))} tiles, "
                f"not the {sample.grids} the prompt was built for"
            )
    return out["pixel_values"], out.get("pixel_attention_mask")


def batch_indices(size: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Record indices of training step `step` (0-based): a fresh shuffle every epoch, so the
    order depends only on (seed, step) and a resumed run sees the same batches."""
    per_epoch = math.ceil(size / batch_size)
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(size)
    return order[index * batch_size : (index + 1) * batch_size]


def eval_batches(size: int, batch_size: int, num_batches: int) -> list[range]:
    """The validation batches, in file order: all of them for `num_batches` -1."""
    starts = range(0, size, batch_size)
    if num_batches >= 0:
        starts = starts[:num_batches]
    return [range(s, min(s + batch_size, size)) for s in starts]
