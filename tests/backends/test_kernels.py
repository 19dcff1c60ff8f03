"""The CPU backend: host kernels and the host decoder give MLX's own results, `prepare` swaps
them in only where they apply, and the BLAS choice is reported, never printed at import."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_smolvlm.backends import cpu, decoder, kernels
from mlx_smolvlm.backends import vision as vision_backend
from mlx_smolvlm.backends.decoder import HostKVCache, decode_step
from mlx_smolvlm.backends.kernels import (
    gelu_tanh_into,
    host_attention,
    host_swiglu,
    host_view,
    layer_norm_into,
)
from mlx_smolvlm.model.vision import gelu_tanh


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
    monkeypatch.setattr(kernels, "_threads", lambda: threads)
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
    monkeypatch.setattr(kernels, "_threads", lambda: 2)
    size = kernels._task_size(count, unit)
    tasks = -(-count // size)
    assert size * unit <= kernels.BLOCK + unit  # a task of about BLOCK elements at most
    assert tasks % 2 == 0 or tasks == count  # equal shares, unless there are too few items


def test_bad_mask_is_named():
    q, k, v = qkv(queries=4, keys=4)
    with pytest.raises(ValueError, match="attention mask"):
        host_attention(q, k, v, 0.25, mx.ones((2, 6, 4, 4), dtype=mx.bool_))
    with pytest.raises(ValueError, match="unknown attention mask"):
        host_attention(q, k, v, 0.25, "sliding")


def test_gelu_matches_mlx_and_never_writes_its_input():
    mx.random.seed(2)
    x = mx.random.normal((3, 1000, 700)) * 4
    expected = nn.gelu_approx(x)
    mx.eval(expected)
    before = np.array(x)
    host = kernels.host_view(x)
    out = np.empty(host.shape, np.float32)
    gelu_tanh_into(out, host)
    assert np.allclose(out, np.array(expected), atol=1e-5)
    assert mx.allclose(gelu_tanh(x), expected, atol=1e-5).item()
    view = host.transpose(2, 1, 0)  # not contiguous
    gelu_tanh_into(out.reshape(view.shape), view)
    assert np.allclose(out.reshape(view.shape), np.array(expected).transpose(2, 1, 0), atol=1e-5)
    assert np.array_equal(np.array(x), before)


@pytest.mark.parametrize("magnitude", [1.0, 40.0])
@pytest.mark.parametrize("mask, queries", [(None, 300), ("causal", 300), ("causal", 120)])
def test_softmax_without_shift_only_where_scores_are_safe(monkeypatch, magnitude, mask, queries):
    """Small scores skip the shift by the row maxima, large ones (|q||k| past SAFE_SCORE) keep
    it, with or without the causal triangle (over cached keys too): both give MLX's attention,
    and never inf or NaN."""
    q = mx.random.normal((1, 4, queries, 32), key=mx.random.key(0))
    k, v = (mx.random.normal((1, 4, 300, 32), key=mx.random.key(i)) for i in (1, 2))
    q, k = q * magnitude, k * magnitude
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=32**-0.5, mask=mask)
    shifted = []
    norm = kernels._largest_norm
    monkeypatch.setattr(kernels, "_largest_norm", lambda x: shifted.append(1) or norm(x))
    got = host_attention(q, k, v, 32**-0.5, mask)
    assert np.isfinite(np.array(got)).all()
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-5)
    largest = float(
        mx.sqrt((q * 32**-0.5).square().sum(-1)).max() * mx.sqrt(k.square().sum(-1)).max()
    )
    assert (largest < kernels.SAFE_SCORE) == (magnitude == 1.0) and shifted


def test_host_views_are_read_only():
    x = mx.arange(4, dtype=mx.float32)
    with pytest.raises(ValueError, match="read-only"):
        kernels.host_view(x)[0] = 5
    assert x.tolist() == [0, 1, 2, 3]


# --- the seam --------------------------------------------------------------------------------


def tiny_model():
    from reference import tiny_config

    from mlx_smolvlm.model import Model, ModelConfig

    model = Model(ModelConfig.from_dict(tiny_config()))
    mx.eval(model.parameters())
    return model.eval()


def kinds(model) -> set[type]:
    return {type(m) for _, m in model.named_modules()}


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the host modules are the CPU's")
def test_prepare_swaps_host_modules_in_and_out(monkeypatch):
    model = tiny_model()
    names = sorted(k for k, _ in nn.utils.tree_flatten(model.parameters()))
    assert cpu.prepare(model) is model
    assert {cpu.HostVisionModel, cpu.HostLanguageModel} <= kinds(model)
    assert cpu.HostAttention in kinds(model) and cpu.HostMLP in kinds(model)
    # Same parameters under the same names: weights, adapters and checkpoints are unaffected.
    assert sorted(k for k, _ in nn.utils.tree_flatten(model.parameters())) == names
    assert "Host kernels: on; host vision tower: on; host decoder: on" in cpu.report(model)
    cpu.prepare(model)  # idempotent
    assert cpu.HostLanguageModel in kinds(model)

    model.set_dtype(mx.bfloat16)  # numpy has no bf16: everything goes back to MLX's modules
    cpu.prepare(model)
    assert not any(k.__name__.startswith("Host") for k in kinds(model))
    model.set_dtype(mx.float32)
    nn.quantize(model.language_model, group_size=32, bits=8)
    cpu.prepare(model)  # host kernels stay, the decoder is MLX's for quantized weights
    assert cpu.HostAttention in kinds(model) and cpu.HostLanguageModel not in kinds(model)
    assert cpu.HostVisionModel in kinds(model)
    nn.quantize(model.vision_model, group_size=32, bits=8)
    cpu.prepare(model)  # and so is the tower for a quantized one
    assert cpu.HostVisionModel not in kinds(model)
    monkeypatch.setenv("MLX_SMOLVLM_HOST_KERNELS", "0")
    cpu.prepare(model)
    assert not any(k.__name__.startswith("Host") for k in kinds(model))


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the host modules are the CPU's")
def test_prepared_modules_in_training_mode_run_mlx():
    model = cpu.prepare(tiny_model())
    x = mx.random.normal((2, 10, model.config.text_config.hidden_size))
    layer = model.language_model.layers[0]
    assert type(layer.self_attn) is cpu.HostAttention
    # The host kernels are not differentiable: in training mode the MLX code gives gradients.
    layer.train()
    grad = mx.grad(lambda y: layer(y, mask="causal").sum())(x)
    assert grad.shape == x.shape and bool(mx.isfinite(grad).all())
    tower = model.vision_model
    assert type(tower) is cpu.HostVisionModel
    tower.train()
    pixels, ids = vision_inputs(model, 2)
    grad = mx.grad(lambda p: tower(p, ids).sum())(pixels)
    assert grad.shape == pixels.shape and bool(mx.isfinite(grad).all())


def vision_inputs(model, tiles: int, padded: bool = False):
    """Random pixels, position ids and (with `padded`) a key mask that hides part of a tile."""
    from mlx_smolvlm.model.vision import patch_inputs

    config = model.config.vision_config
    side = config.image_size // config.patch_size
    patch_mask = np.ones((tiles, side, side), dtype=bool)
    if padded:
        patch_mask[-1, side // 2 :] = False
        patch_mask[-1, :, side // 3 :] = False
    ids, mask = patch_inputs(patch_mask, config.patches_per_side)
    mx.random.seed(6)
    pixels = mx.random.normal((tiles, config.image_size, config.image_size, 3))
    return (pixels, ids) if mask is None else (pixels, ids, mask)


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the host modules are the CPU's")
@pytest.mark.parametrize("padded", [False, True])
def test_host_vision_tower_matches_mlx_and_leaves_weights_alone(monkeypatch, padded):
    model = tiny_model()
    monkeypatch.setattr(vision_backend, "ROWS", 7)  # several row blocks, a ragged last one
    inputs = vision_inputs(model, 3, padded)
    expected = model.vision_model(*inputs)
    weights = {k: np.array(v) for k, v in nn.utils.tree_flatten(model.parameters())}
    cpu.prepare(model)
    assert type(model.vision_model) is cpu.HostVisionModel
    got = model.vision_model(*inputs)
    assert got.shape == expected.shape and got.dtype == mx.float32
    assert mx.allclose(got, expected, atol=1e-4).item()
    for name, value in nn.utils.tree_flatten(model.parameters()):
        assert np.array_equal(np.array(value), weights[name]), name


# --- the numpy decode step -------------------------------------------------------------------


def tiny_decoder(tie: bool, bias: bool = False, **text):
    from reference import tiny_config

    from mlx_smolvlm.model.config import ModelConfig
    from mlx_smolvlm.model.language import LanguageModel

    config = ModelConfig.from_dict(
        tiny_config(tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, **text)
    ).text_config
    model = LanguageModel(config)
    mx.random.seed(3)
    model.update(nn.utils.tree_map(lambda w: mx.random.normal(w.shape) * 0.2, model.parameters()))
    mx.eval(model.parameters())
    return model.eval()


def decode(model, cache, steps: int) -> list[np.ndarray]:
    """Prefill 250 tokens, then decode `steps` tokens one at a time."""
    prompt = mx.array(np.random.default_rng(0).integers(3, 300, (1, 250)))
    logits = model(prompt, cache)
    token = mx.argmax(logits[:, -1], axis=-1)
    outs = []
    for _ in range(steps):
        logits = model(token[None], cache)
        outs.append(np.array(logits[0, -1]))
        token = mx.argmax(logits[:, -1], axis=-1)
    return outs


def test_host_decode_reads_weights_updated_since_the_last_generation():
    host = cpu.prepare(tiny_decoder(tie=True))
    before = decode(host, host.make_cache(), 3)
    # New weights (as a user's update or load_weights gives): the next generation reads them.
    host.update(nn.utils.tree_map(lambda w: w * 1.5, host.parameters()))
    host.eval()
    got = decode(host, host.make_cache(), 3)
    reference = cpu._as(host, cpu.BASE[type(host)])
    want = decode(reference, reference.make_cache(), 3)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert not np.allclose(got[0], before[0], atol=1e-3)


def test_host_decode_stacks_projections_in_place_of_their_weights(tmp_path):
    """q/k/v and gate/up are read as one matrix each whose row slices are the layers' own
    weights: same values, no second copy, saved checkpoints unchanged; re-stacked after an
    update."""
    model = tiny_decoder(tie=False, bias=True)
    weights = {k: np.array(v) for k, v in nn.utils.tree_flatten(model.parameters())}
    host = cpu.prepare(model)
    host.make_cache()
    attn = host.layers[0].self_attn
    stacked = host_view(attn.__dict__["stacked_q_proj_k_proj_v_proj"])
    q, k, v = (host_view(attn[name].weight) for name in ("q_proj", "k_proj", "v_proj"))
    assert q.ctypes.data == stacked.ctypes.data  # a slice of the stacked buffer, not a copy
    assert v.ctypes.data + v.nbytes == stacked.ctypes.data + stacked.nbytes
    assert np.array_equal(stacked, np.concatenate([q, k, v]))
    for name, value in nn.utils.tree_flatten(host.parameters()):
        assert np.array_equal(np.array(value), weights[name]), name
    host.save_weights(str(tmp_path / "w.safetensors"))
    saved = mx.load(str(tmp_path / "w.safetensors"))
    assert set(saved) == set(weights)
    for name, value in saved.items():
        assert np.array_equal(np.array(value), weights[name]), name
    # One projection replaced: the next generation stacks the new weights.
    attn.k_proj.weight = attn.k_proj.weight * 2
    host.make_cache()
    restacked = host_view(attn.__dict__["stacked_q_proj_k_proj_v_proj"])
    assert np.array_equal(restacked[q.shape[0] : q.shape[0] + k.shape[0]], k * 2)


def test_host_decode_pads_a_small_projection_with_zero_rows(tmp_path):
    """SmolVLM-256M's 576x576 output projection is read from a buffer with zero rows below its
    weights (so that numpy's OpenBLAS runs it on every thread): its weight is a slice of that
    buffer, parameters and checkpoints unchanged, the decode the same as MLX's."""
    model = tiny_decoder(
        tie=True, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        intermediate_size=1536,
    )  # fmt: skip
    weights = {k: np.array(v) for k, v in nn.utils.tree_flatten(model.parameters())}
    expected = decode(model, model.make_cache(), 4)
    host = cpu.prepare(model)
    got = decode(host, host.make_cache(), 4)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-4)
    attn = host.layers[0].self_attn
    padded = host_view(attn.__dict__["stacked_o_proj"])
    o = host_view(attn.o_proj.weight)
    assert o.shape == (576, 576) and o.ctypes.data == padded.ctypes.data
    assert padded.shape == (decoder.THREADED_GEMV // 576, 576)
    assert np.array_equal(padded[:576], weights["layers.0.self_attn.o_proj.weight"])
    assert not padded[576:].any()
    assert "stacked_down_proj" not in host.layers[0].mlp.__dict__  # large enough as it is
    host.save_weights(str(tmp_path / "w.safetensors"))
    saved = mx.load(str(tmp_path / "w.safetensors"))
    assert set(saved) == set(weights)
    for name, value in saved.items():
        assert value.shape == weights[name].shape and np.array_equal(value, weights[name]), name


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the host decoder is the CPU's")
def test_warm_stacks_at_load_without_swapping_modules(monkeypatch):
    """load() stacks the projections (warm) so the first answer need not; it swaps nothing, so a
    loaded model can still be adapted and trained; a bf16 model or the pure-MLX path is left
    alone."""
    model = tiny_model()
    cpu.warm(model)
    attn = model.language_model.layers[0].self_attn
    assert type(model.language_model) is cpu.BASE[cpu.HostLanguageModel]
    assert type(attn) is cpu.BASE[cpu.HostAttention]
    stacked = attn.__dict__["stacked_q_proj_k_proj_v_proj"]
    host = cpu.prepare(model)
    host.language_model.make_cache()  # the views of the stacked buffer already made
    assert (
        host.language_model.layers[0].self_attn.__dict__["stacked_q_proj_k_proj_v_proj"] is stacked
    )
    for setup in ("bf16", "pure"):
        other = tiny_model()
        if setup == "bf16":
            other.set_dtype(mx.bfloat16)
        else:
            monkeypatch.setenv("MLX_SMOLVLM_HOST_KERNELS", "0")
        cpu.warm(other)
        assert (
            "stacked_q_proj_k_proj_v_proj" not in other.language_model.layers[0].self_attn.__dict__
        )


@pytest.mark.parametrize("tie, bias", [(False, False), (True, True)])
def test_host_decode_matches_mlx_across_cache_growth(tie, bias, monkeypatch):
    # 250 + 20 tokens crosses the 256-position growth step of the KV caches.
    model = tiny_decoder(tie, bias)
    expected = decode(model, model.make_cache(), 20)
    steps = []
    monkeypatch.setattr(cpu, "decode_step", lambda *a: steps.append(1) or decode_step(*a))
    host = cpu.prepare(model)
    assert isinstance(host, cpu.HostLanguageModel)
    got = decode(host, host.make_cache(), 20)
    assert len(steps) == 20
    for step, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"step {step}")


