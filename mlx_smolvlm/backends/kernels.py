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
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import cache
from typing import Any

import mlx.core as mx
import numpy as np

from ..model.vision import GELU_C
from . import threads

QUERY_BLOCK = 256  # query rows per attention task: a block's scores stay in the CPU cache
BLOCK = 1 << 18  # at most this many elements per elementwise task (1 MiB of float32)
SAFE_SCORE = 64.0  # float32 exp is finite below ~88 and above zero beyond -87


def _threads() -> int:
    """Threads the kernels split their tasks among (`threads.for_tasks`)."""
    return threads.for_tasks()


@cache
def _pool() -> ThreadPoolExecutor:
    """Helpers for every available core (they wait on a queue, never spinning); a kernel uses
    `_threads() - 1` of them beside the calling thread."""
    return ThreadPoolExecutor(threads.available_cores(), thread_name_prefix="mlx-smolvlm")


@cache
def _blas_controller() -> Any:
    try:  # threadpoolctl: optional (a dependency on Linux, absent on macOS)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def blas_threads(count: int):
    """A context in which numpy's (and MLX's) BLAS runs on at most `count` threads."""
    controller = _blas_controller()
    return controller.limit(limits=count, user_api="blas") if controller else nullcontext()


def _task_size(count: int, unit: int = 1) -> int:
    """Items per task for `count` items of `unit` elements: about BLOCK elements at most (or one
    item), and tasks in whole rounds of the threads (3 equal tasks on 2 threads take as long
    as 4)."""
    tasks = _threads() * math.ceil(count * unit / (BLOCK * _threads()))
    return max(1, math.ceil(count / tasks))


def run_tasks(task, count: int) -> None:
    """Run task(0..count-1) on `_threads()` threads, this one included (numpy releases the
    GIL). BLAS runs on one thread per caller meanwhile, so the threads here are the only
    parallelism (no BLAS threads nested in pool threads)."""
    indices = iter(range(count))  # shared: each thread takes the next index until none is left

    def drain() -> None:
        for i in indices:
            task(i)

    with blas_threads(1):
        helpers = [_pool().submit(drain) for _ in range(min(_threads(), count) - 1)]
        drain()
        for helper in helpers:
            helper.result()


def host_view(x: mx.array) -> np.ndarray:
    """An MLX array as a read-only numpy array sharing its memory (evaluated first: a lazy
    array has no data). MLX arrays are values: their memory is read, never written.

    The view does not keep `x`'s memory alive: callers hold `x` while they use it."""
    mx.eval(x)
    view = np.array(x, copy=False)
    view.flags.writeable = False
    return view


def _additive_mask(mask: Any) -> np.ndarray | None:
    """`mask` (None, or a boolean or additive array; "causal" is `attention_into`'s) as float32
    (batch, 1|queries, keys). An array broadcasts as MLX's attention broadcasts it: (queries,
    keys) from a bounded (rotating) KV cache's window, (batch, 1, queries, keys) from padded
    batches."""
    if mask is None:
        return None
    if isinstance(mask, str):
        raise ValueError(f"unknown attention mask {mask!r}")
    mask = np.asarray(mask)
    if mask.ndim < 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
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
    out = np.empty((qn.shape[0], qn.shape[2], qn.shape[1], vn.shape[-1]), dtype=np.float32)
    attention_into(out, qn, kn, vn, scale, mask)
    return mx.array(out).transpose(0, 2, 1, 3)


