"""Write a converted document as Markdown, HTML, JSON and DocTags files, each atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..utils.atomic import write_file
from . import extras
from .pipeline import Conversion

FORMATS = {"md": ".md", "html": ".html", "json": ".json", "doctags": ".doctags"}
IMAGE_MODES = ("embedded", "referenced", "placeholder")
PAGE_BREAK = "\n<page_break>\n"


def parse_formats(spec: str) -> list[str]:
    """The formats of a comma-separated list such as "md,html", each once, in order."""
    formats = [part.strip().lower() for part in spec.split(",") if part.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(
            f"unknown --to format {', '.join(unknown) or repr(spec)} (choose from {', '.join(FORMATS)})"
        )
    return list(dict.fromkeys(formats))


def output_paths(output_dir: Path, name: str, formats: Sequence[str]) -> list[Path]:
    """Where a document's files go."""
    return [Path(output_dir) / f"{name}{FORMATS[f]}" for f in formats]


def is_converted(output_dir: Path, name: str, formats: Sequence[str]) -> bool:
    """Whether every requested file of the document is already written."""
    return all(path.exists() for path in output_paths(output_dir, name, formats))


def write_document(
    conversion: Conversion,
    output_dir: Path,
    name: str,
    formats: Sequence[str],
    images: str = "embedded",
) -> list[Path]:
    """Write the requested files (and the raw DocTags whenever a page is malformed); their paths.

    Pictures are embedded, written beside the files in NAME_artifacts/ ("referenced"), or left
    as placeholders. Each file appears whole or not at all.
    """
    extras.require()
    mode = extras.ImageRefMode(images)
    artifacts = Path(f"{name}_artifacts")  # relative: files refer to it by a relative path
    document = conversion.document
    wanted = list(formats)
    if conversion.malformed and "doctags" not in wanted:
        wanted.append("doctags")
    paths = output_paths(output_dir, name, wanted)
    for fmt, path in zip(wanted, paths):
        if fmt == "md":
            write_file(
                path,
                lambda t: document.save_as_markdown(t, artifacts_dir=artifacts, image_mode=mode),
            )
        elif fmt == "html":
            write_file(
                path, lambda t: document.save_as_html(t, artifacts_dir=artifacts, image_mode=mode)
            )
        elif fmt == "json":
            write_file(
                path, lambda t: document.save_as_json(t, artifacts_dir=artifacts, image_mode=mode)
            )
        else:
            raw = PAGE_BREAK.join(page.doctags for page in conversion.pages) + "\n"
            write_file(path, lambda t, raw=raw: t.write_text(raw, encoding="utf-8"))
    return paths
