"""SmolLM2 (Llama) decoder.

Written here rather than taken from mlx_lm.models.llama so that the joined model can feed
image-merged input embeddings with a padding mask and project only the positions it needs
to logits (the last one during prefill: the 49k-vocab head is a large share of the work).
Caches and quantized attention come from mlx-lm.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

from .config import TextConfig


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        dims, head_dim = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.scale = head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(dims, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dims, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dims, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dims, bias=bias)
        self.rope = initialize_rope(
            head_dim,
            config.rope_theta,
            config.rope_traditional,
            config.rope_scaling,
            config.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = self.attend(q, k, v, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def attend(self, q: mx.array, k: Any, v: Any, mask: Any, cache: Any) -> mx.array:
        """Attention of the new queries over the (cached) keys and values."""
        return scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        dims, hidden, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(dims, hidden, bias=bias)
        self.up_proj = nn.Linear(dims, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dims, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LanguageModel(nn.Module):
    """Token or input embeddings -> final hidden states -> logits."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def hidden_states(
        self,
        inputs: mx.array | None = None,
        cache: list | None = None,
        input_embeddings: mx.array | None = None,
        mask: Any = None,
    ) -> mx.array:
        """Run the decoder layers and the final norm; `mask` defaults to causal."""
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        cache = cache if cache is not None else [None] * len(self.layers)
        if mask is None:
            mask = create_attention_mask(h, cache[0])
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache)
        return self.norm(h)

    def logits(self, hidden: mx.array) -> mx.array:
        """Project final hidden states onto the vocabulary."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        inputs: mx.array | None = None,
        cache: list | None = None,
        input_embeddings: mx.array | None = None,
        mask: Any = None,
    ) -> mx.array:
        return self.logits(self.hidden_states(inputs, cache, input_embeddings, mask))

    def make_cache(self) -> list[KVCache]:
        """One mlx-lm KV cache per layer."""
        return [KVCache() for _ in self.layers]
