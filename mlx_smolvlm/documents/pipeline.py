"""Pages -> DocTags with SmolDocling or granite-docling (batched), and sources -> one DoclingDocument."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .. import Model, batch_generate
from ..processing.pages import DEFAULT_DPI, open_source, parse_pages, render_pages
from .doctags import check_doctags, to_docling

if TYPE_CHECKING:
    from docling_core.types.doc import DoclingDocument

DEFAULT_MODEL = "ds4sd/SmolDocling-256M-preview"
MODELS = {"smoldocling": DEFAULT_MODEL, "granite-docling": "ibm-granite/granite-docling-258M"}
DEFAULT_PROMPT = "Convert this page to docling."
DEFAULT_MAX_TOKENS = 8192  # what the models' cards generate for a dense page
DEFAULT_BATCH_SIZE = 4
END = "</doctag>"

# The instructions SmolDocling was trained on (its card's "Supported Instructions"; granite-
# docling's card carries SmolDocling's features over).
# Only the first answers with a whole page of DocTags; the others answer about one element.
TASK_PROMPTS = {
    "page": DEFAULT_PROMPT,
    "chart": "Convert chart to table.",
    "formula": "Convert formula to LaTeX.",
    "code": "Convert code to text.",
    "table": "Convert table to OTSL.",
    # Locations are <loc_x> on a 0-500 grid over the page: left, top, right, bottom.
    "ocr": "OCR the text in a specific location: <loc_{left}><loc_{top}><loc_{right}><loc_{bottom}>",
}


@dataclass
class PageResult:
    """One page's DocTags as generated, and why it is malformed (None when it is not)."""

    number: int  # in the source, from 1
    doctags: str
    image: Image.Image | None
    token_ids: list[int]
    finish_reason: str | None  # "stop" (</doctag> or the end-of-turn token) or "length"
    problem: str | None = None


@dataclass
class Conversion:
    """A converted source: its document and the DocTags of every page."""

    document: DoclingDocument | None
    pages: list[PageResult]

    @property
    def malformed(self) -> list[PageResult]:
        """Pages whose raw DocTags is kept because it is cut short or malformed."""
        return [page for page in self.pages if page.problem is not None]


def generate_doctags(
    model: Model,
    processor: Any,
    pages: Iterable[tuple[int, Image.Image]],
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_page: Callable[[PageResult], None] | None = None,
    **generate_kwargs: Any,
) -> list[PageResult]:
    """DocTags for `(page number, image)` pairs, `batch_size` pages per `batch_generate` call.

    Each page stops at `</doctag>` or the end-of-turn token; `on_page` sees each page as its
    batch finishes. Keyword arguments go to `batch_generate` (e.g. `temperature`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    tokenizer = processor.tokenizer
    # In granite-docling's vocabulary </doctag> is one special token (left out of streamed
    # text), so it stops as an end-of-turn token; in SmolDocling's it is text: a stop string.
    end_id = tokenizer.backend.token_to_id(END)
    eos = set(tokenizer.eos_token_ids) | ({end_id} if end_id is not None else set())
    results = []
    for batch in _chunks(pages, batch_size):
        outputs = batch_generate(
            model,
            processor,
            [prompt] * len(batch),
            [image for _, image in batch],
            max_tokens=max_tokens,
            stop=(END,),
            eos_token_ids=eos,
            **generate_kwargs,
        )
        for (number, image), output in zip(batch, outputs):
            text = tokenizer.decode(output.token_ids, skip_special_tokens=False)
            if output.finish_reason == "stop" and output.token == end_id:
                text += END
            if END in text:
                text = text[: text.index(END) + len(END)]
            page = PageResult(number, text, image, output.token_ids, output.finish_reason)
            if output.finish_reason == "length":
                page.problem = f"cut at max_tokens ({max_tokens}) before </doctag>"
            else:
                page.problem = check_doctags(text)
            results.append(page)
            if on_page is not None:
                on_page(page)
    return results


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter), drawn lazily."""
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def source_pages(
    source: str | Path | Image.Image | Sequence[Image.Image],
    pages: str | Sequence[int] | None = None,
    dpi: float = DEFAULT_DPI,
) -> tuple[str, int, Iterator[tuple[int, Image.Image]]]:
    """A source's name, number of selected pages and lazily rendered `(number, image)` pairs.

    `source` is a PDF or image path, a PIL image or a list of page images; `pages` a spec like
    "1-3,7" or a list of page numbers from 1.
    """
    if isinstance(source, (str, Path)):
        opened = open_source(source)
        count, name = opened.page_count, opened.name
    else:
        images = [source] if isinstance(source, Image.Image) else list(source)
        count, name = len(images), "Document"
    if pages is None or isinstance(pages, str):
        numbers = parse_pages(pages, count)
    else:
        numbers = parse_pages(",".join(map(str, pages)), count) if pages else []
    if not numbers:
        raise ValueError("no pages selected")
    if isinstance(source, (str, Path)):
        return name, len(numbers), render_pages(opened, numbers, dpi)
    return name, len(numbers), ((n, images[n - 1].convert("RGB")) for n in numbers)


def convert(
    model: Model,
    processor: Any,
    source: str | Path | Image.Image | Sequence[Image.Image],
    pages: str | Sequence[int] | None = None,
    dpi: float = DEFAULT_DPI,
    doctags: bool = False,
    **kwargs: Any,
) -> Conversion:
    """Convert a source's pages: the document (None with `doctags`) and every page's DocTags.

    Keyword arguments are those of `generate_doctags`.
    """
    name, _, rendered = source_pages(source, pages, dpi)
    results = generate_doctags(model, processor, rendered, **kwargs)
    if doctags:
        return Conversion(None, results)
    document, unreadable = to_docling(
        [page.doctags for page in results], [page.image for page in results], name
    )
    for i in unreadable:
        results[i].problem = results[i].problem or "docling-core cannot read it"
    return Conversion(document, results)


def convert_document(
    model: Model,
    processor: Any,
    source: str | Path | Image.Image | Sequence[Image.Image],
    doctags: bool = False,
    **kwargs: Any,
) -> DoclingDocument | list[str]:
    """A PDF, page image or list of page images as one DoclingDocument (with `doctags`: each
    page's raw DocTags).

    A malformed or cut page is reported with a warning; the document holds what docling-core
    reads of it, and `convert` returns its raw DocTags. Keyword arguments are those of
    `convert` (`pages`, `dpi`, `prompt`, `max_tokens`, `batch_size`, ...).
    """
    conversion = convert(model, processor, source, doctags=doctags, **kwargs)
    if doctags:
        return [page.doctags for page in conversion.pages]
    for page in conversion.malformed:
        warnings.warn(
            f"page {page.number}: {page.problem}; convert() returns its raw DocTags", stacklevel=2
        )
    return conversion.document
