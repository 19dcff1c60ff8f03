"""Where the time to first token goes: processor, vision tower, connector, language-model
prefill, and the host <-> MLX transfers of the CPU backend's host kernels.

Each stage is evaluated before the next starts (so its time is its own); the transfers are the
time spent handing MLX arrays to numpy (`host_view`, which evaluates and maps) and numpy
results back to MLX, measured inside the other stages. `--profile` adds cProfile's top entries.

    python benchmarks/profile_prefill.py --model CHECKPOINT --image-size 1024x768
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# mlx_smolvlm first: it loads the optimized BLAS, which must precede mlx.core's import.
from mlx_smolvlm import load
from mlx_smolvlm.backends import cpu, kernels, threads
from mlx_smolvlm.generation.generate import prepare_inputs

# isort: split
import mlx.core as mx
import numpy as np
from PIL import Image

PROMPT = "Describe this image in detail."
totals: dict[str, float] = defaultdict(float)


def timed_transfers() -> None:
    """Count the time of the kernels' host views and of their results' copies into MLX."""
    view, to_mlx = kernels.host_view, kernels.mx.array

    def host_view(x):
        start = time.perf_counter()
        mx.eval(x)  # the MLX work before a kernel (matrix products): not a transfer
        mapped = time.perf_counter()
        try:
            return view(x)
        finally:
            totals["  of which MLX work before kernels"] += mapped - start
            totals["  of which host <- MLX (map)"] += time.perf_counter() - mapped

    class Array:
        def __new__(cls, *args, **kwargs):
            start = time.perf_counter()
            try:
                return to_mlx(*args, **kwargs)
            finally:
                totals["  of which host -> MLX (copy)"] += time.perf_counter() - start

    kernels.host_view = host_view
    kernels.mx = type("mx", (), {"array": Array, "eval": staticmethod(mx.eval)})


def stage(name: str, work, *args, **kwargs):
    """Run `work(*args, **kwargs)`, evaluate its result, add the time to `name`."""
    start = time.perf_counter()
    out = work(*args, **kwargs)
    mx.eval(out)
    totals[name] += time.perf_counter() - start
    return out


def prefill(model, processor, image: Path, chunk: int, step: int) -> None:
    inputs = stage("processor", lambda: prepare_inputs(processor, PROMPT, [str(image)]))
    tiles = stage(
        "pixels -> MLX",
        lambda: model.image_inputs(inputs["pixel_values"], inputs["pixel_attention_mask"]),
    )
    features = []
    for start in range(0, tiles["pixels"].shape[0], chunk):
        part = {k: v[start : start + chunk] for k, v in tiles.items()}
        hidden = stage("vision tower", model.vision_model, **part)
        features.append(stage("connector", model.connector, hidden))
    ids = [int(t) for t in inputs["input_ids"][0]]
    hidden_size = model.config.text_config.hidden_size
    embeddings = stage(
        "embed + merge",
        lambda: model.embed(
            [ids], image_features=mx.concatenate(features).reshape(-1, hidden_size)
        ),
    )
    lm = model.language_model
    cache = lm.make_cache()
    for start in range(0, len(ids), step):
        part = embeddings[:, start : start + step]
        logits = stage("language-model prefill", lm, None, cache, input_embeddings=part)
    return len(ids), logits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="an MLX or HF checkpoint")
    parser.add_argument("--image-size", default="1024x768", help="WIDTHxHEIGHT")
    parser.add_argument("--vision-chunk", type=int, default=2, help="tiles encoded at once")
    parser.add_argument("--prefill-step", type=int, default=512)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top 25")
    args = parser.parse_args()

    model, processor = load(str(args.model))
    model = cpu.prepare(model)
    print(cpu.report(model))
    width, height = (int(v) for v in args.image_size.split("x"))
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "image.png"
        Image.fromarray(pixels).save(image)
        timed_transfers()
        profiler = cProfile.Profile() if args.profile else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        tokens, _ = prefill(model, processor, image, args.vision_chunk, args.prefill_step)
        if profiler:
            profiler.disable()
        total = time.perf_counter() - start
    print(f"{tokens} prompt tokens, {total:.2f} s to the first logits ({threads.status()})")
    for name, seconds in totals.items():
        print(f"{name:>32}: {seconds:7.2f} s  {seconds / total:5.1%}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
