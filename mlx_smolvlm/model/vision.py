"""SigLIP vision encoder with the variable-size patch positions of Idefics3."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import VisionConfig
from .cpu_kernels import (
    gelu_tanh,
    host_attention,
    host_gelu_tanh,
    host_layer_norm,
    use_host_kernels,
)


def patch_position_ids(patch_mask: np.ndarray, patches_per_side: int) -> np.ndarray:
    """Position-embedding ids of each patch, bucketizing fractional coordinates as the reference.

    `patch_mask` is (images, rows, cols) bool, True on real patches. Computed on the host in
    numpy because the exact float32/float64 mix decides the buckets (a plain float32 arange
    gives duplicate ids on the 27x27 grid of the 2.2B model).
    """
    n = patches_per_side
    boundaries = np.arange(1 / n, 1.0, 1 / n, dtype=np.float64).astype(np.float32)
    images, rows, cols = patch_mask.shape
    ids = np.zeros((images, rows * cols), dtype=np.int32)
    for i, mask in enumerate(patch_mask):
        nb_h, nb_w = int(mask[:, 0].sum()), int(mask[0, :].sum())
        bucket_h = _buckets(rows, nb_h, boundaries)
        bucket_w = _buckets(cols, nb_w, boundaries)
        grid = bucket_h[:, None] * n + bucket_w[None, :]
        ids[i] = np.where(mask, grid, 0).reshape(-1)
    return ids


def _buckets(length: int, valid: int, boundaries: np.ndarray) -> np.ndarray:
    """Bucket index of each of `length` patches spread over `valid` real ones."""
    step = np.float32(1.0) / np.float32(max(valid, 1))
    frac = np.arange(length, dtype=np.float32) * step
    frac = np.minimum(frac, np.float32(1.0 - 1e-6))
    return np.searchsorted(boundaries, frac, side="right")


def layer_norm(caller: nn.Module, norm: nn.LayerNorm, x: mx.array) -> mx.array:
    """`norm(x)`, on the host kernels where `caller` may use them."""
    return host_layer_norm(x, norm) if use_host_kernels(caller, x) else norm(x)


class Attention(nn.Module):
    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        B, L, D = x.shape

        def heads(t):
            return t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if use_host_kernels(self, x):
            out = host_attention(q, k, v, self.scale, mask)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.fc1(x)
        return self.fc2(host_gelu_tanh(h) if use_host_kernels(self, h) else gelu_tanh(h))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = Attention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        x = x + self.self_attn(layer_norm(self, self.layer_norm1, x), mask)
        return x + self.mlp(layer_norm(self, self.layer_norm2, x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patches_per_side = config.patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
        )
        self.position_embedding = nn.Embedding(config.patches_per_side**2, config.hidden_size)

    def __call__(self, pixels: mx.array, position_ids: mx.array) -> mx.array:
        """Embed NHWC `pixels` into (images, patches, hidden)."""
        patches = self.patch_embedding(pixels)
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        return patches + self.position_embedding(position_ids)


class VisionModel(nn.Module):
    """Encode tiles (images, H, W, C) into patch features (images, patches, hidden)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, pixels: mx.array, patch_mask: np.ndarray) -> mx.array:
        ids = patch_position_ids(patch_mask, self.config.patches_per_side)
        h = self.embeddings(pixels.astype(self.dtype), mx.array(ids))
        mask = None
        if not patch_mask.all():
            # Padded patches are ignored as keys; queries of padded patches still see real keys.
            mask = mx.array(patch_mask.reshape(patch_mask.shape[0], 1, 1, -1))
        for layer in self.encoder.layers:
            h = layer(h, mask)
        return layer_norm(self, self.post_layernorm, h)

    @property
    def dtype(self) -> mx.Dtype:
        return self.embeddings.patch_embedding.weight.dtype
