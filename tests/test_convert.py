"""Conversion to MLX: dtypes, quantization drift, output layout, CLI errors and atomic writes."""

from __future__ import annotations

import errno
import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from faults import kill_at
from mlx.utils import tree_flatten
from reference import image_prompt, random_pixels, save_hf_checkpoint, tiny_config

import mlx_smolvlm.convert as convert_module
from mlx_smolvlm import load, load_model
from mlx_smolvlm.convert import ConvertError, convert, main

pytest.importorskip("transformers")
pytest.importorskip("torch")

SIDE_FILES = {
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": '{"model_max_length": 8192}',
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "merges.txt": "a b\n",
    "preprocessor_config.json": '{"do_image_splitting": true}',
}
# (bits, quantize_vision) -> (least top-1 agreement, largest mean KL) over the 334 positions
# of the fixed prompt. Measured on the CPU: 8-bit 0.982 / 4.6e-5 (vision float), 0.973 / 7.0e-5
# (vision quantized); 4-bit 0.557 / 1.4e-2 and 0.746 / 2.0e-2. Random weights give flat logits,
# so top-1 is noisy at 4 bits (other seeds: 0.49 to 0.87); KL is the steadier measure.
DRIFT_BOUNDS = {
    (8, False): (0.95, 1e-3),
    (8, True): (0.95, 1e-3),
    (4, False): (0.4, 0.05),
    (4, True): (0.4, 0.1),
}


def quantizable_config() -> dict:
    """Tiny widths that groups of 32, 64 and 128 all divide."""
    config = tiny_config(hidden_size=128, intermediate_size=256, head_dim=32)
    config["vision_config"].update(hidden_size=128, intermediate_size=256)
    return config


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("source") / "hf"
    save_hf_checkpoint(path, quantizable_config())
    for name, text in SIDE_FILES.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def inputs() -> tuple:
    """A fixed prompt with one image split into 2x2 tiles plus the global one."""
    rng = np.random.default_rng(0)
    ids = np.array([image_prompt([5], 64, rng)])
    pixels, mask = random_pixels([[5]], 512, rng)
    return ids, pixels, mask


@pytest.fixture(scope="module")
def source_logits(source, inputs) -> np.ndarray:
    return logits(load_model(source, dtype="float32"), inputs)


def logits(model, inputs) -> np.ndarray:
    return np.array(model(*inputs).astype(mx.float32))[0]


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(p || q) between the softmaxes of two logit arrays."""
    log_p = p_logits.astype(np.float64)
    log_q = q_logits.astype(np.float64)
    log_p = log_p - np.logaddexp.reduce(log_p, axis=-1, keepdims=True)
    log_q = log_q - np.logaddexp.reduce(log_q, axis=-1, keepdims=True)
    return float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())


def snapshot(root: Path) -> dict:
    """Every path under `root` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_float32_conversion_is_exact(source, inputs, source_logits, tmp_path):
    out = convert(source, tmp_path / "f32", dtype="float32")
    np.testing.assert_array_equal(logits(load_model(out), inputs), source_logits)


