"""Pages and queries -> model inputs, as colpali-engine's ColIdefics3Processor builds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .backbone import Processor, fetch_image

# The fixed prompt every page is embedded with, and the token queries are padded out with.
VISUAL_PROMPT = "<|im_start|>User:<image>Describe the image.<end_of_utterance>\nAssistant:"
QUERY_AUGMENTATION_TOKEN = "<end_of_utterance>"
QUERY_AUGMENTATION_COUNT = 10


class RetrievalProcessor:
    """Page images and query strings -> left-padded ids, attention mask and pixels."""

    def __init__(self, processor: Processor, query_prefix: str = "") -> None:
        self.processor = processor
        self.query_prefix = query_prefix

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> RetrievalProcessor:
        """The checkpoint's tokenizer and image processor (keyword overrides go to `Processor`)."""
        return cls(Processor.from_pretrained(path, **overrides))

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def process_images(self, images: list[Any]) -> dict[str, Any]:
        """Inputs for pages: each image (PIL, path, URL) behind the fixed visual prompt."""
        if not images:
            raise ValueError("no images to process")
        rgb = [fetch_image(image).convert("RGB") for image in images]
        return self.processor(
            [VISUAL_PROMPT] * len(rgb), images=[[image] for image in rgb], return_tensors="np"
        )

    def process_queries(self, queries: list[str], suffix: str | None = None) -> dict[str, Any]:
        """Inputs for queries: prefix + query + ten augmentation tokens (the default suffix)."""
        if not queries:
            raise ValueError("no queries to process")
        for query in queries:
            if not isinstance(query, str):
                raise TypeError(f"a query must be a string, got {type(query).__name__}")
        if suffix is None:
            suffix = QUERY_AUGMENTATION_TOKEN * QUERY_AUGMENTATION_COUNT
        texts = [self.query_prefix + query + suffix for query in queries]
        return self.processor(texts, return_tensors="np")
