"""Memory read bandwidth of this machine, the decode speed it allows a float32 model, and how
close decoding comes to it.

Decoding one token reads every weight of the language model once (the KV cache is small beside
it), so tokens/s cannot exceed bandwidth / bytes of weights. The bandwidth is measured by
streaming float32 data far larger than the CPU caches through numpy: a sum and a BLAS dot
product of a 512 MB array, and a matrix-vector product of a 512 MB matrix, on one thread and on
every available core (threads reading disjoint slices: numpy releases the GIL); the best of
several passes of the best kernel counts.

    python benchmarks/bench_bandwidth.py --model ../shared/models/SmolVLM-256M-Instruct

With `--decode CHECKPOINT` (weights, not only a config) it also generates `--tokens` tokens
after a short text prompt with `stream_generate`, alternating with the bandwidth measurement
for `--rounds` rounds (this kind of machine drifts by 10-20 % from one minute to the next), and
reports each round's decode speed as a share of that round's ceiling, and the median. Within a
round both sides are medians, taken the same way: the median pass of the best kernel against
the median time between tokens (a best pass against a mean token would count the machine's
jitter against decoding only); the best-of-passes ceiling is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# mlx_smolvlm first: it loads the optimized BLAS, which must precede mlx.core's import.
from mlx_smolvlm import load, stream_generate
from mlx_smolvlm.backends.threads import available_cores

# isort: split
import numpy as np
from threadpoolctl import threadpool_limits

PROMPT = "Write a long story about a lighthouse keeper and her cat."


def read_gbps(data: np.ndarray, threads: int, passes: int, reduce) -> list[float]:
    """GB/s of each of `passes` reads of `data` with `reduce` over `threads` disjoint slices."""
    parts = np.array_split(data, threads)
    rates = []
    with ThreadPoolExecutor(threads) as pool, threadpool_limits(1, user_api="blas"):
        for _ in range(passes):
            start = time.perf_counter()
            list(pool.map(reduce, parts))
            rates.append(data.nbytes / (time.perf_counter() - start) / 1e9)
    return rates


def bandwidths(data: np.ndarray, passes: int, echo: bool) -> dict[str, list[float]]:
    """GB/s of each pass of each reading kernel, on one thread and on every available core."""
    matrix = data.reshape(-1, 1024)  # rows of 4 KB: a matrix-vector product, as decoding runs
    vector = np.ones(1024, dtype=np.float32)
    kernels = {
        "sum": (data, np.sum),
        "dot": (data, lambda part: np.dot(part, part)),
        "gemv": (matrix, lambda part: part @ vector),
    }
    results = {}
    for threads in sorted({1, available_cores()}):
        for name, (array, reduce) in kernels.items():
            rates = read_gbps(array, threads, passes, reduce)
            results[f"{name}, {threads} thread(s)"] = rates
            if echo:
                print(
                    f"{name:>4}, {threads} thread(s): {max(rates):6.1f} GB/s best, "
                    f"{statistics.median(rates):6.1f} median"
                )
    return results


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


def decode_tps(model, processor, tokens: int) -> float:
    """Tokens/s of decoding `tokens` tokens after a short text prompt: one over the median time
    between two tokens."""
    stamps = []
    for _ in stream_generate(model, processor, PROMPT, max_tokens=tokens):
        stamps.append(time.perf_counter())
    return 1 / statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a checkpoint or config folder")
    parser.add_argument("--decode", type=Path, help="a checkpoint to decode with, in turn")
    parser.add_argument("--megabytes", type=int, default=512, help="size of the streamed array")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="bandwidth/decode rounds")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per round")
    args = parser.parse_args()

    data = np.ones(args.megabytes * (1 << 20) // 4, dtype=np.float32)
    results = bandwidths(data, args.passes, echo=True)
    best = max(max(rates) for rates in results.values())
    print(f"bandwidth: {best:.1f} GB/s (the best of the above)")
    folder = args.decode or args.model
    if folder is None:
        return
    weights = decode_bytes(json.loads((folder / "config.json").read_text()))
    print(
        f"decode reads {weights / 1e6:.0f} MB of float32 weights per token: ceiling "
        f"{best * 1e9 / weights:.1f} tokens/s"
    )
    if args.decode is None:
        return
    model, processor = load(args.decode)
    decode_tps(model, processor, 8)  # warm-up: first-call costs out of the rounds
    shares = []
    print(
        "| round | bandwidth GB/s, median (best) pass | ceiling tok/s | decode tok/s, median "
        "| share |"
    )
    print("|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        passes = bandwidths(data, args.passes, echo=False).values()
        gbps = max(statistics.median(rates) for rates in passes)
        best = max(max(rates) for rates in passes)
        ceiling = gbps * 1e9 / weights
        tps = decode_tps(model, processor, args.tokens)
        shares.append(tps / ceiling)
        print(
            f"| {round_} | {gbps:.1f} ({best:.1f}) | {ceiling:.1f} | {tps:.1f} "
            f"| {tps / ceiling:.0%} |"
        )
    print(f"decode at {statistics.median(shares):.0%} of the bandwidth ceiling (median of rounds)")


if __name__ == "__main__":
    main()
