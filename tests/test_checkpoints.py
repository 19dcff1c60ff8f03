"""Every model folder in ../shared/models, as the hub stores it, against transformers.

For each folder: random weights built by transformers from that exact config.json (kept
sparse: the project reads the file itself, not transformers' re-serialization), the
folder's own tokenizer and processor files, then logits within 1e-4 and processor outputs
identical to transformers' processor. SmolVLM-256M-Instruct's full shape is covered by
test_model.py::test_real_256m_shape_with_real_processor; here it checks the processor.

The one override, for test speed on a 2-core CPU: the decoder keeps 2 of its layers
(`text_config.num_hidden_layers`, a key present in every folder's config), and
granite-docling's vision tower 2 of its 12 (`vision_config.num_hidden_layers`, present
there). Widths, vocabularies, head counts, grids and every omitted key stay as stored.
SmolVLM2-500M ships no tokenizer: it uses SmolVLM-256M-Instruct's (the same vocabulary),
as shared/models/SOURCES.md says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import real_model_dir
from pages import picture
from PIL import Image
from reference import hf_logits, hf_model, hf_processor

from mlx_smolvlm import load
from mlx_smolvlm.generation import generate, prepare_inputs
from mlx_smolvlm.model.config import ModelConfig

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

# folder -> (folder with its tokenizer files, keys overridden for speed)
FOLDERS = {
    "SmolVLM-256M-Instruct": ("SmolVLM-256M-Instruct", None),
    "SmolVLM2-500M-Video-Instruct": ("SmolVLM-256M-Instruct", {"text_config.num_hidden_layers": 2}),
    "granite-docling-258M": (
        "granite-docling-258M",
        {"text_config.num_hidden_layers": 2, "vision_config.num_hidden_layers": 2},
    ),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def messages(image: Image.Image, text: str = "Convert this page to docling.") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": text}],
        }
    ]


def stored_config(name: str, override: dict | None) -> dict:
    """The folder's config.json as stored, with the documented speed override applied."""
    raw = json.loads((real_model_dir(name) / "config.json").read_text())
    for path, value in (override or {}).items():
        section, key = path.split(".")
        raw[section][key] = value
    return raw


def checkpoint_files(name: str, target: Path) -> None:
    """The folder's processor files and its (or its family's) tokenizer files in `target`."""
    tokenizer_dir = real_model_dir(FOLDERS[name][0])
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).exists():
            shutil.copy(tokenizer_dir / file, target / file)
    for file in PROCESSOR_FILES:
        shutil.copy(real_model_dir(name) / file, target / file)


def assert_same_outputs(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(
        ours["pixel_attention_mask"], np.asarray(ref["pixel_attention_mask"]).astype(bool)
    )


@pytest.fixture(scope="module", params=list(FOLDERS))
def folder(request, tmp_path_factory):
    """(name, directory with the folder's config and tokenizer/processor files)."""
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    checkpoint_files(name, directory)
    return name, directory


@pytest.mark.torch
def test_processor_matches_transformers(folder):
    """Chat template, image expansion (split, with row/col tokens) and pixels, per folder."""
    from mlx_smolvlm.processing import Processor

    name, directory = folder
    shutil.copy(real_model_dir(name) / "config.json", directory / "config.json")
    ours, ref = Processor.from_pretrained(directory), hf_processor(directory)
    # 2048 longest edge, 512 tiles: a 4x3 grid (granite's vocabulary has rows/cols up to 4).
    conversation = messages(picture())
    kwargs = {"tokenize": True, "return_dict": True, "return_tensors": "np"}
    expected = ref.apply_chat_template(conversation, add_generation_prompt=True, **kwargs)
    got = ours.apply_chat_template(conversation, **kwargs)
    assert got["pixel_values"].shape[1] == 13
    assert_same_outputs(got, expected)
    text = ours.apply_chat_template(conversation)
    assert text == ref.apply_chat_template(conversation, add_generation_prompt=True)
    # generate passes a rendered prompt through and templates a plain one.
    assert ours.is_rendered(text) and not ours.is_rendered("Convert this page to docling.")
    assert ours.tokenizer.decode(got["input_ids"][0], skip_special_tokens=False) == ref.decode(
        expected["input_ids"][0], skip_special_tokens=False
    )


def random_checkpoint(name: str, path: Path, seed: int):
    """Random transformers weights for the folder's config in `path`, beside the stored
    (sparse) config.json, not transformers' re-serialization of it; returns the HF model."""
    raw = stored_config(name, FOLDERS[name][1])
    hf = hf_model(raw, seed=seed)
    hf.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(raw))
    checkpoint_files(name, path)
    return hf


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    """A random granite-docling-258M (2 decoder and 2 vision layers) and its transformers twin."""
    path = tmp_path_factory.mktemp("granite")
    return path, random_checkpoint("granite-docling-258M", path, seed=5)


