"""Faster kernels for MLX's CPU backend, where its elementwise operations are slow.

On x86 Linux MLX's CPU kernels evaluate exp/tanh one element at a time on one thread (about
15 ns per element on a 2-core machine, 8x slower than numpy): attention's softmax and the vision
tower's GELU then cost more than all the matrix products. These host kernels hand evaluated
operands to numpy (read through views, never written) and run the softmax, GELU, SwiGLU and
layer norm with numpy's vectorized functions on every core, in cache-sized blocks, into numpy
buffers of their own. They cut the vision tower's time about in half. They are not
differentiable: `backends.cpu.prepare` installs them for inference only.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model.vision import GELU_C

QUERY_BLOCK = 256  # query rows per attention task: a block's scores stay in the CPU cache
BLOCK = 1 << 18  # at most this many elements per elementwise task (1 MiB of float32)


@cache
def _threads() -> int:
    return os.cpu_count() or 1


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_threads(), thread_name_prefix="mlx-smolvlm")


@cache
def _blas_controller() -> Any:
    try:  # threadpoolctl: optional (a dependency on Linux, absent on macOS)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _one_blas_thread_each():
    """numpy's BLAS on one thread per caller while our workers are the parallelism."""
    controller = _blas_controller()
    return controller.limit(limits=1, user_api="blas") if controller else nullcontext()


def _task_size(count: int, unit: int = 1) -> int:
    """Items per task for `count` items of `unit` elements: about BLOCK elements at most (or one
    item), and tasks in whole rounds of the threads (3 equal tasks on 2 threads take as long
    as 4)."""
    tasks = _threads() * math.ceil(count * unit / (BLOCK * _threads()))
    return max(1, math.ceil(count / tasks))


def _run(task, count: int) -> None:
    """Run task(0..count-1) on the worker threads (numpy releases the GIL)."""
    with _one_blas_thread_each():
        for _ in _pool().map(task, range(count)):
            pass


def host_view(x: mx.array) -> np.ndarray:
    """An MLX array as a read-only numpy array sharing its memory (evaluated first: a lazy
    array has no data). MLX arrays are values: their memory is read, never written.

    The view does not keep `x`'s memory alive: callers hold `x` while they use it."""
    mx.eval(x)
    view = np.array(x, copy=False)
    view.flags.writeable = False
    return view


