"""Tokenizer, chat template, prompt expansion and the Processor, against transformers where present."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from conftest import real_model_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from mlx_smolvlm.processing.image import ImageProcessor
from mlx_smolvlm.processing.processor import (
    IMAGE_TOKEN,
    Processor,
    Tokenizer,
    build_messages,
    image_prompt_string,
)

TEXTS = [
    "Hello world! It's 2024-05-17, we've 12345 items.",
    "  leading spaces\n\ntwo newlines\ttab",
    "café naïve 😀 日本語 — “quotes”",
    "<|im_start|>User:<image> What's this?<end_of_utterance>\nAssistant: A cat.<|im_end|>",
    "<fake_token_around_image><row_1_col_2><image><image>\n\n<global-img>",
    "don 't do it , ok ? yes !",
]


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random noise with a drawn shape, converted to `mode`."""
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    ImageDraw.Draw(rgba).rectangle((0, 0, width // 3, height // 3), fill=(10, 200, 90, 100))
    return rgba if mode == "RGBA" else rgba.convert(mode)


@functools.lru_cache(maxsize=1)
def ours_256m() -> Processor:
    return Processor.from_pretrained(real_model_dir())


@functools.lru_cache(maxsize=1)
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(real_model_dir())


@functools.lru_cache(maxsize=2)
def reference_processor(geometry: str = "256m"):
    """transformers' Idefics3Processor built directly (AutoProcessor needs torchvision)."""
    pytest.importorskip("transformers")
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

    directory = real_model_dir()
    config = json.loads((directory / "preprocessor_config.json").read_text())
    for key in ("image_processor_type", "processor_class"):
        config.pop(key)
    seq_len = 64
    if geometry == "2.2b":
        config.update(size={"longest_edge": 1536}, max_image_size={"longest_edge": 384})
        seq_len = 81
    template = json.loads((directory / "chat_template.json").read_text())["chat_template"]
    return Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(**config),
        tokenizer=hf_tokenizer(),
        image_seq_len=seq_len,
        chat_template=template,
    )


def ours_for(geometry: str) -> Processor:
    if geometry == "256m":
        return ours_256m()
    base = ours_256m()
    return Processor(
        tokenizer=base.tokenizer,
        image_processor=ImageProcessor(
            size={"longest_edge": 1536}, max_image_size={"longest_edge": 384}
        ),
        image_seq_len=81,
        chat_template=base.chat_template,
    )


def assert_same_inputs(ref_out, ours_out):
    np.testing.assert_array_equal(ours_out["input_ids"], ref_out["input_ids"])
    np.testing.assert_array_equal(ours_out["attention_mask"], ref_out["attention_mask"])
    if "pixel_values" in ref_out:
        assert ours_out["pixel_values"].shape == ref_out["pixel_values"].shape
        assert np.abs(ours_out["pixel_values"] - ref_out["pixel_values"]).max() == 0
        np.testing.assert_array_equal(
            ours_out["pixel_attention_mask"], ref_out["pixel_attention_mask"].astype(bool)
        )
    else:
        assert "pixel_values" not in ours_out


# ---------------------------------------------------------------------------
# Tokenizer


@pytest.mark.torch
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(text):
    ours, ref = ours_256m().tokenizer, hf_tokenizer()
    ids = ours.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert ids == ref(text)["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
            ids, skip_special_tokens=skip
        )
    assert ours.batch_decode([ids, ids[:3]]) == ref.batch_decode(
        [ids, ids[:3]], skip_special_tokens=True
    )


@pytest.mark.torch
def test_non_ascii_numerals_follow_tokenizer_json():
    """transformers 5 rebuilds GPT2Tokenizer's pre-tokenizer as plain ByteLevel, dropping the
    checkpoint's Digits(individual_digits) step; ids differ only for a space before a non-ASCII
    numeral (ASCII digits never merge). We keep the checkpoint's tokenizer.json, as training did."""
    tokenizers = pytest.importorskip("tokenizers")
    ours, ref = ours_256m().tokenizer, hf_tokenizer()
    raw = tokenizers.Tokenizer.from_file(str(real_model_dir() / "tokenizer.json"))
    text = "half ½ and cubed ³"
    ids = ours.encode(text)
    assert ids == raw.encode(text).ids
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text
    assert ours.encode("ASCII digits 12 345") == ref("ASCII digits 12 345")["input_ids"]


@pytest.mark.torch
def test_clean_up_setting_matches_transformers():
    ref = hf_tokenizer()
    ours = ours_256m().tokenizer
    config = json.loads((real_model_dir() / "tokenizer_config.json").read_text())
    eager = Tokenizer(ours.backend, {**config, "clean_up_tokenization_spaces": True})
    ids = ours.encode(TEXTS[-1])
    # transformers 5 ignores the clean-up for BPE models; so do we.
    assert eager.decode(ids) == ref.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=True
    )
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.torch
def test_special_ids_match_transformers():
    ours, ref = ours_256m().tokenizer, hf_tokenizer()
    assert ours.bos_token_id == ref.bos_token_id == 1
    assert ours.pad_token_id == ref.pad_token_id == 2
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.all_special_ids == ref.all_special_ids
    assert ours.vocab_size == len(ref) == 49280
    tokens = ["<image>", "<global-img>", "<row_3_col_4>", "hello", "not-a-token-xyz"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("<end_of_utterance>") == 49279


def test_stop_tokens(smolvlm_256m_dir):
    tokenizer = Tokenizer.from_pretrained(smolvlm_256m_dir)
    assert tokenizer.eos_token_ids == {49279}
    extra = Tokenizer(
        tokenizer.backend, {"eos_token": "<|im_end|>"}, None, {"eos_token_id": [0, 49279]}
    )
    assert extra.eos_token_ids == {0, 2, 49279}
    assert extra.pad_token_id == 2  # no pad token: falls back to eos


def test_streaming_detokenizer(smolvlm_256m_dir):
    tokenizer = Tokenizer.from_pretrained(smolvlm_256m_dir)
    text = "Émoji 😀 time:\n日本語 text ½ — done.\nlast line"
    ids = tokenizer.encode(text)
    ids = ids[:5] + [49279, 49190] + ids[5:]  # special tokens are skipped
    detok = tokenizer.detokenizer
    segments = []
    for token in ids:
        detok.add_token(token)
        segments.append(detok.last_segment)
        assert "\ufffd" not in segments[-1]
    detok.finalize()
    segments.append(detok.last_segment)
    assert "".join(segments) == detok.text == text == tokenizer.decode(ids)
    assert detok.tokens == ids
    detok.reset()
    assert (detok.text, detok.tokens, detok.last_segment) == ("", [], "")


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------
# Chat template

CONVERSATIONS = [
    build_messages("What is in this image?", 1),
    build_messages("Compare these two.", 2, system="You are a careful assistant."),
    [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]}],
    [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Caption it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red car."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the color of the sky?"}]},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "Text only, no image."}]}],
]


