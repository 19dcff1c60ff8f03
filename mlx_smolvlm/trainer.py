"""Fine-tuning: JSONL records to tokens with a completion-only loss mask, padded batches of
tokens and image tiles, and a resumable training loop with validation and a loss curve.

Every input problem (bad JSON, a missing image, a record too long...) is reported with its
file and line before the first step. Records longer than --max-seq-length are an error,
never truncated: cutting one could split an image's tokens from its features.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from jinja2 import TemplateError
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.models.base import create_attention_mask
from PIL import ExifTags, Image, UnidentifiedImageError
from tqdm import tqdm

from .image_processing import (
    ImageProcessor,
    edge_for_max_tiles,
    encoder_size,
    fetch_image,
    resized_size,
    tile_grid,
)
from .lora import (
    ADAPTER_FORMAT,
    adapter_weights,
    add_lora,
    atomic_save_safetensors,
    lora_parameters,
    save_adapters,
    select_modules,
)
from .model import Model
from .processing import END_OF_UTTERANCE, IMAGE_TOKEN, Processor, image_prompt_string

STATE_FILE = "training_state.safetensors"
CURVE_FILE = "loss_curve.png"
DEFAULT_ITERS = 1000
MAX_REPORTED_PROBLEMS = 10
ROLES = ("system", "user", "assistant")


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
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise TrainingError(
                f"{file}:{number}: invalid JSON ({e.msg} at column {e.colno})"
            ) from e
    if not records:
        raise TrainingError(f"{file} is empty: no records to train on")
    return records


def record_messages(record: Any, base: Path) -> tuple[list[dict], list[Path]]:
    """Chat messages (image blocks reduced to placeholders) and the image files, in order."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, not {type(record).__name__}")
    listed = _listed_images(record)
    if "messages" in record:
        messages, sources = conversation(record["messages"], listed)
    elif any(k in record for k in ("answer", "completion")):
        messages, sources = question_answer(record), listed
    else:
        raise ValueError(
            "a record needs 'messages', or 'image' + 'question'/'prompt' + 'answer'/'completion'"
        )
    return messages, [image_file(s, base) for s in sources]


def _listed_images(record: dict) -> list[Any]:
    """Top-level "images" (list) or "image" of a record."""
    images = record.get("images", record.get("image"))
    if images is None:
        return []
    return list(images) if isinstance(images, list) else [images]


