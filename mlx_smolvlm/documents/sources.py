"""Document sources on disk: PDFs and page images, the pages to read, and page rendering."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..processing.image import load_image
from . import extras

# docling's VLM pipeline renders PDF pages for SmolDocling and granite-docling at scale 2.0
# of PDF's 72 points per inch.
DEFAULT_DPI = 144
PDF_SUFFIXES = (".pdf",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")


@dataclass(frozen=True)
class Source:
    """One document: a PDF, or a page image (a one-page document)."""

    path: Path
    kind: str  # "pdf" or "image"
    page_count: int

    @property
    def name(self) -> str:
        """The document's name: its file name without the suffix."""
        return self.path.stem


def find_documents(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, with the PDFs and images inside named folders (not their subfolders)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in PDF_SUFFIXES + IMAGE_SUFFIXES
            )
            if not inside:
                raise FileNotFoundError(f"{path}: the folder holds no PDF or image")
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def open_source(path: str | Path) -> Source:
    """Check that `path` is a readable PDF or image and count its pages."""
    extras.require()
    path = Path(path)
    with open(path, "rb") as file:
        head = file.read(1024)
    if b"%PDF-" in head or path.suffix.lower() in PDF_SUFFIXES:
        try:
            pdf = extras.pdfium.PdfDocument(path)
        except extras.pdfium.PdfiumError as error:
            raise ValueError(f"{path}: not a readable PDF ({error})") from error
        try:
            count = len(pdf)
        finally:
            pdf.close()
        if count == 0:
            raise ValueError(f"{path}: the PDF has no pages")
        return Source(path, "pdf", count)
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: neither a PDF nor an image ({error})") from error
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path}: {error}") from error
    return Source(path, "image", 1)


def parse_pages(spec: str | None, page_count: int) -> list[int]:
    """Page numbers (from 1) selected by a spec like "1-3,7" or "5-" (None: every page)."""
    if spec is None:
        return list(range(1, page_count + 1))
    pages: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?", part)
        if match is None:
            raise ValueError(f"--pages {spec!r}: {part!r} is not N, N-M or N-")
        first = int(match[1])
        last = (int(match[3]) if match[3] else page_count) if match[2] else first
        if first < 1 or last < first:
            raise ValueError(f"--pages {spec!r}: {part.strip()!r} is an empty range")
        if last > page_count:
            raise ValueError(
                f"--pages {spec!r}: page {last} is out of range (the document has {page_count})"
            )
        pages += [n for n in range(first, last + 1) if n not in pages]
    return pages


def render_pages(
    source: Source, pages: Sequence[int], dpi: float = DEFAULT_DPI
) -> Iterator[tuple[int, Image.Image]]:
    """Yield `(page number, RGB image)` for each selected page, rendering PDFs at `dpi`."""
    if source.kind == "image":
        yield 1, load_image(source.path)
        return
    pdf = extras.pdfium.PdfDocument(source.path)
    try:
        for number in pages:
            try:
                page = pdf[number - 1]
                image = page.render(scale=dpi / 72).to_pil().convert("RGB")
                page.close()
            except extras.pdfium.PdfiumError as error:
                raise ValueError(f"page {number} cannot be rendered ({error})") from error
            yield number, image
    finally:
        pdf.close()
