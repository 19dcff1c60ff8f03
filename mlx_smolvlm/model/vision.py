"""SigLIP vision encoder with the variable-size patch positions of Idefics3."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import VisionConfig

# tanh(x) ~= x * P(u) / Q(u) with u = (x / CLAMP)^2, for |x| <= CLAMP (tanh(9) rounds to 1.0).
# Coefficients fitted here (weighted least squares on [0, 9]); float32 error within 4e-7. A
# rational function vectorizes on every backend, where MLX's CPU tanh runs one element at a
# time (about 8x slower than this on x86).
CLAMP = 9.0
P = [0.9999999987, 11.08151972, 25.38810288, 14.89739789, 1.319134474, -0.04270404489]
Q = [1.0, 38.08151872, 178.7892405, 209.4293355, 55.49097888]
GELU_C = math.sqrt(2 / math.pi)


def _polyval(coefficients: list[float], u: mx.array) -> mx.array:
    result = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        result = result * u + c
    return result


@mx.compile
def tanh(x: mx.array) -> mx.array:
    """tanh as a vectorizable rational function."""
    x = mx.clip(x, -CLAMP, CLAMP)
    u = mx.square(x * (1 / CLAMP))
    return x * _polyval(P, u) / _polyval(Q, u)


@mx.compile
def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (SigLIP's `gelu_pytorch_tanh`), differentiable."""
    inner = GELU_C * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1 + tanh(inner))


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


def patch_inputs(patch_mask: np.ndarray, patches_per_side: int) -> tuple[mx.array, mx.array | None]:
    """Position ids of the patches and the attention mask of the padded ones (None when all
    are real): padded patches are ignored as keys; their queries still see real keys."""
    ids = mx.array(patch_position_ids(patch_mask, patches_per_side))
    if patch_mask.all():
        return ids, None
    return ids, mx.array(patch_mask.reshape(patch_mask.shape[0], 1, 1, -1))


def _buckets(length: int, valid: int, boundaries: np.ndarray) -> np.ndarray:
    """Bucket index of each of `length` patches spread over `valid` real ones."""
    step = np.float32(1.0) / np.float32(max(valid, 1))
    frac = np.arange(length, dtype=np.float32) * step
    frac = np.minimum(frac, np.float32(1.0 - 1e-6))
    return np.searchsorted(boundaries, frac, side="right")


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
        out = self.attend(q, k, v, mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
        """Attention of every patch over the real patches of its tile."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(gelu_tanh(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = Attention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


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

    def __call__(
        self, pixels: mx.array, position_ids: mx.array, mask: mx.array | None = None
    ) -> mx.array:
        """Encode NHWC tiles, given their patches' position ids and key mask (`patch_inputs`)."""
        h = self.embeddings(pixels.astype(self.dtype), position_ids)
        for layer in self.encoder.layers:
            h = layer(h, mask)
        return self.post_layernorm(h)

    @property
    def dtype(self) -> mx.Dtype:
        return self.embeddings.patch_embedding.weight.dtype
