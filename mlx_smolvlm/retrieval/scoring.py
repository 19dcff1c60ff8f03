"""Late-interaction scoring (MaxSim): for each query token the best page token, summed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np


def flatten(items: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Stack (tokens, dim) matrices into one; also each item's first row."""
    arrays = [np.asarray(item, dtype=np.float32) for item in items]
    for i, array in enumerate(arrays):
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"item {i} has shape {array.shape}; expected (tokens > 0, dim)")
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.concatenate(arrays), starts


def maxsim_flat(
    queries: mx.array, query_starts: np.ndarray, pages: Any, page_starts: np.ndarray
) -> np.ndarray:
    """Scores (queries, pages) of flattened query and page token matrices."""
    similarity = mx.matmul(mx.array(pages, dtype=mx.float32), queries.T)
    best = np.maximum.reduceat(np.array(similarity), page_starts, axis=0)
    return np.add.reduceat(best, query_starts, axis=1).T


def score(queries: Sequence[Any], pages: Sequence[Any], batch_size: int = 128) -> np.ndarray:
    """MaxSim scores (len(queries), len(pages)) of per-token embeddings, `batch_size` pages at a time."""
    if not queries:
        raise ValueError("no queries to score")
    flat, query_starts = flatten(queries)
    query_matrix = mx.array(flat)
    out = np.zeros((len(queries), len(pages)), dtype=np.float32)
    for start in range(0, len(pages), batch_size):
        chunk = pages[start : start + batch_size]
        page_flat, page_starts = flatten(chunk)
        if page_flat.shape[1] != flat.shape[1]:
            raise ValueError(
                f"pages have dimension {page_flat.shape[1]}; queries have {flat.shape[1]}"
            )
        out[:, start : start + len(chunk)] = maxsim_flat(
            query_matrix, query_starts, page_flat, page_starts
        )
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` best scores per row, best first (ties: lower index first)."""
    k = min(k, scores.shape[1])
    if k <= 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)
