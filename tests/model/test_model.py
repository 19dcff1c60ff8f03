"""Parity of the MLX model with transformers on the same random weights, and loading errors."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from reference import (
    GEOMETRIES,
    hf_logits,
    image_prompt,
    left_pad,
    random_pixels,
    save_hf_checkpoint,
    tiny_config,
    write_config,
)

from mlx_smolvlm import load_model
from mlx_smolvlm.backends.cpu import prepare
from mlx_smolvlm.model.config import ConfigError, ModelConfig
from mlx_smolvlm.model.vision import patch_position_ids

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(params=["mlx-kernels", "host-kernels"])
def kernels(request, monkeypatch):
    """Run the test with the pure-MLX model, then with the CPU backend's host modules that
    the generators install (`backends.cpu.prepare`)."""
    if request.param == "host-kernels":
        plain = load_model
        monkeypatch.setitem(globals(), "load_model", lambda *a, **k: prepare(plain(*a, **k)))


def checkpoint(tmp_path, model_type="idefics3", geometry="256m", seed=0):
    config = tiny_config(model_type, geometry)
    hf = save_hf_checkpoint(tmp_path, config, seed)
    return hf, load_model(tmp_path), ModelConfig.from_dict(config)


def assert_parity(ours: mx.array, ref: np.ndarray, valid: np.ndarray | None = None):
    ours = np.array(ours)
    assert ours.shape == ref.shape
    if valid is not None:
        ours, ref = ours[valid.astype(bool)], ref[valid.astype(bool)]
    assert np.abs(ours - ref).max() <= 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize(
    "model_type,geometry", [("idefics3", "256m"), ("smolvlm", "2.2b"), ("idefics3", "2.2b")]
)
def test_logits_match_transformers_with_split_image(tmp_path, model_type, geometry, kernels):
    hf, model, config = checkpoint(tmp_path, model_type, geometry)
    rng = np.random.default_rng(0)
    size = GEOMETRIES[geometry]["image_size"]
    ids = np.array([image_prompt([5], config.image_seq_len, rng)])  # 2x2 tiles + global
    pixels, mask = random_pixels([[5]], size, rng)
    assert_parity(model(ids, pixels, mask), hf_logits(hf, ids, pixels, mask))


def test_batch_with_different_tile_counts_and_lengths(tmp_path, kernels):
    hf, model, config = checkpoint(tmp_path, "smolvlm", "2.2b")
    rng = np.random.default_rng(1)
    prompts = [image_prompt([3], config.image_seq_len, rng, text=9), image_prompt([1], 81, rng)]
    ids, attention = left_pad(prompts)
    pixels, mask = random_pixels([[3], [1]], 384, rng)
    ours = model(ids, pixels, mask, attention_mask=attention)
    assert_parity(ours, hf_logits(hf, ids, pixels, mask, attention), valid=attention)


def test_several_images_in_one_prompt(tmp_path):
    hf, model, config = checkpoint(tmp_path, "idefics3", "256m")
    rng = np.random.default_rng(2)
    ids = np.array([image_prompt([3, 1, 2], config.image_seq_len, rng)])
    pixels, mask = random_pixels([[3, 1, 2]], 512, rng)
    assert_parity(model(ids, pixels, mask), hf_logits(hf, ids, pixels, mask))


def test_partially_masked_tiles_on_the_27_grid(tmp_path, kernels):
    """Padded pixels change the patch positions and the vision attention mask."""
    hf, model, config = checkpoint(tmp_path, "smolvlm", "2.2b")
    rng = np.random.default_rng(3)
    ids = np.array([image_prompt([2], config.image_seq_len, rng)])
    pixels, mask = random_pixels([[2]], 384, rng)
    mask[0, 0, 250:, :] = False
    mask[0, 1, :, 101:] = False
    pixels[~mask[:, :, None].repeat(3, 2)] = 0
    assert_parity(model(ids, pixels, mask), hf_logits(hf, ids, pixels, mask))


def test_text_only_prompt(tmp_path):
    hf, model, _ = checkpoint(tmp_path)
    ids = np.array([[1, 5, 6, 7, 8, 9, 10]])
    assert_parity(model(ids), hf_logits(hf, ids))


@pytest.mark.parametrize("geometry", ["256m", "2.2b"])
def test_position_ids_match_torch_bucketize(geometry):
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    geo = GEOMETRIES[geometry]
    n = geo["image_size"] // geo["patch_size"]
    emb = Idefics3VisionEmbeddings(
        Idefics3VisionConfig(image_size=geo["image_size"], patch_size=geo["patch_size"])
    )
    # The reference adds position_embedding(ids); an identity embedding table reads the ids back.
    emb.position_embedding.weight.data = torch.arange(n * n, dtype=torch.float32)[:, None].repeat(
        1, emb.embed_dim
    )
    emb.patch_embedding.weight.data.zero_()
    emb.patch_embedding.bias.data.zero_()
    rng = np.random.default_rng(4)
    masks = np.zeros((6, n, n), dtype=bool)
    masks[0] = True
    for m in masks[1:]:
        m[: rng.integers(1, n + 1), : rng.integers(1, n + 1)] = True
    pixels = torch.zeros(6, 3, geo["image_size"], geo["image_size"])
    ref = emb(pixels, torch.from_numpy(masks))[..., 0].round().long().numpy()
    ours = patch_position_ids(masks, n)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours[0], np.arange(n * n))


def test_mlx_community_layout_gives_identical_logits(tmp_path):
    hf_dir, mlx_dir = tmp_path / "hf", tmp_path / "mlx"
    mlx_dir.mkdir()
    _, model, config = checkpoint(hf_dir)
    # mlx-vlm layout: no `model.` prefix, language_model.*, conv kernel already channels-last.
    weights = dict(tree_flatten(model.parameters()))
    assert weights["vision_model.embeddings.patch_embedding.weight"].shape[-1] == 3
    mx.save_safetensors(str(mlx_dir / "model.safetensors"), weights)
    write_config(mlx_dir, json.loads((hf_dir / "config.json").read_text()))
    other = load_model(mlx_dir)
    rng = np.random.default_rng(5)
    ids = np.array([image_prompt([1], config.image_seq_len, rng)])
    pixels, mask = random_pixels([[1]], 512, rng)
    np.testing.assert_array_equal(
        np.array(model(ids, pixels, mask)), np.array(other(ids, pixels, mask))
    )


def test_sharded_bf16_checkpoint_loads(tmp_path):
    hf_dir = tmp_path / "hf"
    hf = save_hf_checkpoint(hf_dir, tiny_config(), seed=0)
    sharded = tmp_path / "sharded"
    hf.to(torch.bfloat16).save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    model = load_model(sharded, dtype="float32")
    ids = np.array([[1, 5, 6, 7]])
    ref = hf_logits(hf.float(), ids)
    assert np.abs(np.array(model(ids)) - ref).max() < 0.5  # bf16-rounded weights


def test_image_token_count_mismatch_is_an_error(tmp_path):
    _, model, config = checkpoint(tmp_path)
    rng = np.random.default_rng(6)
    ids = np.array([image_prompt([2], config.image_seq_len, rng)])
    pixels, mask = random_pixels([[3]], 512, rng)
    with pytest.raises(ValueError, match="128 <image> tokens .* 192 features"):
        model(ids, pixels, mask)


def test_wrong_model_type_is_an_error(tmp_path):
    config = tiny_config()
    config["model_type"] = "llava"
    write_config(tmp_path, config)
    with pytest.raises(ConfigError, match="model_type is 'llava'"):
        load_model(tmp_path)


def test_truncated_safetensors_is_an_error(tmp_path):
    save_hf_checkpoint(tmp_path, tiny_config())
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])
    with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors"):
        load_model(tmp_path)


def test_missing_weight_is_named(tmp_path):
    save_hf_checkpoint(tmp_path, tiny_config())
    weights = mx.load(str(tmp_path / "model.safetensors"))
    del weights["model.connector.modality_projection.proj.weight"]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    with pytest.raises(
        ValueError, match="missing weights .*connector.modality_projection.proj.weight"
    ):
        load_model(tmp_path)


def test_shape_mismatch_names_weight_and_shapes(tmp_path):
    save_hf_checkpoint(tmp_path, tiny_config())
    config = tiny_config(intermediate_size=96)
    write_config(tmp_path, config)
    with pytest.raises(ValueError, match=r"_proj.weight has shape \(128, 64\).*expects \(96, 64\)"):
        load_model(tmp_path)


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(tmp_path)


@pytest.mark.slow
def test_real_256m_shape_with_real_processor(tmp_path, smolvlm_256m_dir):
    """The full SmolVLM-256M-Instruct shape, real config, tokenizer and processor, split image."""
    from reference import copy_tokenizer_files, hf_model

    from mlx_smolvlm.processing.processor import Processor

    config = json.loads((smolvlm_256m_dir / "config.json").read_text())
    hf = hf_model(config, seed=0)
    hf.save_pretrained(tmp_path)
    copy_tokenizer_files(smolvlm_256m_dir, tmp_path)
    model = load_model(tmp_path)
    processor = Processor.from_pretrained(tmp_path)
    rng = np.random.default_rng(8)
    image = (rng.uniform(0, 255, size=(600, 800, 3))).astype(np.uint8)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=text, images=[image], return_tensors="np", longest_edge=1024)
    assert inputs["pixel_values"].shape[1] == 5  # 2x2 tiles and the global image
    ours = model(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"])
    ref = hf_logits(hf, inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"])
    assert_parity(ours, ref)
