"""The seam between the pure-MLX model and the CPU backend's host kernels, host vision tower
and host decoder.

`prepare(model)` is called by the generation entry points (`stream_generate`,
`batch_stream_generate`) once per call, before any work. On MLX's CPU backend it decides how
many threads host work and MLX's BLAS use (`threads.decide`: the available cores, fewer when
other programs keep them busy), and for a float32 model it swaps the vision tower, the decoder's
attention and MLP, and the decoder itself for subclasses that run their non-differentiable
parts with numpy (the way LoRA swaps linear layers; the numpy vision tower and decoder only
where every layer is a plain float32 one: not quantized, not adapted); elsewhere (Metal, bf16/fp16 weights,
MLX_SMOLVLM_HOST_KERNELS=0) it swaps any such subclass back, and the pure-MLX modules of
`mlx_smolvlm.model` run. The swapped modules
share the originals' parameters (same names, same arrays), so weights, adapters and saved
checkpoints are unaffected. Training builds its own model and never calls `prepare`; a
prepared module that is put in training mode runs the MLX code of its base class.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..model import language, vision
from . import blas, threads
from .decoder import HostKVCache, Weights, decode_step, prefill, supported, views
from .kernels import blas_threads, host_attention, host_swiglu, host_view
from .vision import HostVisionModel
from .vision import supported as vision_supported


def on_host(cache: list | None) -> bool:
    """Whether `cache` is the host decoder's: a `HostKVCache` for every layer."""
    return bool(cache) and all(isinstance(c, HostKVCache) for c in cache)


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
        if one_token and on_host(cache) and not self.training:
            token = None if inputs is None else inputs.item()
            logits = decode_step(self, token, input_embeddings, cache, self.weights())
            return mx.array(logits[None, None])
        return super().__call__(inputs, cache, input_embeddings, mask)

    def hidden_states(
        self,
        inputs: mx.array | None = None,
        cache: list | None = None,
        input_embeddings: mx.array | None = None,
        mask: Any = None,
    ) -> mx.array:
        """The prefill on its host caches (causal, one sequence) in numpy (`decoder.prefill`);
        anything else in MLX (training, masks, other caches)."""
        x = input_embeddings if input_embeddings is not None else inputs
        if not on_host(cache) or self.training or mask is not None or x.shape[0] != 1:
            return super().hidden_states(inputs, cache, input_embeddings, mask)
        weights = self.weights()
        if input_embeddings is not None:  # the embeddings win, as in the MLX decoder
            rows = host_view(input_embeddings.astype(mx.float32))[0]
        else:
            rows = weights.embed[np.array(inputs[0], dtype=np.int64)]
        return mx.array(prefill(self, rows, cache, weights)[None])

    def logits(self, hidden: mx.array) -> mx.array:
        """One position's logits (the prompt's last) as a numpy matrix-vector product of the
        head: MLX's CPU matrix product reads the 113 MB head of SmolVLM-256M at half the speed
        (~11 ms of a short prompt's ~100 ms to the first token)."""
        if self.training or hidden.size != hidden.shape[-1]:
            return super().logits(hidden)
        with blas_threads(threads.current()):
            row = self.weights().head @ host_view(hidden.astype(mx.float32)).reshape(-1)
        return mx.array(row.reshape(hidden.shape[:-1] + row.shape))

    def greedy_tokens(self, token: int, cache: list[HostKVCache], count: int) -> Iterator[int]:
        """The `count` greedy tokens that follow `token`, each the argmax of a numpy step's
        logits: what mlx-lm's `generate_step` yields with a greedy sampler and no logits
        processors, without its MLX log-softmax of the logits (on MLX's CPU backend ~1 ms of
        a ~22 ms step for SmolVLM-256M, whose exponentials MLX computes one at a time)."""
        weights = self.weights()
        for _ in range(count):
            token = int(np.argmax(decode_step(self, token, None, cache, weights)))
            yield token

    def make_cache(self) -> list:
        """One host KV cache per layer (and the weights' views for the steps, made anew)."""
        self.refresh()
        return [HostKVCache() for _ in self.layers]

    def weights(self) -> Weights:
        """The views the numpy steps read: those of the last `make_cache`, or made now."""
        return self.__dict__.get("host_weights") or self.refresh()

    def refresh(self) -> Weights:
        """Make the numpy views of the weights the decode steps read (`decoder.views`); called
        by `make_cache` at each generation call, so weights loaded or updated since are the
        ones read (a reused prompt cache was made, and its views with it, for these weights)."""
        self.__dict__["host_weights"] = views(self)
        return self.__dict__["host_weights"]