def attention_into(
    out: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float,
    mask: Any = None,
    biases: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> None:
    """Softmax attention of numpy (batch, heads, queries, dims) q over (batch, kv_heads, keys,
    dims) k and v (views of any strides), written into `out` (batch, queries, heads, v_dims),
    across threads. `biases`, (heads, dims) arrays for q, k and v, are added on the way (the
    projections' biases, folded into the copies the blocks make anyway)."""
    batch, heads, queries, _ = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    causal = isinstance(mask, str) and mask == "causal"
    # A causal mask hides, in each block, only a triangle of its last QUERY_BLOCK visible keys
    # (earlier keys are all visible): that triangle is masked, not the whole score matrix.
    bias = None if causal else _additive_mask(mask)
    triangle = _causal_triangle() if causal else None

    def head(x: np.ndarray, b: int, g: int, which: int) -> np.ndarray:
        """Head g of sequence b of k (which=1) or v (2), its bias added (a copy) if it has one."""
        return x[b, g] + biases[which][g] if biases else x[b, g]

    blocks = math.ceil(queries / QUERY_BLOCK)
    ones = np.ones(keys, np.float32)
    # With heads enough to share among the threads a task takes a whole head and copies its
    # keys (transposed) and values once (BLAS multiplies contiguous operands ~15% faster);
    # else a task is one block.
    per_head = batch * kv_heads >= 2 * _threads()

    def key_norm_of(keys_t: np.ndarray) -> float:
        """A head's largest key norm; not computed with an additive mask (whose values bound
        nothing: the shift is then always made). The causal triangle only hides scores."""
        return 0.0 if bias is not None else _largest_norm(keys_t.T)

    def attend(
        b: int, g: int, block: int, keys_t: np.ndarray, values: np.ndarray, key_norm: float
    ) -> None:
        rows = slice(block * QUERY_BLOCK, min((block + 1) * QUERY_BLOCK, queries))
        # A causal block sees no key past its last query's position: those are not computed.
        visible = keys - queries + rows.stop if causal else keys
        head_range = slice(g * group, (g + 1) * group)
        block_q = q[b, head_range, rows]
        if biases:
            block_q = block_q + biases[0][head_range, None]
        block_q = block_q * np.float32(scale)
        scores = block_q @ keys_t[:, :visible]
        if bias is not None:
            bias_rows = rows if bias.shape[1] > 1 else slice(None)
            scores += bias[b if len(bias) > 1 else 0, bias_rows, :visible]
        if causal:  # query i of the block sees the window's keys up to its own position
            count = rows.stop - rows.start
            scores[..., visible - count : visible] += triangle[:count, :count]
        # Softmax needs no shift by the row maxima (two passes over the scores, a sixth of the
        # attention's time) when no score can leave (-SAFE_SCORE, SAFE_SCORE): |q.k| is at most
        # |q| |k|, and exp stays finite and positive in float32 there.
        if bias is not None or _largest_norm(block_q) * key_norm >= SAFE_SCORE:
            scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        # Normalizing the (rows, dims) output costs less than normalizing (rows, keys) scores;
        # the row sums as a BLAS product with ones take a third of np.sum's time.
        block_out = scores @ values[:visible]
        block_out /= (scores @ ones[:visible])[..., None]
        out[b, rows, head_range] = block_out.transpose(1, 0, 2)

    def task(i: int) -> None:
        if per_head:
            b, g = divmod(i, kv_heads)
            keys_t = np.ascontiguousarray(head(k, b, g, 1).T)
            values = np.ascontiguousarray(head(v, b, g, 2))
            key_norm = key_norm_of(keys_t)
            for block in range(blocks):
                attend(b, g, block, keys_t, values, key_norm)
        else:
            b, rest = divmod(i, kv_heads * blocks)
            g, block = divmod(rest, blocks)
            keys_t = head(k, b, g, 1).T
            attend(b, g, block, keys_t, head(v, b, g, 2), key_norm_of(keys_t))

    run_tasks(task, batch * kv_heads * (1 if per_head else blocks))


@cache
def _causal_triangle() -> np.ndarray:
    """-inf above the diagonal of a QUERY_BLOCK square, 0 elsewhere: a causal block's mask."""
    triangle = np.triu(np.full((QUERY_BLOCK, QUERY_BLOCK), -np.inf, np.float32), k=1)
    triangle.flags.writeable = False
    return triangle


def _largest_norm(x: np.ndarray) -> float:
    """The largest Euclidean norm of the rows of x (..., dims)."""
    return float(np.sqrt(np.einsum("...i,...i->...", x, x).max()))


def elementwise(kernel, data: np.ndarray, *others: np.ndarray) -> np.ndarray:
    """`kernel(out_block, data_block, *other_blocks)` over 1 MiB blocks of numpy arrays across
    threads, into a numpy buffer of its own (the operands are only read)."""
    out = np.empty(data.shape, dtype=np.float32)
    flat, flat_out = np.ascontiguousarray(data).reshape(-1), out.reshape(-1)
    flat_others = [np.ascontiguousarray(np.broadcast_to(o, data.shape)).reshape(-1) for o in others]
    block = _task_size(flat.size)

    def task(i: int) -> None:
        part = slice(i * block, (i + 1) * block)
        kernel(flat_out[part], flat[part], *(o[part] for o in flat_others))

    run_tasks(task, math.ceil(flat.size / block))
    return out


def gelu_tanh_into(out: np.ndarray, x: np.ndarray) -> None:
    """GELU (tanh approximation) of the numpy block `x` into `out` (another buffer)."""
    np.multiply(x, x, out=out)
    out *= 0.044715 * GELU_C
    out += GELU_C
    out *= x  # GELU_C * (x + 0.044715 x^3)
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    out *= x


def layer_norm_into(
    out: np.ndarray, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float
) -> None:
    """Layer norm of the numpy rows `x` over their last axis into `out` (another buffer)."""
    np.subtract(x, x.mean(axis=-1, keepdims=True), out=out)
    variance = np.mean(out * out, axis=-1, keepdims=True)
    out *= 1.0 / np.sqrt(variance + np.float32(eps))
    out *= weight
    out += bias


def swiglu_into(out: np.ndarray, gate: np.ndarray, up: np.ndarray) -> None:
    """silu(gate) * up of numpy blocks into `out` (another buffer)."""
    np.multiply(gate, np.float32(0.5), out=out)
    np.tanh(out, out=out)  # sigmoid(g) = (1 + tanh(g / 2)) / 2, no overflow
    out += 1.0
    out *= 0.5
    out *= gate
    out *= up


def host_swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up with numpy across threads."""
    return mx.array(elementwise(swiglu_into, host_view(gate), host_view(up)))