def conversation(messages: Any, listed: list[Any]) -> tuple[list[dict], list[Any]]:
    """Checked messages; image blocks without a source take the record's "images" in order."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    pending = iter(listed)
    out, sources = [], []
    for message in messages:
        message, named = checked_message(message)
        out.append(message)
        sources += [s if s is not None else next(pending, None) for s in named]
    if None in sources or next(pending, None) is not None:
        raise ValueError(f"{len(sources)} image blocks but {len(listed)} listed images")
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message to learn from")
    return out, sources


def checked_message(message: Any) -> tuple[dict, list[Any]]:
    """A message with its image blocks reduced to placeholders, and their sources (None
    for a bare placeholder)."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ValueError(f"every message needs a role among {ROLES}: got {message!r:.80}")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}, []
    if not isinstance(content, list) or not content:
        raise ValueError(f"a {role} message's content must be a string or a non-empty list")
    blocks, sources = [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in ("image", "image_url") and role != "assistant":
            sources.append(_block_source(block))
            blocks.append({"type": "image"})
        elif kind == "text":
            blocks.append({"type": "text", "text": str(block.get("text", ""))})
        else:
            raise ValueError(f"unsupported {role} content block {block!r:.80}")
    return {"role": role, "content": blocks}, sources


def _block_source(block: dict) -> Any:
    """The image a content block names, or None for a bare placeholder."""
    for key in ("image", "path", "url"):
        if block.get(key) is not None:
            return block[key]
    url = block.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def question_answer(record: dict) -> list[dict]:
    """Messages for the {"image", "question"/"prompt", "answer"/"completion"} shape."""
    question = record.get("question", record.get("prompt"))
    answer = record.get("answer", record.get("completion"))
    if not isinstance(question, str) or not isinstance(answer, str):
        raise ValueError("'question'/'prompt' and 'answer'/'completion' must be strings")
    user = [{"type": "image"} for _ in _listed_images(record)] + [
        {"type": "text", "text": question}
    ]
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    if isinstance(record.get("system"), str):
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def image_file(source: Any, base: Path) -> Path:
    """A local image file named relative to the JSONL file (or absolute), which must exist."""
    if not isinstance(source, str) or source.startswith(("http://", "https://", "data:")):
        raise ValueError(f"image {source!r:.80} must be a local file path")
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ValueError(f"image {source!r} not found (looked for {path})")
    return path


# ---------------------------------------------------------------------------
# Tokens and the loss mask


def image_grid(image_processor: ImageProcessor, path: Path, image_kwargs: dict) -> tuple[int, int]:
    """(rows, cols) of tiles the processor will cut `path` into, from the image header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(ExifTags.Base.Orientation)
    except (OSError, UnidentifiedImageError) as e:
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
    """Token ids and loss mask: the assistant tokens (text and `<end_of_utterance>`), or with
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
    through its `<end_of_utterance>`, found by rendering the turns before and through it."""
    prompt = render_ids(processor, messages[:turn], grids, prompt=True)
    through = render_ids(processor, messages[: turn + 1], grids, prompt=False)
    # Tokenizing a prefix of the text must give a prefix of the tokens, or the mask would be off.
    if through != ids[: len(through)] or prompt != through[: len(prompt)]:
        raise ValueError(
            f"assistant turn {turn}: the chat template's rendering up to this turn does not "
            "tokenize to a prefix of the whole conversation, so its tokens cannot be located"
        )
    eou = processor.tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    span = through[len(prompt) :]
    # What the template writes after the end-of-turn token ("\n") is not the model's to say.
    end = len(span) - span[::-1].index(eou) if eou in span else len(span)
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
    """Pad samples on the right (a causal model never attends to later padding) and their
    images with all-zero tiles (which the model drops) into one batch."""
    length = max(len(s.ids) for s in samples)
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


# ---------------------------------------------------------------------------
# Loss


def decoder_hidden(model: Model, embeddings: mx.array, grad_checkpoint: bool = False) -> mx.array:
    """Final hidden states of the decoder; with `grad_checkpoint` each block's activations
    are recomputed in the backward pass instead of kept."""
    language = model.language_model
    if not grad_checkpoint:
        return language.hidden_states(input_embeddings=embeddings)
    mask = create_attention_mask(embeddings)
    h = embeddings
    for layer in language.layers:
        h = mx.checkpoint(partial(_run_layer, layer, mask))(layer.trainable_parameters(), h)
    return language.norm(h)


def _run_layer(layer: nn.Module, mask: Any, params: dict, h: mx.array) -> mx.array:
    layer.update(params)
    return layer(h, mask)


def loss_fn(model: Model, batch: Batch, grad_checkpoint: bool = False) -> mx.array:
    """Mean cross-entropy over the batch's loss tokens."""
    embeddings = model.embed(batch.input_ids, batch.pixel_values, batch.pixel_attention_mask)
    hidden = decoder_hidden(model, embeddings, grad_checkpoint)[:, :-1]
    # Project only the loss positions: the vocabulary head is the largest activation.
    hidden = hidden.reshape(-1, hidden.shape[-1])[mx.array(batch.positions)]
    logits = model.language_model.logits(hidden).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, mx.array(batch.targets))
    return losses.sum() / len(batch.positions)


def evaluate(
    model: Model,
    samples: list[Sample],
    processor: Processor,
    batch_size: int,
    num_batches: int = -1,
    image_kwargs: dict | None = None,
) -> float:
    """Mean loss per loss token over the validation batches (dropout off)."""
    training = model.training
    model.eval()
    total, count = 0.0, 0
    for indices in eval_batches(len(samples), batch_size, num_batches):
        batch = make_batch([samples[i] for i in indices], processor, image_kwargs)
        total += loss_fn(model, batch).item() * len(batch.positions)
        count += len(batch.positions)
    model.train(training)
    return total / count