@pytest.mark.torch
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(index, add_generation_prompt):
    messages = CONVERSATIONS[index]
    expected = reference_processor().apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt
    )
    assert (
        ours_256m().apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        == expected
    )


@pytest.mark.torch
def test_smolvlm2_template_matches_transformers():
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    messages = CONVERSATIONS[3] + [{"role": "user", "content": "plain string content"}]
    expected = reference_processor().apply_chat_template(
        messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True
    )
    assert (
        ours_256m().apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE) == expected
    )


def test_chat_template_string_content_and_known_output(smolvlm_256m_dir):
    processor = Processor.from_pretrained(smolvlm_256m_dir)
    as_string = [{"role": "user", "content": "Hi there"}]
    as_blocks = [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    assert processor.apply_chat_template(as_string) == processor.apply_chat_template(as_blocks)
    assert processor.apply_chat_template(build_messages("Describe.", 1)) == (
        "<|im_start|>User:<image>Describe.<end_of_utterance>\nAssistant:"
    )


def test_chat_template_tokenize(smolvlm_256m_dir):
    processor = Processor.from_pretrained(smolvlm_256m_dir)
    text_only = build_messages("Hello")
    # A batch of one, as transformers returns it.
    assert processor.apply_chat_template(text_only, tokenize=True) == [
        processor.tokenizer.encode(processor.apply_chat_template(text_only))
    ]
    image = noise_image(40, 30)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}],
        }
    ]
    ids = processor.apply_chat_template(messages, tokenize=True)
    expected = processor(processor.apply_chat_template(messages), images=[image])["input_ids"][0]
    assert ids == [expected.tolist()]
    with pytest.raises(ValueError, match="placeholder"):
        processor.apply_chat_template(build_messages("Hi", 1), tokenize=True)  # no image source


def test_openai_image_url_blocks_render_as_images(smolvlm_256m_dir):
    processor = Processor.from_pretrained(smolvlm_256m_dir)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]
    assert IMAGE_TOKEN in processor.apply_chat_template(messages)


