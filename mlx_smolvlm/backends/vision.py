"""The SigLIP encoder layers computed with numpy: the vision tower on MLX's CPU backend.

The vision tower is nine tenths of the time to first token. On MLX's CPU backend each of its
layers spent a third of its time between matrix products: bias adds that MLX makes a pass of
their own, copies to and from the host kernels (softmax, GELU, layer norm) and back. Here the
patch embedding runs in MLX and hands its result to numpy once; every layer then runs on numpy
buffers of its own: the products through numpy's BLAS (its OpenBLAS multiplied the 13-tile
image's 13312x768x3072 product 10-20% faster than MLX's on a 2-core x86 machine:
benchmarks/bench_blas.py), and the biases, residual adds, layer norms and GELU in row blocks
across threads, each group folded into one pass; the result goes back to MLX once.
MLX's weights are read through read-only views, never copied or written. A 256M vision layer
on 13 tiles took ~1.15 s instead of ~1.5 s (transformers: ~1.15 s).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..model import vision
from .kernels import attention_into, gelu_tanh_into, host_view, layer_norm_into, run_tasks


class HostVisionModel(vision.VisionModel):
    """The vision tower whose encoder layers run in numpy (`encode`)."""

    def __call__(
        self, pixels: mx.array, position_ids: mx.array, mask: mx.array | None = None
    ) -> mx.array:
        if self.training:
            return super().__call__(pixels, position_ids, mask)
        h = self.embeddings(pixels.astype(self.dtype), position_ids)
        keys = None if mask is None else host_view(mask)
        return mx.array(encode(self, host_view(h), keys))


def supported(model: vision.VisionModel) -> bool:
    """Whether `encode` computes what the MLX tower would: plain float32 layers (not
    quantized, not adapted)."""
    modules = [model.post_layernorm] + [
        module
        for layer in model.encoder.layers
        for module in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
            layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2,
            layer.layer_norm1, layer.layer_norm2,
        )
    ]  # fmt: skip
    return all(
        type(m) in (nn.Linear, nn.LayerNorm) and "bias" in m and m.weight.dtype == mx.float32
        for m in modules
    )


ROWS = 512  # patch rows per task: large enough for BLAS, small enough to share out
GELU_ROWS = 64  # rows of the MLP's hidden layer (3072 wide for 256M) per pass of its GELU


def _views(module: nn.Module) -> dict[str, np.ndarray]:
    """`module`'s parameters by name as read-only numpy views (made here, on the calling
    thread, not in the tasks: MLX is not asked to evaluate from several threads at once)."""
    return {name: host_view(value) for name, value in tree_flatten(module.parameters())}


def encode(model: vision.VisionModel, x: np.ndarray, key_mask: np.ndarray | None) -> np.ndarray:
    """The encoder layers and final layer norm on embedded patches x (images, patches, dims);
    `key_mask` (images, 1, 1, patches) is False on padded patches.

    A layer is three rounds of tasks across threads: blocks of rows through the layer norm and
    the q, k, v products; the attention of each image's heads; blocks of rows through the
    output projection, the MLP and their residual adds. Every task runs BLAS on one thread: a
    BLAS thread pool's workers spin for a while after each product, and on two cores that
    took a core from the tasks that followed (up to a fifth of the tower's time)."""
    images, length, dims = x.shape
    rows = images * length
    layers = model.encoder.layers
    heads = layers[0].self_attn.num_heads if layers else 1
    stream = x.reshape(rows, dims).copy()  # the residual stream, updated in place
    normed, q, k, v, attended = (np.empty((rows, dims), np.float32) for _ in range(5))
    blocks = -(-rows // ROWS)

    def split(t: np.ndarray) -> np.ndarray:
        """(rows, dims) as (images, heads, patches, head_dims), a view."""
        return t.reshape(images, length, heads, -1).transpose(0, 2, 1, 3)

    def norm_into(w: dict, name: str, eps: float, part: slice) -> None:
        """normed = stream through the layer norm whose views are w[name + "weight"/"bias"]."""
        layer_norm_into(normed[part], stream[part], w[name + "weight"], w[name + "bias"], eps)

    def attention_inputs(layer: vision.EncoderLayer, w: dict, part: slice) -> None:
        """normed = layer_norm1(stream); q, k, v without their biases (attention adds them)."""
        norm_into(w, "layer_norm1.", layer.layer_norm1.eps, part)
        for out, name in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
            np.matmul(normed[part], w[f"self_attn.{name}.weight"].T, out=out[part])

    def rest_of_layer(layer: vision.EncoderLayer, w: dict, part: slice) -> None:
        """stream += out_proj(attended); stream += mlp(layer_norm2(stream))."""
        stream[part] += np.matmul(attended[part], w["self_attn.out_proj.weight"].T)
        stream[part] += w["self_attn.out_proj.bias"]
        norm_into(w, "layer_norm2.", layer.layer_norm2.eps, part)
        hidden = np.matmul(normed[part], w["mlp.fc1.weight"].T)
        activated = np.empty_like(hidden)
        # The bias and GELU's eight passes, GELU_ROWS rows at a time: each chunk stays in the
        # CPU's cache through them (~30 % faster than whole 512-row blocks).
        for chunk in range(0, hidden.shape[0], GELU_ROWS):
            rows = slice(chunk, chunk + GELU_ROWS)
            hidden[rows] += w["mlp.fc1.bias"]
            gelu_tanh_into(activated[rows], hidden[rows])
        stream[part] += np.matmul(activated, w["mlp.fc2.weight"].T)
        stream[part] += w["mlp.fc2.bias"]

    def by_rows(work, *args) -> None:
        """work(*args, part) for every block of rows, across threads."""
        run_tasks(lambda i: work(*args, slice(i * ROWS, min((i + 1) * ROWS, rows))), blocks)

    for layer in layers:
        w = _views(layer)
        by_rows(attention_inputs, layer, w)
        biases = tuple(
            w[f"self_attn.{n}.bias"].reshape(heads, -1) for n in ("q_proj", "k_proj", "v_proj")
        )
        attention_into(
            attended.reshape(images, length, heads, -1),
            split(q), split(k), split(v), layer.self_attn.scale, key_mask, biases,
        )  # fmt: skip
        by_rows(rest_of_layer, layer, w)
    final = model.post_layernorm
    by_rows(norm_into, _views(final), "", final.eps)
    return normed.reshape(images, length, dims)
