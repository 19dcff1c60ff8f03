"""Embed pages into an index folder, streaming shards to disk and resuming where a run stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..processing.pages import DEFAULT_DPI
from .embedding import embed_inputs
from .index import IndexWriter
from .model import ColIdefics3
from .processing import RetrievalProcessor
from .sources import Page, load_page


def build_index(
    model: ColIdefics3,
    processor: RetrievalProcessor,
    pages: list[Page],
    index_dir: str | Path,
    identity: dict[str, Any],
    batch_size: int = 4,
    dpi: float = DEFAULT_DPI,
    shard_pages: int = 32,
    progress: bool = True,
) -> IndexWriter:
    """Add every page not yet in the index; what finished stays on disk if the run stops."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    writer = IndexWriter(index_dir, identity, shard_pages)
    todo = [page for page in pages if page.key not in writer.done]
    bar = tqdm(
        total=len(pages),
        initial=len(pages) - len(todo),
        unit="page",
        desc="Indexing",
        disable=not progress,
    )
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = [load_page(page, dpi) for page in batch]
            embeddings = embed_inputs(model, processor.process_images(images))
            for page, embedding in zip(batch, embeddings):
                writer.add(page, np.array(embedding))
            bar.update(len(batch))
    finally:
        writer.flush()
        bar.close()
    return writer