@pytest.mark.parametrize("dtype,tolerance", [("float16", 0.02), ("bfloat16", 0.2)])
def test_half_precision_rounds_the_weights_only(
    source, inputs, source_logits, tmp_path, dtype, tolerance
):
    out = convert(source, tmp_path / dtype, dtype=dtype)
    stored = mx.load(str(out / "model.safetensors"))
    original = dict(tree_flatten(load_model(source, dtype="float32").parameters()))
    for name, value in stored.items():
        assert value.dtype == getattr(mx, dtype)
        assert mx.array_equal(value, original[name].astype(value.dtype)), name
    model = load_model(out, dtype="float32")
    converted = logits(model, inputs)
    assert np.abs(converted - source_logits).max() < tolerance
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("quantize_vision", [False, True])
def test_quantized_logits_stay_close(
    source, inputs, source_logits, tmp_path, bits, quantize_vision
):
    out = convert(
        source, tmp_path / "q", quantize=True, q_bits=bits, quantize_vision=quantize_vision
    )
    model = load_model(out)
    vision_type = nn.QuantizedLinear if quantize_vision else nn.Linear
    assert isinstance(model.vision_model.encoder.layers[1].mlp.fc2, vision_type)
    assert isinstance(model.connector.modality_projection.proj, vision_type)
    assert isinstance(model.language_model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.language_model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    quantized = logits(model, inputs)
    top1 = float((quantized.argmax(-1) == source_logits.argmax(-1)).mean())
    kl = mean_kl(source_logits, quantized)
    print(
        f"\n{bits}-bit, vision {'quantized' if quantize_vision else 'float'}: top-1 {top1:.4f}, KL {kl:.2e}"
    )
    least_top1, most_kl = DRIFT_BOUNDS[bits, quantize_vision]
    assert top1 >= least_top1 and kl <= most_kl


def test_output_layout_and_config(source, tmp_path):
    out = convert(source, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((source / "config.json").read_text())
    assert config["vision_config"] == source_config["vision_config"]
    assert "rope_theta" not in source_config["text_config"]  # transformers 5 nests it
    assert config["text_config"]["rope_theta"] == 100000.0
    quantization = config["quantization"]
    assert list(quantization)[:3] == ["group_size", "bits", "mode"]
    assert (quantization["group_size"], quantization["bits"], quantization["mode"]) == (
        32,
        4,
        "affine",
    )
    assert config["quantization_config"] == quantization
    assert quantization["vision_model.encoder.layers.0.mlp.fc1"] is False
    assert quantization["connector.modality_projection.proj"] is False
    assert "language_model.lm_head" not in quantization  # quantized with the defaults
    for name, text in SIDE_FILES.items():
        assert (out / name).read_text() == text
    assert "base_model" not in (out / "README.md").read_text()  # a local source
    weights, metadata = mx.load(str(out / "model.safetensors"), return_metadata=True)
    assert metadata == {"format": "mlx"}
    assert weights["vision_model.embeddings.patch_embedding.weight"].shape[-1] == 3  # OHWI
    assert {"language_model.lm_head.scales", "language_model.embed_tokens.biases"} <= set(weights)
    assert not any(name.startswith(("model.", "lm_head")) for name in weights)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights)


def test_sharded_output_loads_identically(source, inputs, source_logits, tmp_path):
    out = convert(source, tmp_path / "sharded", dtype="float32", max_shard_bytes=400_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        assert name in mx.load(str(out / file))
    np.testing.assert_array_equal(logits(load_model(out), inputs), source_logits)


def test_layers_the_group_size_does_not_divide_stay_float(tmp_path, inputs):
    save_hf_checkpoint(tmp_path / "hf", tiny_config())  # widths 64 and 128, heads 4 x 16
    out = convert(tmp_path / "hf", tmp_path / "q", quantize=True, q_group_size=128)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["language_model.layers.0.self_attn.q_proj"] is False
    assert quantization["language_model.embed_tokens"] is False
    model = load_model(out)
    assert isinstance(model.language_model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(model.language_model.layers[0].self_attn.q_proj, nn.Linear)
    assert np.isfinite(logits(model, inputs)).all()


def test_dequantize_round_trip(source, inputs, tmp_path):
    quantized_dir = convert(source, tmp_path / "q8", quantize=True, q_bits=8)
    result = run_cli(
        "--hf-path", str(quantized_dir), "--mlx-path", str(tmp_path / "deq"), "--dequantize"
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "deq" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    quantized, dequantized = load_model(quantized_dir), load_model(tmp_path / "deq")
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in dequantized.named_modules())
    layer = quantized.language_model.layers[0].mlp.up_proj
    expected = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    assert mx.array_equal(dequantized.language_model.layers[0].mlp.up_proj.weight, expected)
    np.testing.assert_allclose(logits(dequantized, inputs), logits(quantized, inputs), atol=1e-4)


def test_load_gives_a_quantized_model_and_its_processor(tmp_path, smolvlm_256m_dir):
    config = tiny_config(vocab_size=49280)
    config["image_token_id"] = 49190
    save_hf_checkpoint(tmp_path / "hf", config, tokenizer_dir=smolvlm_256m_dir)
    out = convert(tmp_path / "hf", tmp_path / "q4", quantize=True)
    model, processor = load(out)
    assert isinstance(model.language_model.lm_head, nn.QuantizedLinear)
    assert processor is not None
    for file in smolvlm_256m_dir.iterdir():
        if file.name != "config.json":
            assert (out / file.name).read_bytes() == file.read_bytes()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--hf-path", "{tmp}/missing"], "'--hf-path'.*missing does not exist"),
        (["--hf-path", "{tmp}/empty"], "'--hf-path'.*empty/config.json not found"),
        (["--hf-path", "{tmp}/no_weights"], "'--hf-path'.*no_weights has no \\*.safetensors"),
        (["--hf-path", "{source}", "-q", "--q-bits", "5"], "'--q-bits'.*'5' is not one of"),
        (["--hf-path", "{source}", "-q", "--q-group-size", "48"], "'--q-group-size'.*'48'"),
        (
            ["--hf-path", "{source}", "--mlx-path", "{tmp}/existing"],
            "'--mlx-path'.*existing already exists",
        ),
        (["--hf-path", "{source}", "-q", "--dequantize"], "'--dequantize'.*cannot be combined"),
        (["--hf-path", "{source}", "--dequantize"], "'--dequantize'.*is not quantized"),
        (["--hf-path", "{source}", "--quantize-vision"], "'--quantize-vision'.*with --quantize"),
        (["--hf-path", "{source}", "--upload-repo", "noslash"], "'--upload-repo'.*'noslash'"),
        (
            ["--hf-path", "{source}", "--mlx-path", "{source}", "--force"],
            "'--mlx-path'.*source checkpoint's folder",
        ),
        (
            ["--hf-path", "{source}", "--mlx-path", "{source}/..", "--force"],
            "'--mlx-path'.*source checkpoint's folder",
        ),
        (
            ["--hf-path", "{source}", "--mlx-path", "{tmp}/existing", "--force"],
            "'--mlx-path'.*existing holds files that are not a model's",
        ),
    ],
)
def test_bad_input_is_named_and_changes_nothing(source, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps(quantizable_config()))
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("old model")
    args = [a.format(tmp=tmp_path, source=source) for a in args]
    before, source_before = snapshot(tmp_path), snapshot(source)
    result = run_cli("--mlx-path", str(tmp_path / "out"), *args)  # the last --mlx-path wins
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert snapshot(tmp_path) == before and snapshot(source) == source_before


def test_quantizing_a_quantized_checkpoint_is_refused(source, tmp_path):
    quantized = convert(source, tmp_path / "q4", quantize=True)
    with pytest.raises(ConvertError, match="--quantize: .* already quantized"):
        convert(quantized, tmp_path / "again", quantize=True)
    assert not (tmp_path / "again").exists()


@pytest.fixture(scope="module")
def old_model(source, tmp_path_factory) -> Path:
    """A bf16 conversion of the source: the "old model" a forced conversion replaces."""
    return convert(source, tmp_path_factory.mktemp("old") / "model", dtype="bfloat16")


def copy_of(model: Path, target: Path) -> Path:
    shutil.copytree(model, target)
    return target


def test_failed_forced_conversion_keeps_the_old_model(source, old_model, tmp_path, monkeypatch):
    target = copy_of(old_model, tmp_path / "out")
    before = snapshot(target)
    saved = []

    def failing_save(file, shard):
        saved.append(file)
        file.write_bytes(b"half a shard")  # the disk fills up in the middle of the weights
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert_module, "save_shard", failing_save)
    result = run_cli(
        "--hf-path", str(source), "--mlx-path", str(target), "--force", "--dtype", "float32"
    )
    assert saved  # it failed midway, with part of the weights written
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing partial left
    assert snapshot(target) == before


