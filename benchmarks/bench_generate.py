"""Side-by-side generation benchmark: mlx-smolvlm, mlx-vlm and transformers on one checkpoint.

Each implementation runs in its own process, several times in turn, on the same checkpoint, image
and prompt; the table reports load time, time to first token, prefill and decode speed and peak
memory with ratios to mlx-smolvlm, and a PNG bar chart is written next to the JSON results.

    python benchmarks/bench_generate.py --model ../shared/models/SmolVLM-256M-Instruct

Given a directory with only a config (and tokenizer files), a random checkpoint of that shape is
built with transformers first. mlx-vlm runs from another interpreter (`--mlx-vlm-python`), since
it pins its own dependencies; it gets its own conversion of the same weights. `--dtype` and
`--quantize BITS` compare bf16 or quantized conversions (each converter's own; transformers
runs unquantized only), `--text-only` measures decoding without an image.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Describe this image in detail."
TEXT_PROMPT = "Write a long story about a lighthouse keeper and her cat."
HERE = Path(__file__).resolve().parent
OPENBLAS = "libopenblas.so.0"


def rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def token_times_report(load_s: float, start: float, stamps: list[float], prompt_tokens: int):
    ttft = stamps[0] - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {
        "load_s": load_s,
        "ttft_s": ttft,
        "prompt_tokens": prompt_tokens,
        "prefill_tps": prompt_tokens / ttft,
        "decode_tps": decode,
        "generated": len(stamps),
    }


def prompt_and_images(args) -> tuple[str, list[str]]:
    """The prompt and images of a run: the test image, or none with --text-only (decode speed
    without the vision tower)."""
    return (TEXT_PROMPT, []) if args.text_only else (PROMPT, [args.image])


def worker_ours(args) -> dict:
    t0 = time.perf_counter()
    # mlx_smolvlm first: it loads the optimized BLAS, which must precede mlx.core's import.
    from mlx_smolvlm import load, stream_generate

    # isort: split
    import mlx.core as mx

    model, processor = load(args.checkpoint, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    prompt, images = prompt_and_images(args)
    stamps, start, result = [], time.perf_counter(), None
    for result in stream_generate(
        model, processor, prompt, images or None, max_tokens=args.max_tokens
    ):
        stamps.append(time.perf_counter())
    report = token_times_report(
        load_s, start, stamps[: result.generation_tokens], result.prompt_tokens
    )
    return {**report, "peak_gb": mx.get_peak_memory() / 1e9}


def worker_mlx_vlm(args) -> dict:
    t0 = time.perf_counter()
    import mlx.core as mx
    from mlx_vlm import load, stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    model, processor = load(args.checkpoint)
    load_s = time.perf_counter() - t0
    text, images = prompt_and_images(args)
    prompt = apply_chat_template(processor, model.config, text, num_images=len(images))
    stamps, start, result = [], time.perf_counter(), None
    for result in stream_generate(
        model, processor, prompt, image=images or None, max_tokens=args.max_tokens
    ):
        stamps.append(time.perf_counter())
    report = token_times_report(load_s, start, stamps, result.prompt_tokens)
    return {**report, "peak_gb": mx.get_peak_memory() / 1e9}


def worker_transformers(args) -> dict:
    t0 = time.perf_counter()
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    checkpoint = Path(args.checkpoint)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype).eval()
    settings = json.loads((checkpoint / "preprocessor_config.json").read_text())
    settings = {
        k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")
    }
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(**settings),
        tokenizer=AutoTokenizer.from_pretrained(checkpoint),
        image_seq_len=json.loads((checkpoint / "processor_config.json").read_text())[
            "image_seq_len"
        ],
        chat_template=json.loads((checkpoint / "chat_template.json").read_text())["chat_template"],
    )
    load_s = time.perf_counter() - t0
    stamps = []

    class Clock:
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    start = time.perf_counter()
    prompt, images = prompt_and_images(args)
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    images = [Image.open(path) for path in images] or None
    inputs = processor(text=text, images=images, return_tensors="pt")
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=args.max_tokens,
            min_new_tokens=args.max_tokens,
            do_sample=False,
            streamer=Clock(),
        )
    # The streamer's first call carries the prompt, the rest one token each.
    return token_times_report(load_s, start, stamps[1:], inputs["input_ids"].shape[1])


WORKERS = {
    "mlx-smolvlm": worker_ours,
    "mlx-vlm": worker_mlx_vlm,
    "transformers": worker_transformers,
}


def build_checkpoint(config_dir: Path, out: Path) -> Path:
    """A random-weight checkpoint of the config's shape, made with transformers (cached)."""
    if (out / "model.safetensors").exists():
        return out
    from mlx_smolvlm.random_checkpoint import save_random_checkpoint

    return save_random_checkpoint(config_dir, out, seed=0, force=True)


def add_worker_arguments(parser: argparse.ArgumentParser, workers: dict) -> None:
    """Options every comparing benchmark has: mlx-vlm's interpreter, results, the worker's own."""
    parser.add_argument("--mlx-vlm-python", default=None, help="interpreter with mlx-vlm installed")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", choices=list(workers), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)


def checkpoint_for(model: Path, out: Path) -> Path:
    """`model` when it holds weights, else a random checkpoint built from its config in `out`."""
    if list(model.glob("*.safetensors")):
        return model
    return build_checkpoint(model, out / "checkpoint")


