"""Random checkpoints (transformers' reference ones, tiny MLX ones) and processor-shaped inputs."""

from __future__ import annotations

import json
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_smolvlm.model import Model, ModelConfig
from mlx_smolvlm.random_checkpoint import copy_tokenizer_files, hf_model

__all__ = ["copy_tokenizer_files", "hf_model"]  # re-exported for the tests

# Real patch geometry of the family, with small widths and depths to keep tests fast.
GEOMETRIES = {
    "256m": {"image_size": 512, "patch_size": 16, "scale_factor": 4},  # 32x32 grid, 64 tokens
    "2.2b": {"image_size": 384, "patch_size": 14, "scale_factor": 3},  # 27x27 grid, 81 tokens
}
IMAGE_TOKEN_ID = 300
FAKE_TOKEN_ID = 301
VOCAB_SIZE = 320


def tiny_config(
    model_type: str = "idefics3",
    geometry: str = "256m",
    image_token_id: int = IMAGE_TOKEN_ID,
    **text,
) -> dict:
    """A config.json dict with real patch geometry and a tiny vision tower and decoder."""
    geo = GEOMETRIES[geometry]
    text_config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": VOCAB_SIZE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "pad_token_id": 2,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **text,
    }
    return {
        "model_type": model_type,
        "architectures": [
            "Idefics3ForConditionalGeneration"
            if model_type == "idefics3"
            else "SmolVLMForConditionalGeneration"
        ],
        "image_token_id": image_token_id,
        "scale_factor": geo["scale_factor"],
        "tie_word_embeddings": False,
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": geo["image_size"],
            "patch_size": geo["patch_size"],
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh",
        },
        "text_config": text_config,
    }


def tiny_config_for_real_tokenizer(model_type: str = "idefics3", geometry: str = "256m") -> dict:
    """A tiny model that speaks SmolVLM-256M's vocabulary (49280 ids, <image> = 49190)."""
    # head_dim 32 so that a quantized KV cache (groups of 32 or more) works too.
    return tiny_config(model_type, geometry, image_token_id=49190, vocab_size=49280, head_dim=32)


def save_hf_checkpoint(path: Path, config: dict, seed: int = 0, tokenizer_dir: Path | None = None):
    """Write a random HF checkpoint to `path` and return the transformers model."""
    model = hf_model(config, seed)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, path)
    return model


def image_prompt(tiles: list[int], seq_len: int, rng: np.random.Generator, text: int = 4) -> list:
    """Token ids: text, then per image a block of `<image>` tokens per tile, then text."""
    ids = []
    for count in tiles:
        ids += rng.integers(3, 200, size=text).tolist()
        for _ in range(count):
            ids += [FAKE_TOKEN_ID] + [IMAGE_TOKEN_ID] * seq_len
        ids.append(FAKE_TOKEN_ID)
    return ids + rng.integers(3, 200, size=text).tolist()


def random_pixels(tiles: list[list[int]], size: int, rng: np.random.Generator):
    """pixel_values (batch, max tiles, 3, size, size) with zero padding tiles, and the pixel mask."""
    most = max(sum(sample) for sample in tiles)
    pixels = np.zeros((len(tiles), most, 3, size, size), dtype=np.float32)
    mask = np.zeros((len(tiles), most, size, size), dtype=bool)
    for b, sample in enumerate(tiles):
        n = sum(sample)
        pixels[b, :n] = rng.uniform(-1, 1, size=(n, 3, size, size))
        mask[b, :n] = True
    return pixels, mask


def left_pad(sequences: list[list[int]], pad_id: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into input_ids and attention_mask arrays."""
    longest = max(map(len, sequences))
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for i, seq in enumerate(sequences):
        ids[i, longest - len(seq) :] = seq
        mask[i, longest - len(seq) :] = 1
    return ids, mask


def hf_logits(model, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None):
    """Reference logits as a numpy array."""
    import torch

    kwargs = {"input_ids": torch.from_numpy(np.asarray(input_ids, dtype=np.int64))}
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.from_numpy(pixel_values)
        kwargs["pixel_attention_mask"] = torch.from_numpy(pixel_attention_mask)
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(np.asarray(attention_mask))
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def write_config(path: Path, config: dict) -> None:
    (Path(path) / "config.json").write_text(json.dumps(config))


def hf_processor(directory: Path):
    """transformers' Idefics3Processor (SmolVLMProcessor when the checkpoint has video settings)
    from the files in `directory`, with the PIL image processors (AutoProcessor needs torchvision)."""
    import transformers
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.idefics3.processing_idefics3 import Idefics3Processor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    config = json.loads((directory / "preprocessor_config.json").read_text())
    sampling = config.pop("video_sampling", None)
    for key in ("image_processor_type", "processor_class"):
        config.pop(key, None)
    seq_len = json.loads((directory / "processor_config.json").read_text())["image_seq_len"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    template = tokenizer.chat_template
    if template is None and (directory / "chat_template.json").exists():
        template = json.loads((directory / "chat_template.json").read_text())["chat_template"]
    if sampling is None:
        return Idefics3Processor(
            image_processor=Idefics3ImageProcessorPil(**config),
            tokenizer=tokenizer,
            image_seq_len=seq_len,
            chat_template=template,
        )

    class ImageSmolVLMProcessor(SmolVLMProcessor):
        """SmolVLMProcessor without its torchvision video processor (images only here)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name != "video_processor":
                return super().check_argument_for_proper_class(argument_name, argument)

    video = types.SimpleNamespace(num_frames=sampling["max_frames"], fps=sampling["fps"])
    return ImageSmolVLMProcessor(
        image_processor=SmolVLMImageProcessorPil(**config),
        tokenizer=tokenizer,
        video_processor=video,
        image_seq_len=seq_len,
        chat_template=template,
    )


def write_checkpoint(path: Path, quantize: bool = False) -> Path:
    """A tiny random SmolVLM with the real 256M tokenizer and 128-pixel tiles of 64 tokens."""
    from conftest import real_model_dir

    config = tiny_config_for_real_tokenizer()
    # 128px tiles, 8px patches, shuffle 2: 64 tokens per tile like the real model, 16x cheaper.
    config["vision_config"].update(image_size=128, patch_size=8)
    config["scale_factor"] = 2
    mx.random.seed(0)
    model = Model(ModelConfig.from_dict(config))
    # A 64-wide random head caps logits near 5, too low to ever be confident over 49k tokens.
    model.language_model.lm_head.weight = model.language_model.lm_head.weight * 4
    if quantize:
        nn.quantize(model, group_size=64, bits=4)
        config["quantization"] = {"group_size": 64, "bits": 4}
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    copy_tokenizer_files(real_model_dir("SmolVLM-256M-Instruct"), path)
    image_config = json.loads((path / "preprocessor_config.json").read_text())
    image_config.update(max_image_size={"longest_edge": 128}, size={"longest_edge": 512})
    (path / "preprocessor_config.json").write_text(json.dumps(image_config))
    return path
