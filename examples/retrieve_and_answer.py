"""Find the page that answers a question, then answer it from that page with SmolVLM.

    python examples/retrieve_and_answer.py "What was the revenue in 2023?" report.pdf slides/ \
        [--retriever vidore/colSmol-256M] [--model HuggingFaceTB/SmolVLM-256M-Instruct]

The pages are embedded into an index folder (`--index`, reused and resumed on the next run),
the best page for the question is found by late interaction, rendered, and given to the
answering model with the question.
"""

import argparse

from mlx_smolvlm import generate, load
from mlx_smolvlm.retrieval import (
    Index,
    Page,
    build_index,
    collect_pages,
    embed_queries,
    load_retriever,
)
from mlx_smolvlm.retrieval.sources import DEFAULT_DPI, load_page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("inputs", nargs="+", help="PDFs, images or folders of them.")
    parser.add_argument("--index", default="retrieval-index", help="Index folder.")
    parser.add_argument("--retriever", default="vidore/colSmol-256M")
    parser.add_argument("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct")
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()

    retriever, retrieval_processor = load_retriever(args.retriever)
    identity = {
        "model": args.retriever,
        "adapter": None,
        "dim": retriever.dim,
        "dtype": "bfloat16",
        "dpi": DEFAULT_DPI,
    }
    build_index(retriever, retrieval_processor, collect_pages(args.inputs), args.index, identity)
    query = embed_queries(retriever, retrieval_processor, [args.question])
    best = Index(args.index).search(query, k=1)[0][0]
    print(f"Best page ({best.score:.2f}): {best.label()}")

    model, processor = load(args.model)
    page = load_page(Page(best.source, best.page))
    result = generate(model, processor, args.question, image=page, max_tokens=args.max_tokens)
    print(result.text)


if __name__ == "__main__":
    main()