# ---------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    adapter_path: Path,
    model: Model,
    optimizer: optim.Optimizer,
    step: int,
    history: list,
    config: dict,
) -> None:
    """Adapters for users, and one atomically written file with all a resume needs."""
    save_adapters(model, adapter_path, config)
    state = {f"adapters.{k}": v for k, v in adapter_weights(model).items()}
    state.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    metadata = {"step": str(step), "history": json.dumps(history), "config": json.dumps(config)}
    atomic_save_safetensors(adapter_path / STATE_FILE, state, metadata)


def read_checkpoint(adapter_path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Arrays and metadata of the training state in `adapter_path`."""
    file = adapter_path / STATE_FILE
    if not file.exists():
        raise TrainingError(f"--resume: {file} not found; there is no checkpoint to resume")
    try:
        return mx.load(str(file), return_metadata=True)
    except Exception as e:  # mlx raises bare RuntimeErrors on bad files
        raise TrainingError(f"--resume: cannot read {file} ({e})") from e


def restore_checkpoint(
    adapter_path: Path, model: Model, optimizer: optim.Optimizer
) -> tuple[int, list]:
    """Load adapters and optimizer state; return the step reached and the loss history."""
    arrays, metadata = read_checkpoint(adapter_path)
    adapters = {
        k.removeprefix("adapters."): v for k, v in arrays.items() if k.startswith("adapters.")
    }
    saved = {
        k.removeprefix("optimizer."): v for k, v in arrays.items() if k.startswith("optimizer.")
    }
    if set(adapters) != set(adapter_weights(model)):
        raise TrainingError(
            f"--resume: {adapter_path / STATE_FILE} holds other adapters than this run's"
        )
    model.load_weights(list(adapters.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    missing = [p for p, _ in tree_flatten(optimizer.state) if p not in saved]
    if missing:
        raise TrainingError(
            f"--resume: {adapter_path / STATE_FILE} lacks optimizer state {missing[:4]}"
        )
    # The learning rate is this run's option; everything else continues where it stopped.
    optimizer.state = tree_map_with_path(
        lambda path, value: value if path == "learning_rate" else saved[path], optimizer.state
    )
    return int(metadata["step"]), json.loads(metadata["history"])


def check_resumable(adapter_path: Path, resume: bool, config: dict) -> None:
    """Refuse to overwrite a checkpoint without --resume, or to resume a different setup."""
    if not resume:
        if (adapter_path / STATE_FILE).exists():
            raise TrainingError(
                f"--adapter-path {adapter_path} already holds a training checkpoint: pass "
                "--resume to continue it, or choose another directory"
            )
        return
    _, metadata = read_checkpoint(adapter_path)
    saved = json.loads(metadata["config"])
    for key in ("modules", "lora_parameters"):
        if saved.get(key) != config[key]:
            raise TrainingError(
                f"--resume: the checkpoint in {adapter_path} has {key} {saved.get(key)}, "
                f"this run {config[key]}: pass the same LoRA options as the interrupted run"
            )


# ---------------------------------------------------------------------------
# The training loop


@dataclass
class TrainingArgs:
    """Options of the training loop."""

    iters: int = DEFAULT_ITERS
    batch_size: int = 4
    learning_rate: float = 1e-4
    steps_per_eval: int = 100
    val_batches: int = 25
    save_every: int = 100
    grad_checkpoint: bool = False
    seed: int = 0


def step_seed(seed: int, step: int) -> int:
    """The random seed of one step (LoRA dropout), so a resumed run draws the same masks."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def train(
    model: Model,
    processor: Processor,
    train_set: list[Sample],
    valid_set: list[Sample],
    args: TrainingArgs,
    adapter_path: str | Path,
    config: dict,
    image_kwargs: dict | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train the model's unfrozen (LoRA) parameters; return the loss history.

    Checkpoints go to `adapter_path` every `save_every` steps and at the end; with `resume`
    the run continues from the last one with the same optimizer state and data order.
    """
    adapter_path = Path(adapter_path)
    optimizer = optim.Adam(learning_rate=args.learning_rate)
    step, history = restore_checkpoint(adapter_path, model, optimizer) if resume else (0, [])
    value_and_grad = nn.value_and_grad(model, loss_fn)
    validate = partial(
        evaluate, model, valid_set, processor, args.batch_size, args.val_batches, image_kwargs
    )
    validating = bool(valid_set) and args.val_batches != 0
    if validating and step == 0:
        history.append({"step": 0, "val_loss": validate()})
    model.train()
    start, tokens = time.perf_counter(), 0
    bar = tqdm(total=args.iters, initial=step, disable=not progress, desc="Training", unit="step")
    while step < args.iters:
        indices = batch_indices(len(train_set), args.batch_size, args.seed, step)
        batch = make_batch([train_set[i] for i in indices], processor, image_kwargs)
        step += 1
        mx.random.seed(step_seed(args.seed, step))
        loss, grads = value_and_grad(model, batch, args.grad_checkpoint)
        optimizer.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        record = {"step": step, "train_loss": loss.item()}
        if validating and (step % args.steps_per_eval == 0 or step == args.iters):
            record["val_loss"] = validate()
        history.append(record)
        tokens += batch.tokens
        bar.update()
        bar.set_postfix(
            loss=f"{record['train_loss']:.3f}",
            tok_s=f"{tokens / (time.perf_counter() - start):.0f}",
            peak_gb=f"{mx.get_peak_memory() / 1e9:.2f}",
            **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}),
        )
        if step % args.save_every == 0 or step == args.iters:
            save_checkpoint(adapter_path, model, optimizer, step, history, config)
    bar.close()
    plot_loss_curve(history, adapter_path / CURVE_FILE)
    return history


def plot_loss_curve(history: list[dict], file: Path) -> None:
    """Training and validation loss against the step, as a PNG (skipped without matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib is not installed: no {file.name} (pip install matplotlib)")
        return
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, style, label in (("train_loss", "-", "train"), ("val_loss", "o-", "validation")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            axes.plot(*zip(*points), style, label=label, markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (per loss token)")
    axes.legend()
    axes.grid(alpha=0.3)
    tmp = file.with_name(f".{file.stem}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(file)


# ---------------------------------------------------------------------------
# Command line glue


def cli_image_kwargs(
    no_image_splitting: bool, longest_edge: int | None, max_tiles: int | None
) -> dict:
    """Processor keyword arguments for the image options."""
    kwargs: dict[str, Any] = {}
    if no_image_splitting:
        kwargs["do_image_splitting"] = False
    if longest_edge is not None:
        kwargs["longest_edge"] = longest_edge
    if max_tiles is not None:
        kwargs["max_tiles"] = max_tiles
    return kwargs


def recorded_base(model: str) -> str:
    """The base model as adapter_config.json records it: an absolute folder, or a Hub repo id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


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
    progress: bool = True,
) -> list[dict]:
    """Everything `python -m mlx_smolvlm.lora` does: check data, add LoRA, train, save."""
    from .loading import get_model_path, load_model

    if iters is not None and epochs is not None:
        raise TrainingError("give --iters or --epochs, not both")
    kwargs = cli_image_kwargs(no_image_splitting, longest_edge, max_tiles)
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
    if epochs is not None:
        iters = epochs * math.ceil(len(train_set) / batch_size)
    args = TrainingArgs(
        iters or DEFAULT_ITERS, batch_size, learning_rate, steps_per_eval, val_batches,
        save_every, grad_checkpoint, seed,
    )  # fmt: skip
    trainable = sum(v.size for _, v in tree_flatten(vlm.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(vlm.parameters()))
    print(
        f"{len(train_set)} training / {len(valid_set)} validation records; LoRA on "
        f"{len(config['modules'])} layers: {trainable / 1e6:.3f}M trainable parameters "
        f"({100 * trainable / total:.2f}%); {args.iters} steps ({asdict(args)})"
    )
    history = train(
        vlm, processor, train_set, valid_set, args, adapter_path, config, kwargs, resume, progress
    )
    print(f"Saved adapters to {adapter_path}")
    return history
