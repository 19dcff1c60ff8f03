"""Hostile input to the Python API, the CLIs, the chat REPL, config files, LoRA data and the Hub.

Every case asserts what the user sees: the exception and its message for the API; for a
command, a non-zero exit with one `Error:` line naming the culprit and no traceback.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from PIL import Image
from reference import save_hf_checkpoint, tiny_config_for_real_tokenizer

from mlx_smolvlm import load
from mlx_smolvlm.generate import generate, stream_generate
from mlx_smolvlm.generate import main as generate_main
from mlx_smolvlm.generation import batch_generate
from mlx_smolvlm.utils.validation import Command, ValidationError, fit_to_window

pytest.importorskip("transformers")
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 128  # max_position_embeddings of the test checkpoint: long prompts are cheap to make
ONE_TILE = {"do_image_splitting": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random SmolVLM with the real tokenizer and a 128-token context window."""
    from conftest import real_model_dir

    shared = real_model_dir("SmolVLM-256M-Instruct")
    config = tiny_config_for_real_tokenizer()
    config["text_config"]["max_position_embeddings"] = WINDOW
    path = tmp_path_factory.mktemp("tiny-window")
    save_hf_checkpoint(path, config, seed=3, tokenizer_dir=shared)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(checkpoint)


def run(module: str, *args: str | bytes, stdin: bytes | None = None, env: dict | None = None):
    """Run `python -m module args` and return the completed process (bytes output)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        input=stdin,
        cwd=ROOT,
        env={**os.environ, "MLX_SMOLVLM_QUIET": "1", **(env or {})},
        timeout=300,
    )


def error_line(stderr: bytes | str) -> str:
    """The one `Error:` line a failed command printed, checking there is no traceback."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, text
    return errors[0]


# ---------------------------------------------------------------------------
# Python API: every sampling, image and cache parameter


BAD_PARAMETERS = [
    ("max_tokens", -1),
    ("max_tokens", 2.5),
    ("max_tokens", True),
    ("max_tokens", "10"),
    ("temperature", -0.5),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("top_k", -1),
    ("top_k", 1.5),
    ("min_p", -0.1),
    ("min_p", 2.0),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.nan),
    ("seed", -1),
    ("seed", 2**64),
    ("seed", 1.5),
    ("seed", "42"),
    ("longest_edge", 0),
    ("longest_edge", -512),
    ("longest_edge", 256.5),
    ("max_tiles", 0),
    ("max_image_size", -1),
    ("do_image_splitting", "no"),
    ("kv_bits", 7),
    ("kv_bits", "8"),
    ("kv_group_size", 48),
    ("max_kv_size", 0),
    ("max_kv_size", -100),
    ("prefill_step_size", 0),
    ("vision_chunk_size", -1),
    ("fps", 0.0),
    ("max_frames", 0),
]


@pytest.mark.parametrize("name, value", BAD_PARAMETERS)
def test_generate_refuses_a_bad_parameter_by_name(loaded, name, value):
    model, processor = loaded
    with pytest.raises(ValidationError, match=rf"^{name} must ") as info:
        generate(model, processor, "Hi", **{"max_tokens": 2, name: value})
    assert info.value.param == name


@pytest.mark.parametrize(
    "name, value",
    [p for p in BAD_PARAMETERS if p[0] in ("max_tokens", "temperature", "top_p", "top_k", "seed")],
)
def test_batch_generate_refuses_a_bad_parameter_by_name(loaded, name, value):
    model, processor = loaded
    with pytest.raises(ValidationError, match=rf"^{name} must "):
        batch_generate(model, processor, ["Hi", "Ho"], **{"max_tokens": 2, name: value})


def test_misspelled_keywords_name_the_close_match(loaded, checkpoint):
    model, processor = loaded
    with pytest.raises(TypeError, match=r"generate\(\).*'max_token'.*'max_tokens'"):
        generate(model, processor, "Hi", max_token=5)
    with pytest.raises(TypeError, match=r"stream_generate\(\).*'temprature'.*'temperature'"):
        next(stream_generate(model, processor, "Hi", temprature=0.5))
    with pytest.raises(TypeError, match=r"batch_generate\(\).*'top_P'.*'top_p'"):
        batch_generate(model, processor, ["Hi"], top_P=0.5)
    with pytest.raises(TypeError, match=r"load\(\).*'adaptor_path'.*'adapter_path'"):
        load(checkpoint, adaptor_path="x")
    with pytest.raises(TypeError, match=r"'zzz'$"):  # nothing close: no suggestion
        generate(model, processor, "Hi", zzz=1)


