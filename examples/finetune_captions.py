"""Fine-tune SmolVLM with LoRA to caption a toy dataset, then caption with the adapters.

    python examples/finetune_captions.py --model HuggingFaceTB/SmolVLM-256M-Instruct

It draws eight images (four colours, two shapes), writes them as a JSONL dataset in the
chat format, trains adapters with a completion-only loss and prints the captions that
the fine-tuned model gives. The training step is the same as running

    python -m mlx_smolvlm.lora --model HuggingFaceTB/SmolVLM-256M-Instruct \\
        --data toy-captions/data --adapter-path toy-captions/adapters \\
        --iters 60 --learning-rate 2e-4 --no-image-splitting
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from PIL import Image, ImageDraw

from mlx_smolvlm import generate, load
from mlx_smolvlm.lora import run_training

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 30),
}
SHAPES = ("square", "circle")
PROMPT = "Caption this image."


def draw(colour: tuple[int, int, int], shape: str) -> Image.Image:
    """A coloured shape on a white background."""
    image = Image.new("RGB", (96, 96), "white")
    box = (16, 16, 80, 80)
    pen = ImageDraw.Draw(image)
    (pen.rectangle if shape == "square" else pen.ellipse)(box, fill=colour)
    return image


def write_dataset(root: Path) -> list[tuple[Path, str]]:
    """Images, train.jsonl and valid.jsonl under `root`; returns (image, caption) pairs."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    pairs, records = [], []
    for name, colour in COLOURS.items():
        for shape in SHAPES:
            file = root / "images" / f"{name}-{shape}.png"
            draw(colour, shape).save(file)
            caption = f"A {name} {shape} on white."
            pairs.append((file, caption))
            user = [
                {"type": "image", "image": f"images/{file.name}"},  # relative to the JSONL file
                {"type": "text", "text": PROMPT},
            ]
            assistant = [{"type": "text", "text": caption}]
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": assistant},
                    ]
                }
            )
    lines = [json.dumps(r) + "\n" for r in records]
    (root / "train.jsonl").write_text("".join(lines))
    (root / "valid.jsonl").write_text("".join(lines[::3]))
    return pairs


@click.command()
@click.option("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct", show_default=True)
@click.option(
    "--out", default="toy-captions", show_default=True, help="Directory for data and adapters."
)
@click.option("--iters", default=60, show_default=True)
@click.option("--learning-rate", default=2e-4, show_default=True)
def main(model: str, out: str, iters: int, learning_rate: float) -> None:
    """Write the toy dataset, train LoRA adapters on it and caption its images."""
    root = Path(out)
    pairs = write_dataset(root / "data")
    adapters = root / "adapters"
    history = run_training(
        model,
        str(root / "data"),
        iters=iters,
        learning_rate=learning_rate,
        adapter_path=str(adapters),
        steps_per_eval=max(iters // 4, 1),
        save_every=max(iters // 2, 1),
        no_image_splitting=True,  # one tile per image: 64 image tokens, quick steps
        resume=(adapters / "training_state.safetensors").exists(),
    )
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    print(
        f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}; curve in {adapters / 'loss_curve.png'}"
    )
    vlm, processor = load(model, adapter_path=adapters)
    for file, caption in pairs:
        answer = generate(
            vlm, processor, PROMPT, str(file), max_tokens=16, do_image_splitting=False
        )
        print(f"{file.name:20} expected {caption!r:28} got {answer.text.strip()!r}")


if __name__ == "__main__":
    main()
