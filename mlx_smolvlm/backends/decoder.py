"""One decoder step for one token, computed with numpy: the decode loop on MLX's CPU backend.

Decoding reads every weight once per token, so its speed is the speed of matrix-vector
products. MLX's CPU backend does them through `cblas_sgemm` (packing the weights, ~10 GB/s here)
plus a fixed cost per operation; numpy's `gemv` streams the same float32 weights at the memory's
bandwidth (~16 GB/s) and its small operations cost microseconds. Reading the weights through
read-only views (no copies), a step takes ~38 ms instead of ~75 ms on a 2-core x86 machine for
SmolVLM-256M. On Metal none of this applies and the MLX decoder runs.

The keys and values live in `HostKVCache`, numpy memory of its own: the MLX prefill hands its
keys to the cache (copied in) and gets copies back, the numpy step appends in place. It has
mlx-lm's cache interface (offset, trim, quantization), so prompt-cache reuse works unchanged.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from ..model.language import LanguageModel
from . import threads
from .kernels import attention_into, blas_threads, elementwise, host_view, swiglu_into


class HostKVCache:
    """One layer's keys and values for one sequence in numpy buffers, grown `step` at a time."""

    step = 256

    def __init__(self) -> None:
        self.keys: np.ndarray | None = None  # (kv_heads, capacity, head_dim)
        self.values: np.ndarray | None = None
        self.offset = 0

    def append(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add (kv_heads, new, head_dim) keys and values; all of them so far, as views."""
        new = keys.shape[1]
        if self.keys is None or self.offset + new > self.keys.shape[1]:
            capacity = -(-(self.offset + new) // self.step) * self.step
            self.keys = self._grown(self.keys, keys, capacity)
            self.values = self._grown(self.values, values, capacity)
        self.keys[:, self.offset : self.offset + new] = keys
        self.values[:, self.offset : self.offset + new] = values
        self.offset += new
        return self.keys[:, : self.offset], self.values[:, : self.offset]

    def _grown(self, old: np.ndarray | None, like: np.ndarray, capacity: int) -> np.ndarray:
        buffer = np.zeros((like.shape[0], capacity, like.shape[2]), dtype=np.float32)
        if old is not None:
            buffer[:, : self.offset] = old[:, : self.offset]
        return buffer

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """mlx-lm's cache call from the MLX layers (prefill): copies in, copies out."""
        if keys.shape[0] != 1:
            raise ValueError("HostKVCache holds one sequence")
        k, v = self.append(np.array(keys[0], dtype=np.float32), np.array(values[0], np.float32))
        return mx.array(k)[None].astype(keys.dtype), mx.array(v)[None].astype(values.dtype)

    @property
    def state(self) -> tuple:
        """Nothing for MLX to evaluate: the buffers are numpy's."""
        return ()

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last `n` positions."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> Any:
        """mlx-lm's quantized cache holding the same positions (for `kv_bits`)."""
        plain = KVCache()
        if self.offset:
            keys, values = (mx.array(b[:, : self.offset])[None] for b in (self.keys, self.values))
            plain.update_and_fetch(keys, values)
        return plain.to_quantized(group_size=group_size, bits=bits)


def supported(model: LanguageModel) -> bool:
    """Whether the numpy step computes what the MLX decoder would for this model."""
    head = model.embed_tokens if model.config.tie_word_embeddings else model.lm_head
    linears = [head] + [
        linear
        for layer in model.layers
        for linear in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
            layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj,
        )
    ]  # fmt: skip
    plain = all(type(m) in (nn.Linear, nn.Embedding) for m in linears)
    rope = model.layers[0].self_attn.rope
    return (
        plain
        and all(m.weight.dtype == mx.float32 for m in linears)
        and type(rope) is nn.RoPE
        and not rope.traditional
        and rope.scale == 1.0
        and rope.dims == model.config.head_dim
    )


@cache
def _inverse_frequencies(dims: int, base: float) -> np.ndarray:
    # float32 throughout, as the reference computes its rotary tables.
    exponents = np.arange(0, dims, 2, dtype=np.int64).astype(np.float32) / np.float32(dims)
    return (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)


