"""The joined model: image features from the vision tower and connector replace `<image>` tokens."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ModelConfig
from .connector import Connector
from .language import LanguageModel
from .mask import padding_mask
from .vision import VisionModel


class Model(nn.Module):
    """SmolVLM / Idefics3: SigLIP encoder, pixel-shuffle connector, SmolLM2 decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionModel(config.vision_config)
        self.connector = Connector(config)
        self.language_model = LanguageModel(config.text_config)

    def get_image_features(
        self,
        pixel_values: Any,
        pixel_attention_mask: Any = None,
        chunk_size: int | None = None,
    ) -> mx.array:
        """Encode (batch, images, 3, H, W) pixels into (real tiles * image_seq_len, hidden).

        All-zero tiles are padding and are dropped, as the reference does. With `chunk_size`
        the tiles are encoded and evaluated that many at a time to bound peak memory.
        """
        pixels = mx.array(pixel_values)
        batch, images, channels, height, width = pixels.shape
        pixels = pixels.reshape(batch * images, channels, height, width)
        real = np.array(mx.any(pixels.reshape(batch * images, -1) != 0, axis=1))
        keep = np.flatnonzero(real)
        if pixel_attention_mask is None:
            pixel_mask = np.ones((len(keep), height, width), dtype=bool)
        else:
            pixel_mask = np.asarray(pixel_attention_mask).reshape(batch * images, height, width)
            pixel_mask = pixel_mask[keep].astype(bool)
        p = self.config.vision_config.patch_size
        rows, cols = height // p, width // p  # a remainder narrower than a patch is dropped
        pixel_mask = pixel_mask[:, : rows * p, : cols * p]
        patch_mask = pixel_mask.reshape(len(keep), rows, p, cols, p).any(axis=(2, 4))
        # MLX convolutions take channels last.
        pixels = pixels[mx.array(keep)].transpose(0, 2, 3, 1)
        step = chunk_size or max(len(keep), 1)
        features = []
        for start in range(0, len(keep), step):
            hidden = self.vision_model(
                pixels[start : start + step], patch_mask[start : start + step]
            )
            features.append(self.connector(hidden))
            if chunk_size:
                mx.eval(features[-1])
        features = mx.concatenate(features) if features else mx.zeros((0, 1, 1))
        return features.reshape(-1, features.shape[-1])

    def embed(
        self,
        input_ids: Any,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        image_features: mx.array | None = None,
        chunk_size: int | None = None,
    ) -> mx.array:
        """Token embeddings with `<image>` positions replaced by image features, in order."""
        ids = mx.array(input_ids)
        embeddings = self.language_model.embed_tokens(ids)
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values, pixel_attention_mask, chunk_size)
        positions = np.flatnonzero(np.array(ids).reshape(-1) == self.config.image_token_id)
        n_features = 0 if image_features is None else image_features.shape[0]
        if len(positions) != n_features:
            raise ValueError(
                f"the prompt has {len(positions)} <image> tokens (id {self.config.image_token_id}) "
                f"but the images give {n_features} features "
                f"({self.config.image_seq_len} per tile): the text and the images do not match"
            )
        if n_features == 0:
            return embeddings
        batch, length, dims = embeddings.shape
        flat = embeddings.reshape(batch * length, dims)
        flat[mx.array(positions)] = image_features.astype(flat.dtype)
        return flat.reshape(batch, length, dims)

    def __call__(
        self,
        input_ids: Any,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        cache: list | None = None,
        attention_mask: Any = None,
    ) -> mx.array:
        """Logits (batch, length, vocab) for every position of `input_ids`."""
        embeddings = self.embed(input_ids, pixel_values, pixel_attention_mask)
        mask = None
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if not attention_mask.all():
                mask = padding_mask(attention_mask, embeddings.shape[1])
        return self.language_model(cache=cache, input_embeddings=embeddings, mask=mask)

    def make_cache(self) -> list:
        """A fresh KV cache per decoder layer."""
        return self.language_model.make_cache()

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map HF or mlx-community weight names and layouts onto this model's."""
        out = {}
        for name, value in weights.items():
            if name.endswith(("rotary_emb.inv_freq", "position_ids")):
                continue
            if name.startswith("model."):
                name = name[len("model.") :]
            if name.startswith("text_model."):
                name = "language_model." + name[len("text_model.") :]
            elif name.startswith("lm_head."):
                name = "language_model." + name
            if name.endswith("patch_embedding.weight") and value.ndim == 4:
                channels = self.config.vision_config.num_channels
                if value.shape[1] == channels and value.shape[-1] != channels:
                    value = value.transpose(0, 2, 3, 1)  # torch OIHW -> MLX OHWI
            out[name] = value
        if self.config.text_config.tie_word_embeddings:
            out.pop("language_model.lm_head.weight", None)
        return out
