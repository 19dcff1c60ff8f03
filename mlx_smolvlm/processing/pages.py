"""Pages on disk: finding PDFs and page images, opening and rendering PDFs, page ranges."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .image import load_image

# docling's VLM pipeline renders PDF pages for SmolDocling and granite-docling at scale 2.0
# of PDF's 72 points per inch.
DEFAULT_DPI = 144
PDF_SUFFIXES = (".pdf",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
INSTALL = 'pip install "mlx-smolvlm[retrieval]" (or the [docling] extra)'


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


def supported(path: Path) -> bool:
    """Whether the file's suffix is a PDF's or a page image's."""
    return path.suffix.lower() in PDF_SUFFIXES + IMAGE_SUFFIXES


def find_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, with the PDFs and images inside named folders (searched recursively)."""
    found: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and supported(p))
            if not inside:
                raise FileNotFoundError(f"{item}: the folder holds no PDF or image files")
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return found


def open_pdf(path: str | Path) -> Any:
    """Open a PDF with pypdfium2 (a `pypdfium2.PdfDocument`), naming the file when unreadable."""
    try:
        import pypdfium2  # optional dependency: only PDFs need it
    except ImportError as error:
        raise ImportError(f"reading PDFs needs pypdfium2, not installed: {INSTALL}") from error
    try:
        return pypdfium2.PdfDocument(str(path))
    except pypdfium2.PdfiumError as error:
        raise ValueError(f"{path}: not a readable PDF ({error})") from error


def pdf_page_count(path: str | Path) -> int:
    """Number of pages of a PDF."""
    pdf = open_pdf(path)
    try:
        return len(pdf)
    finally:
        pdf.close()


def render_pdf(
    path: str | Path, pages: Iterable[int], dpi: float = DEFAULT_DPI
) -> Iterator[tuple[int, Image.Image]]:
    """Yield `(page number, RGB image)` for the PDF's pages (from 1) rendered at `dpi`."""
    pdf = open_pdf(path)
    try:
        for number in pages:
            try:
                page = pdf[number - 1]
                image = page.render(scale=dpi / 72).to_pil().convert("RGB")
                page.close()
            except Exception as error:  # pypdfium2's PdfiumError, or an index out of range
                raise ValueError(f"page {number} cannot be rendered ({error})") from error
            yield number, image
    finally:
        pdf.close()


def render_pdf_page(path: str | Path, page: int, dpi: float = DEFAULT_DPI) -> Image.Image:
    """Page `page` (from 1) of a PDF rendered to an RGB image at `dpi`."""
    ((_, image),) = render_pdf(path, [page], dpi)
    return image


def open_source(path: str | Path) -> Source:
    """Check that `path` is a readable PDF or image and count its pages."""
    path = Path(path)
    with open(path, "rb") as file:
        head = file.read(1024)
    if b"%PDF-" in head or path.suffix.lower() in PDF_SUFFIXES:
        count = pdf_page_count(path)
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


def render_pages(
    source: Source, pages: Sequence[int], dpi: float = DEFAULT_DPI
) -> Iterator[tuple[int, Image.Image]]:
    """Yield `(page number, RGB image)` for each selected page, rendering PDFs at `dpi`."""
    if source.kind == "image":
        yield 1, load_image(source.path)
        return
    yield from render_pdf(source.path, pages, dpi)


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
