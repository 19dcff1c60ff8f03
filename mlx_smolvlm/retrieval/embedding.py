"""Embed pages and queries in batches: one (tokens, dim) matrix per item, padding removed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import mlx.core as mx
import numpy as np

from .model import ColIdefics3
from .processing import RetrievalProcessor


def embed_inputs(model: ColIdefics3, inputs: dict[str, Any]) -> list[mx.array]:
    """Run the model on processed inputs; each item's embeddings at its real tokens."""
    embeddings = model(
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs.get("pixel_values"),
        inputs.get("pixel_attention_mask"),
    )
    mx.eval(embeddings)
    mask = np.asarray(inputs["attention_mask"]).astype(bool)
    return [embeddings[i][mx.array(np.flatnonzero(row))] for i, row in enumerate(mask)]


def iter_image_embeddings(
    model: ColIdefics3, processor: RetrievalProcessor, images: Iterable[Any], batch_size: int = 4
) -> Iterator[mx.array]:
    """Embeddings of each page image, in order, computed `batch_size` at a time."""
    for batch in _batches(images, batch_size):
        yield from embed_inputs(model, processor.process_images(batch))


def embed_images(
    model: ColIdefics3, processor: RetrievalProcessor, images: Iterable[Any], batch_size: int = 4
) -> list[mx.array]:
    """Embeddings (tokens, dim) of each page image (PIL image, path or URL)."""
    return list(iter_image_embeddings(model, processor, images, batch_size))


def embed_queries(
    model: ColIdefics3, processor: RetrievalProcessor, queries: Iterable[str], batch_size: int = 16
) -> list[mx.array]:
    """Embeddings (tokens, dim) of each query string."""
    out = []
    for batch in _batches(queries, batch_size):
        out.extend(embed_inputs(model, processor.process_queries(batch)))
    return out


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
