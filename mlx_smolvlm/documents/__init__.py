"""Documents: PDFs and page images -> DocTags (SmolDocling, granite-docling) -> DoclingDocument.

Needs the `docling` extra (docling-core, pypdfium2): `pip install "mlx-smolvlm[docling]"`.
"""

from ..processing.pages import DEFAULT_DPI, find_files, open_source, parse_pages, render_pages
from .doctags import check_doctags, to_docling
from .export import FORMATS, write_document
from .pipeline import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    MODELS,
    TASK_PROMPTS,
    Conversion,
    PageResult,
    convert,
    convert_document,
    generate_doctags,
)

__all__ = [
    "DEFAULT_DPI",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MODEL",
    "DEFAULT_PROMPT",
    "FORMATS",
    "MODELS",
    "TASK_PROMPTS",
    "Conversion",
    "PageResult",
    "check_doctags",
    "convert",
    "convert_document",
    "find_files",
    "generate_doctags",
    "open_source",
    "parse_pages",
    "render_pages",
    "to_docling",
    "write_document",
]
