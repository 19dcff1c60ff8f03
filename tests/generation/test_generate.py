"""Generation: greedy parity with transformers, the Python API, the CLI and the chat REPL."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from pages import picture
from reference import save_hf_checkpoint, tiny_config_for_real_tokenizer

from mlx_smolvlm import load
from mlx_smolvlm.generation import PromptCache, generate, prepare_inputs, stream_generate

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random SmolVLM with the real 256M tokenizer, chat template and processor."""
    from conftest import real_model_dir

    shared = real_model_dir("SmolVLM-256M-Instruct")
    path = tmp_path_factory.mktemp("tiny-smolvlm")
    hf = save_hf_checkpoint(path, tiny_config_for_real_tokenizer(), seed=7, tokenizer_dir=shared)
    return path, hf


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(checkpoint[0])


def test_greedy_tokens_match_transformers_generate(checkpoint, loaded):
    _, hf = checkpoint
    model, processor = loaded
    image = picture()
    inputs = prepare_inputs(processor, "What is in this image?", [image])
    # 700x500 is resized to 2048 longest edge: 4x3 tiles plus the global image.
    assert inputs["pixel_values"].shape[:2] == (1, 13)
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.from_numpy(inputs["input_ids"].astype(np.int64)),
            attention_mask=torch.from_numpy(inputs["attention_mask"].astype(np.int64)),
            pixel_values=torch.from_numpy(inputs["pixel_values"]),
            pixel_attention_mask=torch.from_numpy(inputs["pixel_attention_mask"]),
            max_new_tokens=32,
            do_sample=False,
        )
    ref_tokens = ref[0, inputs["input_ids"].shape[1] :].tolist()
    result = generate(model, processor, "What is in this image?", [image], max_tokens=32)
    stopped = ref_tokens[-1] in processor.tokenizer.eos_token_ids
    assert result.token_ids == (ref_tokens[:-1] if stopped else ref_tokens)
    assert result.finish_reason == ("stop" if stopped else "length")
    assert len(ref_tokens) == 32  # random weights rarely pick the stop token


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the host decoder is the CPU's")
def test_load_does_the_host_decoders_one_time_stacking(checkpoint):
    model, _ = load(checkpoint[0])
    for layer in model.language_model.layers:
        assert "stacked_q_proj_k_proj_v_proj" in layer.self_attn.__dict__
        assert "stacked_gate_proj_up_proj" in layer.mlp.__dict__
    assert (
        not load(checkpoint[0], lazy=True)[0]
        .language_model.layers[0]
        .self_attn.__dict__.get("stacked_q_proj_k_proj_v_proj")
    )


def test_generate_result_fields_and_determinism(loaded):
    model, processor = loaded
    first = generate(model, processor, "Describe.", picture(300, 300), max_tokens=8)
    second = generate(model, processor, "Describe.", picture(300, 300), max_tokens=8)
    assert first.token_ids == second.token_ids
    assert first.text == processor.tokenizer.decode(first.token_ids)
    assert first.prompt_tokens > 64 and first.prompt_tps > 0 and first.peak_memory > 0
    assert first.finish_reason in ("stop", "length")


def test_seed_makes_sampling_reproducible(loaded):
    model, processor = loaded
    runs = [
        generate(model, processor, "Hi", max_tokens=12, temperature=1.0, seed=3).token_ids
        for _ in range(2)
    ]
    other = generate(model, processor, "Hi", max_tokens=12, temperature=1.0, seed=4).token_ids
    assert runs[0] == runs[1]
    assert runs[0] != other


def test_stream_generate_segments_join_to_text(loaded):
    model, processor = loaded
    segments = [r.text for r in stream_generate(model, processor, "Hello", max_tokens=10)]
    whole = generate(model, processor, "Hello", max_tokens=10)
    assert "".join(segments) == whole.text


