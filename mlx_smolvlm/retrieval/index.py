"""An on-disk index of page embeddings: safetensors shards + a JSONL manifest, searched memory-mapped.

Layout of an index folder:

- `index.json`: {"format": "mlx-smolvlm-retrieval-index", "version": 1, "model", "adapter",
  "dim", "dtype" (bfloat16, float16 or float32), "dpi"}, written once when the index is created.
- `embeddings-NNNNN.safetensors`: one tensor `embeddings` (tokens, dim) holding the token
  embeddings of consecutive pages, row after row.
- `manifest.jsonl`: one line per page, appended after its shard is complete:
  {"id", "source", "page" (1-based PDF page, null for an image), "shard", "start", "tokens"};
  the page's embeddings are rows start .. start + tokens of its shard.

A shard is written to a temporary name and renamed (utils.atomic), then its lines are
appended to the manifest in one write, so a killed run leaves whole shards and lines; a rerun drops a
trailing partial line and shards that no line names, and skips pages already listed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .backbone import atomic, read_json
from .scoring import flatten, maxsim_flat, top_k
from .sources import Page

FORMAT = "mlx-smolvlm-retrieval-index"
VERSION = 1
INDEX_FILE = "index.json"
MANIFEST = "manifest.jsonl"
TENSOR = "embeddings"
SHARD_NAME = "embeddings-{:05d}.safetensors"
SHARD_PATTERN = re.compile(r"embeddings-(\d{5,})\.safetensors")
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# numpy has no bfloat16: its raw 16 bits are mapped and widened to float32 by MLX.
SAFETENSORS_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
# Identity of an index's embeddings: a resumed run must match these.
IDENTITY_KEYS = ("model", "adapter", "dim", "dtype", "dpi")
# Rows scored per task: 2 MiB of float32 at dim 128, which stays in a core's cache.
CHUNK_TOKENS = 4096


class IndexFormatError(ValueError):
    """An index folder that is missing, damaged or built differently."""


@dataclass
class Hit:
    """One search result."""

    rank: int
    score: float
    id: int
    source: str
    page: int | None

    def label(self) -> str:
        return self.source if self.page is None else f"{self.source} page {self.page}"


def read_metadata(index_dir: Path) -> dict[str, Any]:
    """index.json, checked to be this format."""
    file = index_dir / INDEX_FILE
    if not file.exists():
        raise IndexFormatError(f"{index_dir}: not an index (no {INDEX_FILE})")
    meta = read_json(file, IndexFormatError)
    if meta.get("format") != FORMAT:
        raise IndexFormatError(f"{file}: not an {FORMAT} file")
    if meta.get("version") != VERSION:
        raise IndexFormatError(f"{file}: version {meta.get('version')!r}; expected {VERSION}")
    if meta.get("dtype") not in DTYPES or not isinstance(meta.get("dim"), int):
        raise IndexFormatError(f"{file}: bad dtype or dim")
    return meta


def read_manifest(index_dir: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The manifest's entries; a trailing partial line (a killed write) is ignored or cut off."""
    file = index_dir / MANIFEST
    if not file.exists():
        return []
    data = file.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        with open(file, "r+b") as f:
            f.truncate(len(complete))
    entries = []
    for number, line in enumerate(complete.splitlines(), start=1):
        try:
            entry = json.loads(line)
            _check_entry(entry)
        except (ValueError, TypeError, KeyError) as e:
            raise IndexFormatError(f"{file}:{number}: bad manifest line ({e})") from e
        entries.append(entry)
    return entries


def _check_entry(entry: Any) -> None:
    if not isinstance(entry, dict):
        raise TypeError("not an object")
    for key in ("id", "start", "tokens"):
        if not isinstance(entry[key], int) or entry[key] < 0:
            raise ValueError(f"{key} must be a non-negative integer")
    if not isinstance(entry["source"], str) or not SHARD_PATTERN.fullmatch(entry["shard"]):
        raise ValueError("bad source or shard")


