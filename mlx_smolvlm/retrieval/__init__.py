"""ColSmolVLM retrieval: page and query embeddings (ColIdefics3), MaxSim scoring, an on-disk index."""

from ..processing.pages import render_pdf_page
from .build import build_index
from .convert import convert_retriever
from .embedding import embed_images, embed_queries, iter_image_embeddings
from .index import Hit, Index, IndexFormatError, IndexWriter
from .loading import apply_peft_adapter, fuse_adapter, load_colidefics3, load_retriever
from .model import ColIdefics3
from .processing import RetrievalProcessor
from .scoring import score, top_k
from .sources import Page, collect_pages

__all__ = [
    "ColIdefics3",
    "Hit",
    "Index",
    "IndexFormatError",
    "IndexWriter",
    "Page",
    "RetrievalProcessor",
    "apply_peft_adapter",
    "build_index",
    "collect_pages",
    "convert_retriever",
    "embed_images",
    "embed_queries",
    "fuse_adapter",
    "iter_image_embeddings",
    "load_colidefics3",
    "load_retriever",
    "render_pdf_page",
    "score",
    "top_k",
]