@pytest.mark.parametrize("tie, bias", [(False, True), (True, False)])
def test_host_prefill_in_chunks_matches_mlx(tie, bias, monkeypatch):
    """The prefill runs in numpy on the host caches: chunk after chunk (each continuing the
    cache's positions), from token ids or input embeddings, the hidden states, the last
    position's logits and the next steps are MLX's."""
    model = tiny_decoder(tie, bias)
    ids = mx.array(np.random.default_rng(1).integers(3, 300, (1, 40)))
    embeddings = model.embed_tokens(ids)
    cache = model.make_cache()
    want = model.hidden_states(ids, cache)
    want_next = model(mx.array([[5]]), cache)
    prefills = []
    monkeypatch.setattr(cpu, "prefill", lambda *a: prefills.append(1) or decoder.prefill(*a))
    host = cpu.prepare(model)
    for source in ("ids", "embeddings"):
        cache = host.make_cache()
        parts = []
        for start in range(0, 40, 7):
            chunk = slice(start, start + 7)
            if source == "ids":
                parts.append(host.hidden_states(ids[:, chunk], cache))
            else:
                parts.append(host.hidden_states(None, cache, embeddings[:, chunk]))
        got = mx.concatenate(parts, axis=1)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, err_msg=source)
        np.testing.assert_allclose(
            np.array(host.logits(got[:, -1:])), np.array(model.logits(want[:, -1:])), atol=1e-4
        )
        assert cache[0].offset == 40
        np.testing.assert_allclose(
            np.array(host(mx.array([[5]]), cache)), np.array(want_next), atol=1e-4
        )
    assert len(prefills) == 2 * 6
    # A mask, or caches of another kind, take MLX's layers.
    masked = host.hidden_states(ids, host.make_cache(), mask="causal")
    np.testing.assert_allclose(np.array(masked), np.array(want), atol=1e-4)
    assert len(prefills) == 2 * 6


