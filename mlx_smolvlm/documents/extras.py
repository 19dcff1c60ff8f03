"""The documents package's optional dependencies (the `docling` extra), imported once here."""

from __future__ import annotations

try:  # optional dependencies: pip install "mlx-smolvlm[docling]"
    import pypdfium2 as pdfium
    from docling_core.types.doc import DoclingDocument, ImageRefMode
    from docling_core.types.doc.document import DocTagsDocument
except ImportError as error:
    pdfium = DoclingDocument = ImageRefMode = DocTagsDocument = None
    MISSING: str | None = error.name
else:
    MISSING = None

INSTALL = 'pip install "mlx-smolvlm[docling]"'


def require() -> None:
    """Fail with the command that installs docling-core and pypdfium2 when one is missing."""
    if MISSING is not None:
        raise ImportError(
            f"documents need docling-core and pypdfium2 ({MISSING} is not installed): {INSTALL}"
        )
