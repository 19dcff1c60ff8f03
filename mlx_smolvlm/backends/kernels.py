"""Faster kernels for MLX's CPU backend, where its elementwise operations are slow.

On x86 Linux MLX's CPU kernels evaluate exp/tanh one element at a time on one thread (about
15 ns per element on a 2-core machine, 8x slower than numpy): attention's softmax and the vision
tower's GELU then cost more than all the matrix products. Two remedies live here:

- compiled rational functions (`gelu_tanh`), which stay inside MLX's graph and so can be
  differentiated; used while training;
- host kernels (`host_attention`, `host_gelu_tanh`) for inference: the operands are evaluated and
  handed to numpy without a copy, and the softmax/GELU run with numpy's vectorized exp/tanh on
  every core, in cache-sized blocks. They cut the vision tower's time about in half. They are not
  differentiable, so models use them only inside a `host_kernels()` block (the generation
  functions open one) and in eval mode; a model called directly, or under `mx.grad`, runs MLX's.

On Metal none of this applies: MLX's own kernels are used. MLX_SMOLVLM_HOST_KERNELS=0 turns the
host kernels off.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# tanh(x) ~= x * P(u) / Q(u) with u = (x / CLAMP)^2, for |x| <= CLAMP (tanh(9) rounds to 1.0).
# Coefficients fitted here (weighted least squares on [0, 9]); float32 error within 4e-7.
CLAMP = 9.0
P = [0.9999999987, 11.08151972, 25.38810288, 14.89739789, 1.319134474, -0.04270404489]
Q = [1.0, 38.08151872, 178.7892405, 209.4293355, 55.49097888]
GELU_C = math.sqrt(2 / math.pi)

QUERY_BLOCK = 256  # query rows per attention task: a block's scores stay in the CPU cache
BLOCK = 1 << 18  # at most this many elements per elementwise task (1 MiB of float32)


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
def _gelu_tanh(x: mx.array) -> mx.array:
    inner = GELU_C * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1 + tanh(inner))


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (SigLIP's `gelu_pytorch_tanh`), differentiable."""
    if mx.default_device() == mx.cpu:
        return _gelu_tanh(x)
    return nn.gelu_approx(x)


_inference = threading.local()


@contextmanager
def host_kernels(enabled: bool = True) -> Iterator[None]:
    """Inside this block (in this thread) eval-mode models may use the host kernels."""
    previous = getattr(_inference, "enabled", False)
    _inference.enabled = enabled
    try:
        yield
    finally:
        _inference.enabled = previous


def use_host_kernels(module: nn.Module, x: mx.array) -> bool:
    """Whether `module` may hand `x`'s work to the host kernels: inside `host_kernels()`, CPU,
    float32, eval mode."""
    return (
        getattr(_inference, "enabled", False)
        and not module.training
        and x.dtype == mx.float32
        and mx.default_device() == mx.cpu
        and os.environ.get("MLX_SMOLVLM_HOST_KERNELS") != "0"
    )


@cache
def _threads() -> int:
    return os.cpu_count() or 1


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_threads(), thread_name_prefix="mlx-smolvlm")


@cache
def _blas_controller() -> Any:
    try:
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


def _host_view(x: mx.array) -> np.ndarray:
    """An evaluated MLX array as a numpy array sharing its memory."""
    mx.eval(x)
    return np.array(x, copy=False)


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
    qn, kn, vn = _host_view(q), _host_view(k), _host_view(v)
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


def _in_place(x: mx.array, *others: mx.array, kernel) -> mx.array:
    """Apply `kernel(block, *other_blocks)` to 1 MiB blocks of `x` across threads, in place.

    `x` must not be used elsewhere (a Linear's output here): its buffer is overwritten, which
    saves copying the largest activations in and out of MLX. A view that is not contiguous
    is copied first.
    """
    data = _host_view(x)
    if not data.flags.c_contiguous or not data.flags.writeable:
        data, x = np.ascontiguousarray(data).copy(), None
    flat = data.reshape(-1)
    flat_others = [np.broadcast_to(_host_view(o), data.shape).reshape(-1) for o in others]

    block = _task_size(flat.size)

    def task(i: int) -> None:
        part = slice(i * block, (i + 1) * block)
        kernel(flat[part], *(o[part] for o in flat_others))

    _run(task, math.ceil(flat.size / block))
    return x if x is not None else mx.array(data)


def _gelu_block(block: np.ndarray) -> None:
    inner = block * block
    inner *= 0.044715 * GELU_C
    inner += GELU_C
    inner *= block  # GELU_C * (x + 0.044715 x^3)
    np.tanh(inner, out=inner)
    inner += 1.0
    inner *= 0.5
    block *= inner


def _swiglu_block(gate: np.ndarray, up: np.ndarray) -> None:
    sigmoid = np.tanh(gate * np.float32(0.5))  # sigmoid(g) = (1 + tanh(g / 2)) / 2, no overflow
    sigmoid += 1.0
    sigmoid *= 0.5
    gate *= sigmoid
    gate *= up


def host_swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up with numpy across threads, in place on `gate` (a fresh intermediate)."""
    return _in_place(gate, up, kernel=_swiglu_block)


def host_gelu_tanh(x: mx.array) -> mx.array:
    """GELU (tanh approximation) with numpy across threads, in place on a fresh intermediate."""
    return _in_place(x, kernel=_gelu_block)


def host_layer_norm(x: mx.array, norm: nn.LayerNorm) -> mx.array:
    """`norm(x)` over the last axis with numpy across threads, in row blocks that stay in cache."""
    data = _host_view(x)
    rows = data.reshape(-1, data.shape[-1])
    weight, bias = _host_view(norm.weight), _host_view(norm.bias)
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
