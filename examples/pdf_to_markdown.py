"""Convert a PDF (or a page image) to Markdown with SmolDocling or granite-docling.

    python examples/pdf_to_markdown.py paper.pdf --pages 1-2 [--model ibm-granite/granite-docling-258M]

Needs the `docling` extra: pip install -e ".[docling]".
"""

import argparse
from pathlib import Path

from mlx_smolvlm import load
from mlx_smolvlm.documents import DEFAULT_MODEL, convert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path, help="PDF or page image")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--pages", default=None, help="e.g. 1-3,7 (default: all)")
    args = parser.parse_args()

    model, processor = load(args.model)
    conversion = convert(model, processor, args.source, pages=args.pages)
    for page in conversion.malformed:
        print(f"page {page.number}: {page.problem}; its raw DocTags:\n{page.doctags}\n")
    markdown = args.source.with_suffix(".md")
    markdown.write_text(conversion.document.export_to_markdown())
    print(f"{len(conversion.pages)} pages -> {markdown}")


if __name__ == "__main__":
    main()
