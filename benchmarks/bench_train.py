"""LoRA training speed: steps per second of `tuner.trainer.train` on a random checkpoint.

    python benchmarks/bench_train.py --config ../shared/models/SmolVLM-256M-Instruct \\
        --text-layers 4 --vision-layers 2 --iters 10 --compile both

The checkpoint has the config's widths with fewer layers (random weights, written by this
package itself, so transformers is not needed), the data are coloured squares with captions
encoded as one tile each. The first step of a compiled run includes tracing; steady-state
steps/s leaves it out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlx_smolvlm  # noqa: F401  (the fast CPU BLAS loads before mlx.core)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten
from PIL import Image

from mlx_smolvlm.lora import run_training
from mlx_smolvlm.model import Model, ModelConfig
from mlx_smolvlm.tuner import trainer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}


def random_checkpoint(config_dir: Path, out: Path, text_layers: int, vision_layers: int) -> Path:
    """A random-weight checkpoint with `config_dir`'s widths and tokenizer, fewer layers."""
    config = json.loads((config_dir / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = text_layers
    config["vision_config"]["num_hidden_layers"] = vision_layers
    out.mkdir(parents=True)
    for file in config_dir.iterdir():
        if (
            file.is_file()
            and file.suffix in (".json", ".jinja", ".txt")
            and file.name != "config.json"
        ):
            shutil.copy(file, out / file.name)
    (out / "config.json").write_text(json.dumps(config))
    mx.random.seed(0)
    model = Model(ModelConfig.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return out


def dataset(out: Path, records: int) -> Path:
    (out / "images").mkdir(parents=True)
    lines = []
    for i in range(records):
        name, colour = list(COLOURS.items())[i % len(COLOURS)]
        Image.new("RGB", (64, 64), colour).save(out / "images" / f"{i}.png")
        caption = f"A {name} square, number {i}."
        lines.append(
            json.dumps({"image": f"images/{i}.png", "question": "What is it?", "answer": caption})
        )
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    return out


def measure(checkpoint: Path, data: Path, out: Path, iters: int, batch_size: int, **extra) -> dict:
    stamps = []
    original = trainer.batch_indices

    def stamped(*args, **kwargs):
        stamps.append(time.perf_counter())
        return original(*args, **kwargs)

    trainer.batch_indices = stamped  # called once at the start of each step
    try:
        start = time.perf_counter()
        run_training(
            model=str(checkpoint), data=str(data), iters=iters, batch_size=batch_size,
            adapter_path=str(out), no_image_splitting=True, save_every=iters, progress=False,
            val_batches=0, **extra,
        )  # fmt: skip
        total = time.perf_counter() - start
    finally:
        trainer.batch_indices = original
    steady = (len(stamps) - 2) / (stamps[-1] - stamps[1]) if len(stamps) > 2 else float("nan")
    return {"iters": iters, "total_s": round(total, 2), "steady_steps_per_s": round(steady, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--compile", choices=["on", "off", "both", "unsupported"], default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = random_checkpoint(
            args.config, tmp / "model", args.text_layers, args.vision_layers
        )
        data = dataset(tmp / "data", 8)
        modes = {"both": ["off", "on"], "unsupported": [None]}.get(args.compile, [args.compile])
        for mode in modes:
            extra = {} if mode is None else {"compile": mode == "on"}
            result = measure(
                checkpoint, data, tmp / f"adapters-{mode}", args.iters, args.batch_size, **extra
            )
            print(json.dumps({"compile": mode, **result}), flush=True)


if __name__ == "__main__":
    main()
