"""Inputs -> pages: PDF files (one page each), image files, and folders of them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..processing.pages import (
    DEFAULT_DPI,
    IMAGE_SUFFIXES,
    PDF_SUFFIXES,
    find_files,
    pdf_page_count,
    render_pdf_page,
    supported,
)
from .backbone import fetch_image


@dataclass(frozen=True)
class Page:
    """One page to embed: an image file, or page `page` (1-based) of a PDF."""

    source: str
    page: int | None = None

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.source, self.page)

    def label(self) -> str:
        return self.source if self.page is None else f"{self.source} page {self.page}"


def collect_pages(inputs: Iterable[str | Path]) -> list[Page]:
    """Pages of every input, folders searched recursively in name order, duplicates dropped."""
    pages: list[Page] = []
    seen = set()
    for file in find_files(inputs):
        if not supported(file):
            raise ValueError(
                f"{file}: not a PDF or an image "
                f"(supported: .pdf, {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        source = str(file.resolve())
        if source in seen:
            continue
        seen.add(source)
        if file.suffix.lower() in PDF_SUFFIXES:
            pages.extend(Page(source, n) for n in range(1, pdf_page_count(file) + 1))
        else:
            pages.append(Page(source))
    return pages


def load_page(page: Page, dpi: float = DEFAULT_DPI) -> Image.Image:
    """The page's image, with the file (and page) named when it cannot be read."""
    try:
        if page.page is not None:
            return render_pdf_page(page.source, page.page, dpi)
        return fetch_image(page.source)
    except Exception as e:
        raise ValueError(f"{page.label()}: cannot read it ({e})") from e
