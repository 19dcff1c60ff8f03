"""Data-parallel LoRA under `mlx.launch --backend ring -n 2`: the same adapters as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from reference import write_checkpoint
from test_lora import COLOURS, caption_records, write_jsonl

from mlx_smolvlm.lora import run_training
from mlx_smolvlm.tuner import trainer

# mlx.launch is installed beside the Python running the tests (venv activated or not).
LAUNCH = str(Path(sys.executable).with_name("mlx.launch"))
ROOT = Path(__file__).resolve().parents[2]

# Runs lora's command line with every checkpoint write logged as "rank step", in every rank.
LOGGED_LORA = """
import sys

from mlx_smolvlm import lora
from mlx_smolvlm.tuner import trainer
from mlx_smolvlm.utils import distributed

log_file = sys.argv.pop(1)
save = trainer.save_checkpoint


def logged(adapter_path, model, optimizer, step, *rest):
    with open(log_file, "a") as log:
        log.write(f"{distributed.rank()} {step}\\n")
    return save(adapter_path, model, optimizer, step, *rest)


trainer.save_checkpoint = logged
lora.main()
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint and four captioned colour images of different answer lengths."""
    root = tmp_path_factory.mktemp("lora-dp")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(data / "images" / f"{name}.png")
    write_jsonl(data / "train.jsonl", caption_records())
    write_jsonl(data / "valid.jsonl", caption_records()[1:])
    return write_checkpoint(root / "tiny"), data


SETTINGS = {
    "batch_size": 4, "learning_rate": 1e-3, "save_every": 2, "steps_per_eval": 2, "seed": 3,
    "no_image_splitting": True, "grad_accumulation": 2,  # ranks average after accumulating
}  # fmt: skip


def run_one_rank(checkpoint: Path, data: Path, adapters: Path, iters: int, **extra) -> None:
    run_training(
        model=str(checkpoint), data=str(data), adapter_path=str(adapters), iters=iters,
        progress=False, **SETTINGS, **extra,
    )  # fmt: skip


def cli_options(checkpoint: Path, data: Path, adapters: Path, iters: int) -> list[str]:
    settings = {"model": checkpoint, "data": data, "adapter_path": adapters, "iters": iters}
    args = []
    for key, value in {**settings, **SETTINGS}.items():
        args += ["--" + key.replace("_", "-")] + ([] if value is True else [str(value)])
    return args


def state(adapters: Path) -> tuple[dict[str, np.ndarray], dict]:
    arrays, metadata = mx.load(str(adapters / trainer.STATE_FILE), return_metadata=True)
    return {k: np.array(v) for k, v in arrays.items()}, metadata


def assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5, err_msg=key)


def test_two_ranks_of_two_records_train_as_one_rank_of_four(setup, tmp_path):
    checkpoint, data = setup
    script, log = tmp_path / "logged_lora.py", tmp_path / "saves.log"
    script.write_text(LOGGED_LORA)
    two = tmp_path / "two-ranks"
    command = [
        LAUNCH, "--backend", "ring", "-n", "2", "--python", sys.executable,
        "--", str(script), str(log), *cli_options(checkpoint, data, two, iters=4),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=400
    )
    output = done.stdout.decode()
    # mlx.launch exits with 0 even when a rank failed: the output tells.
    assert done.returncode == 0 and "Saved adapters" in output, done.stderr.decode()[-3000:]
    assert "2 ranks × 2 records" in output
    assert output.count("Saved adapters") == 1  # rank 0 alone reports
    assert log.read_text().split("\n") == ["0 2", "0 4", ""]  # each checkpoint written once

    one = tmp_path / "one-rank"
    run_one_rank(checkpoint, data, one, iters=4)
    (two_state, two_meta), (one_state, one_meta) = state(two), state(one)
    assert_close(two_state, one_state)
    assert two_meta["step"] == "4"
    for a, b in zip(json.loads(two_meta["history"]), json.loads(one_meta["history"]), strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5)

    # The two-rank run resumes on one rank, and agrees with one rank trained straight through.
    run_one_rank(checkpoint, data, two, iters=6, resume=True)
    run_one_rank(checkpoint, data, tmp_path / "straight", iters=6)
    assert_close(state(two)[0], state(tmp_path / "straight")[0])
