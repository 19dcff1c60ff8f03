"""Captioning image collections: inputs, batched generation by shard, resumable JSONL output."""

from .inputs import DEFAULT_PROMPT, IMAGE_EXTENSIONS, InputError, Item, read_items, select, shard
from .records import merge, read_records
from .run import Summary, caption_batch, caption_dataset

__all__ = [
    "DEFAULT_PROMPT",
    "IMAGE_EXTENSIONS",
    "InputError",
    "Item",
    "Summary",
    "caption_batch",
    "caption_dataset",
    "merge",
    "read_items",
    "read_records",
    "select",
    "shard",
]