def test_max_tokens_is_fitted_to_the_context_window(loaded):
    model, processor = loaded
    huge = 1_000_000_000  # once reserved a KV cache this long and crashed MLX
    result = generate(model, processor, "Hi", max_tokens=huge)
    room = WINDOW - result.prompt_tokens
    assert result.generation_tokens <= room
    assert result.notice and f"lowered from {huge} to {room}" in result.notice
    batched = batch_generate(model, processor, ["Hi", "Hello there"], max_tokens=huge)
    for one in batched:
        assert one.generation_tokens <= WINDOW - one.prompt_tokens and "lowered" in one.notice
    fitting = generate(model, processor, "Hi", max_tokens=3)
    assert fitting.notice is None and fitting.generation_tokens <= 3


def test_a_prompt_longer_than_the_window_is_refused(loaded):
    model, processor = loaded
    with pytest.raises(ValidationError, match=r"prompt has \d+ tokens.*context window.*128"):
        generate(model, processor, "word " * 200, max_tokens=4)
    with pytest.raises(ValidationError, match="context window"):
        batch_generate(model, processor, ["Hi", "word " * 200], max_tokens=4)


def test_max_tokens_zero_generates_nothing(loaded):
    model, processor = loaded
    for result in (
        generate(model, processor, "Hi", max_tokens=0),
        batch_generate(model, processor, ["Hi", "Ho"], max_tokens=0)[1],
    ):
        assert (result.text, result.generation_tokens, result.finish_reason) == ("", 0, "length")


def test_text_that_is_not_unicode_is_refused(loaded):
    model, processor = loaded
    undecodable = b"caf\xff".decode("utf-8", "surrogateescape")  # what argv gives for bad bytes
    with pytest.raises(ValidationError, match=r"prompt is not valid UTF-8 text \(byte 0xff"):
        generate(model, processor, undecodable, max_tokens=2)
    with pytest.raises(ValidationError, match="not valid UTF-8"):
        generate(model, processor, "Hi", system="\ud800", max_tokens=2)


def test_fit_to_window_edges():
    assert fit_to_window(10, 5, 16) == (5, None)
    assert fit_to_window(10, 6, 16) == (6, None)
    assert fit_to_window(10, 7, 16)[0] == 6
    with pytest.raises(ValidationError):
        fit_to_window(16, 1, 16)