def test_host_cache_trims_and_quantizes_like_mlx_lms():
    model = tiny_decoder(False)
    host = cpu.prepare(model)
    mine, theirs = host.make_cache(), model.make_cache()
    decode(host, mine, 3)
    decode(model, theirs, 3)
    assert mine[0].offset == theirs[0].offset == 253
    for c in mine + theirs:
        c.trim(5)
    token = mx.array([[7]])
    np.testing.assert_allclose(
        np.array(host(token, mine)), np.array(model(token, theirs)), atol=1e-4
    )
    # kv_bits: mlx-lm's quantized cache takes over with the same positions.
    cache = HostKVCache()
    keys = mx.random.normal((1, 2, 5, 32))
    cache.update_and_fetch(keys, keys)
    quantized = cache.to_quantized(group_size=32, bits=8)
    assert quantized.offset == 5
    restored = mx.dequantize(*quantized.keys, group_size=32, bits=8)[..., :5, :]
    np.testing.assert_allclose(np.array(restored), np.array(keys), atol=0.05)


def test_host_cache_keeps_its_own_memory():
    cache = HostKVCache()
    keys = mx.ones((1, 2, 3, 4))
    fetched, _ = cache.update_and_fetch(keys, keys)
    cache.append(np.zeros((2, 1, 4), np.float32), np.zeros((2, 1, 4), np.float32))
    assert fetched.shape == (1, 2, 3, 4) and bool((fetched == 1).all())  # a copy, not a view
    assert keys.tolist() == mx.ones((1, 2, 3, 4)).tolist()
    with pytest.raises(ValueError, match="one sequence"):
        cache.update_and_fetch(mx.ones((2, 2, 1, 4)), mx.ones((2, 2, 1, 4)))


