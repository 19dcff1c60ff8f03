"""config.json reading: transformers' defaults for every omitted key, clear errors for bad values."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import MODELS
from reference import tiny_config, write_config

from mlx_smolvlm import load_model
from mlx_smolvlm.model.config import ConfigError, ModelConfig, TextConfig, VisionConfig

transformers = pytest.importorskip("transformers")

SHARED_CONFIGS = ["SmolVLM-256M-Instruct", "SmolVLM2-500M-Video-Instruct", "granite-docling-258M"]


def reference_config(raw: dict):
    """transformers' config object for a config.json dict."""
    name = "Idefics3" if raw["model_type"] == "idefics3" else "SmolVLM"
    return getattr(transformers, f"{name}Config")(**copy.deepcopy(raw))


def assert_same_as_transformers(raw: dict) -> None:
    """Every field the model uses equals what transformers' config classes make of `raw`."""
    ours, ref = ModelConfig.from_dict(raw), reference_config(raw)
    for name in VisionConfig.__dataclass_fields__:
        assert getattr(ours.vision_config, name) == getattr(ref.vision_config, name), name
    text = ref.text_config
    for name in TextConfig.__dataclass_fields__:
        if name in ("rope_theta", "rope_scaling", "rope_traditional", "tie_word_embeddings"):
            continue
        assert getattr(ours.text_config, name) == getattr(text, name), name
    assert ours.text_config.rope_theta == text.rope_parameters["rope_theta"]
    # transformers 5 ties the output head by the top-level key.
    assert ours.text_config.tie_word_embeddings == ref.tie_word_embeddings
    assert ours.image_token_id == ref.image_token_id
    assert ours.scale_factor == ref.scale_factor


@pytest.mark.parametrize("name", SHARED_CONFIGS)
def test_shared_hub_configs_read_like_transformers(name):
    raw = json.loads((MODELS / name / "config.json").read_text())
    assert_same_as_transformers(raw)


def test_sparse_smolvlm2_config_gets_class_defaults():
    raw = json.loads((MODELS / "SmolVLM2-500M-Video-Instruct" / "config.json").read_text())
    assert "num_hidden_layers" not in raw["vision_config"]  # kept sparse, as the hub stores it
    config = ModelConfig.from_dict(raw)
    vision, text = config.vision_config, config.text_config
    assert (vision.num_hidden_layers, vision.intermediate_size, vision.num_channels) == (
        12,
        3072,
        3,
    )
    assert (vision.hidden_act, vision.layer_norm_eps) == ("gelu_pytorch_tanh", 1e-6)
    assert (text.hidden_act, text.attention_bias, text.mlp_bias) == ("silu", False, False)
    assert text.tie_word_embeddings is False and text.rope_theta == 100000.0
    assert config.image_seq_len == 64


# Keys the hub may leave out, one at a time and all at once.
OMITTABLE = {
    "vision_config": [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "hidden_act",
        "layer_norm_eps",
    ],
    "text_config": [
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
        "hidden_act",
        "vocab_size",
    ],
}


@pytest.mark.parametrize("section,key", [(s, k) for s, keys in OMITTABLE.items() for k in keys])
def test_each_omitted_key_takes_transformers_default(section, key):
    raw = tiny_config()
    if section == "vision_config" and key in ("hidden_size", "num_attention_heads"):
        # The defaults (1152, 16) only make sense together.
        raw[section].pop("hidden_size")
        raw[section].pop("num_attention_heads")
    raw[section].pop(key, None)
    if section == "text_config" and key == "num_attention_heads":
        raw[section].pop("num_key_value_heads")
    assert_same_as_transformers(raw)


def test_everything_omitted_takes_transformers_defaults():
    # Only the patch grid is given: transformers' defaults (224 / 32, scale 2) do not divide.
    grid = {"vision_config": {"image_size": 448, "patch_size": 32}}
    assert_same_as_transformers({"model_type": "idefics3", **grid})
    assert_same_as_transformers({"model_type": "smolvlm", "text_config": {}, **grid})
    default_text = ModelConfig.from_dict({"model_type": "idefics3", **grid}).text_config
    assert default_text.rms_norm_eps == 1e-5  # the composite's own default text config
    sparse = ModelConfig.from_dict({"model_type": "idefics3", "text_config": {}, **grid})
    assert sparse.text_config.rms_norm_eps == 1e-6  # LlamaConfig's
    with pytest.raises(ConfigError, match="scale_factor 2 does not divide the 7x7 patch grid"):
        ModelConfig.from_dict({"model_type": "idefics3"})


def test_head_dim_is_derived_when_absent():
    raw = tiny_config()
    del raw["text_config"]["head_dim"]
    assert ModelConfig.from_dict(raw).text_config.head_dim == 64 // 4
    raw["text_config"]["head_dim"] = None
    assert ModelConfig.from_dict(raw).text_config.head_dim == 16