# ---------------------------------------------------------------------------
# Command lines


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**64)], "--seed"),
        (["--max-tokens", "-1"], "--max-tokens"),
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "2"], "--top-p"),
        (["--top-k", "-3"], "--top-k"),
        (["--min-p", "1.5"], "--min-p"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--longest-edge", "0"], "--longest-edge"),
        (["--max-tiles", "-2"], "--max-tiles"),
        (["--resize-shape", "0", "10"], "--resize-shape"),
        (["--max-kv-size", "0"], "--max-kv-size"),
        (["--prompt", "\udcff oops"], "--prompt"),
    ],
)
def test_generate_cli_names_the_bad_option(checkpoint, args, culprit):
    result = CliRunner().invoke(generate_main, ["--model", str(checkpoint), *args])
    assert result.exit_code == 1, result.output
    line = error_line(result.stderr)
    assert line.startswith(f"Error: {culprit} "), line
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_generate_cli_with_a_huge_max_tokens_and_bad_bytes(checkpoint):
    out = run(
        "mlx_smolvlm.generate", "--model", str(checkpoint), "--prompt", "Hi",
        "--max-tokens", "1000000000", "--quiet",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert b"max_tokens lowered from 1000000000" in out.stderr
    # Bytes that are not UTF-8 in an argument: one line, no traceback.
    out = run("mlx_smolvlm.generate", "--model", str(checkpoint), "--prompt", b"caf\xe9 au lait")
    assert out.returncode == 1
    assert "--prompt is not valid UTF-8 text (byte 0xe9" in error_line(out.stderr)


def test_an_unexpected_error_is_one_line_unless_debug_is_asked(monkeypatch):
    @click.command(cls=Command)
    def boom():
        raise RuntimeError("wires\ncrossed")

    result = CliRunner().invoke(boom, [])
    assert result.exit_code == 1
    assert error_line(result.stderr) == (
        "Error: RuntimeError: wires crossed (MLX_SMOLVLM_DEBUG=1 shows the traceback)"
    )
    monkeypatch.setenv("MLX_SMOLVLM_DEBUG", "1")
    result = CliRunner().invoke(boom, [])
    assert isinstance(result.exception, RuntimeError)


# ---------------------------------------------------------------------------
# Broken checkpoints: config.json


def broken_copy(checkpoint: Path, tmp_path: Path, config: object) -> Path:
    """The checkpoint's files linked into a new folder, with `config` as its config.json."""
    path = tmp_path / "broken"
    path.mkdir()
    for file in checkpoint.iterdir():
        if file.name != "config.json":
            (path / file.name).symlink_to(file)
    (path / "config.json").write_text(json.dumps(config))
    return path


def valid_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: [c], "expected a JSON object, got list"),
        (lambda c: {**c, "vision_config": None}, "'vision_config' is None; expected an object"),
        (lambda c: {**c, "text_config": "llama"}, "'text_config' is 'llama'; expected an object"),
        (
            lambda c: {**c, "text_config": {**c["text_config"], "hidden_size": "64"}},
            "'text_config.hidden_size' is '64'; expected a positive integer",
        ),
        (
            lambda c: {**c, "vision_config": {**c["vision_config"], "num_attention_heads": 0}},
            "'vision_config.num_attention_heads' is 0; expected a positive integer",
        ),
        (
            lambda c: {**c, "text_config": {**c["text_config"], "rms_norm_eps": "small"}},
            "'text_config.rms_norm_eps' is 'small'; expected a positive number",
        ),
        (lambda c: {**c, "scale_factor": 2.5}, "'scale_factor' is 2.5; expected a positive"),
        (lambda c: {**c, "image_token_id": "<image>"}, "'image_token_id' is '<image>'"),
    ],
)
def test_a_broken_config_is_one_line_naming_the_key(checkpoint, tmp_path, mutate, message):
    path = broken_copy(checkpoint, tmp_path, mutate(valid_config(checkpoint)))
    result = CliRunner().invoke(generate_main, ["--model", str(path)])
    assert result.exit_code == 1
    line = error_line(result.stderr)
    assert str(path / "config.json") in line and message in line, line


def test_a_config_that_is_not_json_or_not_utf8(checkpoint, tmp_path):
    path = broken_copy(checkpoint, tmp_path, {})
    for content in (b"\xff\xfe{", b"[" * 100_000):
        (path / "config.json").write_bytes(content)
        result = CliRunner().invoke(generate_main, ["--model", str(path)])
        assert result.exit_code == 1
        assert "config.json: invalid JSON" in error_line(result.stderr)


# ---------------------------------------------------------------------------
# The chat REPL


def test_chat_reports_bad_lines_and_goes_on(checkpoint, tmp_path):
    stdin = b"".join(
        [
            b"Hi\n",
            b"caf\xe9 \xff\n",  # not UTF-8
            b"look: <image> here\n",  # an image placeholder with no image
            b"/image missing.png\n",
            b"word " * 200 + b"\n",  # longer than the context window
            b"Still there?\n",
            b"/exit\n",
        ]
    )
    out = run(
        "mlx_smolvlm.chat", "--model", str(checkpoint), "--max-tokens", "3", "--verbose",
        stdin=stdin,
    )  # fmt: skip
    stderr = out.stderr.decode()
    assert out.returncode == 0, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 4, stderr
    assert "line 2 is not valid UTF-8 (byte 0xe9)" in errors[0]
    assert "<image>" in errors[1] or "image" in errors[1]
    assert "missing.png" in errors[2]
    assert "context window" in errors[3]
    assert out.stdout.decode().count("Prompt:") == 2  # both good lines were answered


def test_chat_refuses_bad_options(checkpoint):
    from mlx_smolvlm import chat

    for args, culprit in ((["--seed", "-1"], "--seed"), (["--top-p", "0"], "--top-p")):
        result = CliRunner().invoke(chat.main, ["--model", str(checkpoint), *args], input="")
        assert result.exit_code == 1
        assert error_line(result.stderr).startswith(f"Error: {culprit} ")


# ---------------------------------------------------------------------------
# LoRA training data


