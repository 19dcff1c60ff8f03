"""The peers' calling conventions: mlx-vlm's prompt flow, transformers' processor keywords,
and BOS handling for tokenizers that add one (Idefics3-8B-Llama3 style)."""

from __future__ import annotations

import io
import json
import re
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from conftest import real_model_dir
from PIL import Image, ImageDraw
from reference import hf_processor, save_hf_checkpoint, tiny_config_for_real_tokenizer

import mlx_smolvlm
from mlx_smolvlm import apply_chat_template, generate, load, load_config, stream_generate
from mlx_smolvlm.generation import prepare_inputs
from mlx_smolvlm.processing import Processor

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def picture(width: int = 300, height: int = 200) -> Image.Image:
    image = Image.new("RGB", (width, height), (30, 90, 160))
    ImageDraw.Draw(image).ellipse((40, 30, 200, 180), fill=(240, 200, 40))
    return image


def same_outputs(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    for key in ref:
        expected = np.asarray(ref[key])
        got = np.asarray(ours[key])
        assert got.shape == expected.shape, key
        np.testing.assert_array_equal(got.astype(expected.dtype), expected, err_msg=key)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random SmolVLM with SmolVLM-256M-Instruct's tokenizer, template and processor."""
    path = tmp_path_factory.mktemp("tiny")
    save_hf_checkpoint(
        path, tiny_config_for_real_tokenizer(), seed=2, tokenizer_dir=real_model_dir()
    )
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(checkpoint)


# ---------------------------------------------------------------------------
# mlx-vlm's flow


def test_mlx_vlm_flow_renders_once(checkpoint, loaded):
    model, processor = loaded
    image = picture()
    plain = generate(model, processor, "Describe it.", [image], max_tokens=6)
    config = load_config(checkpoint)
    assert config["model_type"] == "idefics3" and isinstance(config, dict)
    for cfg in (model.config, config):
        prompt = apply_chat_template(processor, cfg, "Describe it.", num_images=1)
        assert prompt == "<|im_start|>User:<image>Describe it.<end_of_utterance>\nAssistant:"
        # Positional image, as mlx-vlm scripts call it; the rendered prompt is used as it is.
        result = generate(model, processor, prompt, image, verbose=False, max_tokens=6)
        assert result.token_ids == plain.token_ids and result.text == plain.text
        streamed = list(stream_generate(model, processor, prompt, image, max_tokens=6))
        assert "".join(r.text for r in streamed) == plain.text
    # Without config, and with messages.
    assert apply_chat_template(processor, "Describe it.", num_images=1) == prompt
    messages = apply_chat_template(
        processor, None, "Describe it.", num_images=1, return_messages=True
    )
    assert apply_chat_template(processor, model.config, messages) == prompt
    assert (
        prepare_inputs(processor, prompt, [image])["input_ids"].tolist()
        == prepare_inputs(processor, "Describe it.", [image])["input_ids"].tolist()
    )


def test_print_of_a_result_is_its_text(loaded):
    model, processor = loaded
    result = generate(model, processor, "Hi", max_tokens=4)
    out = io.StringIO()
    with redirect_stdout(out):
        print(result)
    assert out.getvalue() == result.text + "\n"


def test_rendered_prompt_errors(loaded):
    model, processor = loaded
    prompt = apply_chat_template(processor, model.config, "Describe it.", num_images=1)
    with pytest.raises(
        ValueError, match="system cannot be added to a prompt that is already rendered"
    ):
        generate(model, processor, prompt, picture(), system="Be brief.", max_tokens=2)
    with pytest.raises(ValueError, match="more <image> placeholders"):
        generate(model, processor, prompt, max_tokens=2)  # the rendered prompt wants an image
    with pytest.raises(TypeError, match="config must be a ModelConfig, a dict or None"):
        apply_chat_template(processor, 3, "x")
    with pytest.raises(TypeError, match="needs a prompt"):
        apply_chat_template(processor, model.config)
    with pytest.raises(ValueError, match="num_images must be a non-negative integer, got -1"):
        apply_chat_template(processor, model.config, "x", num_images=-1)


def test_top_level_names():
    for name in ("load", "load_config", "generate", "stream_generate", "apply_chat_template"):
        assert name in mlx_smolvlm.__all__ and callable(getattr(mlx_smolvlm, name))


# ---------------------------------------------------------------------------
# transformers' processor keywords, against transformers' Idefics3Processor


@pytest.fixture(scope="module")
def processors():
    directory = real_model_dir()
    return Processor.from_pretrained(directory), hf_processor(directory)


def chat(image=None, text="What is this?") -> list[dict]:
    content = [{"type": "image", "image": image}] if image is not None else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"add_special_tokens": False},
        {"padding": "max_length", "max_length": 1200, "padding_side": "left"},
        {"padding": "max_length", "max_length": 1200, "padding_side": "right"},
        {"size": {"longest_edge": 700}},
        {"size": {"longest_edge": 1024}, "max_image_size": {"longest_edge": 512}},
        {"do_image_splitting": False},
        {"do_resize": False, "do_image_splitting": False},
    ],
    ids=lambda kw: ",".join(kw) or "defaults",
)
def test_processor_keywords_match_transformers(processors, kwargs):
    ours, ref = processors
    text = ours.apply_chat_template(chat(picture()))
    expected = ref(text=[text], images=[picture()], return_tensors="np", **kwargs)
    same_outputs(ours([text], images=[picture()], **kwargs), expected)