def test_transformers_5_rope_parameters_and_dtype():
    raw = tiny_config()
    del raw["text_config"]["rope_theta"]
    raw["text_config"]["rope_parameters"] = {"rope_theta": 273768.0, "rope_type": "default"}
    raw["dtype"] = "bfloat16"
    assert ModelConfig.from_dict(raw).text_config.rope_theta == 273768.0
    assert_same_as_transformers(raw)
    raw["text_config"]["rope_parameters"] = {
        "rope_type": "linear",
        "factor": 2.0,
        "rope_theta": 5.0,
    }
    assert ModelConfig.from_dict(raw).text_config.rope_scaling["factor"] == 2.0


@pytest.mark.parametrize(
    "top,text,tied",
    [
        (None, None, False),
        (True, None, True),
        (True, False, True),
        (False, True, False),
        (None, True, True),
    ],  # the last: a transformers-4 checkpoint tied by its text config
)
def test_tie_word_embeddings_at_either_level(top, text, tied):
    raw = tiny_config()
    raw.pop("tie_word_embeddings")
    raw["text_config"].pop("tie_word_embeddings")
    if top is not None:
        raw["tie_word_embeddings"] = top
    if text is not None:
        raw["text_config"]["tie_word_embeddings"] = text
    assert ModelConfig.from_dict(raw).text_config.tie_word_embeddings is tied
    if text is None or top is not None:
        assert_same_as_transformers(raw)


def test_leftover_keys_are_ignored():
    raw = tiny_config()
    raw.update(pad_token_id=128002, vocab_size=49280, torch_dtype="float32", use_cache=False)
    raw["text_config"].update(perceiver_config={"x": 1}, pad_token_id=2, torch_dtype="bfloat16")
    raw["vision_config"].update(size={"longest_edge": 2048}, use_base_siglip=False)
    assert_same_as_transformers(raw)


BAD_VALUES = [
    ("vision_config", None, "'vision_config' is None; expected an object"),
    ("vision_config", [1, 2], "'vision_config' is \\[1, 2\\]; expected an object"),
    ("text_config", "llama", "'text_config' is 'llama'; expected an object"),
    ("text_config.hidden_size", None, "'text_config.hidden_size' is null"),
    (
        "text_config.hidden_size",
        "576",
        "'text_config.hidden_size' is '576'; expected a positive integer",
    ),
    ("text_config.hidden_size", 64.0, "'text_config.hidden_size' is 64.0"),
    ("text_config.num_hidden_layers", -2, "'text_config.num_hidden_layers' is -2"),
    ("text_config.num_attention_heads", True, "'text_config.num_attention_heads' is True"),
    ("text_config.rms_norm_eps", 0, "'text_config.rms_norm_eps' is 0; expected a positive number"),
    ("text_config.rope_theta", "1e5", "'text_config.rope_theta' is '1e5'"),
    ("text_config.tie_word_embeddings", "yes", "'text_config.tie_word_embeddings' is 'yes'"),
    ("text_config.rope_parameters", [10000], "'text_config.rope_parameters' is \\[10000\\]"),
    ("text_config.hidden_act", "relu", "'text_config.hidden_act' is 'relu'; supported"),
    ("text_config.model_type", "mistral", "text_config.model_type is 'mistral'"),
    (
        "text_config.num_key_value_heads",
        3,
        "'text_config.num_attention_heads' \\(4\\) is not a multiple of 3",
    ),
    ("vision_config.patch_size", 0, "'vision_config.patch_size' is 0"),
    ("vision_config.image_size", 500, "scale_factor 4 does not divide the 31x31 patch grid"),
    ("vision_config.layer_norm_eps", [1e-6], "'vision_config.layer_norm_eps' is \\[1e-06\\]"),
    ("vision_config.hidden_act", "gelu", "'vision_config.hidden_act' is 'gelu'"),
    ("tie_word_embeddings", 1, "'tie_word_embeddings' is 1; expected true or false"),
    ("scale_factor", 0, "'scale_factor' is 0"),
    ("image_token_id", "49190", "'image_token_id' is '49190'"),
    ("quantization", 4, "'quantization' is 4; expected an object"),
]


@pytest.mark.parametrize("path,value,message", BAD_VALUES)
def test_present_but_wrong_values_name_the_key(tmp_path, path, value, message):
    raw = tiny_config()
    *parents, key = path.split(".")
    section = raw
    for parent in parents:
        section = section[parent]
    section[key] = value
    write_config(tmp_path, raw)
    with pytest.raises(ConfigError, match=message) as err:
        load_model(tmp_path)
    assert str(err.value).startswith(str(tmp_path / "config.json"))
    assert "\n" not in str(err.value)


def test_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        load_model(tmp_path)


def test_processor_reads_image_seq_len_from_a_sparse_config(tmp_path):
    from mlx_smolvlm.processing.processor import _image_seq_len

    raw = {
        "model_type": "smolvlm",
        "scale_factor": 4,
        "vision_config": {"image_size": 512, "patch_size": 16},
    }
    assert _image_seq_len(tmp_path, raw) == 64
    assert (
        _image_seq_len(tmp_path, {"model_type": "idefics3", "vision_config": {"image_size": 448}})
        == 49
    )
    with pytest.raises(ValueError, match="Cannot tell image_seq_len: .* model_type is None"):
        _image_seq_len(tmp_path, {})