def memmap_tensor(file: Path, name: str = TENSOR) -> np.ndarray:
    """A read-only memory map of one tensor of a safetensors file (no copy)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > size:
                raise ValueError("header larger than the file")
            header = json.loads(f.read(header_size))
        info = header[name]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise IndexFormatError(f"{file}: not a readable embeddings shard ({e})") from e
    offset = 8 + header_size + begin
    if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize or offset + end - begin > size:
        raise IndexFormatError(f"{file}: truncated shard")
    return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)


class IndexWriter:
    """Append pages' embeddings to an index folder, a shard at a time, resuming a previous run."""

    def __init__(self, index_dir: str | Path, identity: dict[str, Any], shard_pages: int = 32):
        if shard_pages < 1:
            raise ValueError(f"shard_pages must be at least 1, got {shard_pages}")
        if identity.get("dtype") not in DTYPES:
            raise ValueError(
                f"dtype must be one of {sorted(DTYPES)}, got {identity.get('dtype')!r}"
            )
        self.dir = Path(index_dir)
        self.shard_pages = shard_pages
        if (self.dir / INDEX_FILE).exists():
            self.meta = read_metadata(self.dir)
            for key in IDENTITY_KEYS:
                if self.meta.get(key) != identity.get(key):
                    raise IndexFormatError(
                        f"{self.dir} was built with {key}={self.meta.get(key)!r}, not "
                        f"{identity.get(key)!r}: use the same settings or a new --index folder"
                    )
        else:
            if self.dir.exists() and not self.dir.is_dir():
                raise IndexFormatError(f"{self.dir} is a file, not an index folder")
            if self.dir.exists() and any(self.dir.iterdir()):
                raise IndexFormatError(f"{self.dir} is a non-empty folder that is not an index")
            self.dir.mkdir(parents=True, exist_ok=True)
            self.meta = {"format": FORMAT, "version": VERSION, **identity}
            atomic.write_json(self.dir / INDEX_FILE, self.meta)
        self.entries = read_manifest(self.dir, repair=True)
        used = {entry["shard"] for entry in self.entries}
        numbers = [int(SHARD_PATTERN.fullmatch(name)[1]) for name in used]
        for file in self.dir.iterdir():  # leftovers of a killed run
            if (SHARD_PATTERN.fullmatch(file.name) and file.name not in used) or (
                file.name.startswith(".") and ".tmp" in file.name
            ):
                file.unlink()
        self.next_shard = max(numbers, default=-1) + 1
        self.done = {(entry["source"], entry["page"]) for entry in self.entries}
        self.pending: list[tuple[Page, np.ndarray]] = []

    def add(self, page: Page, embeddings: Any) -> None:
        """Queue one page's (tokens, dim) embeddings; a full shard is written out."""
        array = np.asarray(embeddings, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.meta["dim"] or array.shape[0] == 0:
            raise ValueError(
                f"{page.label()}: embeddings of shape {array.shape}; expected (tokens, {self.meta['dim']})"
            )
        if page.key in self.done:
            return
        self.pending.append((page, array))
        self.done.add(page.key)
        if len(self.pending) >= self.shard_pages:
            self.flush()

    def flush(self) -> None:
        """Write queued pages as one shard, then their manifest lines."""
        if not self.pending:
            return
        name = SHARD_NAME.format(self.next_shard)
        matrix = np.concatenate([array for _, array in self.pending])
        stored = mx.array(matrix).astype(DTYPES[self.meta["dtype"]])
        atomic.save_safetensors(self.dir / name, {TENSOR: stored})
        lines, start = [], 0
        for page, array in self.pending:
            entry = {
                "id": len(self.entries),
                "source": page.source,
                "page": page.page,
                "shard": name,
                "start": start,
                "tokens": int(array.shape[0]),
            }
            self.entries.append(entry)
            lines.append(json.dumps(entry) + "\n")
            start += array.shape[0]
        with open(self.dir / MANIFEST, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        self.next_shard += 1
        self.pending = []


class Index:
    """A finished (or partial) index opened for search: shards are memory-mapped, not read."""

    def __init__(self, index_dir: str | Path):
        self.dir = Path(index_dir)
        if not self.dir.is_dir():
            raise IndexFormatError(f"{index_dir}: no such index folder")
        self.meta = read_metadata(self.dir)
        self.entries = read_manifest(self.dir)
        self.shards: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for number, entry in enumerate(self.entries):
            if entry["id"] != number:
                raise IndexFormatError(
                    f"{self.dir / MANIFEST}: line {number + 1} has id {entry['id']}"
                )
            by_shard.setdefault(entry["shard"], []).append(entry)
        for name, entries in by_shard.items():
            matrix = memmap_tensor(self.dir / name)
            ids = np.array([e["id"] for e in entries], dtype=np.int64)
            starts = np.array([e["start"] for e in entries], dtype=np.int64)
            lengths = np.array([e["tokens"] for e in entries], dtype=np.int64)
            if matrix.ndim != 2 or matrix.shape[1] != self.meta["dim"]:
                raise IndexFormatError(
                    f"{self.dir / name}: shape {matrix.shape} is not (tokens, dim)"
                )
            packed = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            if not np.array_equal(starts, packed) or packed[-1] + lengths[-1] > len(matrix):
                raise IndexFormatError(
                    f"{self.dir / name}: the manifest's rows do not fit the shard"
                )
            self.shards.append((matrix, ids, starts, lengths))

    def __len__(self) -> int:
        return len(self.entries)

    def scores(
        self, queries: Sequence[Any], chunk_tokens: int = CHUNK_TOKENS, workers: int | None = None
    ) -> np.ndarray:
        """MaxSim scores (queries, pages by id) against every page, a chunk of rows at a time.

        Chunks go to `workers` threads (default: the CPUs this process may use), each with a
        single-threaded BLAS: coarse work per thread, where a multi-threaded BLAS would make
        its threads wait for each other on every small product (ruinous on a busy machine).
        """
        flat, query_starts = flatten(queries)
        if flat.shape[1] != self.meta["dim"]:
            raise ValueError(
                f"queries have dimension {flat.shape[1]}; the index {self.meta['dim']}"
            )
        out = np.zeros((len(queries), len(self.entries)), dtype=np.float32)
        tasks = [
            (matrix, ids[lo:hi], starts[lo:hi], lengths[lo:hi])
            for matrix, ids, starts, lengths in self.shards
            for lo, hi in _chunks(lengths, chunk_tokens)
        ]

        def run(task: tuple) -> None:
            matrix, ids, starts, lengths = task
            block = as_float32(matrix[starts[0] : starts[-1] + lengths[-1]])
            out[:, ids] = maxsim_flat(flat, query_starts, block, starts - starts[0])

        with single_threaded_blas(), ThreadPoolExecutor(workers or available_cpus()) as pool:
            list(pool.map(run, tasks))
        return out

    def search(
        self,
        queries: Sequence[Any],
        k: int = 5,
        chunk_tokens: int = CHUNK_TOKENS,
        workers: int | None = None,
    ) -> list[list[Hit]]:
        """The `k` best pages for each query's embeddings, best first."""
        if k < 1:
            raise ValueError(f"top-k must be at least 1, got {k}")
        if not self.entries:
            return [[] for _ in queries]
        scores = self.scores(queries, chunk_tokens, workers)
        results = []
        for row, best in zip(scores, top_k(scores, k)):
            hits = []
            for rank, i in enumerate(best, start=1):
                entry = self.entries[i]
                hits.append(Hit(rank, float(row[i]), entry["id"], entry["source"], entry["page"]))
            results.append(hits)
        return results


def as_float32(rows: np.ndarray) -> np.ndarray:
    """Shard rows as float32; bfloat16 is stored as raw uint16 bits, the high half of a float32."""
    if rows.dtype == np.uint16:
        wide = np.zeros(rows.shape + (2,), dtype=np.uint16)
        wide[..., 1] = rows  # little-endian: the high 16 bits come second
        return wide.view(np.float32).reshape(rows.shape)
    return np.asarray(rows, dtype=np.float32)


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def single_threaded_blas() -> Any:
    """A context in which numpy's BLAS uses one thread (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits  # optional: a dependency off macOS only
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _chunks(lengths: np.ndarray, budget: int) -> Iterable[tuple[int, int]]:
    """Consecutive page ranges [lo, hi) of at most `budget` rows (at least one page each)."""
    lo, total = 0, 0
    for i, length in enumerate(lengths):
        if i > lo and total + length > budget:
            yield lo, i
            lo, total = i, 0
        total += int(length)
    if lo < len(lengths):
        yield lo, len(lengths)