def test_chat_template_return_dict_with_images_in_messages(processors):
    ours, ref = processors
    batch = [chat(picture()), chat(picture(120, 300), "And this one, longer?")]
    for conversation in (batch[0], batch):
        for extra in (
            {},
            {"size": {"longest_edge": 1024}},
            {"padding": True, "padding_side": "left"},
        ):
            kwargs = {"tokenize": True, "return_dict": True, "return_tensors": "np", **extra}
            if conversation is batch and "padding" not in extra:
                kwargs.update(padding=True, padding_side="left")
            expected = ref.apply_chat_template(conversation, add_generation_prompt=True, **kwargs)
            same_outputs(ours.apply_chat_template(conversation, **kwargs), expected)
    ids = ours.apply_chat_template(batch[0], tokenize=True)
    assert ids == ref.apply_chat_template(batch[0], tokenize=True, add_generation_prompt=True)
    plain = ours.apply_chat_template(batch[0], tokenize=True, return_dict=True)
    assert isinstance(plain["input_ids"], list)  # return_tensors=None: lists, as transformers
    pt = ours.apply_chat_template(batch[0], tokenize=True, return_dict=True, return_tensors="pt")
    assert isinstance(pt["input_ids"], torch.Tensor) and isinstance(
        pt["pixel_values"], torch.Tensor
    )


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_channels_first_arrays(processors, kind):
    ours, ref = processors
    array = np.asarray(picture(120, 90)).transpose(2, 0, 1).copy()  # CHW
    image = torch.from_numpy(array) if kind == "torch" else array
    text = ours.apply_chat_template(chat(picture()))
    expected = ref(text=[text], images=[image], return_tensors="np")
    same_outputs(ours([text], images=[image]), expected)


def test_text_keywords_match_transformers(processors):
    ours, ref = processors
    texts = ["hello there, how are you doing today?", "a"]
    for kwargs in (
        {"truncation": True, "max_length": 4, "padding": True, "padding_side": "right"},
        {"truncation": True, "max_length": 4, "padding": "max_length", "padding_side": "left"},
        {"padding": "longest", "padding_side": "right"},
        {"padding": "max_length", "max_length": 12, "padding_side": "right"},
    ):
        same_outputs(ours(texts, **kwargs), ref(text=texts, return_tensors="np", **kwargs))
    unpadded = ours(texts, padding=False, return_tensors=None)
    assert unpadded == dict(ref(text=texts, padding=False))


def test_decode_and_batch_decode(processors):
    ours, ref = processors
    inputs = ours(["<image>What is it? A cat.", "Short."], images=[[picture()], []])
    for skip in (True, False):
        expected = ref.batch_decode(inputs["input_ids"], skip_special_tokens=skip)
        assert ours.batch_decode(inputs["input_ids"], skip_special_tokens=skip) == expected
        assert ours.batch_decode(torch.from_numpy(inputs["input_ids"]), skip) == expected
        assert ours.decode(inputs["input_ids"][1], skip) == expected[1]


def test_images_without_text(processors):
    ours, ref = processors
    same_outputs(ours(images=[picture()]), ref(images=[picture()], return_tensors="np"))
    same_outputs(
        ours(picture()), ref(picture(), return_tensors="np")
    )  # positional, as transformers


def test_bad_processor_input_is_named(processors):
    ours, _ = processors
    text = ours.apply_chat_template(chat(picture()))
    with pytest.raises(ValueError, match="Give text, images or both"):
        ours()
    with pytest.raises(ValueError, match="text must be a string or a list of strings"):
        ours(3, images=[picture()])
    with pytest.raises(ValueError, match="would cut image tokens"):
        ours([text], images=[picture()], truncation=True, max_length=20)
    with pytest.raises(ValueError, match="padding must be True, False"):
        ours([text], images=[picture()], padding="most")
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        ours(["x"], padding_side="middle")
    with pytest.raises(
        ValueError, match="size must be a dict with a positive integer 'longest_edge'"
    ):
        ours([text], images=[picture()], size={"longest_edge": 0})
    with pytest.raises(ValueError, match="return_tensors must be"):
        ours(["x"], return_tensors="tf")
    with pytest.raises(TypeError, match="Unknown processor keyword argument\\(s\\): longest_egde"):
        ours(["x"], longest_egde=512)  # misspelled, and no image to use it on