def lora(checkpoint: Path, data: Path, adapters: Path) -> subprocess.CompletedProcess:
    return run(
        "mlx_smolvlm.lora", "--model", str(checkpoint), "--data", str(data),
        "--adapter-path", str(adapters), "--iters", "1", "--batch-size", "1",
        "--no-image-splitting",
    )  # fmt: skip


def test_lora_names_the_file_and_line_of_a_non_utf8_byte(checkpoint, tmp_path):
    good = json.dumps({"prompt": "Q", "completion": "A"}).encode()
    (tmp_path / "train.jsonl").write_bytes(
        good + b"\n" + b'{"prompt": "caf\xe9", "completion": "A"}\n'
    )
    out = lora(checkpoint, tmp_path, tmp_path / "adapters")
    assert out.returncode == 1
    line = error_line(out.stderr)
    assert f"{tmp_path / 'train.jsonl'}:2: not valid UTF-8 (byte 0xe9" in line, line
    assert not (tmp_path / "adapters").exists()


def test_lora_finds_a_truncated_image_before_training(checkpoint, tmp_path):
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "red.png")
    Image.effect_noise((256, 256), 60).convert("RGB").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    records = [
        {"image": "red.png", "prompt": "Colour?", "completion": "Red."},
        {"image": "cut.png", "prompt": "Colour?", "completion": "Grey."},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = lora(checkpoint, tmp_path, tmp_path / "adapters")
    assert out.returncode == 1
    stderr = out.stderr.decode()
    assert "Traceback" not in stderr and "train.jsonl:2: cannot read image" in stderr
    assert "truncated" in stderr
    assert b"trainable parameters" not in out.stdout  # found before training began
    assert not (tmp_path / "adapters").exists()


# ---------------------------------------------------------------------------
# The Hub: unreachable or silent


@pytest.fixture
def silent_hub():
    """An HF_ENDPOINT that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"  # nobody listens there afterwards


@pytest.mark.parametrize("kind", ["silent", "refusing"])
def test_an_unreachable_hub_fails_within_seconds_with_what_to_do(silent_hub, tmp_path, kind):
    endpoint = silent_hub if kind == "silent" else closed_port()
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_OFFLINE": "0",
    }
    out = run("mlx_smolvlm.generate", "--model", "someone/some-model", env=env)
    assert out.returncode == 1
    line = error_line(out.stderr)
    assert "'someone/some-model'" in line and "local folder" in line and "HF_HUB_OFFLINE=1" in line


# ---------------------------------------------------------------------------
# Broken files given to the commands


def test_broken_images_on_the_command_line_are_named(checkpoint, tmp_path):
    Image.effect_noise((128, 128), 50).convert("RGB").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a picture")
    (tmp_path / "folder.png").mkdir()
    for name in ("cut.png", "empty.png", "text.png", "folder.png", "absent.png"):
        args = ["--model", str(checkpoint), "--image", str(tmp_path / name)]
        result = CliRunner().invoke(generate_main, args)
        assert result.exit_code == 1, name
        assert name in error_line(result.stderr)


def test_broken_checkpoint_files_are_named(checkpoint, tmp_path):
    path = broken_copy(checkpoint, tmp_path, valid_config(checkpoint))
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(generate_main, ["--model", str(path)])
    assert result.exit_code == 1 and "model.safetensors" in error_line(result.stderr)
    weights.write_bytes(data)
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.json").write_text("{broken")
    result = CliRunner().invoke(generate_main, ["--model", str(path)])
    assert result.exit_code == 1 and "tokenizer.json" in error_line(result.stderr)
    result = CliRunner().invoke(generate_main, ["--model", str(weights)])
    assert result.exit_code == 1 and "is a file" in error_line(result.stderr)


def test_every_command_reports_unexpected_errors_in_one_line():
    """Every CLI (and every subcommand of a group) is a `Command`, so none shows a traceback."""
    import importlib

    package = ROOT / "mlx_smolvlm"
    commands = []
    for path in sorted(package.glob("*.py")):
        module = importlib.import_module(f"mlx_smolvlm.{path.stem}")
        main = getattr(module, "main", None)
        if isinstance(main, click.Group):
            commands += list(main.commands.values())
        elif isinstance(main, click.Command):
            commands.append(main)
    assert len(commands) >= 9  # generate, chat, convert, fuse, lora, server, caption, docling...
    assert [c.name for c in commands if not isinstance(c, Command)] == []
