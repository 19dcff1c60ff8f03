"""README's offline walk-through, run as it stands on a tiny random checkpoint."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import real_model_dir

ROOT = Path(__file__).resolve().parents[1]
HEADING = "### Trying it offline on a random-weight checkpoint"

pytestmark = pytest.mark.torch


def readme_block(heading: str, language: str = "bash") -> str:
    """The first ```language block of README.md after `heading`."""
    text = (ROOT / "README.md").read_text()
    assert heading in text, f"README.md lost its section {heading!r}"
    section = text[text.index(heading) :]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_walkthrough_runs_step_by_step(tmp_path):
    script = readme_block(HEADING)
    (tmp_path / "smolvlm-config").symlink_to(real_model_dir())
    script = script.replace("8080", str(free_port()))  # other tests may hold 8080
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MLX_SMOLVLM_QUIET": "1",
    }
    # -x echoes each command before it runs: a failure names its step.
    run = subprocess.run(["bash", "-euxo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, f"{out}\n{run.stderr}"
    assert "Traceback" not in run.stderr
    assert "Wrote a random-weight checkpoint to random-tiny" in out
    assert out.count("Prompt: ") == 2  # generate, then generate with the adapters
    assert "What colour is it?" not in out and ">> " not in out  # piped chat: no prompt echo
    assert "Saved adapters to toy-adapters" in out and "Wrote toy-fused" in out
    reply = json.loads(out.strip().splitlines()[-1])
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]
    adapter = json.loads((tmp_path / "toy-adapters" / "adapter_config.json").read_text())
    assert adapter["base_model"] == str((tmp_path / "random-tiny-mlx").resolve())
    assert adapter["image_kwargs"] == {"do_image_splitting": False}
    fused = json.loads((tmp_path / "toy-fused" / "preprocessor_config.json").read_text())
    assert fused["do_image_splitting"] is False

    # The model card written by convert: its snippet runs and prints the answer's text.
    card = (tmp_path / "random-tiny-mlx" / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    snippet = snippet.replace("path/to/this/model", str(tmp_path / "random-tiny-mlx"))
    snippet = snippet.replace("image.jpg", str(tmp_path / "red.png"))
    snippet = snippet.replace("max_tokens=128", "max_tokens=4")
    run = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "GenerationResult" not in run.stdout
