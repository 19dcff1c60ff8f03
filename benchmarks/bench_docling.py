"""Pages per second of PDF -> DocTags -> DoclingDocument: this project's pipeline and the same
pipeline written with mlx-vlm, on one checkpoint and one PDF.

    python benchmarks/bench_docling.py --model ../shared/models/SmolVLM-256M-Instruct \
        --mlx-vlm-python /path/to/venv-with-mlx-vlm/bin/python --pages 2 --max-tokens 32

Given a directory with only a config (SmolDocling-256M has SmolVLM-256M-Instruct's shape and
tokenizer), a random checkpoint of that shape is built with transformers first. Both pipelines
render the PDF with pypdfium2 at 144 dpi, generate greedily with the page prompt and hand the
DocTags and page images to docling-core; this project batches pages (`--batch-size`), the
mlx-vlm script generates one page after another, as its model cards show. With random weights
every page runs to --max-tokens, so both generate the same number of tokens per page.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_generate import (  # noqa: E402
    add_worker_arguments,
    checkpoint_for,
    mlx_vlm_checkpoint,
    preload_openblas,
)

PROMPT = "Convert this page to docling."
DPI = 144


def worker_ours(args) -> dict:
    # mlx_smolvlm first: it loads the optimized BLAS, which must precede mlx.core's import.
    from mlx_smolvlm import load
    from mlx_smolvlm.documents import convert

    model, processor = load(args.checkpoint)
    start = time.perf_counter()
    conversion = convert(
        model,
        processor,
        args.pdf,
        dpi=DPI,
        prompt=PROMPT,
        max_tokens=args.max_tokens,
        batch_size=int(args.batch_size),
    )
    seconds = time.perf_counter() - start
    tokens = sum(len(page.token_ids) for page in conversion.pages)
    return {"pages": len(conversion.pages), "seconds": seconds, "tokens": tokens}


def worker_mlx_vlm(args) -> dict:
    """The glue an mlx-vlm user writes: render, generate page by page, docling-core."""
    import pypdfium2 as pdfium
    from docling_core.types.doc.document import DoclingDocument, DocTagsDocument
    from mlx_vlm import generate, load
    from mlx_vlm.prompt_utils import apply_chat_template

    model, processor = load(args.checkpoint)
    start = time.perf_counter()
    pdf = pdfium.PdfDocument(args.pdf)
    images = [pdf[i].render(scale=DPI / 72).to_pil().convert("RGB") for i in range(len(pdf))]
    prompt = apply_chat_template(processor, model.config, PROMPT, num_images=1)
    doctags, tokens = [], 0
    for image in images:
        result = generate(
            model, processor, prompt, [image], max_tokens=args.max_tokens, verbose=False
        )
        doctags.append(result.text)
        tokens += result.generation_tokens
    document = DocTagsDocument.from_doctags_and_image_pairs(doctags, images)
    DoclingDocument.load_from_doctags(document, document_name="bench")
    seconds = time.perf_counter() - start
    return {"pages": len(images), "seconds": seconds, "tokens": tokens}


WORKERS = {"mlx-smolvlm": worker_ours, "mlx-vlm": worker_mlx_vlm}


def make_pdf(path: Path, pages: int) -> Path:
    """A PDF of US-letter pages with a title, text lines and a picture, drawn by Pillow."""
    from PIL import Image, ImageDraw

    images = []
    for n in range(pages):
        image = Image.new("RGB", (612, 792), "white")
        draw = ImageDraw.Draw(image)
        draw.text((60, 50), f"Report, page {n + 1}", fill="black")
        for line in range(30):
            draw.text((60, 90 + 14 * line), f"Line {line}: the quick brown fox " * 2, fill="black")
        draw.rectangle((300, 560, 540, 720), fill=(200, 30, 60))
        images.append(image)
    images[0].save(path, format="PDF", save_all=True, append_images=images[1:], resolution=72)
    return path


def run_worker(name: str, python: str, checkpoint: Path, batch_size: str, args) -> dict:
    env = {**os.environ, "MLX_SMOLVLM_QUIET": "1"}
    if name == "mlx-vlm" and sys.platform == "linux":
        preload_openblas(env)  # the same optimized BLAS mlx-smolvlm loads itself
    cmd = [python, __file__, "--worker", name, "--checkpoint", str(checkpoint), "--pdf",
           str(args.pdf), "--max-tokens", str(args.max_tokens), "--batch-size", batch_size]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint or config directory")
    parser.add_argument("--pages", type=int, default=2, help="pages in the test PDF")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--batch-size", default="2", help="this project's pages per batch; a list compares several"
    )
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--impl", default="mlx-smolvlm,mlx-vlm")
    add_worker_arguments(parser, WORKERS)
    parser.add_argument("--pdf", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    if args.model is None:
        parser.error("--model is required")
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_for(args.model, args.out)
    args.pdf = make_pdf(args.out / "pages.pdf", args.pages)
    args.dtype, args.quantize = "float32", None  # mlx-vlm's own float32 conversion
    workers = {}
    for name in args.impl.split(","):
        if name == "mlx-smolvlm":
            for size in args.batch_size.split(","):
                workers[f"{name}, batch {size}"] = (sys.executable, checkpoint, size)
        elif name == "mlx-vlm" and args.mlx_vlm_python:
            path = mlx_vlm_checkpoint(
                args.mlx_vlm_python, checkpoint, args.out / "mlx-vlm-float32", args
            )
            workers[name] = (args.mlx_vlm_python, path, "1")
        else:
            print(f"skipping {name}: not installed", file=sys.stderr)
    runs: dict[str, list[dict]] = {name: [] for name in workers}
    for rep in range(args.reps):  # round robin
        for name, (python, path, size) in workers.items():
            run = run_worker(name.split(",")[0], python, path, size, args)
            print(f"{name} run {rep + 1}: {json.dumps(run)}", file=sys.stderr)
            runs[name].append(run)
    print("| pipeline | pages | tokens/page | s/page | pages/s |")
    print("|---|---|---|---|---|")
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        pages, tokens = results[0]["pages"], results[0]["tokens"]
        row = f"{pages} | {tokens / pages:.0f} | {seconds / pages:.1f} | {pages / seconds:.4f}"
        print(f"| {name} | {row} |")
    (args.out / "bench_docling.json").write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