def _rotations(
    start: int, count: int, dims: int, base: float, heads: int, kv_heads: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """The cos and signed sin tables (count, heads + kv_heads, dims) that rotate the queries
    and keys of `count` positions from `start` (rotate-half layout, no scaling), the queries'
    rows times the attention's scale: the rotation is then two products and an add."""
    positions = np.arange(start, start + count).astype(np.float32)[:, None, None]
    angles = positions * _inverse_frequencies(dims, base)
    cos, sin = np.cos(angles), np.sin(angles)
    rows = np.ones((heads + kv_heads, 1), np.float32)
    rows[:heads] = np.float32(scale)
    return rows * np.concatenate([cos, cos], -1), rows * np.concatenate([-sin, sin], -1)


@lru_cache(maxsize=4)
def _rotation(
    position: int, dims: int, base: float, heads: int, kv_heads: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """One position's `_rotations` tables (heads + kv_heads, dims), made once a decode step:
    every layer asks the same."""
    cos, sin = _rotations(position, 1, dims, base, heads, kv_heads, scale)
    return cos[0], sin[0]


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate (..., dims) by tables of `_rotations`: x cos + rotate_half(x) sin, where
    rotate_half swaps the two halves (the sign is in the sin table)."""
    half = x.shape[-1] // 2
    swapped = x.reshape(*x.shape[:-1], 2, half)[..., ::-1, :].reshape(x.shape)  # one copy
    rotated = x * cos
    rotated += swapped * sin
    return rotated


# numpy's OpenBLAS (0.3.31) runs a matrix-vector product on one thread below this many
# matrix elements: SmolVLM-256M's 576x576 output projection streamed at half the speed of the
# other products (~95 us of a layer's ~700). Padded with zero rows up to it, it runs on every
# thread: ~0.8 ms a step faster for 516 KB of zeros a layer. Matrices under two thirds of it
# are left as they are (more zeros than the second thread gains; tiny test models).
THREADED_GEMV = 460_800


FEW_ROWS = 64  # up to this many rows, `_linear_rows` multiplies the other way round


class Projection(NamedTuple):
    """A step's matrix-vector product: the matrix (the weights of one or more linear layers
    stacked, with zero rows below them where that makes BLAS use every thread), the biases
    (None when absent), and how many of the matrix's rows are the layers'."""

    matrix: np.ndarray
    bias: np.ndarray | None
    rows: int


class LayerWeights(NamedTuple):
    """One decoder layer's weights as read-only numpy views: the q/k/v projections stacked in
    one matrix, the gate and up projections in another."""

    input_norm: np.ndarray
    qkv: Projection
    o: Projection
    post_norm: np.ndarray
    gate_up: Projection
    down: Projection


class Weights(NamedTuple):
    """The decoder's weights as numpy views, made once per generation call (`views`): looking
    them up through the modules cost ~2 ms of a ~40 ms step."""

    layers: list[LayerWeights]
    norm: np.ndarray
    head: np.ndarray
    embed: np.ndarray


def _stacked(owner: nn.Module, names: tuple[str, ...]) -> Projection:
    """The weights of `owner`'s linear layers `names` as one matrix (and their biases as one
    vector), so that a step makes one matrix-vector product where it made several: each costs
    a wake-up of every BLAS thread, and a larger one streams closer to the memory's speed (a
    step ~7 % faster). The matrix is one MLX buffer whose row slices become the layers'
    weights (MLX slices share their array's memory): the same values, no second copy, and
    zero rows below them up to THREADED_GEMV elements. It is made again when the weights are
    no longer its slices (loaded or updated since)."""
    linears = [getattr(owner, name) for name in names]
    weights = [linear.weight for linear in linears]
    rows, columns = sum(w.shape[0] for w in weights), weights[0].shape[1]
    padding = max(0, -(-THREADED_GEMV // columns) - rows)
    if 3 * rows * columns < 2 * THREADED_GEMV:
        padding = 0
    bias = None  # the layers of a group have biases all or none
    if "bias" in linears[0]:
        bias = np.concatenate([host_view(linear.bias) for linear in linears])
    if len(weights) == 1 and not padding:
        return Projection(host_view(weights[0]), bias, rows)  # as it is
    key = "stacked_" + "_".join(names)
    stacked = owner.__dict__.get(key)
    if stacked is None or not _slices_of(stacked, weights, padding):
        zeros = [mx.zeros((padding, columns), weights[0].dtype)] if padding else []
        stacked = mx.concatenate(weights + zeros)
        start = 0
        for linear in linears:
            end = start + linear.weight.shape[0]
            linear.weight = stacked[start:end]
            start = end
        mx.eval(stacked, [linear.weight for linear in linears])
        owner.__dict__[key] = stacked  # an attribute, not a parameter: held for the views
    return Projection(host_view(stacked), bias, rows)


def _slices_of(stacked: mx.array, weights: list[mx.array], padding: int) -> bool:
    """Whether `weights` are consecutive row slices of `stacked`'s memory, `padding` rows
    after them."""
    if sum(w.shape[0] for w in weights) + padding != stacked.shape[0]:
        return False
    address = host_view(stacked).ctypes.data
    for weight in weights:
        view = host_view(weight)
        if view.ctypes.data != address or not view.flags.c_contiguous:
            return False
        address += view.nbytes
    return True


def views(model: LanguageModel) -> Weights:
    """`model`'s weights as read-only numpy views, for `decode_step`."""
    layers = [
        LayerWeights(
            host_view(layer.input_layernorm.weight),
            _stacked(layer.self_attn, ("q_proj", "k_proj", "v_proj")),
            _stacked(layer.self_attn, ("o_proj",)),
            host_view(layer.post_attention_layernorm.weight),
            _stacked(layer.mlp, ("gate_proj", "up_proj")),
            _stacked(layer.mlp, ("down_proj",)),
        )
        for layer in model.layers
    ]
    head = model.embed_tokens if model.config.tie_word_embeddings else model.lm_head
    return Weights(
        layers,
        host_view(model.norm.weight),
        host_view(head.weight),
        host_view(model.embed_tokens.weight),
    )


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    mean_square = np.dot(x, x) / np.float32(x.size)  # a BLAS dot: a third of np.mean's time
    return x * (np.float32(1.0) / np.sqrt(mean_square + np.float32(eps))) * weight


def _rms_norm_rows(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    mean_square = np.einsum("ij,ij->i", x, x)[:, None] / np.float32(x.shape[-1])
    return x * (np.float32(1.0) / np.sqrt(mean_square + np.float32(eps))) * weight


def _linear_rows(x: np.ndarray, projection: Projection) -> np.ndarray:
    """(rows, in) times the projection's transposed matrix: one matrix product. For a few
    rows it is computed as the matrix times the transposed rows (~30 % faster in numpy's
    OpenBLAS for 20 rows, level from ~256), then laid out by rows again."""
    if x.shape[0] <= FEW_ROWS:
        out = np.ascontiguousarray((projection.matrix @ x.T).T)
    else:
        out = x @ projection.matrix.T
    if projection.rows < out.shape[1]:
        out = out[:, : projection.rows]
    return out if projection.bias is None else out + projection.bias


def _linear(x: np.ndarray, projection: Projection) -> np.ndarray:
    out = projection.matrix @ x
    if projection.rows < out.shape[0]:
        out = out[: projection.rows]  # the zero rows' products
    return out if projection.bias is None else out + projection.bias


def _attention(attn: Any, w: LayerWeights, x: np.ndarray, cache: HostKVCache) -> np.ndarray:
    head_dim = attn.rope.dims
    heads, kv_heads = attn.n_heads, attn.n_kv_heads
    qkv = _linear(x, w.qkv).reshape(heads + 2 * kv_heads, head_dim)
    tables = _rotation(cache.offset, head_dim, attn.rope.base, heads, kv_heads, attn.scale)
    rotated = _rope(qkv[: heads + kv_heads], *tables)  # queries (scaled) and keys
    keys, values = cache.append(rotated[heads:, None], qkv[heads + kv_heads :, None])
    group = heads // kv_heads
    # Keys times contiguous queries, (kv_heads, length, dims) @ (kv_heads, dims, group): the
    # cached keys stream through BLAS as a plain product (queries times transposed keys runs
    # ~5x slower for so few queries). The scores are then laid out with length last, so that
    # the softmax reductions run along contiguous memory.
    grouped = rotated[:heads].reshape(kv_heads, group, head_dim)
    scores = np.matmul(keys, grouped.transpose(0, 2, 1).copy()).transpose(0, 2, 1).copy()
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    out = np.matmul(scores, values)  # (kv_heads, group, head_dim)
    out /= scores.sum(axis=-1, keepdims=True)
    return _linear(out.reshape(-1), w.o)


def _mlp(w: LayerWeights, x: np.ndarray) -> np.ndarray:
    gate_up = _linear(x, w.gate_up)
    half = gate_up.shape[0] // 2  # slices: np.split costs more than the SiLU
    activated = np.empty(half, np.float32)
    swiglu_into(activated, gate_up[:half], gate_up[half:])
    return _linear(activated, w.down)


def decode_step(
    model: LanguageModel,
    token: int | None,
    embedding: Any,
    cache: list[HostKVCache],
    weights: Weights | None = None,
) -> np.ndarray:
    """The (vocab,) logits of one new token (or input embedding), appending to `cache`;
    `weights` are `views(model)`, made here when not given.

    numpy's BLAS runs on the threads `threads.decide` left to host work: a step makes ~120
    small products, each waiting for all BLAS threads, so a descheduled one stalls it."""
    weights = weights or views(model)
    if embedding is None:
        x = weights.embed[token].copy()
    else:
        x = np.array(embedding, dtype=np.float32).reshape(-1)
    attn = model.layers[0].self_attn if model.layers else None
    eps = model.config.rms_norm_eps
    with blas_threads(threads.current()):
        for w, layer_cache in zip(weights.layers, cache):
            x = x + _attention(attn, w, _rms_norm(x, w.input_norm, eps), layer_cache)
            x = x + _mlp(w, _rms_norm(x, w.post_norm, eps))
        return weights.head @ _rms_norm(x, weights.norm, eps)


def prefill(
    model: LanguageModel, x: np.ndarray, cache: list[HostKVCache], weights: Weights
) -> np.ndarray:
    """The final-normed hidden states (positions, hidden) of the input embeddings `x` of new
    positions, their keys and values appended to `cache`: the prefill in numpy.

    The same layers as the decode step, on several rows: the projections are numpy matrix
    products, the attention is the host kernel's (causal over the cached and new positions),
    and the keys and values go to the numpy cache without a round trip through MLX. A short
    prompt (a chat's next turn) no longer pays MLX's fixed cost per operation: a 20-token
    prompt's first token ~0.12 -> ~0.085 s on 2 cores; an 876-token one is level with MLX's
    products and the host kernels between them."""
    attn = model.layers[0].self_attn
    heads, kv_heads, dims = attn.n_heads, attn.n_kv_heads, attn.rope.dims
    eps = model.config.rms_norm_eps
    count = x.shape[0]
    cos, sin = _rotations(cache[0].offset, count, dims, attn.rope.base, heads, kv_heads, attn.scale)
    with blas_threads(threads.current()):
        for w, layer_cache in zip(weights.layers, cache):
            qkv = _linear_rows(_rms_norm_rows(x, w.input_norm, eps), w.qkv)
            qkv = qkv.reshape(count, heads + 2 * kv_heads, dims)
            rotated = _rope(qkv[:, : heads + kv_heads], cos, sin)  # queries (scaled) and keys
            keys, values = layer_cache.append(
                rotated[:, heads:].transpose(1, 0, 2), qkv[:, heads + kv_heads :].transpose(1, 0, 2)
            )
            out = np.empty((1, count, heads, dims), np.float32)
            queries = rotated[None, :, :heads].transpose(0, 2, 1, 3)
            attention_into(out, queries, keys[None], values[None], 1.0, "causal")
            x = x + _linear_rows(out.reshape(count, -1), w.o)
            gate_up = _linear_rows(_rms_norm_rows(x, w.post_norm, eps), w.gate_up)
            half = gate_up.shape[1] // 2
            activated = elementwise(swiglu_into, gate_up[:, :half], gate_up[:, half:])
            x = x + _linear_rows(activated, w.down)
        return _rms_norm_rows(x, weights.norm, eps)
