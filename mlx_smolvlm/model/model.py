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
from .vision import VisionModel, patch_inputs


class Model(nn.Module):
    """SmolVLM / Idefics3: SigLIP encoder, pixel-shuffle connector, SmolLM2 decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionModel(config.vision_config)
        self.connector = Connector(config)
        self.language_model = LanguageModel(config.text_config)

    def image_inputs(self, pixel_values: Any, pixel_attention_mask: Any = None) -> dict:
        """The vision tower's inputs for (batch, images, 3, H, W) pixels, computed on the host:
        the real tiles channels-last ("pixels"; all-zero tiles are padding and are dropped, as
        the reference does), their patches' "position_ids" and padded-patch "mask"."""
        pixels = np.asarray(pixel_values)
        batch, images, channels, height, width = pixels.shape
        pixels = pixels.reshape(batch * images, channels, height, width)
        keep = np.flatnonzero(pixels.reshape(batch * images, -1).any(axis=1))
        if pixel_attention_mask is None:
            pixel_mask = np.ones((len(keep), height, width), dtype=bool)
        else:
            pixel_mask = np.asarray(pixel_attention_mask).reshape(batch * images, height, width)
            pixel_mask = pixel_mask[keep].astype(bool)
        p = self.config.vision_config.patch_size
        rows, cols = height // p, width // p  # a remainder narrower than a patch is dropped
        pixel_mask = pixel_mask[:, : rows * p, : cols * p]
        patch_mask = pixel_mask.reshape(len(keep), rows, p, cols, p).any(axis=(2, 4))
        position_ids, mask = patch_inputs(patch_mask, self.config.vision_config.patches_per_side)
        # MLX convolutions take channels last.
        inputs = {
            "pixels": mx.array(pixels[keep].transpose(0, 2, 3, 1)),
            "position_ids": position_ids,
        }
        return inputs if mask is None else {**inputs, "mask": mask}

    def encode_images(self, inputs: dict, chunk_size: int | None = None) -> mx.array:
        """Image features (real tiles * image_seq_len, hidden) of `image_inputs`' output.

        With `chunk_size` the tiles are encoded and evaluated that many at a time to bound
        peak memory."""
        count = inputs["pixels"].shape[0]
        step = chunk_size or max(count, 1)
        features = []
        for start in range(0, count, step):
            part = {k: v[start : start + step] for k, v in inputs.items()}
            features.append(self.connector(self.vision_model(**part)))
            if chunk_size:
                mx.eval(features[-1])
        features = mx.concatenate(features) if features else mx.zeros((0, 1, 1))
        return features.reshape(-1, features.shape[-1])

    def get_image_features(
        self,
        pixel_values: Any,
        pixel_attention_mask: Any = None,
        chunk_size: int | None = None,
    ) -> mx.array:
        """Encode (batch, images, 3, H, W) pixels into (real tiles * image_seq_len, hidden)."""
        return self.encode_images(self.image_inputs(pixel_values, pixel_attention_mask), chunk_size)

    def image_positions(self, input_ids: Any) -> mx.array:
        """Flat positions of the `<image>` tokens of `input_ids`, computed on the host."""
        ids = np.asarray(input_ids).reshape(-1)
        return mx.array(np.flatnonzero(ids == self.config.image_token_id))

    def embed(
        self,
        input_ids: Any,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        image_features: mx.array | None = None,
        chunk_size: int | None = None,
    ) -> mx.array:
        """Token embeddings with `<image>` positions replaced by image features, in order."""
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values, pixel_attention_mask, chunk_size)
        return self.merge_images(
            mx.array(input_ids), self.image_positions(input_ids), image_features
        )

    def merge_images(
        self, input_ids: mx.array, positions: mx.array, image_features: mx.array | None
    ) -> mx.array:
        """Token embeddings of `input_ids` with the flat `positions` replaced by the features."""
        embeddings = self.language_model.embed_tokens(input_ids)
        n_features = 0 if image_features is None else image_features.shape[0]
        if positions.size != n_features:
            raise ValueError(
                f"the prompt has {positions.size} <image> tokens (id {self.config.image_token_id}) "
                f"but the images give {n_features} features "
                f"({self.config.image_seq_len} per tile): the text and the images do not match"
            )
        if n_features == 0:
            return embeddings
        batch, length, dims = embeddings.shape
        flat = embeddings.reshape(batch * length, dims)
        flat[positions] = image_features.astype(flat.dtype)
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
