"""Throughput of `batch_generate` against batch size: a table on stdout and a PNG plot.

    python benchmarks/bench_batch.py --model ../shared/models/SmolVLM-256M-Instruct
    python benchmarks/bench_batch.py --tiny           # seconds: a shrunk random model

`--model` takes a checkpoint directory; one with a config but no weights
(like ../shared/models/SmolVLM-256M-Instruct) gets random weights from transformers, which
keeps the real shapes and so the real cost. `--tiny` shrinks that config's widths and depths.
Every prompt decodes exactly `--max-tokens` tokens (end-of-turn tokens are ignored) so that
all batch sizes do the same work per sequence.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx_smolvlm  # noqa: F401  (loads the fast CPU BLAS before mlx)
from mlx_smolvlm import batch_generate, load
from mlx_smolvlm.random_checkpoint import save_random_checkpoint

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "shared/models/SmolVLM-256M-Instruct"


def prompts_for(batch: int, image: bool) -> tuple[list[str], list]:
    """`batch` different questions, each with one small image when `image` is set."""
    from PIL import Image

    questions = [f"Question {i}: what do you see, and why? " * (1 + i % 3) for i in range(batch)]
    images = [Image.new("RGB", (384, 320), (20 * i % 255, 90, 160)) if image else None for i in range(batch)]  # fmt: skip
    return questions, images


def measure(model, processor, batch: int, max_tokens: int, image: bool) -> dict:
    """One timed batch: prefill and decode seconds and throughputs."""
    prompts, images = prompts_for(batch, image)
    start = time.perf_counter()
    results = batch_generate(
        model,
        processor,
        prompts,
        images,
        max_tokens=max_tokens,
        eos_token_ids=(),
        do_image_splitting=False,  # one tile per image
    )
    wall = time.perf_counter() - start
    prompt_tokens = sum(r.prompt_tokens for r in results)
    prefill = prompt_tokens / results[0].prompt_tps
    generated = sum(r.generation_tokens for r in results)
    return {
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "generated": generated,
        "prefill_s": prefill,
        "decode_s": wall - prefill,
        "decode_tps": generated / (wall - prefill),
        "total_tps": generated / wall,
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'batch':>5} {'prompt tok':>10} {'prefill s':>9} {'decode s':>8} "
          f"{'decode tok/s':>12} {'overall tok/s':>13}")  # fmt: skip
    for r in rows:
        print(f"{r['batch']:>5} {r['prompt_tokens']:>10} {r['prefill_s']:>9.2f} "
              f"{r['decode_s']:>8.2f} {r['decode_tps']:>12.1f} {r['total_tps']:>13.1f}")  # fmt: skip


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Decode and overall generated tokens/s against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [r["decode_tps"] for r in rows], "o-", label="decode only")
    ax.plot(sizes, [r["total_tps"] for r in rows], "s--", label="with prefill")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_CONFIG_DIR)
    parser.add_argument("--tiny", action="store_true", help="Shrink the model (quick runs).")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-image", action="store_true", help="Text-only prompts.")
    parser.add_argument("--output", type=Path, default=Path("bench_batch.png"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if args.tiny or not any(path.glob("*.safetensors")):
            path = save_random_checkpoint(args.model, Path(tmp) / "random", tiny=args.tiny)
        model, processor = load(path)
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        measure(model, processor, 1, 4, not args.no_image)  # warm-up
        rows = [measure(model, processor, b, args.max_tokens, not args.no_image) for b in sizes]
    print_table(rows)
    kind = "tiny random" if args.tiny else "random" if path != args.model else "checkpoint"
    title = (
        f"{args.model.name} ({kind}), {args.max_tokens} tokens per prompt,\n"
        f"{'text only' if args.no_image else 'one 1-tile image per prompt'}"
    )
    plot(rows, title, args.output)
    print(f"plot saved to {args.output}")


if __name__ == "__main__":
    main()
