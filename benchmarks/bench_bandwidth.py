"""Memory read bandwidth of this machine, and the decode speed it allows a float32 model.

Decoding one token reads every weight of the language model once (the KV cache is small beside
it), so tokens/s cannot exceed bandwidth / bytes of weights. The bandwidth is measured by
streaming a float32 array far larger than the CPU caches through numpy reductions (a sum and a
BLAS dot product), on one thread and on every available core (threads summing disjoint slices:
numpy releases the GIL); the best of several passes counts.

    python benchmarks/bench_bandwidth.py --model ../shared/models/SmolVLM-256M-Instruct
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from mlx_smolvlm.backends.threads import available_cores


def read_gbps(data: np.ndarray, threads: int, passes: int, reduce) -> float:
    """Best GB/s of `passes` reads of `data` with `reduce` over `threads` disjoint slices."""
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool, threadpool_limits(1, user_api="blas"):
        for _ in range(passes):
            start = time.perf_counter()
            list(pool.map(reduce, parts))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def decode_bytes(config: dict) -> int:
    """Bytes of float32 weights one decode step reads: every decoder projection and the head."""
    text = config.get("text_config", config)
    hidden, inter, layers = (
        text["hidden_size"],
        text["intermediate_size"],
        text["num_hidden_layers"],
    )
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads", heads)
    head_dim = text.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    per_layer = attention + 3 * hidden * inter + 2 * hidden  # projections, two RMS norms
    return 4 * (layers * per_layer + text["vocab_size"] * hidden + hidden)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a checkpoint or config folder")
    parser.add_argument("--megabytes", type=int, default=512, help="size of the streamed array")
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()

    data = np.ones(args.megabytes * (1 << 20) // 4, dtype=np.float32)
    kernels = {"sum": np.sum, "dot": lambda part: np.dot(part, part)}  # a BLAS streaming read
    results = {}
    for threads in sorted({1, available_cores()}):
        for name, reduce in kernels.items():
            gbps = read_gbps(data, threads, args.passes, reduce)
            results[f"{name}, {threads} thread(s)"] = gbps
            print(f"{name:>4}, {threads} thread(s): {gbps:6.1f} GB/s")
    best = max(results.values())
    print(f"bandwidth: {best:.1f} GB/s (the best of the above)")
    if args.model:
        config = json.loads((args.model / "config.json").read_text())
        weights = decode_bytes(config)
        print(
            f"decode reads {weights / 1e6:.0f} MB of float32 weights per token: ceiling "
            f"{best * 1e9 / weights:.1f} tokens/s"
        )


if __name__ == "__main__":
    main()