def test_template_raise_exception_helper(smolvlm_256m_dir):
    processor = Processor.from_pretrained(smolvlm_256m_dir)
    template = "{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}ok"
    assert processor.apply_chat_template(build_messages("x"), chat_template=template) == "ok"
    with pytest.raises(Exception, match="only one message"):
        processor.apply_chat_template(build_messages("x", system="s"), chat_template=template)


# ---------------------------------------------------------------------------
# Processor parity


def prompt(processor: Processor, text: str, num_images: int) -> str:
    return processor.apply_chat_template(build_messages(text, num_images))


@pytest.mark.torch
@pytest.mark.parametrize("geometry", ["256m", "2.2b"])
def test_processor_matches_reference(geometry):
    ref, ours = reference_processor(geometry), ours_for(geometry)
    images = [
        noise_image(640, 480),
        noise_image(7, 300, "L"),
        noise_image(512, 256, "RGBA", seed=1),
        noise_image(1500, 200, "P", seed=2),
        noise_image(90, 700, "LA", seed=3),
    ]
    one = prompt(ours, "Describe the image.", 1)
    two = prompt(ours, "Compare.", 2)
    cases = [
        ([one], images[:1], {}),  # one image
        ([two], images[1:3], {}),  # several images in one prompt
        ([one, two, one], images[1:], {}),  # a batch: flat list spread by placeholder counts
        ([two, one], [images[:2], images[4:5]], {}),  # a batch as a list of lists
        ([two], images[3:5], {"do_image_splitting": False}),  # splitting off
        (
            [one, prompt(ours, "No image here.", 0)],
            [[images[0]], []],
            {},
        ),  # a text-only prompt in the batch
    ]
    for texts, batch, kwargs in cases:
        expected = ref(
            text=texts,
            images=batch,
            padding=True,
            padding_side="left",
            return_tensors="np",
            **kwargs,
        )
        assert_same_inputs(expected, ours(texts, images=batch, **kwargs))


@pytest.mark.torch
def test_processor_overrides_match_reference():
    ref, ours = reference_processor(), ours_256m()
    texts, images = [prompt(ours, "Hi", 1)], [noise_image(700, 300)]
    expected = ref(text=texts, images=images, size={"longest_edge": 1024}, return_tensors="np")
    assert_same_inputs(expected, ours(texts, images=images, longest_edge=1024))


@pytest.mark.torch
def test_text_only_batch_matches_reference():
    ref, ours = reference_processor(), ours_256m()
    texts = [
        prompt(ours, "Short.", 0),
        prompt(ours, "A much longer prompt, with several more words.", 0),
    ]
    expected = ref(text=texts, padding=True, padding_side="left", return_tensors="np")
    assert_same_inputs(expected, ours(texts))


@pytest.mark.torch
def test_reference_also_rejects_images_without_placeholder():
    with pytest.raises(ValueError):
        reference_processor()(text=["no placeholder"], images=[noise_image(10, 10)])
    with pytest.raises(ValueError, match="no <image> placeholder"):
        ours_256m()("no placeholder", images=[noise_image(10, 10)])


# ---------------------------------------------------------------------------
# Prompt expansion and errors (no reference needed)


def test_image_prompt_string_layout():
    assert (
        image_prompt_string(0, 0, 2)
        == "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
    )
    split = image_prompt_string(2, 1, 1)
    assert split == (
        "<fake_token_around_image><row_1_col_1><image>\n"
        "<fake_token_around_image><row_2_col_1><image>\n"
        "\n<fake_token_around_image><global-img><image><fake_token_around_image>"
    )


def test_placeholder_count_errors(smolvlm_256m_dir):
    processor = Processor.from_pretrained(smolvlm_256m_dir)
    image = noise_image(10, 10)
    with pytest.raises(ValueError, match=r"more <image> placeholders \(2.*images \(1\)"):
        processor("<image><image>", images=[image])
    with pytest.raises(ValueError, match=r"fewer <image> placeholders \(1.*images \(2\)"):
        processor("<image>", images=[image, image])
    with pytest.raises(ValueError, match="no <image> placeholder"):
        processor("plain text", images=[image])
    with pytest.raises(ValueError, match=r"placeholders \(1.*images \(0\)"):
        processor("<image> but nothing", images=None)
    with pytest.raises(ValueError, match="Prompt 1 has 1 <image> placeholder.*0 image"):
        processor(["<image>", "<image>"], images=[[image], []])
    with pytest.raises(ValueError, match="2 image lists for 1 prompts"):
        processor("<image>", images=[[image], [image]])