# --- the optimized BLAS ----------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="MLX uses Accelerate on macOS")
def test_blas_is_loaded_first_silently_and_reported():
    if not ctypes.util.find_library("openblas"):
        pytest.skip("no OpenBLAS installed")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLX_SMOLVLM") and k != "OPENBLAS_THREAD_TIMEOUT"
    }

    def run(code: str) -> tuple[str, str]:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        return run.stdout, run.stderr

    status = "import mlx_smolvlm; from mlx_smolvlm.backends import blas; print(blas.status())"
    out, err = run(status)
    assert "for matrix products" in out and err == ""  # nothing printed at import
    # MLX's copy sleeps between calls; the setting does not leak to libraries loaded later.
    run("import os, mlx_smolvlm; assert 'OPENBLAS_THREAD_TIMEOUT' not in os.environ")
    out, err = run("import mlx.core; " + status)
    assert "imported before mlx_smolvlm" in out and err == ""
    env["MLX_SMOLVLM_BLAS"] = "0"
    out, err = run(status)
    assert "reference BLAS (MLX_SMOLVLM_BLAS=0)" in out and err == ""


def test_layer_norm_matches_mlx():
    mx.random.seed(4)
    norm = nn.LayerNorm(96, eps=1e-6)
    norm.update({"weight": mx.random.normal((96,)), "bias": mx.random.normal((96,))})
    x = mx.random.normal((3, 5000, 96)) * 3 + 1
    out = np.empty(x.shape, np.float32)
    weight, bias = kernels.host_view(norm.weight), kernels.host_view(norm.bias)
    layer_norm_into(out, kernels.host_view(x), weight, bias, norm.eps)
    assert np.allclose(out, np.array(norm(x)), atol=1e-5)


