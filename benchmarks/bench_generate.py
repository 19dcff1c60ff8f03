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

`--backend mlx` runs mlx-smolvlm's pure-MLX path (the modules Metal runs: no host kernels, no
host decoder, `MLX_SMOLVLM_HOST_KERNELS=0`) on the same MLX kernels as mlx-vlm; `--backend
both` shows it beside the default. `--background-load N` runs every measurement twice in turn,
quiet and with N competing processes doing multi-threaded numpy matrix products (as another
ML job on the same machine would; each stops itself after `--background-seconds` and is
killed when its measurement ends), and shows both side by side. The jobs run in the
benchmark's own session by default, where Linux's scheduler shares the cores among all their
threads and the measured one's (the worst case); `--load-session own` starts them in a
session of their own, as a program started from another terminal or desktop application is,
which Linux's autogroup scheduling (`/proc/sys/kernel/sched_autogroup_enabled`) gives a share
of the cores as a whole.

Nothing here assumes the CPU: on MLX's CUDA backend or on Metal the workers run on the GPU
(transformers on torch's CUDA or MPS device when it has one); OpenBLAS is only preloaded for
mlx-vlm where MLX computes on the CPU of a Linux machine.
"""

from __future__ import annotations

import argparse
import ctypes.util
import functools
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Describe this image in detail."
TEXT_PROMPT = "Write a long story about a lighthouse keeper and her cat."
HERE = Path(__file__).resolve().parent
OPENBLAS = "libopenblas.so.0"
OURS = "mlx-smolvlm"
PURE_MLX = "mlx-smolvlm (pure MLX)"
# A competing job: float32 matrix products on numpy's BLAS with its default (all-core) threads.
BACKGROUND = """
import sys, time
import numpy as np
a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    a @ a
"""


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
    from mlx_smolvlm.backends import threads

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
    return {**report, "peak_gb": mx.get_peak_memory() / 1e9, "host_threads": threads.threads}


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
    device = torch_device(torch)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype)
    model = model.to(device).eval()
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
            value.cpu()  # waits for the device, where there is one
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
    inputs = processor(text=text, images=images, return_tensors="pt").to(device)
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


def torch_device(torch) -> str:
    """The device transformers runs on: the GPU when torch has one, as the MLX workers do."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


WORKERS = {
    OURS: worker_ours,
    PURE_MLX: worker_ours,
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


@functools.cache
def mlx_on_cpu(python: str) -> bool:
    """Whether MLX computes on the CPU under `python` (no Metal, no CUDA backend)."""
    probe = "import mlx.core as mx; print(mx.default_device() == mx.cpu)"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def worker_env(name: str, python: str) -> dict:
    """The environment of a worker: mlx-vlm gets the OpenBLAS that mlx-smolvlm loads itself
    (where MLX multiplies on a Linux CPU), the pure-MLX row turns the host kernels off."""
    env = dict(os.environ)
    blas = ctypes.util.find_library("openblas")
    if name == "mlx-vlm" and sys.platform == "linux" and blas and mlx_on_cpu(python):
        preload_openblas(env)
    if name == PURE_MLX:
        env["MLX_SMOLVLM_HOST_KERNELS"] = "0"
    return env


def preload_openblas(env: dict) -> None:
    """Give a peer's MLX (mlx-vlm) the OpenBLAS mlx-smolvlm loads itself, with the same kernels
    (`blas.core_type`: the ones the CPU's flags allow, where OpenBLAS may not know its model)."""
    # Here, not at the top: this file is also the worker run by mlx-vlm's own interpreter,
    # which has no mlx_smolvlm (and importing it loads a BLAS).
    from mlx_smolvlm.backends.blas import core_type

    env["LD_PRELOAD"] = OPENBLAS
    family = core_type()
    if family and "OPENBLAS_CORETYPE" not in env:
        env["OPENBLAS_CORETYPE"] = family


def start_background(count: int, seconds: float, own_session: bool) -> list[subprocess.Popen]:
    """`count` competing BLAS jobs, each ending itself after `seconds` at the latest, in this
    session or (`own_session`) in one of their own."""
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", BACKGROUND, str(seconds)], start_new_session=own_session
        )
        for _ in range(count)
    ]
    time.sleep(1.0)  # their threads running before the measurement starts
    return jobs


def stop_background(jobs: list[subprocess.Popen]) -> None:
    for job in jobs:
        job.kill()
    for job in jobs:
        job.wait()


def run_worker(name: str, python: str, checkpoint: Path, args, load: int = 0) -> dict:
    """One measurement in a fresh process, with `load` competing BLAS jobs running."""
    cmd = [python, __file__, "--worker", name, "--checkpoint", str(checkpoint),
           "--max-tokens", str(args.max_tokens), "--dtype", args.dtype]  # fmt: skip
    cmd += ["--text-only"] if args.text_only else ["--image", str(args.image)]
    own = args.load_session == "own"
    jobs = start_background(load, args.background_seconds, own) if load else []
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(name, python))
    finally:
        stop_background(jobs)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    return {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in results.items()
        if runs
    }


