"""What a new user meets first: clear refusals, warnings that say what to do, random checkpoints."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import real_model_dir
from PIL import Image

from mlx_smolvlm import random_checkpoint
from mlx_smolvlm.generate import main as generate_main


def test_a_missing_blas_library_is_reported():
    env = {**os.environ, "MLX_SMOLVLM_BLAS": "/nonexistent/libblas.so"}
    env.pop("MLX_SMOLVLM_QUIET", None)
    run = subprocess.run([sys.executable, "-c", "import mlx_smolvlm"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    if sys.platform == "linux":
        assert "warning: MLX_SMOLVLM_BLAS=/nonexistent/libblas.so could not be loaded" in run.stderr
    else:
        assert "MLX_SMOLVLM_BLAS" not in run.stderr  # nothing to load on macOS
    env["MLX_SMOLVLM_QUIET"] = "1"
    run = subprocess.run([sys.executable, "-c", "import mlx_smolvlm"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0 and "warning" not in run.stderr


def test_random_checkpoint_refusals(tmp_path, monkeypatch):
    main = random_checkpoint.main
    result = CliRunner().invoke(main, [str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "config.json not found" in result.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, [str(real_model_dir()), str(tmp_path / "taken")])
    assert result.exit_code == 1 and "already exists; pass --force" in result.output
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    result = CliRunner().invoke(main, [str(real_model_dir()), str(tmp_path / "out")])
    assert result.exit_code == 1 and "needs torch and transformers" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.torch
def test_random_checkpoint_is_complete_and_loads(tmp_path, monkeypatch):
    from mlx_smolvlm import generate, load

    out = tmp_path / "random"
    result = CliRunner().invoke(
        random_checkpoint.main, [str(real_model_dir()), str(out), "--tiny", "--layers", "1"]
    )
    assert result.exit_code == 0, result.output
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "chat_template.json"):  # fmt: skip
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 1
    assert config["vision_config"]["hidden_size"] == 64
    model, processor = load(out)
    assert generate(model, processor, "Hello", max_tokens=3).generation_tokens >= 1

    # max_tokens=0 answers at once: no image is encoded and nothing is prefilled.
    def untouchable(*args, **kwargs):
        raise AssertionError("max_tokens=0 must not run the model")

    generation_module = importlib.import_module("mlx_smolvlm.generation.generate")
    monkeypatch.setattr(generation_module, "generate_step", untouchable)
    monkeypatch.setattr(generation_module, "encode_tiles", untouchable)
    monkeypatch.setattr(generation_module, "prefill", untouchable)
    image = Image.new("RGB", (600, 400), "red")
    result = generate(model, processor, "Describe it.", image, max_tokens=0)
    assert (result.text, result.generation_tokens, result.finish_reason) == ("", 0, "length")
    image.save(tmp_path / "red.png")
    args = [
        "--model",
        str(out),
        "--image",
        str(tmp_path / "red.png"),
        "--max-tokens",
        "0",
        "--quiet",
    ]
    result = CliRunner().invoke(generate_main, args)
    assert result.exit_code == 0 and result.output == "\n", result.output