def test_chat_turn_reuses_cache_and_matches_fresh_prefill(loaded):
    model, processor = loaded
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": picture()}, {"type": "text", "text": "What?"}],
        }
    ]
    cache = PromptCache(model)
    first = generate(model, processor, messages, max_tokens=6, prompt_cache=cache)
    messages += [
        {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
        {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]},
    ]
    total = len(prepare_inputs(processor, messages)["input_ids"][0])
    second = generate(model, processor, messages, max_tokens=6, prompt_cache=cache)
    assert second.prompt_tokens < total - 13 * 64  # the image tokens were not prefilled again
    fresh = generate(model, processor, messages, max_tokens=6)
    assert second.token_ids == fresh.token_ids


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 5}])
def test_one_pass_prefill_gives_mlx_lm_generate_step_tokens(loaded, sampling):
    """The prompt is prefilled in one pass (mlx-lm's generate_step runs its last token alone);
    the tokens are the same, with a repetition penalty that must see the prompt, in chunks."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    model, processor = loaded
    image = picture(300, 300)
    kwargs = {"repetition_penalty": 1.8, "prefill_step_size": 7, **sampling}
    seen = []
    result = generate(
        model, processor, "Describe.", image, max_tokens=12,
        progress=lambda stage, done, total: seen.append((stage, done, total)), **kwargs,
    )  # fmt: skip
    prefilled = [(done, total) for stage, done, total in seen if stage == "prefill"]
    total = result.prompt_tokens
    assert prefilled == [(0, total), *((min(d, total), total) for d in range(7, total + 7, 7))]

    inputs = prepare_inputs(processor, "Describe.", image)
    ids = [int(t) for t in inputs["input_ids"][0]]
    features = model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"])
    if "seed" in sampling:
        mx.random.seed(sampling["seed"])
    steps = generate_step(
        mx.array(ids),
        model.language_model,
        max_tokens=12,
        sampler=make_sampler(temp=sampling.get("temperature", 0.0)),
        logits_processors=make_logits_processors(repetition_penalty=1.8),
        prompt_cache=model.language_model.make_cache(),
        prefill_step_size=7,
        input_embeddings=model.embed([ids], image_features=features)[0],
    )
    reference = [token for token, _ in steps]
    stops = processor.tokenizer.eos_token_ids
    ended = next((i for i, t in enumerate(reference) if t in stops), len(reference))
    assert result.token_ids == reference[:ended]


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the host decoder is the CPU's")
def test_greedy_decoding_on_the_host_gives_generate_steps_tokens(loaded, monkeypatch):
    """Greedy decoding on the host decoder takes its own loop of numpy steps (no MLX
    log-softmax): the tokens and the reusable cache are those of mlx-lm's generate_step, which a
    logits processor (a repetition penalty of 1, which changes no logit) still takes."""
    from mlx_smolvlm.backends import cpu

    model, processor = loaded
    image = picture(300, 300)
    loops = []
    host_loop = cpu.HostLanguageModel.greedy_tokens
    monkeypatch.setattr(
        cpu.HostLanguageModel, "greedy_tokens", lambda *a: loops.append(1) or host_loop(*a)
    )
    caches = PromptCache(model), PromptCache(model)
    host = generate(model, processor, "Describe.", image, max_tokens=16, prompt_cache=caches[0])
    assert loops == [1]
    mlx_lm = generate(
        model, processor, "Describe.", image, max_tokens=16, prompt_cache=caches[1],
        repetition_penalty=1.0,
    )  # fmt: skip
    assert loops == [1] and host.generation_tokens == 16
    assert host.token_ids == mlx_lm.token_ids and host.text == mlx_lm.text
    # Each cache remembers the tokens it holds (the two loops leave it one position apart): a
    # follow-up turn on either reuses it, with the same answer.
    follow = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}
    ]
    turns = [
        generate(model, processor, follow, image, max_tokens=4, prompt_cache=cache)
        for cache in caches
    ]
    assert turns[0].token_ids == turns[1].token_ids
    assert turns[0].prompt_tokens == turns[1].prompt_tokens < host.prompt_tokens // 10
    # Sampling, a repetition penalty or a quantized cache keep mlx-lm's loop.
    generate(model, processor, "Describe.", image, max_tokens=3, temperature=0.7, seed=1)
    generate(model, processor, "Describe.", image, max_tokens=3, kv_bits=8)
    assert loops == [1, 1, 1]  # the two follow-up turns', no others


def test_bounded_and_quantized_kv_cache_generate(loaded):
    model, processor = loaded
    image = picture(300, 300)
    one_tile = {"do_image_splitting": False}  # 64 image tokens, ~80 prompt tokens
    bounded = generate(
        model, processor, "Describe.", image, max_tokens=40, max_kv_size=100, **one_tile
    )
    assert bounded.generation_tokens >= 1
    quantized = generate(model, processor, "Describe.", image, max_tokens=6, kv_bits=8)
    exact = generate(model, processor, "Describe.", image, max_tokens=6)
    assert quantized.generation_tokens >= 1 and exact.generation_tokens >= 1
    with pytest.raises(ValueError, match="max_kv_size 50 cannot hold"):
        generate(model, processor, "Describe.", image, max_tokens=6, max_kv_size=50, **one_tile)


def test_prompt_longer_than_a_bounded_kv_cache(loaded, monkeypatch):
    """max_kv_size below the prompt's length: the rotating cache's window mask (a 2-D array)
    reaches the host attention, which computes what MLX's does."""
    model, processor = loaded
    prompt = " ".join(["lighthouse keeper"] * 150)
    kwargs = {"max_tokens": 8, "max_kv_size": 128, "prefill_step_size": 64}
    host = generate(model, processor, prompt, **kwargs)
    assert host.prompt_tokens > 128 and host.generation_tokens >= 1
    monkeypatch.setenv("MLX_SMOLVLM_HOST_KERNELS", "0")
    assert generate(model, processor, prompt, **kwargs).token_ids == host.token_ids


