"""`python -m mlx_smolvlm.docling`: PDFs and page images -> Markdown, HTML, JSON and DocTags."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from tqdm import tqdm

from . import load
from .documents import extras
from .documents.export import FORMATS, IMAGE_MODES, is_converted, parse_formats, write_document
from .documents.pipeline import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    MODELS,
    convert,
)
from .processing.pages import Source, find_files, open_source, parse_pages
from .utils.options import dpi_option, model_option
from .utils.validation import Command, debug

USER_ERRORS = (FileNotFoundError, ValueError, OSError, ImportError)


@contextmanager
def reported(verbose: bool, prefix: str = "") -> Iterator[None]:
    """Turn the errors a user's input causes into one-line messages (tracebacks with --verbose
    or MLX_SMOLVLM_DEBUG=1)."""
    try:
        yield
    except USER_ERRORS as error:
        if verbose or debug():
            raise
        raise click.ClickException(f"{prefix}{error}") from error


def plan(
    inputs: tuple[Path, ...], pages: str | None, output: Path
) -> list[tuple[Source, list[int]]]:
    """Every document to convert with its selected pages, checked before the model loads."""
    extras.require()
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file, not a folder")
    documents = []
    writers: dict[str, Path] = {}
    for path in find_files(inputs):
        source = open_source(path)
        if source.name in writers:
            raise ValueError(
                f"{writers[source.name]} and {path} would both write {output / source.name}.*: "
                "convert them into different --output folders"
            )
        writers[source.name] = path
        try:
            selected = parse_pages(pages if source.kind == "pdf" else None, source.page_count)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        documents.append((source, selected))
    return documents


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--output", "-o", required=True, type=click.Path(path_type=Path), help="Folder for the files."
)
@click.option(
    "--to",
    "formats",
    default="md",
    show_default=True,
    help=f"Comma-separated output formats: {', '.join(FORMATS)}.",
)
@model_option(
    help="Hub id or local path; 'smoldocling' and 'granite-docling' name the two models.",
    default=DEFAULT_MODEL,
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    help="Most DocTags tokens per page; a page cut there is reported and kept raw.",
)
@click.option(
    "--pages", default=None, help="Pages of each PDF, e.g. 1-3,7 or 5- [all]; images are one page."
)
@dpi_option(help="Resolution PDF pages are rendered at (docling's for these models).")
@click.option(
    "--prompt",
    default=DEFAULT_PROMPT,
    show_default=True,
    help="Instruction for every page (see the README for the other trained tasks).",
)
@click.option(
    "--images",
    type=click.Choice(IMAGE_MODES),
    default="embedded",
    show_default=True,
    help="Pictures cropped from the page: embedded, files in NAME_artifacts/, or placeholders.",
)
@click.option("--overwrite", is_flag=True, help="Convert documents whose files already exist.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Pages generated together.",
)
@click.option("--verbose", is_flag=True, help="Show tracebacks of errors.")
def main(
    inputs,
    output,
    formats,
    model,
    max_tokens,
    pages,
    dpi,
    prompt,
    images,
    overwrite,
    batch_size,
    verbose,
):
    """Convert INPUT... (PDFs, page images, or folders of them) with SmolDocling or granite-docling.

    Each document becomes OUTPUT/NAME.md (and .html, .json, .doctags as --to asks); documents
    whose files exist are skipped unless --overwrite.
    """
    with reported(verbose):
        formats = parse_formats(formats)
        documents = plan(inputs, pages, output)
    todo = []
    for source, selected in documents:
        if overwrite or not is_converted(output, source.name, formats):
            todo.append((source, selected))
        else:
            click.echo(f"{source.path}: already converted in {output} (--overwrite redoes it)")
    if not todo:
        return
    output.mkdir(parents=True, exist_ok=True)
    with reported(verbose, f"--model {model}: "):
        vlm, processor = load(MODELS.get(model, model))
    options = {"dpi": dpi, "prompt": prompt, "max_tokens": max_tokens, "batch_size": batch_size}
    failed = 0
    for source, selected in todo:
        try:
            with reported(verbose, f"{source.path}: "):
                convert_one(vlm, processor, source, selected, output, formats, images, **options)
        except click.ClickException as error:
            failed += 1
            error.show()
        except Exception as error:  # anything else fails this document only
            if verbose or debug():
                raise
            failed += 1
            click.echo(f"Error: {source.path}: {type(error).__name__}: {error}", err=True)
    if failed:
        raise SystemExit(1)


def convert_one(vlm, processor, source, selected, output, formats, images, **options) -> None:
    """Convert one document with a progress bar, write its files, report malformed pages."""
    start = time.perf_counter()
    with tqdm(total=len(selected), desc=source.name, unit="page", file=sys.stderr) as bar:
        conversion = convert(
            vlm,
            processor,
            source.path,
            pages=selected,
            on_page=lambda _: bar.update(1),
            **options,
        )
    paths = write_document(conversion, output, source.name, formats, images)
    seconds = time.perf_counter() - start
    raw = output / f"{source.name}{FORMATS['doctags']}"
    for page in conversion.malformed:
        click.echo(
            f"{source.path}: page {page.number} kept as raw DocTags in {raw} ({page.problem})",
            err=True,
        )
    click.echo(
        f"{source.path}: {len(selected)} pages in {seconds:.1f} s -> "
        + ", ".join(str(p) for p in paths)
    )


if __name__ == "__main__":
    main()
