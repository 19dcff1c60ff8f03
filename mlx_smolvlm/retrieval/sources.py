"""Inputs -> pages: PDF files (one page each), image files, and folders of them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .backbone import fetch_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PDF_SUFFIX = ".pdf"
DEFAULT_DPI = 144


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


def render_pdf_page(path: str | Path, page: int, dpi: float = DEFAULT_DPI) -> Image.Image:
    """Render page `page` (1-based) of a PDF to an RGB image with pypdfium2."""
    import pypdfium2  # optional dependency: only PDFs need it

    pdf = pypdfium2.PdfDocument(str(path))
    try:
        return pdf[page - 1].render(scale=dpi / 72).to_pil().convert("RGB")
    finally:
        pdf.close()


def pdf_page_count(path: Path) -> int:
    """Number of pages of a PDF, with the file named in the error of an unreadable one."""
    try:
        import pypdfium2  # optional dependency: only PDFs need it
    except ImportError as e:
        raise ValueError(f"{path}: reading PDFs needs pypdfium2 (pip install pypdfium2)") from e
    try:
        pdf = pypdfium2.PdfDocument(str(path))
    except Exception as e:  # pypdfium2 raises its own PdfiumError for damaged files
        raise ValueError(f"{path}: cannot read the PDF ({e})") from e
    try:
        return len(pdf)
    finally:
        pdf.close()


def collect_pages(inputs: Iterable[str | Path]) -> list[Page]:
    """Pages of every input, folders searched recursively in name order, duplicates dropped."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{item}: no such file or folder")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p))
            if not found:
                raise ValueError(f"{item}: the folder holds no PDF or image files")
            files.extend(found)
        elif _supported(path):
            files.append(path)
        else:
            raise ValueError(
                f"{item}: not a PDF or an image (supported: .pdf, {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
    pages: list[Page] = []
    seen = set()
    for file in files:
        source = str(file.resolve())
        if source in seen:
            continue
        seen.add(source)
        if file.suffix.lower() == PDF_SUFFIX:
            count = pdf_page_count(file)
            pages.extend(Page(source, n) for n in range(1, count + 1))
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


def _supported(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or path.suffix.lower() == PDF_SUFFIX