COLUMNS = [("load_s", "load s"), ("ttft_s", "TTFT s"), ("prefill_tps", "prefill tok/s"),
           ("decode_tps", "decode tok/s"), ("rss_gb", "peak RSS GB"), ("peak_gb", "MLX peak GB")]  # fmt: skip


def print_table(summary: dict[str, dict]) -> None:
    """Medians with each peer's ratio to mlx-smolvlm's (the first of its rows present)."""
    base = next((row for name, row in summary.items() if name.startswith(OURS)), None)
    print("| implementation | " + " | ".join(label for _, label in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, row in summary.items():
        cells = []
        for key, _ in COLUMNS:
            if key not in row:
                cells.append("–")
                continue
            ratio = f" ({row[key] / base[key]:.2f}×)" if row is not base and base.get(key) else ""
            cells.append(f"{row[key]:.2f}{ratio}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("(ratios: the row's value over the first mlx-smolvlm row's)")


def print_load_table(quiet: dict[str, dict], busy: dict[str, dict], load: int) -> None:
    """Quiet and busy side by side, with busy over quiet from runs taken in turn."""
    print(f"\n| implementation | TTFT s quiet | TTFT s, {load} BLAS jobs | decode tok/s quiet | "
          f"decode tok/s, {load} BLAS jobs | decode kept |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in quiet:
        q, b = quiet[name], busy[name]
        print(
            f"| {name} | {q['ttft_s']:.2f} | {b['ttft_s']:.2f} ({b['ttft_s'] / q['ttft_s']:.2f}×) "
            f"| {q['decode_tps']:.2f} | {b['decode_tps']:.2f} "
            f"| {b['decode_tps'] / q['decode_tps']:.0%} |"
        )


def plot(summary: dict[str, dict], path: Path) -> None:
    import matplotlib  # optional: the bench extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("ttft_s", "time to first token (s)"), ("decode_tps", "decode (tokens/s)"),
            ("rss_gb", "peak RSS (GB)")]  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(12, 3.5))
    for ax, (key, title) in zip(axes, keys):
        names = list(summary)
        ax.bar(
            names,
            [summary[n].get(key, 0) for n in names],
            color=[f"C{i}" for i in range(len(names))],
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
        "--backend",
        choices=["default", "mlx", "both"],
        default="default",
        help="mlx-smolvlm with its backend speed-ups (default), its pure-MLX path (the Metal "
        "path: no host kernels), or both rows",
    )
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="N",
        help="also measure each run with N competing multi-threaded BLAS processes",
    )
    parser.add_argument(
        "--load-session",
        choices=["shared", "own"],
        default="shared",
        help="run the background jobs in this session (shared: the scheduler shares the cores "
        "among all threads) or in a session of their own (as another program would be)",
    )
    parser.add_argument(
        "--background-seconds",
        type=float,
        default=900,
        help="the most a background job runs (it is killed when its measurement ends)",
    )
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

    # A terminated benchmark still stops its background jobs (the `finally` of run_worker).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_for(args.model, args.out)
    if not args.text_only:
        args.image = make_image(args.out / "image.png", args.image_size)
    variant = args.dtype + (f"-q{args.quantize}" if args.quantize else "")
    names = []
    for name in args.impl.split(","):
        if name == OURS:
            names += {"default": [OURS], "mlx": [PURE_MLX], "both": [OURS, PURE_MLX]}[args.backend]
        else:
            names.append(name)
    workers = {}  # name -> (python, checkpoint)
    for name in names:
        if name in (OURS, PURE_MLX):
            path = checkpoint
            if args.quantize or args.dtype != "float32":  # as mlx-vlm: its own conversion
                ours = [sys.executable, "-m", "mlx_smolvlm.convert"]
                path = convert_checkpoint(ours, checkpoint, args.out / f"{OURS}-{variant}", args)
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
    loads = [0, args.background_load] if args.background_load else [0]
    results: dict[int, dict[str, list[dict]]] = {load: {n: [] for n in workers} for load in loads}
    # Round robin (and quiet/busy in turn), so that a machine that slows down or speeds up
    # mid-run favours no one.
    for rep in range(args.reps):
        for name, (python, path) in workers.items():
            for load in loads:
                run = run_worker(name, python, path, args, load)
                print(f"{name} run {rep + 1}, load {load}: {json.dumps(run)}", file=sys.stderr)
                results[load][name].append(run)
    summaries = {load: summarize(runs) for load, runs in results.items()}
    (args.out / "bench_generate.json").write_text(
        json.dumps({"args": sys.argv[1:], "runs": results, "median": summaries}, indent=2)
    )
    for load, summary in summaries.items():
        print(f"\n{'quiet' if not load else f'{load} competing BLAS jobs'}:")
        print_table(summary)
    if args.background_load:
        print_load_table(summaries[0], summaries[args.background_load], args.background_load)
    try:
        plot(summaries[0], args.out / "bench_generate.png")
        print(f"chart: {args.out / 'bench_generate.png'}")
    except ImportError:
        print("no chart: matplotlib is not installed", file=sys.stderr)


if __name__ == "__main__":
    main()
