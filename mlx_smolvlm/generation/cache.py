"""KV caches for generation, sized in one place, and a conversation's reusable prompt cache."""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import BatchKVCache, RotatingKVCache, can_trim_prompt_cache

GROWTH = 256  # mlx-lm's caches grow in steps of this many positions


def make_cache(
    model: Any,
    capacity: int,
    left_padding: list[int] | None = None,
    max_kv_size: int | None = None,
    keep: int = 0,
) -> list:
    """Per-layer KV caches for `capacity` positions: the model's own for one sequence,
    mlx-lm's `BatchKVCache` for several (left-padded) ones, a `RotatingKVCache` bounded
    at `max_kv_size` positions that always keeps the first `keep`."""
    layers = model.language_model.layers
    if left_padding is not None and len(left_padding) > 1:
        cache = [BatchKVCache(left_padding) for _ in layers]
    elif max_kv_size is not None:
        return [RotatingKVCache(max_size=max_kv_size, keep=keep) for _ in layers]
    else:
        cache = model.language_model.make_cache()
    reserve(model, cache, capacity)
    return cache


def reserve(model: Any, cache: list, capacity: int) -> None:
    """Let growing caches make room for `capacity` positions in one allocation instead of
    GROWTH at a time, but never for more than the model can attend to."""
    capacity = min(capacity, model.config.text_config.max_position_embeddings)
    for c in cache:
        if not isinstance(c, RotatingKVCache):
            c.step = max(GROWTH, -(-capacity // GROWTH) * GROWTH)


class PromptCache:
    """A conversation's KV cache and the token ids it holds, reused across turns.

    With `max_kv_size` the cache is bounded; it always keeps the first prompt's tokens up to
    its last image token, so images are never evicted.
    """

    def __init__(self, model: Any, max_kv_size: int | None = None):
        self.model = model
        self.max_kv_size = max_kv_size
        self.cache: list | None = None
        self.tokens: list[int] = []

    def reuse(self, ids: list[int], image_token_id: int, image_seq_len: int) -> int:
        """Keep the longest cached prefix of `ids` that ends outside an image; return its length."""
        if self.cache is not None and not can_trim_prompt_cache(self.cache):
            self.cache, self.tokens = None, []  # a rotated cache cannot be rewound
        common = 0
        for cached, new in zip(self.tokens, ids):
            if cached != new:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must be fed for logits
        # Never split an image's block of <image> tokens between cache and new input.
        while common > 0 and ids[common] == image_token_id and ids[common - 1] == image_token_id:
            common -= 1
        # The cache may hold more than `tokens` when a generation was stopped midway.
        if self.cache is not None and self.cache[0].offset > common:
            for c in self.cache:
                c.trim(c.offset - common)
        self.tokens = self.tokens[:common]
        return common

    def ensure(self, ids: list[int], image_token_id: int, capacity: int) -> list:
        """The per-layer caches, created on first use and sized for `capacity` tokens."""
        if self.cache is None:
            keep = 0
            if self.max_kv_size is not None:
                images = [i for i, t in enumerate(ids) if t == image_token_id]
                keep = images[-1] + 1 if images else 0
                if keep >= self.max_kv_size:
                    raise ValueError(
                        f"max_kv_size {self.max_kv_size} cannot hold the {keep} prompt tokens "
                        "up to the last image, which are never evicted"
                    )
            self.cache = make_cache(self.model, capacity, max_kv_size=self.max_kv_size, keep=keep)
        else:
            reserve(self.model, self.cache, capacity)
        return self.cache
