"""Index PDFs and images with ColSmolVLM and search them: `python -m mlx_smolvlm.retrieve`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .processing.pages import DEFAULT_DPI
from .retrieval import (
    Index,
    build_index,
    collect_pages,
    convert_retriever,
    embed_queries,
    load_retriever,
)
from .retrieval.index import INDEX_FILE, read_metadata
from .utils.options import dpi_option, dtype_option, model_option
from .utils.validation import Group

DEFAULT_MODEL = "vidore/colSmol-256M"
# Failures a user can cause (paths, files, settings); anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, ImportError)


def run(action: Callable[[], Any], verbose: bool) -> Any:
    """Run `action`; a user error becomes one line on stderr and exit status 1."""
    try:
        return action()
    except KeyboardInterrupt:
        click.echo("Interrupted; finished pages are kept (rerun to resume).", err=True)
        sys.exit(130)
    except USER_ERRORS as e:
        if verbose:
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise click.ClickException(message) from e


def model_options(function: Callable) -> Callable:
    """--model, --adapter-path, --base, --dtype shared by the commands."""
    function = dtype_option()(function)
    function = click.option(
        "--base", default=None, help="Base checkpoint of an adapter (default: the one it names)."
    )(function)
    function = click.option(
        "--adapter-path", default=None, help="A PEFT LoRA adapter to apply to --model."
    )(function)
    return function


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Page retrieval with ColSmolVLM (ColIdefics3): build an index, then search it."""


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--index", "index_dir", required=True, help="Index folder (created or resumed).")
@model_option(
    help=f"Retriever: checkpoint folder, Hub id or PEFT adapter [default: {DEFAULT_MODEL}, or "
    "the one a resumed index was built with].",
    default=None,
)
@model_options
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@dpi_option(
    help=f"PDF rendering resolution [default: {DEFAULT_DPI:g}, or the resumed index's].",
    default=None,
)
@click.option(
    "--shard-pages",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Pages per embeddings shard (the work a kill can lose).",
)
@click.option(
    "--index-dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default=None,
    help="Stored embedding precision [default: bfloat16, or the resumed index's].",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--verbose", is_flag=True, help="Show tracebacks of errors.")
def index(
    inputs,
    index_dir,
    model,
    adapter_path,
    base,
    dtype,
    batch_size,
    dpi,
    shard_pages,
    index_dtype,
    quiet,
    verbose,
) -> None:
    """Embed the pages of INPUTS (PDFs, images, folders of them) into an index folder."""

    def action() -> int:
        pages = collect_pages(inputs)
        previous = _previous_identity(index_dir)
        name = _absolute(model or previous.get("model") or DEFAULT_MODEL)
        adapter = _absolute(adapter_path if model else adapter_path or previous.get("adapter"))
        retriever, processor = load_retriever(name, adapter_path=adapter, base=base, dtype=dtype)
        identity = {
            "model": name,
            "adapter": adapter,
            "dim": retriever.dim,
            "dtype": index_dtype or previous.get("dtype", "bfloat16"),
            "dpi": dpi or previous.get("dpi", DEFAULT_DPI),
        }
        writer = build_index(
            retriever,
            processor,
            pages,
            index_dir,
            identity,
            batch_size,
            identity["dpi"],
            shard_pages,
            progress=not quiet,
        )
        return len(writer.entries)

    total = run(action, verbose)
    click.echo(f"{index_dir}: {total} pages indexed")


@main.command()
@click.argument("index_dir")
@click.argument("queries", nargs=-1, required=True)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@model_option(help="Retriever for the queries [default: the index's].", default=None)
@model_options
@click.option("--verbose", is_flag=True, help="Show tracebacks of errors.")
def search(index_dir, queries, top_k, as_json, model, adapter_path, base, dtype, verbose) -> None:
    """Find the TOP-K pages of the index at INDEX_DIR that best match each query."""

    def action() -> list:
        opened = Index(index_dir)
        for query in queries:
            if not query.strip():
                raise ValueError("a query is empty")
        name = model or opened.meta["model"]
        adapter = adapter_path if model else adapter_path or opened.meta.get("adapter")
        retriever, processor = load_retriever(name, adapter_path=adapter, base=base, dtype=dtype)
        if retriever.dim != opened.meta["dim"]:
            raise ValueError(
                f"{name} embeds in {retriever.dim} dimensions; the index holds {opened.meta['dim']}"
            )
        return opened.search(embed_queries(retriever, processor, list(queries)), top_k)

    results = run(action, verbose)
    if as_json:
        out = [
            {"query": query, "results": [vars(hit) for hit in hits]}
            for query, hits in zip(queries, results)
        ]
        click.echo(json.dumps(out, indent=2))
        return
    for query, hits in zip(queries, results):
        click.echo(f"Query: {query}")
        if not hits:
            click.echo("  (the index is empty)")
        for hit in hits:
            click.echo(f"  {hit.rank:>3}. {hit.score:9.4f}  {hit.label()}")


@main.command()
@model_option(help="Source retriever.", default=DEFAULT_MODEL)
@click.option("--mlx-path", required=True, help="Output folder.")
@model_options
@click.option("-q", "--quantize", is_flag=True, help="Quantize the decoder and projection.")
@click.option(
    "--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="4", show_default=True
)
@click.option(
    "--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True
)
@click.option("--force", is_flag=True, help="Replace an existing --mlx-path.")
@click.option("--verbose", is_flag=True, help="Show tracebacks of errors.")
def convert(
    model, mlx_path, adapter_path, base, dtype, quantize, q_bits, q_group_size, force, verbose
) -> None:
    """Write a retriever (adapter fused in) as an MLX checkpoint, optionally quantized."""
    out = run(
        lambda: convert_retriever(
            model,
            mlx_path,
            adapter_path,
            base,
            dtype,
            quantize,
            int(q_bits),
            int(q_group_size),
            force,
        ),
        verbose,
    )
    click.echo(f"Wrote {out}")


def _absolute(model: str | None) -> str | None:
    """A local model path made absolute (an index may be resumed from elsewhere); Hub ids as given."""
    if model is None or not Path(model).expanduser().exists():
        return model
    return str(Path(model).expanduser().resolve())


def _previous_identity(index_dir: str) -> dict[str, Any]:
    """The settings an existing index was built with ({} for a new one)."""
    path = Path(index_dir)
    return read_metadata(path) if (path / INDEX_FILE).exists() else {}


if __name__ == "__main__":
    main()
