"""The CPU host kernels give MLX's own results, for every mask the models pass them."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_smolvlm import cpu_kernels
from mlx_smolvlm.cpu_kernels import (
    gelu_tanh,
    host_attention,
    host_gelu_tanh,
    host_kernels,
    host_layer_norm,
    host_swiglu,
    use_host_kernels,
)


def qkv(batch=2, heads=6, kv_heads=2, queries=300, keys=300, dims=16, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((batch, heads, queries, dims))
    k = mx.random.normal((batch, kv_heads, keys, dims))
    v = mx.random.normal((batch, kv_heads, keys, dims))
    return q, k, v


def reference(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_no_mask_and_grouped_queries(kv_heads):
    q, k, v = qkv(kv_heads=kv_heads)
    out = host_attention(q, k, v, 0.25, None)
    assert out.shape == q.shape
    assert mx.allclose(out, reference(q, k, v, 0.25, None), atol=1e-5).item()


@pytest.mark.parametrize("threads", [1, 64])  # a task per head, or per block of queries
@pytest.mark.parametrize("queries, keys", [(300, 300), (300, 420), (1, 420)])
def test_causal_with_cached_keys(monkeypatch, threads, queries, keys):
    # With more keys than queries the first keys come from the cache.
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: threads)
    q, k, v = qkv(queries=queries, keys=keys)
    out = host_attention(q, k, v, 0.25, "causal")
    assert mx.allclose(out, reference(q, k, v, 0.25, "causal"), atol=1e-5).item()


def test_boolean_key_padding_mask_and_transposed_views():
    # The vision tower's layout: heads split from (batch, length, heads, dims) without a copy.
    mx.random.seed(1)
    x = mx.random.normal((3, 2, 260, 4, 8))
    q, k, v = (t.transpose(0, 2, 1, 3) for t in x)
    keys_visible = np.ones((2, 1, 1, 260), dtype=bool)
    keys_visible[1, ..., 200:] = False
    mask = mx.array(keys_visible)
    out = host_attention(q, k, v, 0.3, mask)
    assert mx.allclose(out, reference(q, k, v, 0.3, mask), atol=1e-5).item()


def test_per_query_boolean_and_additive_masks():
    q, k, v = qkv(queries=40, keys=40)
    rng = np.random.default_rng(0)
    visible = rng.random((2, 1, 40, 40)) < 0.7
    visible |= np.eye(40, dtype=bool)  # no empty rows
    boolean = mx.array(visible)
    additive = mx.where(boolean, 0.0, -1e9)
    for mask in (boolean, additive):
        out = host_attention(q, k, v, 0.25, mask)
        assert mx.allclose(out, reference(q, k, v, 0.25, mask), atol=1e-5).item()


@pytest.mark.parametrize("count, unit", [(1, 1), (786_432, 1), (2048, 768), (7, 1 << 20)])
def test_elementwise_tasks_fill_whole_rounds_of_threads(monkeypatch, count, unit):
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: 2)
    size = cpu_kernels._task_size(count, unit)
    tasks = -(-count // size)
    assert size * unit <= cpu_kernels.BLOCK + unit  # a task of about BLOCK elements at most
    assert tasks % 2 == 0 or tasks == count  # equal shares, unless there are too few items


def test_bad_mask_is_named():
    q, k, v = qkv(queries=4, keys=4)
    with pytest.raises(ValueError, match="attention mask"):
        host_attention(q, k, v, 0.25, mx.ones((2, 6, 4, 4), dtype=mx.bool_))
    with pytest.raises(ValueError, match="unknown attention mask"):
        host_attention(q, k, v, 0.25, "sliding")


def test_gelu_matches_mlx_and_overwrites_only_its_input():
    mx.random.seed(2)
    x = mx.random.normal((3, 1000, 700)) * 4
    expected = nn.gelu_approx(x)
    mx.eval(expected)
    fresh = x * 1.0
    assert mx.allclose(host_gelu_tanh(fresh), expected, atol=1e-5).item()
    assert mx.allclose(gelu_tanh(x), expected, atol=1e-5).item()
    # A view that is not contiguous is copied rather than written through.
    before = np.array(x)
    view = x.transpose(2, 1, 0)
    assert mx.allclose(host_gelu_tanh(view), expected.transpose(2, 1, 0), atol=1e-5).item()
    assert np.array_equal(np.array(x), before)


def test_host_kernels_only_in_eval_mode_on_float32(monkeypatch):
    layer = nn.Linear(2, 2)
    x32, x16 = mx.zeros((1, 2)), mx.zeros((1, 2), dtype=mx.bfloat16)
    on_cpu = mx.default_device() == mx.cpu
    assert not use_host_kernels(layer.eval(), x32)  # outside a host_kernels() block
    with host_kernels():
        assert use_host_kernels(layer.eval(), x32) == on_cpu
        assert not use_host_kernels(layer.eval(), x16)
        assert not use_host_kernels(layer.train(), x32)
        monkeypatch.setenv("MLX_SMOLVLM_HOST_KERNELS", "0")
        assert not use_host_kernels(layer.eval(), x32)


# --- the numpy decode step -------------------------------------------------------------------


def tiny_decoder(tie: bool, bias: bool = False):
    from reference import tiny_config

    from mlx_smolvlm.config import ModelConfig
    from mlx_smolvlm.language import LanguageModel

    config = ModelConfig.from_dict(
        tiny_config(tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    ).text_config
    model = LanguageModel(config)
    mx.random.seed(3)
    model.update(nn.utils.tree_map(lambda w: mx.random.normal(w.shape) * 0.2, model.parameters()))
    mx.eval(model.parameters())
    return model.eval()


def decode(model, cache_factory, steps: int, host: bool) -> list[np.ndarray]:
    """Prefill 250 tokens with the MLX decoder, then decode `steps` tokens one at a time."""
    cache = cache_factory(model)
    prompt = mx.array(np.random.default_rng(0).integers(3, 300, (1, 250)))
    logits = model(prompt, cache)
    token = mx.argmax(logits[:, -1], axis=-1)
    outs = []
    for _ in range(steps):
        with host_kernels(host):
            logits = model(token[None], cache)
        outs.append(np.array(logits[0, -1]))
        token = mx.argmax(logits[:, -1], axis=-1)
    return outs


@pytest.mark.parametrize("tie, bias", [(False, False), (True, True)])
def test_host_decode_matches_mlx_across_cache_growth(tie, bias):
    # 250 + 20 tokens crosses mlx-lm's 256-position growth step of the KV cache.
    model = tiny_decoder(tie, bias)
    expected = decode(model, lambda m: m.make_cache(), 20, False)
    got = decode(model, lambda m: m.make_cache(), 20, True)
    for step, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"step {step}")


def test_host_decode_with_a_bounded_cache():
    from mlx_lm.models.cache import RotatingKVCache

    model = tiny_decoder(False)

    def rotating(m):
        return [RotatingKVCache(max_size=128, keep=4) for _ in m.layers]

    expected = decode(model, rotating, 12, False)
    got = decode(model, rotating, 12, True)
    for step, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"step {step}")


def test_host_decode_only_where_it_applies():
    from mlx_lm.models.cache import QuantizedKVCache

    from mlx_smolvlm import cpu_decode

    model = tiny_decoder(False)
    assert cpu_decode.supported(model, model.make_cache())
    assert not cpu_decode.supported(model, [QuantizedKVCache() for _ in model.layers])
    assert not cpu_decode.supported(model, None)
    nn.quantize(model, group_size=32, bits=8)
    assert not cpu_decode.supported(model, model.make_cache())


# --- the optimized BLAS ----------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="MLX uses Accelerate on macOS")
def test_blas_is_loaded_first_or_the_user_is_told():
    if not ctypes.util.find_library("openblas"):
        pytest.skip("no OpenBLAS installed")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLX_SMOLVLM") and k != "OPENBLAS_THREAD_TIMEOUT"
    }

    def stderr(code: str) -> str:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        return run.stderr

    assert "for matrix products" in stderr("import mlx_smolvlm")
    # MLX's copy sleeps between calls; the setting does not leak to libraries loaded later.
    leaked = "import os, mlx_smolvlm; assert 'OPENBLAS_THREAD_TIMEOUT' not in os.environ"
    stderr(leaked)
    assert "imported before mlx_smolvlm" in stderr("import mlx.core; import mlx_smolvlm")
    env["MLX_SMOLVLM_BLAS"] = "0"
    assert "BLAS" not in stderr("import mlx_smolvlm")


def test_layer_norm_matches_mlx():
    mx.random.seed(4)
    norm = nn.LayerNorm(96, eps=1e-6)
    norm.update({"weight": mx.random.normal((96,)), "bias": mx.random.normal((96,))})
    x = mx.random.normal((3, 5000, 96)) * 3 + 1
    assert mx.allclose(host_layer_norm(x, norm), norm(x), atol=1e-5).item()


def test_swiglu_matches_mlx():
    mx.random.seed(5)
    gate, up = mx.random.normal((2, 700, 300)) * 6, mx.random.normal((2, 700, 300))
    expected = nn.silu(gate) * up
    mx.eval(expected)
    assert mx.allclose(host_swiglu(gate * 1.0, up), expected, atol=1e-5).item()
