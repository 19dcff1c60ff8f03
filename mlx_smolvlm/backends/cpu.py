"""The seam between the pure-MLX model and the CPU backend's host kernels and host decoder.

`prepare(model)` is called by the generation entry points (`stream_generate`,
`batch_stream_generate`) once per call, before any work: on MLX's CPU backend, for a float32
model, it swaps the model's attention, MLP, layer-norm and decoder modules for subclasses
that run their non-differentiable parts with numpy (the way LoRA swaps linear layers; the
numpy decoder only where every decoder layer is a plain float32 one: not quantized, not
adapted); elsewhere (Metal, bf16/fp16 weights, MLX_SMOLVLM_HOST_KERNELS=0) it swaps any such
subclass back, and the pure-MLX modules of `mlx_smolvlm.model` run. The swapped modules
share the originals' parameters (same names, same arrays), so weights, adapters and saved
checkpoints are unaffected. Training builds its own model and never calls `prepare`; a
prepared module that is put in training mode runs the MLX code of its base class.
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..model import language, vision
from . import blas
from .decoder import HostKVCache, decode_step, supported
from .kernels import host_attention, host_gelu_tanh, host_layer_norm, host_swiglu


class HostVisionAttention(vision.Attention):
    """Vision attention whose softmax runs on the host."""

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
        if self.training:
            return super().attend(q, k, v, mask)
        return host_attention(q, k, v, self.scale, mask)


class HostVisionMLP(vision.MLP):
    """Vision MLP whose GELU runs on the host."""

    def __call__(self, x: mx.array) -> mx.array:
        if self.training:
            return super().__call__(x)
        return self.fc2(host_gelu_tanh(self.fc1(x)))


class HostLayerNorm(nn.LayerNorm):
    """The vision tower's layer norms, on the host."""

    def __call__(self, x: mx.array) -> mx.array:
        if self.training:
            return super().__call__(x)
        return host_layer_norm(x, self)


class HostAttention(language.Attention):
    """Decoder attention whose prefill (several queries, float keys) runs on the host."""

    def attend(self, q: mx.array, k: Any, v: Any, mask: Any, cache: Any) -> mx.array:
        if self.training or q.shape[2] == 1 or not isinstance(k, mx.array):
            return super().attend(q, k, v, mask, cache)  # decode steps; quantized caches
        return host_attention(q, k, v, self.scale, mask)


class HostMLP(language.MLP):
    """Decoder MLP whose SwiGLU runs on the host during prefill."""

    def __call__(self, x: mx.array) -> mx.array:
        if self.training or x.shape[1] == 1:
            return super().__call__(x)
        return self.down_proj(host_swiglu(self.gate_proj(x), self.up_proj(x)))


class HostLanguageModel(language.LanguageModel):
    """The decoder with numpy decode steps on caches of its own (`HostKVCache`)."""

    def __call__(
        self,
        inputs: mx.array | None = None,
        cache: list | None = None,
        input_embeddings: mx.array | None = None,
        mask: Any = None,
    ) -> mx.array:
        x = inputs if inputs is not None else input_embeddings
        one_token = mask is None and x.shape[:2] == (1, 1)
        if one_token and cache and isinstance(cache[0], HostKVCache) and not self.training:
            token = None if inputs is None else inputs.item()
            return decode_step(self, token, input_embeddings, cache)
        return super().__call__(inputs, cache, input_embeddings, mask)

    def make_cache(self) -> list:
        """One host KV cache per layer."""
        return [HostKVCache() for _ in self.layers]


# Pure-MLX class -> its host subclass. The pure-MLX module is the fallback beside each one.
HOST = {
    vision.Attention: HostVisionAttention,
    vision.MLP: HostVisionMLP,
    language.Attention: HostAttention,
    language.MLP: HostMLP,
    language.LanguageModel: HostLanguageModel,
}
BASE = {host: base for base, host in HOST.items()}
BASE[HostLayerNorm] = nn.LayerNorm


def host_kernels_apply(model: nn.Module) -> bool:
    """Whether the host kernels fit `model` here: MLX's CPU device, float32 weights (quantized
    ones too), not turned off with MLX_SMOLVLM_HOST_KERNELS=0."""
    floats = [v for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    return (
        mx.default_device() == mx.cpu
        and os.environ.get("MLX_SMOLVLM_HOST_KERNELS") != "0"
        and all(v.dtype == mx.float32 for v in floats)
    )


def _as(module: nn.Module, cls: type) -> nn.Module:
    """`module` as an instance of `cls` (its base or host class), sharing its parameters."""
    swapped = cls.__new__(cls)
    dict.update(swapped, module)  # parameters and submodules
    swapped.__dict__.update(module.__dict__)  # plain attributes (config, scale, training...)
    return swapped


def _target(path: str, module: nn.Module, enabled: bool) -> type:
    """The class `module` (at `path`) should have."""
    base = BASE.get(type(module), type(module))
    if not enabled:
        return base
    if base is nn.LayerNorm:  # the vision tower's: the decoder has RMS norms
        return HostLayerNorm if path.startswith("vision_model.") else base
    if base is language.LanguageModel and not supported(module):
        return base  # quantized or adapted: MLX's decoder
    return HOST.get(base, base)


def prepare(model: nn.Module) -> nn.Module:
    """Swap in (or out) the host modules that fit `model` on this backend; return the model
    (the same object, unless the root itself is swapped, as for a bare `LanguageModel`)."""
    enabled = host_kernels_apply(model)
    swaps = [
        (path, _as(module, cls))
        for path, module in model.named_modules()
        if type(module) is not (cls := _target(path, module, enabled))
    ]
    root = model
    # Deepest first: a swapped parent shares its children with the original.
    for path, module in sorted(swaps, key=lambda item: -item[0].count(".")):
        if path:
            model.update_modules(tree_unflatten([(path, module)]))
        else:
            root = module
    return root


def report(model: nn.Module) -> str:
    """What the CPU backend chose for `model`, in two lines (for --verbose)."""
    kinds = {type(m) for _, m in model.named_modules()}
    if mx.default_device() != mx.cpu:
        return f"MLX device: {mx.default_device()} (no host kernels)"
    kernels = "on" if HostVisionAttention in kinds else "off (not float32, or turned off)"
    decoder = "on" if HostLanguageModel in kinds else "off (quantized, adapted or not float32)"
    return f"{blas.status()}\nHost kernels: {kernels}; host decoder: {decoder}"