def convert_checkpoint(command: list[str], source: Path, out: Path, args) -> Path:
    """`out`, converted from `source` with a converter's command line at the run's dtype and
    quantization unless it is there already."""
    if not (out / "config.json").exists():
        quantize = ["-q", "--q-bits", str(args.quantize)] if args.quantize else []
        subprocess.run(
            command + ["--hf-path", str(source), "--mlx-path", str(out), "--dtype", args.dtype]
            + quantize,
            check=True,
        )  # fmt: skip
    return out


def mlx_vlm_checkpoint(python: str, source: Path, out: Path, args) -> Path:
    """mlx-vlm's own conversion, with the flat rope_theta key it reads."""
    convert_checkpoint([python, "-m", "mlx_vlm.convert"], source, out, args)
    config = json.loads((out / "config.json").read_text())
    text = config["text_config"]
    if "rope_theta" not in text:
        text["rope_theta"] = (text.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def run_worker(name: str, python: str, checkpoint: Path, args) -> dict:
    env = dict(os.environ)
    if name == "mlx-vlm" and sys.platform == "linux":
        env["LD_PRELOAD"] = OPENBLAS  # the same optimized BLAS mlx-smolvlm loads itself
    cmd = [python, __file__, "--worker", name, "--checkpoint", str(checkpoint),
           "--max-tokens", str(args.max_tokens), "--dtype", args.dtype]  # fmt: skip
    cmd += ["--text-only"] if args.text_only else ["--image", str(args.image)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    return {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in results.items()
    }


def print_table(summary: dict[str, dict]) -> None:
    base = summary.get("mlx-smolvlm")
    cols = [("load_s", "load s"), ("ttft_s", "TTFT s"), ("prefill_tps", "prefill tok/s"),
            ("decode_tps", "decode tok/s"), ("rss_gb", "peak RSS GB"), ("peak_gb", "MLX peak GB")]  # fmt: skip
    print("| implementation | " + " | ".join(label for _, label in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in summary.items():
        cells = []
        for key, _ in cols:
            if key not in row:
                cells.append("–")
                continue
            ratio = (
                f" ({row[key] / base[key]:.2f}×)"
                if base and name != "mlx-smolvlm" and base.get(key)
                else ""
            )
            cells.append(f"{row[key]:.2f}{ratio}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("(ratios: the implementation's value over mlx-smolvlm's)")


def plot(summary: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("ttft_s", "time to first token (s)"), ("decode_tps", "decode (tokens/s)"),
            ("rss_gb", "peak RSS (GB)")]  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(12, 3.5))
    for ax, (key, title) in zip(axes, keys):
        names = list(summary)
        ax.bar(
            names, [summary[n].get(key, 0) for n in names], color=["C0", "C1", "C2"][: len(names)]
        )
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def make_image(path: Path, size: str) -> Path:
    import numpy as np
    from PIL import Image

    width, height = (int(v) for v in size.split("x"))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint or config directory")
    parser.add_argument("--image-size", default="1024x768", help="WIDTHxHEIGHT of the test image")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--quantize", type=int, help="bits: compare 4/8-bit conversions")
    parser.add_argument(
        "--text-only", action="store_true", help="no image: decode speed without the vision tower"
    )
    parser.add_argument("--impl", default="mlx-smolvlm,mlx-vlm,transformers")
    parser.add_argument(
        "--mlx-smolvlm-python",
        default=sys.executable,
        help="interpreter for mlx-smolvlm (one without the test extras measures what users "
        "install: torch, if present, is imported by transformers and adds ~180 MB)",
    )
    add_worker_arguments(parser, WORKERS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        report = WORKERS[args.worker](args)
        print(json.dumps({**report, "rss_gb": rss_gb()}))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_for(args.model, args.out)
    if not args.text_only:
        args.image = make_image(args.out / "image.png", args.image_size)
    variant = args.dtype + (f"-q{args.quantize}" if args.quantize else "")
    workers = {}  # name -> (python, checkpoint)
    for name in args.impl.split(","):
        if name == "mlx-smolvlm":
            path = checkpoint
            if args.quantize or args.dtype != "float32":  # as mlx-vlm: its own conversion
                ours = [sys.executable, "-m", "mlx_smolvlm.convert"]
                path = convert_checkpoint(ours, checkpoint, args.out / f"{name}-{variant}", args)
            workers[name] = (args.mlx_smolvlm_python, path)
        elif name == "transformers" and not args.quantize:
            workers[name] = (sys.executable, checkpoint)
        elif name == "mlx-vlm" and args.mlx_vlm_python:
            path = mlx_vlm_checkpoint(
                args.mlx_vlm_python, checkpoint, args.out / f"{name}-{variant}", args
            )
            workers[name] = (args.mlx_vlm_python, path)
        else:
            print(f"skipping {name}: not installed or not for this variant", file=sys.stderr)
    results: dict[str, list[dict]] = {name: [] for name in workers}
    # Round robin, so that a machine that slows down or speeds up mid-run favours no one.
    for rep in range(args.reps):
        for name, (python, path) in workers.items():
            run = run_worker(name, python, path, args)
            print(f"{name} run {rep + 1}: {json.dumps(run)}", file=sys.stderr)
            results[name].append(run)
    summary = summarize(results)
    (args.out / "bench_generate.json").write_text(
        json.dumps({"runs": results, "median": summary}, indent=2)
    )
    print_table(summary)
    plot(summary, args.out / "bench_generate.png")
    print(f"chart: {args.out / 'bench_generate.png'}")


if __name__ == "__main__":
    main()
