"""One decoder step for one token, computed with numpy: the decode loop on MLX's CPU backend.

Decoding reads every weight once per token, so its speed is the speed of matrix-vector
products. MLX's CPU backend does them through `cblas_sgemm` (packing the weights, ~10 GB/s here)
plus a fixed cost per operation; numpy's `gemv` streams the same float32 weights at the memory's
bandwidth (~16 GB/s) and its small operations cost microseconds. With the weights and the KV
cache shared with MLX (no copies), a step takes ~38 ms instead of ~75 ms on a 2-core x86 machine
for SmolVLM-256M. On Metal none of this applies and the MLX decoder runs.

The KV cache stays mlx-lm's: each layer's new keys and values go through the cache's own
`update_and_fetch` (so prompt-cache reuse, growth and bounded caches behave as on the MLX path)
and attention reads the returned arrays in place.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache

if TYPE_CHECKING:
    from .language import LanguageModel


def supported(model: LanguageModel, cache: list | None) -> bool:
    """Whether the numpy step computes what the MLX decoder would for this model and cache."""
    if not cache or not all(type(c) in (KVCache, RotatingKVCache) for c in cache):
        return False  # quantized caches keep MLX's quantized attention
    head = model.embed_tokens if model.config.tie_word_embeddings else model.lm_head
    linears = [head] + [
        linear
        for layer in model.layers
        for linear in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
            layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj,
        )
    ]  # fmt: skip
    plain = all(type(m) in (nn.Linear, nn.Embedding) for m in linears)
    rope = model.layers[0].self_attn.rope
    return (
        plain
        and all(m.weight.dtype == mx.float32 for m in linears)
        and type(rope) is nn.RoPE
        and not rope.traditional
        and rope.scale == 1.0
        and rope.dims == model.config.head_dim
    )


def _view(x: mx.array) -> np.ndarray:
    """An MLX array as numpy, sharing its memory (evaluated first: a lazy one has no data).

    The view does not keep `x`'s memory alive: callers hold `x` while they use it."""
    mx.eval(x)
    return np.array(x, copy=False)


@cache
def _inverse_frequencies(dims: int, base: float) -> np.ndarray:
    # float32 throughout, as the reference computes its rotary tables.
    exponents = np.arange(0, dims, 2, dtype=np.int64).astype(np.float32) / np.float32(dims)
    return (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)


def _rope(x: np.ndarray, position: int, base: float) -> np.ndarray:
    """Rotate (heads, dims) by `position` (rotate-half layout, no scaling)."""
    half = x.shape[-1] // 2
    angles = np.float32(position) * _inverse_frequencies(x.shape[-1], base)
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = x[:, :half], x[:, half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def _rms_norm(x: np.ndarray, norm: nn.RMSNorm) -> np.ndarray:
    mean_square = np.dot(x, x) / np.float32(x.size)  # a BLAS dot: a third of np.mean's time
    return x * (np.float32(1.0) / np.sqrt(mean_square + np.float32(norm.eps))) * _view(norm.weight)


def _linear(x: np.ndarray, linear: nn.Linear) -> np.ndarray:
    out = _view(linear.weight) @ x
    return out + _view(linear.bias) if "bias" in linear else out


def _append(cache: Any, k: np.ndarray, v: np.ndarray) -> tuple[mx.array, mx.array, int]:
    """Add one position to the cache; the MLX arrays holding its keys and values so far, and
    how many positions of them are in use."""
    if type(cache) is KVCache and cache.keys is not None and cache.offset < cache.keys.shape[2]:
        # Room left in mlx-lm's buffer: write in place, as its own slice update would, without
        # a round trip through MLX's scheduler for each layer.
        _view(cache.keys)[0, :, cache.offset] = k
        _view(cache.values)[0, :, cache.offset] = v
        cache.offset += 1
        return cache.keys, cache.values, cache.offset
    keys, values = cache.update_and_fetch(mx.array(k[None, :, None]), mx.array(v[None, :, None]))
    return keys, values, keys.shape[2]


def _attention(layer: Any, x: np.ndarray, cache: Any) -> np.ndarray:
    attn = layer.self_attn
    head_dim = attn.rope.dims
    position = cache.offset
    q = _rope(_linear(x, attn.q_proj).reshape(attn.n_heads, head_dim), position, attn.rope.base)
    k = _rope(_linear(x, attn.k_proj).reshape(attn.n_kv_heads, head_dim), position, attn.rope.base)
    v = _linear(x, attn.v_proj).reshape(attn.n_kv_heads, head_dim)
    # The MLX arrays must stay referenced while numpy reads them: a view does not keep them alive.
    keys_owner, values_owner, length = _append(cache, k, v)
    keys = _view(keys_owner)[0, :, :length]  # (kv_heads, length, head_dim)
    values = _view(values_owner)[0, :, :length]
    group = attn.n_heads // attn.n_kv_heads
    # Keys times contiguous queries, (kv_heads, length, dims) @ (kv_heads, dims, group): the
    # cached keys stream through BLAS as a plain product (queries times transposed keys runs
    # ~5x slower for so few queries). The scores are then laid out with length last, so that
    # the softmax reductions run along contiguous memory.
    grouped = (q * np.float32(attn.scale)).reshape(attn.n_kv_heads, group, head_dim)
    scores = np.matmul(keys, grouped.transpose(0, 2, 1).copy()).transpose(0, 2, 1).copy()
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    out = np.matmul(scores, values)  # (kv_heads, group, head_dim)
    out /= scores.sum(axis=-1, keepdims=True)
    return _linear(out.reshape(-1), attn.o_proj)


def _mlp(mlp: Any, x: np.ndarray) -> np.ndarray:
    gate = _linear(x, mlp.gate_proj)
    silu = gate * (np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * gate))
    return _linear(silu * _linear(x, mlp.up_proj), mlp.down_proj)


def decode_step(model: LanguageModel, token: int | None, embedding: Any, cache: list) -> mx.array:
    """Logits (1, 1, vocab) for one new token (or input embedding), appending to `cache`."""
    if embedding is None:
        x = _view(model.embed_tokens.weight)[token].copy()
    else:
        x = np.array(embedding, dtype=np.float32).reshape(-1)
    for layer, layer_cache in zip(model.layers, cache):
        x = x + _attention(layer, _rms_norm(x, layer.input_layernorm), layer_cache)
        x = x + _mlp(layer.mlp, _rms_norm(x, layer.post_attention_layernorm))
    x = _rms_norm(x, model.norm)
    head = model.embed_tokens if model.config.tie_word_embeddings else model.lm_head
    return mx.array((_view(head.weight) @ x)[None, None])
