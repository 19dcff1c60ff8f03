"""Peak memory of generating about a large image from bf16 and quantized conversions.

A random-weight checkpoint of the real SmolVLM-256M-Instruct shape is built with transformers
(saved as bf16 safetensors), converted with `mlx_smolvlm.convert` to each variant, and each
variant generates `--max-tokens` tokens about a 1536x1536 image (17 tiles) in a fresh process,
which reports MLX's peak memory and its own peak resident set size. Building and converting
also run in a child process: on Linux a process's peak RSS carries over an exec from its
parent, so the parent that starts the measurements has to stay small.

    python benchmarks/bench_memory.py [--variants bf16,4bit] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_MODEL = HERE.parents[1] / "shared" / "models" / "SmolVLM-256M-Instruct"
PROMPT = "Describe the image."
# Variant name -> keyword arguments of mlx_smolvlm.convert.convert.
VARIANTS = {
    "bf16": {},
    "8bit": {"quantize": True, "q_bits": 8},
    "4bit": {"quantize": True, "q_bits": 4},
    "4bit-vision": {"quantize": True, "q_bits": 4, "quantize_vision": True},
}


def build_source(config_dir: Path, out: Path) -> Path:
    """A random bf16 checkpoint of the config's shape with its tokenizer files (cached)."""
    if (out / "model.safetensors").exists():
        return out
    from mlx_smolvlm.random_checkpoint import save_random_checkpoint

    return save_random_checkpoint(config_dir, out, seed=0, dtype="bfloat16", force=True)


def build_variant(source: Path, out: Path, options: dict) -> Path:
    """Convert `source` to bf16 with `options` (cached)."""
    if not (out / "config.json").exists():
        from mlx_smolvlm.convert import convert

        convert(source, out, dtype="bfloat16", **options)
    return out


def make_image(path: Path, size: int) -> Path:
    """A noise image, so that no tile is blank."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def peak_rss_gb() -> float:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def worker(checkpoint: Path, image: Path, max_tokens: int, dtype: str) -> dict:
    """Load, generate, and report memory: runs in its own process."""
    # mlx_smolvlm first: it loads the optimized BLAS, which must precede mlx.core's import.
    from mlx_smolvlm import generate, load

    # isort: split
    import mlx.core as mx
    from PIL import Image

    model, processor = load(checkpoint, dtype=dtype)
    loaded_gb = mx.get_peak_memory() / 1e9
    start = time.perf_counter()
    result = generate(model, processor, PROMPT, image=[Image.open(image)], max_tokens=max_tokens)
    return {
        "weights_gb": sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / 1e9,
        "loaded_peak_gb": loaded_gb,
        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
        "rss_peak_gb": peak_rss_gb(),
        "prompt_tokens": result.prompt_tokens,
        "generated": result.generation_tokens,
        "seconds": time.perf_counter() - start,
    }


def prepare(config_dir: Path, out: Path, variants: list[str], image_size: int) -> None:
    """Build the source checkpoint, its conversions and the image: runs in its own process."""
    source = build_source(config_dir, out / "hf-bf16")
    for name in variants:
        build_variant(source, out / name, VARIANTS[name])
    make_image(out / "image.png", image_size)


def child(*args: str) -> str:
    """Run this script with `args` in a fresh interpreter; return its last line of output."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return (out.stdout.strip().splitlines() or [""])[-1]


def print_table(results: dict[str, dict]) -> None:
    columns = ["weights_gb", "loaded_peak_gb", "mlx_peak_gb", "rss_peak_gb", "prompt_tokens",
               "generated", "seconds"]  # fmt: skip
    print("| variant | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in results.items():
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=SHARED_MODEL, help="real config dir")
    parser.add_argument("--variants", default="bf16,4bit", help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=1536)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype when loading")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    variants = args.variants.split(",")
    if args.prepare:
        prepare(args.config, args.out, variants, args.image_size)
        return
    if args.worker:
        report = worker(args.worker, args.out / "image.png", args.max_tokens, args.dtype)
        print(json.dumps(report))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--out", str(args.out), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype]
    child("--prepare", "--config", str(args.config), "--variants", args.variants,
          "--image-size", str(args.image_size), *common)  # fmt: skip
    results = {}
    for name in variants:
        results[name] = json.loads(child("--worker", str(args.out / name), *common))
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    (args.out / "bench_memory.json").write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