def test_swiglu_matches_mlx():
    mx.random.seed(5)
    gate, up = mx.random.normal((2, 700, 300)) * 6, mx.random.normal((2, 700, 300))
    expected = nn.silu(gate) * up
    mx.eval(expected)
    assert mx.allclose(host_swiglu(gate, up), expected, atol=1e-5).item()


def cpuinfo(flags: str) -> str:
    return f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 {flags}\n\n"


def at_openblas_load(seen: str, **env: str) -> str:
    """What `import mlx_smolvlm` printed: the value of the expression `seen` at the moment the
    global OpenBLAS was loaded (a list of one), then OPENBLAS_THREAD_TIMEOUT after the import;
    in a fresh process with `env` added to an environment without MLX_SMOLVLM_* settings."""
    spy = f"""
import ctypes, os, sys
seen = []
class Spy(ctypes.CDLL):
    def __init__(self, name, *args, **kwargs):
        if "openblas" in str(name):
            seen.append({seen})
        super().__init__(name, *args, **kwargs)
ctypes.CDLL = Spy
import mlx_smolvlm
print(seen, os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
"""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLX_SMOLVLM") and k != "OPENBLAS_THREAD_TIMEOUT"
    }
    run = subprocess.run(
        [sys.executable, "-c", spy], capture_output=True, text=True, env={**clean, **env}
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_torch_binds_its_libraries_before_the_global_openblas():
    """Loaded after a global OpenBLAS, torch's BLAS calls bind to it and its CPU attention runs
    ~18x slower: where torch is installed, it is imported before OpenBLAS is loaded."""
    pytest.importorskip("torch")
    if not ctypes.util.find_library("openblas"):
        pytest.skip("no OpenBLAS installed")
    assert at_openblas_load('"torch" in sys.modules') == "[True] None"


@pytest.mark.skipif(sys.platform != "linux", reason="MLX uses Accelerate on macOS")
def test_openblas_threads_sleep_only_where_the_host_kernels_run():
    if not ctypes.util.find_library("openblas"):
        pytest.skip("no OpenBLAS installed")
    timeout = 'os.environ.get("OPENBLAS_THREAD_TIMEOUT")'
    # Sleeping threads, the setting not left in the environment.
    assert at_openblas_load(timeout) == "['4'] None"
    # The pure-MLX path decodes through MLX's BLAS: OpenBLAS's spinning default is kept.
    assert at_openblas_load(timeout, MLX_SMOLVLM_HOST_KERNELS="0") == "[None] None"
    assert at_openblas_load(timeout, OPENBLAS_THREAD_TIMEOUT="10") == "['10'] 10"  # the user's


def test_openblas_kernels_follow_the_cpu_flags_not_its_model():
    from mlx_smolvlm.backends import blas

    avx512 = "avx avx2 fma avx512f avx512bw avx512vl avx512dq avx512cd"
    assert blas.core_type(cpuinfo(avx512)) == "SkylakeX"
    assert blas.core_type(cpuinfo("avx avx2 fma avx512f")) == "Haswell"  # AVX-512 in part
    assert blas.core_type(cpuinfo("avx avx2 fma")) == "Haswell"
    assert blas.core_type(cpuinfo("avx")) is None  # OpenBLAS's own choice
    assert blas.core_type("") is None  # not x86 (no flags line)


@pytest.mark.skipif(sys.platform != "linux", reason="MLX uses Accelerate on macOS")
def test_loaded_openblas_runs_the_kernels_the_flags_allow():
    if not ctypes.util.find_library("openblas"):
        pytest.skip("no OpenBLAS installed")
    code = (
        "import mlx_smolvlm; from mlx_smolvlm.backends import blas; "
        "print(blas.core_type()); print(blas.corename()); print(blas.status())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_SMOLVLM", "OPENBLAS"))}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    chosen, name, status = run.stdout.splitlines()
    if chosen != "None":
        assert name.lower() == chosen.lower()
    assert f"({name} kernels)" in status
    # A user's OPENBLAS_CORETYPE wins.
    env["OPENBLAS_CORETYPE"] = "Prescott"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.splitlines()[1].lower() == "prescott"
