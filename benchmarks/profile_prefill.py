"""Where the time to first token goes: processor, vision tower, connector, language-model
prefill, and the host <-> MLX transfers of the CPU backend's host kernels.

Each stage is evaluated before the next starts (so its time is its own); the transfers are the
time spent handing MLX arrays to numpy (`host_view`, which evaluates and maps) and numpy
results back to MLX, measured inside the other stages. `--profile` adds cProfile's top entries.

It ends with the arithmetic floor of that prefill: the floating-point operations of its matrix
products (counted from the config, the tiles and the prompt's length), over the best float32
GFLOP/s any BLAS here reaches on the vision tower's largest product (`bench_blas.py`: MLX's
OpenBLAS, numpy's, torch's MKL; each in a fresh process, best of five). No float32
implementation can reach the first token sooner on this machine.

    python benchmarks/profile_prefill.py --model CHECKPOINT --image-size 1024x768
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# bench_blas: this folder's, on the path when the script runs.
from bench_blas import measure

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


def prefill(model, processor, image: Path, chunk: int, step: int) -> tuple[int, int]:
    """Run one image prompt's prefill stage by stage; return its tokens and tiles."""
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
        hidden = stage("language-model prefill", lm.hidden_states, None, cache, part)
    stage("language-model prefill", lm.logits, hidden[:, -1:])  # the last position's, as generating
    return len(ids), tiles["pixels"].shape[0]


def prefill_flops(config, tiles: int, tokens: int) -> dict[str, float]:
    """Floating-point operations of the prefill's matrix products (2 per multiply-add), by
    stage, for `tiles` tiles and a `tokens`-token prompt; elementwise work is not counted."""
    vision, text = config.vision_config, config.text_config
    patches, h, i = vision.patches_per_side**2, vision.hidden_size, vision.intermediate_size
    embed = 2 * patches * vision.num_channels * vision.patch_size**2 * h
    layer = 2 * patches * (4 * h * h + 2 * h * i) + 4 * patches * patches * h  # + q.k, p.v
    features = config.image_seq_len
    connector = 2 * features * h * config.scale_factor**2 * text.hidden_size
    d, heads, kv = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    projections = 2 * d * heads * text.head_dim + 2 * d * kv * text.head_dim
    per_token = 2 * (projections + 3 * d * text.intermediate_size)
    causal = 4 * heads * text.head_dim * tokens * (tokens + 1) / 2  # q.k and p.v, causal
    return {
        "vision tower": tiles * (embed + vision.num_hidden_layers * layer),
        "connector": tiles * connector,
        "language-model prefill": text.num_hidden_layers * (tokens * per_token + causal)
        + 2 * text.vocab_size * d,  # the last position's logits
    }


def best_gflops(config, tiles: int) -> tuple[float, str]:
    """The best float32 GFLOP/s of the BLAS libraries here on the tower's largest product."""
    vision = config.vision_config
    shape = (tiles * vision.patches_per_side**2, vision.hidden_size, vision.intermediate_size)
    print(f"best float32 product here ({'x'.join(map(str, shape))}, out x in x hidden):")
    best, name = 0.0, "none"
    for which in ("mlx", "numpy", "torch"):
        line = measure(which, shape, dict(os.environ))
        print(f"  {line}")
        words = line.rsplit(" ", 2)
        if len(words) == 3 and words[2] == "GFLOP/s" and float(words[1]) > best:
            best, name = float(words[1]), line.split(":")[0]
    return best, name


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
        tokens, tiles = prefill(model, processor, image, args.vision_chunk, args.prefill_step)
        if profiler:
            profiler.disable()
        total = time.perf_counter() - start
    print(f"{tokens} prompt tokens, {total:.2f} s to the first logits ({threads.status()})")
    for name, seconds in totals.items():
        print(f"{name:>32}: {seconds:7.2f} s  {seconds / total:5.1%}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    flops = prefill_flops(model.config, tiles, tokens)
    print(f"matrix products of this prefill ({tiles} tiles, {tokens} tokens):")
    for name, count in flops.items():
        print(f"{name:>32}: {count / 1e12:7.3f} TFLOP")
    gflops, library = best_gflops(model.config, tiles)
    floor = sum(flops.values()) / (gflops * 1e9)
    print(
        f"arithmetic floor: {sum(flops.values()) / 1e12:.2f} TFLOP at {gflops:.0f} GFLOP/s "
        f"({library}) = {floor:.2f} s to the first token, for any float32 implementation here"
    )


if __name__ == "__main__":
    main()
