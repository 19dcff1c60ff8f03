"""ColIdefics3 (ColSmolVLM): the SmolVLM backbone's last hidden states projected to unit vectors."""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .backbone import Model, ModelConfig, padding_mask

EMBEDDING_DIM = 128


class ColIdefics3(nn.Module):
    """Backbone without the LM head, then `linear` (hidden -> dim), L2-normalised per token."""

    def __init__(
        self,
        config: ModelConfig,
        dim: int = EMBEDDING_DIM,
        mask_non_image_embeddings: bool = False,
    ):
        super().__init__()
        self.config = config
        self.dim = dim
        self.mask_non_image_embeddings = mask_non_image_embeddings
        # A "tied" head is none at all: the retriever never projects onto the vocabulary.
        text = dataclasses.replace(config.text_config, tie_word_embeddings=True)
        self.model = Model(dataclasses.replace(config, text_config=text))
        self.linear = nn.Linear(config.text_config.hidden_size, dim)

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
    ) -> mx.array:
        """Embeddings (batch, length, dim): unit length on real tokens, zero on padding."""
        ids = np.asarray(input_ids)
        attention = np.asarray(attention_mask)
        embeddings = self.model.embed(ids, pixel_values, pixel_attention_mask)
        # Padded keys are hidden from every query, as transformers does with the attention mask.
        mask = None if attention.all() else padding_mask(attention, embeddings.shape[1])
        hidden = self.model.language_model.hidden_states(input_embeddings=embeddings, mask=mask)
        proj = self.linear(hidden)
        proj = proj / mx.linalg.norm(proj, axis=-1, keepdims=True)
        keep = attention.astype(bool)
        if self.mask_non_image_embeddings and pixel_values is not None:
            keep &= ids == self.config.image_token_id
        return proj * mx.array(keep[..., None]).astype(proj.dtype)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map colpali-engine's (HF) or this project's weight names onto this model's."""
        backbone = {}
        out = {}
        for name, value in weights.items():
            if name.startswith("linear."):
                out[name] = value
            elif name.startswith("model."):
                backbone[name[len("model.") :]] = value
            elif name.endswith(("rotary_emb.inv_freq", "position_ids")):
                continue
            else:
                out[name] = value  # reported as unexpected by the loader
        backbone.pop("lm_head.weight", None)
        backbone.pop("text_model.lm_head.weight", None)
        for name, value in self.model.sanitize(backbone).items():
            out["model." + name] = value
        out.pop("model.language_model.lm_head.weight", None)
        return out

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.vision_model.dtype
