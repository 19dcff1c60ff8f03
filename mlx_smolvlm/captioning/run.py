"""Caption items batch by batch with `batch_generate`, each rank its shard, resumably.

A run reads which ids are already written, deals the rest out to the ranks in whole
batches, and appends each finished batch to the rank's part file; rank 0 merges the parts
into the output once every rank is done. An image that cannot be read, is too large, or
makes generation fail gets an error record with the reason; the run goes on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mlx_smolvlm import batch_generate

from ..processing.image import load_image
from ..utils import distributed
from .inputs import Item, shard
from .records import append_records, cut_partial_tail, done_ids, merge, part_path


@dataclass
class Summary:
    """What a run did, summed over all ranks (`records` is the merged output's length)."""

    captioned: int
    failed: int
    skipped: int
    seconds: float
    records: int

    @property
    def images_per_second(self) -> float:
        return (self.captioned + self.failed) / self.seconds if self.seconds > 0 else 0.0


def open_image(
    path: str, max_pixels: int | None = None, resize_shape: tuple[int, int] | None = None
) -> Image.Image:
    """Load an image to caption; one above `max_pixels` is refused before it is decoded."""
    if max_pixels is not None and not path.startswith(("http://", "https://", "data:")):
        try:
            with Image.open(path) as peek:
                width, height = peek.size
        except (OSError, ValueError):
            width = height = 0  # unreadable: load_image below says why
        if width * height > max_pixels:
            raise ValueError(
                f"image is too large: {width}x{height} pixels, above --max-pixels {max_pixels}"
            )
    image = load_image(path)
    if resize_shape is not None:
        height, width = resize_shape
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def caption_batch(
    model: Any,
    processor: Any,
    items: Sequence[Item],
    max_pixels: int | None = None,
    resize_shape: tuple[int, int] | None = None,
    **generation: Any,
) -> list[dict]:
    """One record per item, in order: its caption, or the reason it has none."""
    records: dict[str, dict] = {}
    ready, images = [], []
    for item in items:
        try:
            images.append(open_image(item.path, max_pixels, resize_shape))
            ready.append(item)
        except Exception as err:  # any unreadable image is recorded, never fatal
            records[item.id] = error_record(item, err)
    try:
        results = batch_generate(
            model, processor, [i.prompt for i in ready], [[im] for im in images], **generation
        )
        records.update((i.id, caption_record(i, r)) for i, r in zip(ready, results))
    except Exception:
        # Something in the batch failed: caption its images one by one to find the culprit.
        for item, image in zip(ready, images):
            try:
                [result] = batch_generate(model, processor, [item.prompt], [[image]], **generation)
                records[item.id] = caption_record(item, result)
            except Exception as err:
                records[item.id] = error_record(item, err)
    return [records[item.id] for item in items]


def caption_record(item: Item, result: Any) -> dict:
    """The output line of a captioned image."""
    return {
        "id": item.id,
        "path": item.path,
        "prompt": item.prompt,
        "text": result.text,
        "tokens": result.generation_tokens,
        "finish_reason": result.finish_reason,
    }


def error_record(item: Item, err: Exception) -> dict:
    """The output line of an image that could not be captioned, with the reason."""
    return {"id": item.id, "path": item.path, "error": str(err) or type(err).__name__}


def caption_dataset(
    model: Any,
    processor: Any,
    items: Sequence[Item],
    output: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    max_pixels: int | None = None,
    resize_shape: tuple[int, int] | None = None,
    **generation: Any,
) -> Summary:
    """Caption the items not yet in `output` on every rank of the group and merge the results.

    Call it on every rank with the same items. `generation` holds `batch_generate`'s keyword
    arguments (max_tokens, temperature, seed, system, image processor options...).
    """
    output = Path(output)
    start = time.perf_counter()
    rank, size = distributed.rank(), distributed.size()
    done = done_ids(output)
    distributed.barrier()  # every rank knows what is done before any rank appends
    pending = [item for item in items if item.id not in done]
    batches = shard(pending, batch_size, rank, size)
    part = part_path(output, rank)
    part.parent.mkdir(parents=True, exist_ok=True)
    cut_partial_tail(part)
    label = f"Captioning (rank 0 of {size})" if size > 1 else "Captioning"
    bar = tqdm(
        total=sum(map(len, batches)), disable=not (progress and rank == 0), desc=label, unit="img"
    )
    failed = 0
    for batch in batches:
        records = caption_batch(
            model, processor, batch, max_pixels=max_pixels, resize_shape=resize_shape, **generation
        )
        append_records(part, records)
        failed += sum("error" in r for r in records)
        bar.update(len(batch))
    bar.close()
    # The sum waits for every rank, so the parts are complete when rank 0 merges them.
    totals = distributed.all_sum([sum(map(len, batches)), failed])
    attempted, failed = (int(n) for n in totals)
    records = merge(output, [item.id for item in items]) if rank == 0 else 0
    return Summary(
        captioned=attempted - failed,
        failed=failed,
        skipped=len(items) - len(pending),
        seconds=time.perf_counter() - start,
        records=records,
    )
