"""Batched generation: greedy parity with one-prompt `generate`, stops, sampling parameters."""

from __future__ import annotations

import mlx.core as mx
import pytest
from PIL import Image, ImageDraw
from reference import save_hf_checkpoint, tiny_config_for_real_tokenizer

from mlx_smolvlm import load
from mlx_smolvlm.backends import cpu, decoder
from mlx_smolvlm.generate import generate
from mlx_smolvlm.generation.batch import (
    SamplingParams,
    batch_generate,
    batch_stream_generate,
    render_batch,
)

pytest.importorskip("transformers")
pytest.importorskip("torch")

# The real 256M processor settings (2048 longest edge, 512 tiles) without upscaling: a 400px
# image stays one tile, 1024px makes 2x2 tiles + the global view, 2048px makes 4x4 + 1.
NO_UPSCALE = {"upscale": False}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A tiny random SmolVLM with the real 256M tokenizer, chat template and processor."""
    from conftest import real_model_dir

    shared = real_model_dir("SmolVLM-256M-Instruct")
    path = tmp_path_factory.mktemp("tiny-smolvlm-batch")
    save_hf_checkpoint(path, tiny_config_for_real_tokenizer(), seed=7, tokenizer_dir=shared)
    return load(path)


def picture(size: int, hue: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (hue, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 8, size // 6, size // 2, size // 2), fill=(240, 200, hue))
    draw.rectangle((size // 2, size // 3, size - 10, size - 20), fill=(200, 30, 60))
    return image


def test_batch_with_1_5_and_17_tiles_matches_single_generate(loaded):
    model, processor = loaded
    prompts = [
        "What is in this image?",
        "Describe the picture in detail, please.",
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look:"},
                    {"type": "image", "image": picture(2048, 20)},
                    {"type": "text", "text": "Which colours?"},
                ],
            }
        ],
        "Say hello.",
    ]
    images = [picture(400, 200), [picture(1024, 120)], None, None]
    inputs = render_batch(processor, prompts, images, **NO_UPSCALE)
    tiles = (inputs["pixel_values"].reshape(4, 17, -1) != 0).any(axis=2).sum(axis=1)
    assert tiles.tolist() == [1, 5, 17, 0]
    assert inputs["attention_mask"][3].sum() < inputs["attention_mask"][2].sum()  # left-padded

    batch = batch_generate(model, processor, prompts, images, max_tokens=12, **NO_UPSCALE)
    for prompt, image, result in zip(prompts, images, batch):
        alone = generate(model, processor, prompt, image, max_tokens=12, **NO_UPSCALE)
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text
        assert result.finish_reason == alone.finish_reason
        assert result.prompt_tokens == alone.prompt_tokens


def test_batch_of_one_decodes_as_generate_does(loaded, monkeypatch):
    """A single prompt (the server's usual case) takes generate's decode path: on the CPU
    backend the host decode step, not the batched MLX one."""
    model, processor = loaded
    steps = []
    host_step = cpu.decode_step
    monkeypatch.setattr(cpu, "decode_step", lambda *a: steps.append(1) or host_step(*a))
    [result] = batch_generate(model, processor, ["What is this?"], [picture(400, 60)], max_tokens=8)
    alone = generate(model, processor, "What is this?", picture(400, 60), max_tokens=8)
    assert result.token_ids == alone.token_ids and result.text == alone.text
    if mx.default_device() == mx.cpu and decoder.supported(model.language_model):
        assert len(steps) >= 2 * (len(alone.token_ids) - 1)  # both runs decoded on the host


def test_per_prompt_max_tokens_and_early_stop(loaded):
    model, processor = loaded
    prompts = ["One.", "Two words.", "Three words here."]
    sampling = [SamplingParams(max_tokens=n) for n in (3, 9, 6)]
    results = batch_generate(model, processor, prompts, sampling=sampling, eos_token_ids=())
    assert [r.generation_tokens for r in results] == [3, 9, 6]
    assert all(r.finish_reason == "length" for r in results)
    for prompt, params, result in zip(prompts, sampling, results):
        alone = generate(model, processor, prompt, max_tokens=params.max_tokens)
        assert alone.token_ids == result.token_ids[: len(alone.token_ids)]


def test_stop_string_cuts_text_and_streams_nothing_after_it(loaded):
    model, processor = loaded
    full = batch_generate(model, processor, ["Tell me a story."], max_tokens=16, eos_token_ids=())
    text = full[0].text
    assert len(text) > 6
    stop = text[3:6]
    cut = text.find(stop)
    pieces = [
        r.text
        for _, r in batch_stream_generate(
            model, processor, ["Tell me a story."], max_tokens=16, stop=[stop], eos_token_ids=()
        )
    ]
    assert "".join(pieces) == text[:cut]


def test_sampling_is_seeded_and_rows_may_differ(loaded):
    model, processor = loaded
    prompts = ["Hi", "Hi"]
    sampling = [SamplingParams(max_tokens=10), SamplingParams(max_tokens=10, temperature=1.0)]

    def run(seed):
        results = batch_generate(
            model, processor, prompts, sampling=sampling, seed=seed, eos_token_ids=()
        )
        return [r.token_ids for r in results]

    first, second, other = run(5), run(5), run(6)
    assert first == second
    assert first[0] == other[0]  # the greedy row ignores the seed
    assert first[1] != other[1]


def test_cancelled_sequence_leaves_the_others_running(loaded):
    model, processor = loaded
    seen = []
    for i, result in batch_stream_generate(
        model,
        processor,
        ["First prompt", "Second"],
        max_tokens=8,
        eos_token_ids=(),
        should_stop=lambda i: i == 0,
    ):
        if result.finish_reason:
            seen.append((i, result.finish_reason, result.generation_tokens))
    assert sorted(seen) == [(0, "cancelled", 1), (1, "length", 8)]


def test_mismatched_lengths_are_rejected(loaded):
    model, processor = loaded
    with pytest.raises(ValueError, match="image entries"):
        batch_generate(model, processor, ["a", "b"], images=[None])
    with pytest.raises(ValueError, match="sampling entries"):
        batch_generate(model, processor, ["a"], sampling=[SamplingParams(), SamplingParams()])