# Pure-MLX class -> its host subclass. The pure-MLX module is the fallback beside each one.
HOST = {
    vision.VisionModel: HostVisionModel,
    language.Attention: HostAttention,
    language.MLP: HostMLP,
    language.LanguageModel: HostLanguageModel,
}
BASE = {host: base for base, host in HOST.items()}


def host_kernels_apply(modules: list[nn.Module]) -> bool:
    """Whether the host kernels fit a model of these modules here: MLX's CPU device, float32
    weights (quantized ones too), not turned off with MLX_SMOLVLM_HOST_KERNELS=0."""
    return (
        mx.default_device() == mx.cpu
        and blas.host_kernels_wanted()
        and all(
            v.dtype == mx.float32
            for module in modules
            for v in module.values()  # each module's own arrays: the walk visits every module
            if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)
        )
    )


def _as(module: nn.Module, cls: type) -> nn.Module:
    """`module` as an instance of `cls` (its base or host class), sharing its parameters."""
    swapped = cls.__new__(cls)
    dict.update(swapped, module)  # parameters and submodules
    # Plain attributes (config, scale, training...), not the views a host decoder made.
    swapped.__dict__.update({k: v for k, v in module.__dict__.items() if k != "host_weights"})
    return swapped


def _target(path: str, module: nn.Module, enabled: bool) -> type:
    """The class `module` (at `path`) should have."""
    base = BASE.get(type(module), type(module))
    if not enabled:
        return base
    if base is language.LanguageModel and not supported(module):
        return base  # quantized or adapted: MLX's decoder
    if base is vision.VisionModel and not vision_supported(module):
        return base  # quantized or adapted: MLX's tower
    return HOST.get(base, base)


def prepare(model: nn.Module) -> nn.Module:
    """Swap in (or out) the host modules that fit `model` on this backend; return the model
    (the same object, unless the root itself is swapped, as for a bare `LanguageModel`)."""
    modules = model.named_modules()  # one walk: MLX's is ~4 ms for this model
    enabled = host_kernels_apply([module for _, module in modules])
    if mx.default_device() == mx.cpu:
        # On a busy machine fewer threads (one) make every synchronised product faster.
        blas.set_threads(threads.decide())
    swaps = [
        (path, _as(module, cls))
        for path, module in modules
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


def warm(model: nn.Module) -> None:
    """Stack the decoder's projections now (`decoder.views`: ~0.2 s for SmolVLM-256M) where the
    host decoder will read them, so that the first answer does not wait for it. No module is
    swapped: that is `prepare`'s, at generation (a loaded model may still be adapted or
    trained)."""
    language = model.language_model
    if host_kernels_apply([m for _, m in language.named_modules()]) and supported(language):
        views(language)


def greedy_tokens(
    language_model: nn.Module, token: int, cache: list, count: int
) -> Iterator[int] | None:
    """The host decoder's greedy tokens after `token` (`HostLanguageModel.greedy_tokens`), or
    None where it does not decode (another backend, a quantized or bounded cache)."""
    if isinstance(language_model, HostLanguageModel) and on_host(cache):
        return language_model.greedy_tokens(token, cache, count)
    return None


def report(model: nn.Module) -> str:
    """What the CPU backend chose for `model`, in three lines (for --verbose)."""
    kinds = {type(m) for _, m in model.named_modules()}
    if mx.default_device() != mx.cpu:
        return f"MLX device: {mx.default_device()} (no host kernels)"
    kernels = "on" if HostAttention in kinds else "off (not float32, or turned off)"
    tower = "on" if HostVisionModel in kinds else "off (quantized, adapted or not float32)"
    decoder = "on" if HostLanguageModel in kinds else "off (quantized, adapted or not float32)"
    return (
        f"{blas.status()}\nHost kernels: {kernels}; host vision tower: {tower}; "
        f"host decoder: {decoder}\n{threads.status()}"
    )
