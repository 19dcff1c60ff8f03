"""DocTags pages -> one DoclingDocument (docling-core), and the check that finds malformed pages."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image

from . import extras

if TYPE_CHECKING:
    from docling_core.types.doc import DoclingDocument

# DocTags elements that enclose content and must be closed (docling-core's DocumentToken
# names); the other tags (locations, OTSL cells, picture classes, code languages) stand alone.
ENCLOSING = {
    "doctag",
    "title",
    "document_index",
    "text",
    "caption",
    "footnote",
    "formula",
    "list_item",
    "page_header",
    "page_footer",
    "picture",
    "chart",
    "table",
    "otsl",
    "code",
    "ordered_list",
    "unordered_list",
    "checkbox_selected",
    "checkbox_unselected",
    "form",
    "key_value_region",
    "inline",
    "smiles",
    *(f"section_header_level_{level}" for level in range(1, 7)),
}
TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9_]*)>")


def check_doctags(doctags: str) -> str | None:
    """Why a page's DocTags is malformed (an unclosed or stray element, text outside one), or None."""
    text = doctags.strip()
    if not text.startswith("<doctag>"):
        return "it does not start with <doctag>"
    if not text.endswith("</doctag>"):
        return "it does not end with </doctag>"
    open_elements: list[str] = []
    position = 0
    for match in TAG.finditer(text):
        between = text[position : match.start()]
        if open_elements == ["doctag"] and between.strip():
            return f"text outside any element: {between.strip()[:40]!r}"
        position = match.end()
        closing, name = match.group(1), match.group(2)
        if name not in ENCLOSING:
            continue
        if not closing:
            if name == "doctag" and open_elements:
                return "a second <doctag> inside the page"
            open_elements.append(name)
            continue
        if not open_elements or open_elements[-1] != name:
            inner = f"<{open_elements[-1]}>" if open_elements else "nothing"
            return f"</{name}> closes {inner}"
        open_elements.pop()
        if not open_elements and text[position:].strip():
            return "content after </doctag>"
    return f"<{open_elements[-1]}> is never closed" if open_elements else None


def to_docling(
    pages: Sequence[str], images: Sequence[Image.Image | None], name: str = "Document"
) -> tuple[DoclingDocument, list[int]]:
    """One document from each page's DocTags and image; pages docling-core cannot read stay empty.

    Returns the document and the indices of the pages left empty.
    """
    extras.require()
    pages = list(pages)
    try:
        return _load(pages, images, name), []
    except Exception:  # docling-core raises whatever its parsing meets: find the pages
        unreadable = []
        for i, (doctags, image) in enumerate(zip(pages, images)):
            try:
                _load([doctags], [image], name)
            except Exception:
                unreadable.append(i)
                pages[i] = ""
        return _load(pages, images, name), unreadable


def _load(pages: list[str], images: Sequence[Image.Image | None], name: str) -> DoclingDocument:
    document = extras.DocTagsDocument.from_doctags_and_image_pairs(pages, list(images))
    return extras.DoclingDocument.load_from_doctags(document, document_name=name)
