"""Connector: pixel shuffle of the patch grid, then a linear projection into the decoder."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig


def pixel_shuffle(x: mx.array, scale: int) -> mx.array:
    """Fold each scale x scale block of patches into one token with scale^2 times the channels."""
    images, seq, dims = x.shape
    side = int(seq**0.5)
    x = x.reshape(images, side // scale, scale, side // scale, scale, dims)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(images, seq // scale**2, scale**2 * dims)


class ModalityProjection(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        in_dims = config.vision_config.hidden_size * config.scale_factor**2
        self.proj = nn.Linear(in_dims, config.text_config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class Connector(nn.Module):
    """Turn (images, patches, vision_hidden) into (images, image_seq_len, text_hidden)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.scale_factor = config.scale_factor
        self.modality_projection = ModalityProjection(config)

    def __call__(self, x: mx.array) -> mx.array:
        return self.modality_projection(pixel_shuffle(x, self.scale_factor))