def _additive_mask(mask: Any, queries: int, keys: int) -> np.ndarray | None:
    """`mask` (None, "causal", boolean or additive array) as float32 (batch, 1|queries, keys)."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        offset = keys - queries  # earlier keys come from the cache
        visible = np.arange(keys)[None, :] <= np.arange(queries)[:, None] + offset
        return np.where(visible, 0.0, -np.inf).astype(np.float32)[None]
    mask = np.asarray(mask)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"attention mask must be (batch, 1, queries, keys), got {mask.shape}")
    if mask.dtype == np.bool_:
        return np.where(mask[:, 0], 0.0, -np.inf).astype(np.float32)
    return mask[:, 0].astype(np.float32)


def host_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Any = None
) -> mx.array:
    """Softmax attention computed with numpy across threads; same as MLX's fused SDPA.

    q is (batch, heads, queries, dims), k and v (batch, kv_heads, keys, dims) with heads a
    multiple of kv_heads (grouped queries); the result is (batch, heads, queries, v_dims).
    """
    qn, kn, vn = host_view(q), host_view(k), host_view(v)
    batch, heads, queries, _ = qn.shape
    kv_heads, keys = kn.shape[1], kn.shape[2]
    group = heads // kv_heads
    causal = isinstance(mask, str) and mask == "causal"
    bias = _additive_mask(mask, queries, keys)
    out = np.empty((batch, queries, heads, vn.shape[-1]), dtype=np.float32)
    blocks = math.ceil(queries / QUERY_BLOCK)
    # With heads enough to share among the threads a task takes a whole head and transposes
    # its keys once (BLAS multiplies by contiguous keys ~15% faster); else a task is one block.
    per_head = batch * kv_heads >= 2 * _threads()

    def attend(b: int, g: int, block: int, keys_t: np.ndarray) -> None:
        rows = slice(block * QUERY_BLOCK, min((block + 1) * QUERY_BLOCK, queries))
        # A causal block sees no key past its last query's position: those are not computed.
        visible = keys - queries + rows.stop if causal else keys
        head_range = slice(g * group, (g + 1) * group)
        scores = (qn[b, head_range, rows] * scale) @ keys_t[:, :visible]
        if bias is not None:
            bias_rows = rows if bias.shape[1] > 1 else slice(None)
            scores += bias[b if len(bias) > 1 else 0, bias_rows, :visible]
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        # Normalizing the (rows, dims) output costs less than normalizing (rows, keys) scores.
        block_out = scores @ vn[b, g, :visible]
        block_out /= scores.sum(axis=-1, keepdims=True)
        out[b, rows, head_range] = block_out.transpose(1, 0, 2)

    def task(i: int) -> None:
        if per_head:
            b, g = divmod(i, kv_heads)
            keys_t = np.ascontiguousarray(kn[b, g].T)
            for block in range(blocks):
                attend(b, g, block, keys_t)
        else:
            b, rest = divmod(i, kv_heads * blocks)
            g, block = divmod(rest, blocks)
            attend(b, g, block, kn[b, g].T)

    _run(task, batch * kv_heads * (1 if per_head else blocks))
    return mx.array(out).transpose(0, 2, 1, 3)


def _elementwise(kernel, x: mx.array, *others: mx.array) -> mx.array:
    """`kernel(out_block, x_block, *other_blocks)` over 1 MiB blocks across threads, into a
    numpy buffer of its own (the operands are only read)."""
    data = host_view(x)
    out = np.empty(data.shape, dtype=np.float32)
    flat, flat_out = np.ascontiguousarray(data).reshape(-1), out.reshape(-1)
    flat_others = [np.broadcast_to(host_view(o), data.shape).reshape(-1) for o in others]
    block = _task_size(flat.size)

    def task(i: int) -> None:
        part = slice(i * block, (i + 1) * block)
        kernel(flat_out[part], flat[part], *(o[part] for o in flat_others))

    _run(task, math.ceil(flat.size / block))
    return mx.array(out)


def _gelu_block(out: np.ndarray, x: np.ndarray) -> None:
    np.multiply(x, x, out=out)
    out *= 0.044715 * GELU_C
    out += GELU_C
    out *= x  # GELU_C * (x + 0.044715 x^3)
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    out *= x


def _swiglu_block(out: np.ndarray, gate: np.ndarray, up: np.ndarray) -> None:
    np.multiply(gate, np.float32(0.5), out=out)
    np.tanh(out, out=out)  # sigmoid(g) = (1 + tanh(g / 2)) / 2, no overflow
    out += 1.0
    out *= 0.5
    out *= gate
    out *= up


def host_swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up with numpy across threads."""
    return _elementwise(_swiglu_block, gate, up)


def host_gelu_tanh(x: mx.array) -> mx.array:
    """GELU (tanh approximation) with numpy across threads."""
    return _elementwise(_gelu_block, x)


def host_layer_norm(x: mx.array, norm: nn.LayerNorm) -> mx.array:
    """`norm(x)` over the last axis with numpy across threads, in row blocks that stay in cache."""
    data = host_view(x)
    rows = data.reshape(-1, data.shape[-1])
    weight, bias = host_view(norm.weight), host_view(norm.bias)
    out = np.empty(rows.shape, dtype=np.float32)
    block = _task_size(*rows.shape)

    def task(i: int) -> None:
        part = rows[i * block : (i + 1) * block]
        centred = out[i * block : (i + 1) * block]
        np.subtract(part, part.mean(axis=-1, keepdims=True), out=centred)
        variance = np.mean(centred * centred, axis=-1, keepdims=True)
        centred *= 1.0 / np.sqrt(variance + np.float32(norm.eps))
        centred *= weight
        centred += bias

    _run(task, math.ceil(len(rows) / block))
    return mx.array(out.reshape(data.shape))
