"""Late-interaction scoring (MaxSim): for each query token the best page token, summed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    queries: np.ndarray, query_starts: np.ndarray, pages: np.ndarray, page_starts: np.ndarray
) -> np.ndarray:
    """Scores (queries, pages) of flattened float32 query and page token matrices.

    numpy's matmul: its bundled OpenBLAS picks kernels for this CPU, where the system
    OpenBLAS that MLX's CPU backend loads may not (see the README's Retrieval section).
    """
    similarity = pages @ queries.T
    lengths = np.diff(np.append(page_starts, pages.shape[0]))
    if np.all(lengths == lengths[0]):  # pages of one size (the usual case): no segments
        best = similarity.reshape(len(lengths), int(lengths[0]), -1).max(axis=1)
    else:
        best = np.maximum.reduceat(similarity, page_starts, axis=0)
    return np.add.reduceat(best, query_starts, axis=1).T


def score(queries: Sequence[Any], pages: Sequence[Any], batch_size: int = 128) -> np.ndarray:
    """MaxSim scores (len(queries), len(pages)) of per-token embeddings, `batch_size` pages at a time."""
    if not queries:
        raise ValueError("no queries to score")
    query_matrix, query_starts = flatten(queries)
    out = np.zeros((len(queries), len(pages)), dtype=np.float32)
    for start in range(0, len(pages), batch_size):
        chunk = pages[start : start + batch_size]
        page_matrix, page_starts = flatten(chunk)
        if page_matrix.shape[1] != query_matrix.shape[1]:
            raise ValueError(
                f"pages have dimension {page_matrix.shape[1]}; queries have {query_matrix.shape[1]}"
            )
        out[:, start : start + len(chunk)] = maxsim_flat(
            query_matrix, query_starts, page_matrix, page_starts
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
