"""Captioning throughput with 1 and 2 processes (`mlx.launch --backend ring` on localhost).

    python benchmarks/bench_caption.py                # SmolVLM-256M shapes, random weights
    python benchmarks/bench_caption.py --tiny         # seconds: a shrunk random model

Each run is `python -m mlx_smolvlm.caption` over the same folder of images into a fresh
output; a Markdown table of the wall time (model loading included) and of the captioning
rate the command itself reports goes to stdout, and the outputs are checked to be identical.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_batch import DEFAULT_CONFIG_DIR, random_checkpoint
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"in ([\d.]+) s \(([\d.]+) images/s\)")


def make_images(folder: Path, count: int) -> None:
    """`count` distinct 640x480 pictures."""
    folder.mkdir()
    for i in range(count):
        image = Image.new("RGB", (640, 480), (20 * i % 255, 90, 160))
        ImageDraw.Draw(image).ellipse((40 + 9 * i, 50, 400, 300 + 5 * i), fill=(240, 200, 30))
        image.save(folder / f"{i:03d}.png")


def run(ranks: int, args: list[str]) -> tuple[float, float, float, str]:
    """Wall seconds, captioning seconds and images/s of one run, and the stderr summary."""
    command = [sys.executable, "-m", "mlx_smolvlm.caption", *args]
    if ranks > 1:
        launch = [
            str(Path(sys.executable).with_name("mlx.launch")),
            "--backend",
            "ring",
            "-n",
            str(ranks),
        ]
        command = [*launch, "--python", sys.executable, "--", *command[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    wall = time.perf_counter() - start
    stderr = done.stderr.decode()
    match = SUMMARY.search(stderr)
    if done.returncode != 0 or match is None:
        sys.exit(f"run with {ranks} processes failed:\n{stderr[-2000:]}")
    return wall, float(match[1]), float(match[2]), stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR)
    parser.add_argument("--tiny", action="store_true", help="shrink widths and depths")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = random_checkpoint(options.config_dir, tmp / "model", options.tiny)
        make_images(tmp / "images", options.images)
        rows, outputs = [], []
        for ranks in options.ranks:
            output = tmp / f"captions-{ranks}.jsonl"
            args = [
                str(tmp / "images"), "-o", str(output), "--model", str(checkpoint),
                "--batch-size", str(options.batch_size), "--max-tokens", str(options.max_tokens),
                "--no-image-splitting",
            ]  # fmt: skip
            wall, seconds, rate = run(ranks, args)[:3]
            rows.append((ranks, wall, seconds, rate))
            outputs.append(output.read_bytes())
        print(f"{options.images} images, batch {options.batch_size}, {options.max_tokens} tokens")
        print("| processes | wall s (with loading) | captioning s | images/s |")
        print("|---|---|---|---|")
        for ranks, wall, seconds, rate in rows:
            print(f"| {ranks} | {wall:.1f} | {seconds:.1f} | {rate:.2f} |")
        print("outputs identical:", all(o == outputs[0] for o in outputs))


if __name__ == "__main__":
    main()