def run_cli(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_cli_generates_with_stats(checkpoint, tmp_path):
    path = tmp_path / "picture.png"
    picture().save(path)
    out = run_cli(
        "mlx_smolvlm.generate",
        "--model", str(checkpoint[0]), "--image", str(path),
        "--prompt", "What is this?", "--max-tokens", "5", "--verbose",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Prompt:" in out.stdout and "tokens-per-sec" in out.stdout
    assert "Peak memory:" in out.stdout


def test_cli_missing_image_and_model_fail_clearly(checkpoint, tmp_path):
    out = run_cli("mlx_smolvlm.generate", "--model", str(checkpoint[0]), "--image", "nope.png")
    assert out.returncode != 0 and "nope.png" in out.stderr
    out = run_cli("mlx_smolvlm.generate", "--model", str(tmp_path / "missing"))
    assert out.returncode != 0 and "missing" in out.stderr


def test_cli_help_documents_every_flag():
    out = run_cli("mlx_smolvlm.generate", "--help")
    for flag in ("--model", "--image", "--prompt", "--system", "--max-tokens", "--temperature",
                 "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--seed",
                 "--adapter-path", "--resize-shape", "--no-image-splitting", "--kv-bits",
                 "--max-kv-size", "--verbose"):  # fmt: skip
        assert flag in out.stdout


def test_chat_repl_through_stdin(checkpoint, tmp_path):
    path = tmp_path / "picture.png"
    picture(400, 300).save(path)
    stdin = f"/image {path}\nWhat is this?\nAnd now?\n/image nothing.png\n/reset\nHi\n/exit\n"
    out = run_cli(
        "mlx_smolvlm.chat", "--model", str(checkpoint[0]), "--max-tokens", "4", stdin=stdin
    )
    assert out.returncode == 0, out.stderr
    assert "1 image(s) attached" in out.stdout
    assert "nothing.png" in out.stderr  # the bad path is reported and the chat goes on
    assert "[conversation cleared]" in out.stdout


def next_token_kl(exact_logits, other_logits) -> float:
    log_p = exact_logits - mx.logsumexp(exact_logits, axis=-1)
    log_q = other_logits - mx.logsumexp(other_logits, axis=-1)
    return float(mx.sum(mx.exp(log_p) * (log_p - log_q)))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kv_cache_drift_is_small(loaded, bits):
    """kv_bits: the next-token distributions over 16 greedy steps after an image prompt stay
    close to those of the exact cache (README reports the drift at the 256M shape)."""
    model, processor = loaded
    inputs = prepare_inputs(processor, "Describe.", picture(300, 300), None)
    ids = [int(t) for t in inputs["input_ids"][0]]
    embeddings = model.embed([ids], inputs["pixel_values"], inputs["pixel_attention_mask"])
    language_model = model.language_model
    head_dim = model.config.text_config.head_dim
    exact, quantized = language_model.make_cache(), language_model.make_cache()
    logits = language_model(cache=exact, input_embeddings=embeddings)
    language_model(cache=quantized, input_embeddings=embeddings)
    quantized = [c.to_quantized(group_size=min(64, head_dim), bits=bits) for c in quantized]
    token, kls, agree = int(mx.argmax(logits[0, -1])), [], 0
    for _ in range(16):
        exact_logits = language_model(mx.array([[token]]), cache=exact)[0, -1]
        quantized_logits = language_model(mx.array([[token]]), cache=quantized)[0, -1]
        kls.append(next_token_kl(exact_logits, quantized_logits))
        token = int(mx.argmax(exact_logits))
        agree += token == int(mx.argmax(quantized_logits))
    print(f"kv_bits {bits}: mean KL {np.mean(kls):.1e}, top-1 {agree}/16")
    assert max(kls) < {8: 1e-4, 4: 1e-2}[bits]  # measured: 4e-7 and 4e-4 (mean)
    assert agree >= {8: 15, 4: 12}[bits]
