"""The documents package's optional dependency (docling-core, the `docling` extra), imported once here."""

from __future__ import annotations

try:  # optional dependency: pip install "mlx-smolvlm[docling]"
    from docling_core.types.doc import DoclingDocument, ImageRefMode
    from docling_core.types.doc.document import DocTagsDocument
except ImportError as error:
    DoclingDocument = ImageRefMode = DocTagsDocument = None
    MISSING: str | None = error.name
else:
    MISSING = None

INSTALL = 'pip install "mlx-smolvlm[docling]"'


def require() -> None:
    """Fail with the command that installs docling-core when it is missing."""
    if MISSING is not None:
        raise ImportError(f"documents need docling-core ({MISSING} is not installed): {INSTALL}")