# ---------------------------------------------------------------------------
# Tokenizers that add a BOS


def bos_checkpoint(directory: Path, style: str) -> Path:
    """SmolVLM-256M's tokenizer made to add "<|im_start|>" as its BOS: by tokenizer_config's
    add_bos_token without a tokenizer.json ("config"; transformers ignores the key beside a
    tokenizer.json), or by tokenizer.json's post-processor with a chat template that does not
    write the BOS itself ("llama3", as Idefics3-8B-Llama3's tokenizer)."""
    source = real_model_dir()
    for file in source.iterdir():
        shutil.copy(file, directory / file.name)
    if style == "config":
        config = json.loads((directory / "tokenizer_config.json").read_text())
        config["add_bos_token"] = True
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        (directory / "tokenizer.json").unlink()  # built from vocab.json + merges.txt
        return directory
    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A",
        pair="<|im_start|> $A <|im_start|> $B",
        special_tokens=[("<|im_start|>", 1)],
    )
    backend.save(str(directory / "tokenizer.json"))
    template = json.loads((directory / "chat_template.json").read_text())["chat_template"]
    template = template.removeprefix("<|im_start|>")
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("style", ["config", "llama3"])
def test_bos_is_added_as_transformers_adds_it(tmp_path, style):
    directory = bos_checkpoint(tmp_path, style)
    ours, ref = Processor.from_pretrained(directory), hf_processor(directory)
    assert (
        ours.tokenizer.encode("Hi there", add_special_tokens=True)
        == ref.tokenizer("Hi there").input_ids
    )
    assert ours.tokenizer.encode("Hi there", add_special_tokens=True)[0] == 1
    conversation = chat(picture())
    text = ours.apply_chat_template(conversation)
    assert text == ref.apply_chat_template(conversation, add_generation_prompt=True)
    # A direct processor call adds the BOS (twice when the text has one), as transformers does.
    same_outputs(
        ours([text], images=[picture()]), ref(text=[text], images=[picture()], return_tensors="np")
    )
    # The chat path adds it only when the rendered text does not start with it.
    kwargs = {"tokenize": True, "return_dict": True, "return_tensors": "np"}
    expected = ref.apply_chat_template(conversation, add_generation_prompt=True, **kwargs)
    same_outputs(ours.apply_chat_template(conversation, **kwargs), expected)
    ids = expected["input_ids"][0].tolist()
    assert ids[0] == 1 and ids[1] != 1
    # generate's inputs, from a plain prompt and from a rendered one (mlx-vlm's flow).
    for prompt in ("What is this?", text):
        assert ours.is_rendered(prompt) == (prompt == text)
        inputs = prepare_inputs(ours, prompt, [picture()])
        assert inputs["input_ids"][0].tolist() == ids


def test_add_bos_token_beside_tokenizer_json_is_ignored_as_in_transformers(tmp_path):
    directory = bos_checkpoint(tmp_path, "config")
    shutil.copy(real_model_dir() / "tokenizer.json", directory / "tokenizer.json")
    ours, ref = Processor.from_pretrained(directory), hf_processor(directory)
    assert (
        ours.tokenizer.encode("Hi there", add_special_tokens=True)
        == ref.tokenizer("Hi there").input_ids
    )
    assert ours.tokenizer.encode("Hi there", add_special_tokens=True)[0] != 1


# ---------------------------------------------------------------------------
# README's "Coming from" snippets


def readme_snippets(heading: str) -> list[str]:
    """The python code blocks of README.md's section `heading`."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("heading", ["Coming from mlx-vlm", "Coming from transformers"])
def test_readme_snippets_run(heading, checkpoint, tmp_path, monkeypatch, capsys):
    (snippet,) = readme_snippets(heading)
    code = snippet.replace('"HuggingFaceTB/SmolVLM-256M-Instruct"', repr(str(checkpoint)))
    assert code != snippet  # the snippet loads the model the test provides
    monkeypatch.chdir(tmp_path)
    picture(700, 500).save("photo.jpg")
    exec(compile(code, f"README.md ({heading})", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip()
    if heading == "Coming from transformers":
        assert "(2, 1200) (2, 13, 3, 512, 512)" in printed


def test_processor_call_options_follow_the_image_processor():
    import inspect

    from mlx_smolvlm.processing.image import ImageProcessor
    from mlx_smolvlm.processing.processor import _IMAGE_CALL_OPTIONS

    parameters = set(inspect.signature(ImageProcessor.__call__).parameters)
    assert _IMAGE_CALL_OPTIONS == parameters - {"self", "images"}
