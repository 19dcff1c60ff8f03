"""Fine-tuning: the loss, evaluation, checkpoints and a resumable training loop.

The step is compiled (`mx.compile` over the model, the optimizer and the random state) and may
accumulate gradients over several batches; the learning rate follows an mlx.optimizers
schedule with a linear warm-up. Checkpoints hold everything a resume needs, so that a resumed
run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from mlx_lm.models.base import create_attention_mask
from tqdm import tqdm

from ..model import Model
from ..processing.processor import Processor
from ..utils import atomic, distributed
from .adapters import adapter_weights, save_adapters
from .datasets import (
    PAD_TO,
    Batch,
    Sample,
    TrainingError,
    batch_indices,
    eval_batches,
    make_batch,
)

STATE_FILE = "training_state.safetensors"
CURVE_FILE = "loss_curve.png"
DEFAULT_ITERS = 1000


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


def batch_arrays(model: Model, batch: Batch, denominator: float | None = None) -> dict:
    """The arrays of a batch for the (compiled) loss, computed on the host: token ids, the
    vision tower's inputs, where the image features go, and the loss positions and targets
    padded to a multiple of PAD_TO (padding weighs 0) so that steps share compiled graphs.
    The summed loss is divided by `denominator` (by default the batch's loss tokens)."""
    count = len(batch.positions)
    size = -(-count // PAD_TO) * PAD_TO
    positions, targets = np.zeros(size, np.int32), np.zeros(size, np.int32)
    positions[:count], targets[:count] = batch.positions, batch.targets
    arrays = {
        "input_ids": mx.array(batch.input_ids),
        "image_positions": model.image_positions(batch.input_ids),
        "positions": mx.array(positions),
        "targets": mx.array(targets),
        "weights": mx.array((np.arange(size) < count).astype(np.float32)),
        "denominator": mx.array(denominator or count, mx.float32),
    }
    if batch.pixel_values is not None:
        arrays["images"] = model.image_inputs(batch.pixel_values, batch.pixel_attention_mask)
    return arrays


def batch_loss(model: Model, arrays: dict, grad_checkpoint: bool = False) -> mx.array:
    """Cross-entropy summed over the loss tokens of `batch_arrays`' output and divided by its
    denominator: the batch's mean (pure MLX)."""
    features = model.encode_images(arrays["images"]) if "images" in arrays else None
    embeddings = model.merge_images(arrays["input_ids"], arrays["image_positions"], features)
    hidden = decoder_hidden(model, embeddings, grad_checkpoint)[:, :-1]
    # Project only the loss positions: the vocabulary head is the largest activation.
    hidden = hidden.reshape(-1, hidden.shape[-1])[arrays["positions"]]
    logits = model.language_model.logits(hidden).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, arrays["targets"]) * arrays["weights"]
    return losses.sum() / arrays["denominator"]


def loss_fn(model: Model, batch: Batch, grad_checkpoint: bool = False) -> mx.array:
    """Mean cross-entropy over the batch's loss tokens."""
    return batch_loss(model, batch_arrays(model, batch), grad_checkpoint)


def loss_tokens(sample: Sample) -> int:
    """How many of a sample's tokens carry loss (the first token is never predicted)."""
    return sum(sample.mask[1:])


def rank_share(samples: list[Sample], rank: int, size: int) -> list[Sample]:
    """The records of a global batch that rank `rank` of `size` trains on."""
    per_rank = -(-len(samples) // size)
    return samples[rank * per_rank : (rank + 1) * per_rank]


def shard_arrays(
    model: Model, samples: list[Sample], processor: Processor, image_kwargs: dict | None
) -> tuple[dict, int]:
    """This rank's share of a global batch as `batch_arrays`, and its token count.

    Each rank divides its summed loss by the loss tokens of the whole global batch (every
    rank holds the dataset, so every rank knows them) over the number of ranks: averaging
    the ranks' gradients then gives exactly the gradient of the global batch's mean loss,
    the one a single process computes with the whole batch.
    """
    share = rank_share(samples, distributed.rank(), distributed.size())
    denominator = sum(map(loss_tokens, samples)) / distributed.size()
    batch = make_batch(share or samples[:1], processor, image_kwargs)
    arrays = batch_arrays(model, batch, denominator)
    if not share:  # a short last batch of an epoch left this rank without records: it adds 0
        arrays["weights"] = mx.zeros_like(arrays["weights"])
        return arrays, 0
    return arrays, batch.tokens


def evaluate(
    model: Model,
    samples: list[Sample],
    processor: Processor,
    batch_size: int,
    num_batches: int = -1,
    image_kwargs: dict | None = None,
) -> float:
    """Mean loss per loss token over the validation batches (dropout off), which the ranks
    of a distributed run share out."""
    training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = eval_batches(len(samples), batch_size, num_batches)
    for indices in batches[distributed.rank() :: distributed.size()]:
        batch = make_batch([samples[i] for i in indices], processor, image_kwargs)
        total += loss_fn(model, batch).item() * len(batch.positions)
        count += len(batch.positions)
    model.train(training)
    total, count = distributed.all_sum([total, count])
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
    atomic.save_safetensors(adapter_path / STATE_FILE, state, metadata)


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

    iters: int = DEFAULT_ITERS  # optimizer steps
    batch_size: int = 4  # records per batch
    learning_rate: float = 1e-4  # peak learning rate
    steps_per_eval: int = 100
    val_batches: int = 25
    save_every: int = 100
    grad_checkpoint: bool = False
    seed: int = 0
    grad_accumulation: int = 1  # batches whose gradients are averaged into one step
    lr_schedule: str = "constant"  # or "cosine" (to 0 at the last step) or "linear"
    warmup: int = 0  # steps of linear warm-up from 0 to the learning rate
    compile: bool = True  # one compiled graph over model, optimizer and random state


SCHEDULES = ("constant", "cosine", "linear")


def learning_rate(args: TrainingArgs) -> float | Callable[[mx.array], mx.array]:
    """The learning rate, or an mlx.optimizers schedule of the step: warm-up, then decay."""
    if args.lr_schedule not in SCHEDULES:
        raise TrainingError(f"--lr-schedule {args.lr_schedule!r} is not one of {SCHEDULES}")
    if not 0 <= args.warmup < args.iters:
        raise TrainingError(f"--warmup {args.warmup} must be at least 0 and below --iters")
    if args.lr_schedule == "constant" and not args.warmup:
        return args.learning_rate
    rest = args.iters - args.warmup
    decay = {
        "constant": lambda: optim.linear_schedule(args.learning_rate, args.learning_rate, 1),
        "cosine": lambda: optim.cosine_decay(args.learning_rate, rest),
        "linear": lambda: optim.linear_schedule(args.learning_rate, 0.0, rest),
    }[args.lr_schedule]()
    if not args.warmup:
        return decay
    warmup = optim.linear_schedule(0.0, args.learning_rate, args.warmup)
    return optim.join_schedules([warmup, decay], [args.warmup])


def step_seed(seed: int, step: int) -> int:
    """The random seed of one batch (LoRA dropout), so a resumed run draws the same masks."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def make_step(model: Model, optimizer: optim.Optimizer, args: TrainingArgs) -> Callable:
    """`step(arrays, grads, update) -> (loss, grads)`: one batch's loss and gradients added
    to `grads`; with `update` the averaged gradients (over the batches, and over the ranks
    of a distributed run) update the model (and None comes back). Compiled with the model,
    optimizer and random state as its implicit inputs and outputs."""
    value_and_grad = nn.value_and_grad(model, batch_loss)
    group = distributed.init()

    def step(arrays: dict, grads: Any, update: bool) -> tuple[mx.array, Any]:
        loss, batch_grads = value_and_grad(model, arrays, args.grad_checkpoint)
        if grads is not None:
            batch_grads = tree_map(mx.add, grads, batch_grads)
        if not update:
            return loss, batch_grads
        if group.size() > 1:
            batch_grads = nn.average_gradients(batch_grads, group=group)
        if args.grad_accumulation > 1:
            batch_grads = tree_map(lambda g: g / args.grad_accumulation, batch_grads)
        optimizer.update(model, batch_grads)
        return loss, None

    if not args.compile:
        return step
    state = [model.state, optimizer.state, mx.random.state]
    return mx.compile(step, inputs=state, outputs=state)


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

    Each step averages the gradients of `grad_accumulation` batches. Checkpoints go to
    `adapter_path` every `save_every` steps and at the end; with `resume` the run continues
    from the last one with the same optimizer state, schedule position and data order. Under
    `mlx.launch` every batch is split across the ranks (`shard_arrays`) and their gradients
    averaged; only rank 0 writes checkpoints and the loss curve and shows the progress bar.
    """
    adapter_path = Path(adapter_path)
    main = distributed.is_main()
    optimizer = optim.Adam(learning_rate=learning_rate(args))
    step, history = restore_checkpoint(adapter_path, model, optimizer) if resume else (0, [])
    validate = partial(
        evaluate, model, valid_set, processor, args.batch_size, args.val_batches, image_kwargs
    )
    validating = bool(valid_set) and args.val_batches != 0
    if validating and step == 0:
        history.append({"step": 0, "val_loss": validate()})
    model.train()
    optimizer.init(model.trainable_parameters())  # the state the compiled step reads and writes
    train_step = make_step(model, optimizer, args)
    start, tokens = time.perf_counter(), 0
    bar = tqdm(
        total=args.iters,
        initial=step,
        disable=not (progress and main),
        desc="Training",
        unit="step",
    )
    while step < args.iters:
        losses, grads = [], None
        for k in range(args.grad_accumulation):
            micro = step * args.grad_accumulation + k  # the batch's index in the data order
            indices = batch_indices(len(train_set), args.batch_size, args.seed, micro)
            arrays, batch_tokens = shard_arrays(
                model, [train_set[i] for i in indices], processor, image_kwargs
            )
            mx.random.seed(step_seed(args.seed, micro + 1))
            last = k == args.grad_accumulation - 1
            loss, grads = train_step(arrays, grads, last)
            mx.eval(loss, grads if grads is not None else model.trainable_parameters())
            losses.append(loss.item())
            tokens += batch_tokens
        mx.eval(model.trainable_parameters(), optimizer.state)
        step += 1
        # Each rank's loss is its share of the batch mean times the number of ranks.
        losses = [value / distributed.size() for value in distributed.all_sum(losses)]
        record = {"step": step, "train_loss": sum(losses) / len(losses)}
        if validating and (step % args.steps_per_eval == 0 or step == args.iters):
            record["val_loss"] = validate()
        history.append(record)
        bar.update()
        bar.set_postfix(
            loss=f"{record['train_loss']:.3f}",
            tok_s=f"{tokens / (time.perf_counter() - start):.0f}",
            peak_gb=f"{mx.get_peak_memory() / 1e9:.2f}",
            **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}),
        )
        if main and (step % args.save_every == 0 or step == args.iters):
            save_checkpoint(adapter_path, model, optimizer, step, history, config)
    bar.close()
    if main:
        plot_loss_curve(history, adapter_path / CURVE_FILE)
    return history


def plot_loss_curve(history: list[dict], file: Path) -> None:
    """Training and validation loss against the step, as a PNG (skipped without matplotlib)."""
    try:  # optional dependency: the [train] extra
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
    atomic.write_file(file, figure.savefig, ".png")