def test_return_types_and_left_padding(smolvlm_256m_dir):
    mx = pytest.importorskip("mlx.core")
    processor = Processor.from_pretrained(smolvlm_256m_dir)
    texts = ["<image>short", "<image>a longer prompt here"]
    images = [noise_image(20, 20), noise_image(30, 20)]
    out = processor(texts, images=images, return_tensors="mlx", do_image_splitting=False)
    assert isinstance(out["input_ids"], mx.array) and out["input_ids"].dtype == mx.int32
    assert out["pixel_values"].shape == (2, 1, 3, 512, 512)
    ids = np.array(out["input_ids"])
    mask = np.array(out["attention_mask"])
    pad = mask.shape[1] - mask[0].sum()
    assert (
        pad > 0
        and (ids[0, :pad] == processor.tokenizer.pad_token_id).all()
        and not mask[0, :pad].any()
    )
    lists = processor(
        texts, images=images, return_tensors=None, padding=False, do_image_splitting=False
    )
    assert [len(x) for x in lists["input_ids"]] == [mask[0].sum(), mask[1].sum()]
    with pytest.raises(ValueError, match="padding"):
        processor(texts, images=images, padding=False, do_image_splitting=False)


def test_image_sources_may_be_paths_and_arrays(smolvlm_256m_dir, tmp_path):
    processor = Processor.from_pretrained(smolvlm_256m_dir)
    image = noise_image(50, 40)
    image.save(tmp_path / "a.png")
    kwargs = {"do_image_splitting": False}
    from_pil = processor("<image>", images=[image], **kwargs)
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), np.asarray(image)):
        out = processor("<image>", images=source, **kwargs)
        np.testing.assert_array_equal(out["pixel_values"], from_pil["pixel_values"])


def test_from_pretrained_fallbacks(smolvlm_256m_dir, tmp_path):
    # Links to the real files minus processor_config.json and chat_template.json.
    for file in smolvlm_256m_dir.iterdir():
        if file.name not in ("processor_config.json", "chat_template.json"):
            (tmp_path / file.name).symlink_to(file)
    processor = Processor.from_pretrained(tmp_path)
    assert processor.image_seq_len == 64  # (512 // 16) ** 2 / 4 ** 2 from config.json
    assert processor.chat_template == Processor.from_pretrained(smolvlm_256m_dir).chat_template
    assert (processor.model_type, processor.image_token_id) == ("idefics3", 49190)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['role'] }}")
    assert Processor.from_pretrained(tmp_path).apply_chat_template(build_messages("x")) == "user"


def test_from_pretrained_errors_and_overrides(tmp_path, smolvlm_256m_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Processor.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="bogus"):
        Processor.from_pretrained(smolvlm_256m_dir, bogus=1)
    processor = Processor.from_pretrained(smolvlm_256m_dir, image_seq_len=81, chat_template="T")
    assert (processor.image_seq_len, processor.chat_template) == (81, "T")


def test_image_token_id_must_agree_with_tokenizer(smolvlm_256m_dir):
    base = Processor.from_pretrained(smolvlm_256m_dir)
    with pytest.raises(ValueError, match="49190"):
        Processor(base.tokenizer, base.image_processor, 64, image_token_id=5)


# ---------------------------------------------------------------------------
# Property: the processor emits exactly as many <image> tokens as the model makes features


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.tuples(st.integers(1, 1200), st.integers(1, 1200)), min_size=1, max_size=2),
    mode=st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "1"]),
    split=st.booleans(),
    upscale=st.booleans(),
)
def test_image_token_count_matches_tiles(sizes, mode, split, upscale):
    processor = ours_256m()
    images = [noise_image(w, h, mode) for w, h in sizes]
    text = processor.apply_chat_template(build_messages("Describe.", len(images)))
    out = processor(text, images=images, do_image_splitting=split, upscale=upscale)
    rows_cols = processor.image_processor([images], do_image_splitting=split, upscale=upscale)
    tiles = sum(r * c + 1 if r else 1 for r, c in zip(rows_cols["rows"][0], rows_cols["cols"][0]))
    assert (out["input_ids"] == processor.image_token_id).sum() == tiles * processor.image_seq_len
    # Real frames are never all zero (normalized pixels are never exactly 0); padding frames are.
    real_frames = out["pixel_values"][0].reshape(out["pixel_values"].shape[1], -1).any(axis=1).sum()
    assert real_frames == tiles


def test_clean_up_spaces_on_a_non_bpe_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "it": 1, "'s": 2, "fine": 3, ",": 4, "ok": 5, "?": 6}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    ids = [1, 2, 3, 4, 5, 6]
    assert Tokenizer(backend).decode(ids) == "it 's fine , ok ?"
    assert (
        Tokenizer(backend, {"clean_up_tokenization_spaces": True}).decode(ids) == "it's fine, ok?"
    )
