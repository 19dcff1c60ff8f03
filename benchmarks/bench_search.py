"""Search speed and memory of the retrieval index against a plain numpy MaxSim.

Synthetic unit-length page embeddings (no model) are written once per size as an index
(bfloat16 shards + manifest, as `retrieve index` writes them by default; cached under
benchmarks/results/). Each measurement runs in a fresh process, which reports its wall time
per query and its peak memory: peak RSS (VmHWM, which counts the index file's pages that
a memory map touched; the OS may drop those at will) and peak anonymous memory (sampled
RssAnon: what the process itself allocated).

- index: `Index(DIR).search(queries, k)`, shards memory-mapped, scored a chunk at a time.
- numpy: every page's embeddings read into memory (as float16), then per page
  `(query @ page.T).max(axis=1).sum()` in float32, then argsort.

    python benchmarks/bench_search.py [--pages 10000,100000] [--tokens 128] [--query-tokens 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "search"
DIM = 128
SHARD_PAGES = 1000


def unit_rows(rng: np.random.Generator, rows: int) -> np.ndarray:
    x = rng.standard_normal((rows, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def build(pages: int, tokens: int, dtype: str) -> Path:
    """An index of `pages` synthetic pages of `tokens` tokens each (cached)."""
    from mlx_smolvlm.retrieval import IndexWriter, Page

    folder = RESULTS / f"{pages}x{tokens}-{dtype}"
    if (folder / "done").exists():
        return folder
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    identity = {"model": "synthetic", "adapter": None, "dim": DIM, "dtype": dtype, "dpi": 0}
    writer = IndexWriter(folder, identity, shard_pages=SHARD_PAGES)
    rng = np.random.default_rng(0)
    for start in range(0, pages, SHARD_PAGES):
        count = min(SHARD_PAGES, pages - start)
        matrix = unit_rows(rng, count * tokens).reshape(count, tokens, DIM)
        for i in range(count):
            writer.add(Page(f"synthetic/{start + i}.png"), matrix[i])
    writer.flush()
    (folder / "done").write_text("")
    return folder


class AnonPeak:
    """Sample RssAnon every few milliseconds and keep the largest value (MiB)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, status("RssAnon"))
            time.sleep(0.02)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return max(self.peak, status("RssAnon"))


def status(key: str) -> float:
    """A /proc/self/status memory line in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(
    method: str, folder: Path, query_tokens: int, repeats: int, k: int, workers: int | None
) -> dict:
    """Time `repeats` single-query searches by `method` in this process."""
    import mlx_smolvlm  # noqa: F401  (the fast CPU BLAS before MLX loads)
    from mlx_smolvlm.retrieval import Index
    from mlx_smolvlm.retrieval.index import as_float32

    rng = np.random.default_rng(1)
    queries = [unit_rows(rng, query_tokens) for _ in range(repeats)]
    peak = AnonPeak()
    start = time.perf_counter()
    times = []
    if method == "index":
        index = Index(folder)
        load = time.perf_counter() - start
        for query in queries:
            t = time.perf_counter()
            hits = index.search([query], k, workers=workers)[0]
            times.append(time.perf_counter() - t)
        best = [hit.id for hit in hits]
    else:
        index = Index(folder)
        pages = []
        for matrix, _, starts, lengths in index.shards:
            block = np.array(as_float32(matrix)).astype(np.float16)  # read into memory
            pages.extend(block[s : s + n] for s, n in zip(starts, lengths))
        load = time.perf_counter() - start
        for query in queries:
            t = time.perf_counter()
            scores = np.array(
                [(query @ page.astype(np.float32).T).max(axis=1).sum() for page in pages]
            )
            order = np.argsort(-scores, kind="stable")[:k]
            times.append(time.perf_counter() - t)
        best = order.tolist()
    anon = peak.stop()
    return {
        "method": method,
        "load_s": load,
        "query_s": float(np.median(times)),
        "peak_rss_mib": status("VmHWM"),
        "peak_anon_mib": anon,
        "top": best,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", default="10000,100000", help="Index sizes, comma-separated.")
    parser.add_argument("--tokens", type=int, default=128, help="Tokens per page.")
    parser.add_argument("--query-tokens", type=int, default=20, help="Tokens per query.")
    parser.add_argument("--repeats", type=int, default=3, help="Queries per measurement.")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--workers", type=int, default=None, help="Index search threads.")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, folder = args.worker
        result = measure(
            method, Path(folder), args.query_tokens, args.repeats, args.top_k, args.workers
        )
        print(json.dumps(result))
        return
    rows = []
    for pages in [int(p) for p in args.pages.split(",")]:
        folder = build(pages, args.tokens, args.dtype)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        results = {}
        for method in ("index", "numpy"):
            command = [
                sys.executable, __file__, "--worker", method, str(folder),
                "--query-tokens", str(args.query_tokens), "--repeats", str(args.repeats),
                "--top-k", str(args.top_k),
            ] + (["--workers", str(args.workers)] if args.workers else [])  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        assert results["index"]["top"] == results["numpy"]["top"], results
        for method, r in results.items():
            rows.append((pages, size, r))
    print(
        f"{args.tokens} tokens per page, {args.query_tokens} query tokens, dim {DIM}, top-{args.top_k}"
    )
    print("| pages | index on disk | method | open/load | per query | peak RSS | peak anon |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for pages, size, r in rows:
        print(
            f"| {pages:,} | {size:,.0f} MiB | {r['method']} | {r['load_s']:.2f} s | "
            f"{r['query_s']:.2f} s | {r['peak_rss_mib']:,.0f} MiB | {r['peak_anon_mib']:,.0f} MiB |"
        )


if __name__ == "__main__":
    main()
