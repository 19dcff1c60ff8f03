"""The vision tower alone: this project's (host kernels on the CPU backend) against transformers'
SigLIP tower, on the same checkpoint and the same number of random 512x512 tiles.

Each runs in a fresh process (a process that loads one library's BLAS first must not time the
other's), in turn, `--reps` times, each process timing `--passes` passes:

    python benchmarks/bench_tower.py --model CHECKPOINT --tiles 9
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def ours(model_path: Path, tiles: int, passes: int) -> list[float]:
    """Seconds per pass of this project's vision tower."""
    from mlx_smolvlm import load  # first: it loads the BLAS MLX multiplies with
    from mlx_smolvlm.backends.cpu import prepare

    # isort: split
    import mlx.core as mx

    model, _ = load(model_path)
    prepare(model)
    size = model.config.vision_config.image_size
    side = size // model.config.vision_config.patch_size
    pixels = mx.random.normal((tiles, size, size, 3))
    positions = mx.broadcast_to(mx.arange(side * side)[None], (tiles, side * side))
    mx.eval(pixels, positions)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        mx.eval(model.vision_model(pixels, positions))
        times.append(time.perf_counter() - start)
    return times


def theirs(model_path: Path, tiles: int, passes: int) -> list[float]:
    """Seconds per pass of transformers' vision tower (torch on the CPU)."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()
    tower = model.model.vision_model
    size = model.config.vision_config.image_size
    side = size // model.config.vision_config.patch_size
    pixels = torch.randn(tiles, 3, size, size)
    mask = torch.ones(tiles, side, side, dtype=torch.bool)
    times = []
    with torch.no_grad():
        for _ in range(passes):
            start = time.perf_counter()
            tower(pixel_values=pixels, patch_attention_mask=mask)
            times.append(time.perf_counter() - start)
    return times


WORKERS = {"mlx-smolvlm": ours, "transformers": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint with weights")
    parser.add_argument("--tiles", type=int, default=9)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2, help="processes of each, in turn")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        times = WORKERS[args.worker](args.model, args.tiles, args.passes)
        print(" ".join(f"{t:.2f}" for t in times))
        return
    results: dict[str, list[float]] = {name: [] for name in WORKERS}
    for rep in range(args.reps):
        for name in WORKERS:
            cmd = [sys.executable, __file__, "--worker", name, "--model", str(args.model)]
            cmd += ["--tiles", str(args.tiles), "--passes", str(args.passes)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            times = [float(t) for t in out.split()[-args.passes :]]
            results[name] += times
            print(f"{name} process {rep + 1}: " + ", ".join(f"{t:.2f} s" for t in times))
    for name, times in results.items():
        print(f"{name}: {min(times):.2f}-{max(times):.2f} s for {args.tiles} tiles")


if __name__ == "__main__":
    main()
