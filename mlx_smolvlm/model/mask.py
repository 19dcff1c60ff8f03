"""The attention mask rule of padded batches: causal, padded keys hidden, each query sees itself.

A query always sees its own key so that the rows of padding tokens are never empty: an
all-masked row makes NaNs that would reach real tokens through the attention weights' zeros.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx


def with_self(mask: mx.array) -> mx.array:
    """A boolean (..., queries, keys) mask, the last queries aligned with the last keys, that
    also lets each query see its own key."""
    queries, keys = mask.shape[-2:]
    return mask | (mx.arange(keys - queries, keys)[:, None] == mx.arange(keys)[None])


def padding_mask(attention_mask: Any, length: int) -> mx.array:
    """(batch, 1, length, keys) mask for the last `length` positions of `attention_mask`
    (batch, keys), which is 0 on padding."""
    valid = mx.array(attention_mask).astype(mx.bool_)[:, None, None, :]
    keys = valid.shape[-1]
    causal = mx.arange(keys - length, keys)[:, None] >= mx.arange(keys)[None]
    return with_self(causal & valid)