@pytest.fixture(scope="module")
def smolvlm2(tmp_path_factory):
    """A random SmolVLM2-500M-Video-Instruct (2 decoder layers) and its transformers twin."""
    path = tmp_path_factory.mktemp("smolvlm2")
    return path, random_checkpoint("SmolVLM2-500M-Video-Instruct", path, seed=3)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", ["SmolVLM2-500M-Video-Instruct", "granite-docling-258M"])
def test_logits_match_transformers(name, request):
    path, hf = request.getfixturevalue("granite" if name.startswith("granite") else "smolvlm2")
    model, processor = load(path)
    assert model.config == ModelConfig.from_dict(stored_config(name, FOLDERS[name][1]))
    ref_processor = hf_processor(path)
    # One tile keeps the 12-layer vision tower of SmolVLM2 quick; granite's 2x2 grid splits.
    image_options = (
        {"do_image_splitting": False}
        if name.startswith("SmolVLM2")
        else {"size": {"longest_edge": 1024}}
    )
    conversation = messages(picture(), "Describe the image.")
    kwargs = {"tokenize": True, "return_dict": True, "return_tensors": "np", **image_options}
    inputs = processor.apply_chat_template(conversation, **kwargs)
    expected = ref_processor.apply_chat_template(conversation, add_generation_prompt=True, **kwargs)
    assert_same_outputs(inputs, expected)
    args = [inputs[k] for k in ("input_ids", "pixel_values", "pixel_attention_mask")]
    ours, ref = np.array(model(*args)), hf_logits(hf, *args)
    assert np.abs(ours - ref).max() <= 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
@pytest.mark.torch
def test_granite_docling_generates_like_transformers(granite):
    path, hf = granite
    model, processor = load(path)
    assert model.config.text_config.tie_word_embeddings
    assert not hasattr(model.language_model, "lm_head")
    tokenizer = processor.tokenizer
    # Turns end with <|end_of_text|>; the vocabulary has no <end_of_utterance>.
    assert tokenizer.eos_token_ids == {100257}
    assert tokenizer.backend.token_to_id("<end_of_utterance>") is None
    prompt = "Convert this page to docling."
    inputs = prepare_inputs(processor, prompt, [picture()], longest_edge=1024)
    text = tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
    assert text.startswith(
        "<|start_of_role|>user<|end_of_role|><fake_token_around_image><row_1_col_1>"
    )
    assert text.endswith(f"{prompt}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>")
    with torch.no_grad():
        ref = hf.generate(
            **{
                k: torch.from_numpy(np.asarray(inputs[k]))
                for k in ("input_ids", "attention_mask", "pixel_values")
            },
            pixel_attention_mask=torch.from_numpy(inputs["pixel_attention_mask"]),
            max_new_tokens=8,
            do_sample=False,
        )
    ref_tokens = ref[0, inputs["input_ids"].shape[1] :].tolist()
    result = generate(model, processor, prompt, [picture()], max_tokens=8, longest_edge=1024)
    stopped = ref_tokens[-1] == 100257
    assert result.token_ids == (ref_tokens[:-1] if stopped else ref_tokens)


@pytest.mark.slow
@pytest.mark.torch
def test_granite_docling_converts(granite, tmp_path):
    from mlx_smolvlm.convert import convert

    path, hf = granite
    out = convert(path, tmp_path / "mlx", dtype="float32")
    for file in ("vocab.json", "merges.txt", "chat_template.jinja", "tokenizer_config.json"):
        assert (out / file).read_bytes() == (path / file).read_bytes()
    converted = json.loads((out / "config.json").read_text())
    assert converted["tie_word_embeddings"] is True
    model, processor = load(out)
    original, _ = load(path)
    inputs = prepare_inputs(
        processor, "Convert this page to docling.", [picture()], do_image_splitting=False
    )
    args = [inputs[k] for k in ("input_ids", "pixel_values", "pixel_attention_mask")]
    np.testing.assert_array_equal(np.array(model(*args)), np.array(original(*args)))


def test_granite_docling_loss_mask_ends_at_end_of_text(tmp_path):
    """LoRA on granite-docling: an answer's tokens run through <|end_of_text|>, not the "\\n"."""
    from mlx_smolvlm.processing import Processor
    from mlx_smolvlm.tuner.datasets import encode_conversation

    name = "granite-docling-258M"
    checkpoint_files(name, tmp_path)
    shutil.copy(real_model_dir(name) / "config.json", tmp_path / "config.json")
    processor = Processor.from_pretrained(tmp_path)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Convert."}]},
        {"role": "assistant", "content": "<doctag><text>Hi</text></doctag>"},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "Done."},
    ]
    ids, mask = encode_conversation(processor, conversation, [(0, 0)])
    answer = processor.tokenizer.decode(
        [t for t, m in zip(ids, mask) if m], skip_special_tokens=False
    )
    assert answer == "<doctag><text>Hi</text></doctag><|end_of_text|>Done.<|end_of_text|>"