def test_forced_conversion_replaces_the_old_model(
    source, old_model, inputs, source_logits, tmp_path
):
    target = copy_of(old_model, tmp_path / "out")
    result = run_cli(
        "--hf-path", str(source), "--mlx-path", str(target), "--force", "--dtype", "float32"
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directory
    assert target.stat().st_mode & 0o777 == 0o755
    np.testing.assert_array_equal(logits(load_model(target), inputs), source_logits)


@pytest.mark.parametrize("pause, replaced", [("staged", False), ("swapped", True)])
def test_sigkilled_conversion_leaves_old_or_new_model(
    source, old_model, inputs, source_logits, tmp_path, pause, replaced
):
    target = copy_of(old_model, tmp_path / "out")
    before = snapshot(target)
    args = ["--hf-path", str(source), "--mlx-path", str(target), "--force", "--dtype", "float32"]
    kill_at(pause, ["-m", "mlx_smolvlm.convert", *args])
    assert any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # what the kill left
    if replaced:
        np.testing.assert_array_equal(logits(load_model(target), inputs), source_logits)
    else:
        assert snapshot(target) == before
    convert(source, target, dtype="float32", force=True)  # the next run cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_upload_repo_is_passed_to_the_hub(source, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id, repo_type):
            calls.append(("upload", Path(folder_path), repo_id, repo_type))

    monkeypatch.setattr(convert_module, "HfApi", FakeApi)
    out = tmp_path / "out"
    result = run_cli(
        "--hf-path", str(source), "--mlx-path", str(out), "--upload-repo", "me/tiny-mlx"
    )
    assert result.exit_code == 0, result.output
    assert calls == [("create", "me/tiny-mlx", True), ("upload", out, "me/tiny-mlx", "model")]


@pytest.mark.parametrize(
    "run",
    [
        lambda root: runpy.run_path(str(root / "convert.py"), run_name="__main__"),
        lambda root: runpy.run_module("mlx_smolvlm.convert", run_name="__main__"),
    ],
    ids=["convert.py", "-m mlx_smolvlm.convert"],
)
@pytest.mark.filterwarnings("ignore:'mlx_smolvlm.convert' found in sys.modules")  # imported above
def test_command_line_entry_points(run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["convert", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        run(Path(__file__).resolve().parents[1])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quantize-vision" in out and "--q-group-size" in out


def test_quantize_vision_warns_about_cpu_prefill(source, tmp_path, capsys):
    convert(source, tmp_path / "q8v", quantize=True, q_bits=8, quantize_vision=True)
    err = capsys.readouterr().err
    if mx.metal.is_available():
        assert "--quantize-vision" not in err
    else:
        assert "Warning: --quantize-vision" in err and "~50x slower" in err
    convert(source, tmp_path / "q8", quantize=True, q_bits=8)
    assert "--quantize-vision" not in capsys.readouterr().err
