"""The chat REPL and generate's progress lines, driven through a pseudo-terminal as a person would."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import real_model_dir
from PIL import Image
from terminal import KEYS, Terminal

from mlx_smolvlm import chat
from mlx_smolvlm.generation import GenerationResult
from mlx_smolvlm.generation.generate import encode_tiles
from mlx_smolvlm.random_checkpoint import save_random_checkpoint
from mlx_smolvlm.utils.progress import TerminalProgress

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint with SmolVLM-256M's tokenizer and processor files."""
    out = tmp_path_factory.mktemp("chat") / "tiny"
    return save_random_checkpoint(real_model_dir(), out, tiny=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    file = tmp_path_factory.mktemp("images") / "red.png"
    Image.new("RGB", (600, 400), (200, 30, 30)).save(file)
    return file


def test_repl_commands_editing_history_and_ctrl_keys(checkpoint, tmp_path):
    history = tmp_path / "history"
    term = Terminal(["-m", "mlx_smolvlm.chat", "--model", str(checkpoint), "--max-tokens", "3000",
                     "--history-file", str(history)])  # fmt: skip
    try:
        term.expect("/help for the commands")
        term.expect(">> ")
        # Line editing: "/hlp", two steps left, "e" -> "/help".
        term.send("/hlp" + KEYS["left"] * 2 + "e" + KEYS["enter"])
        assert "/image PATH" in term.expect(r"Ctrl-C stops an answer.*\n")
        term.expect(">> ")
        term.send("/wat" + KEYS["enter"])
        term.expect(r"Unknown command /wat: /help lists the commands\.")
        term.expect(">> ")
        term.send("/image" + KEYS["enter"])
        term.expect(r"Usage: /image PATH")
        term.expect(">> ")
        # Ctrl-C at the prompt drops the typed text: the next line is a command on its own.
        term.send("half a question")
        term.expect("half a question")  # echoed by readline: it is reading the line
        term.send(KEYS["ctrl-c"])
        term.expect(">> ")
        term.send("/reset" + KEYS["enter"])
        term.expect(r"\[conversation cleared\]")
        term.expect(">> ")
        term.send(KEYS["up"] + KEYS["enter"])  # history: /reset again
        term.expect(r"\[conversation cleared\]")
        term.expect(">> ")
        # Ctrl-C during an answer (3000 tokens: long) stops it; the chat goes on.
        for question in ("Tell me a long story.", "And another one."):
            term.send(question + KEYS["enter"])
            term.expect(question + r"\s*\r?\n\s*\S")  # answer text is arriving
            term.send(KEYS["ctrl-c"])
            term.expect(r"\[stopped\]")
            term.expect(">> ")
        term.send(KEYS["ctrl-d"])
        assert term.wait() == 0
    finally:
        term.close()
    assert term.output.endswith("\n")  # the shell's prompt starts on a line of its own
    assert "Traceback" not in term.output
    assert "/reset" in history.read_text()


def test_stopped_answer_stays_in_the_conversation(monkeypatch):
    """Ctrl-C keeps the question and the part of the answer shown; the next turn sees both."""
    seen = []

    def fake_stream(vlm, processor, messages, **kwargs):
        seen.append([m["content"][-1]["text"] for m in messages])
        yield GenerationResult(text="partial")
        if len(seen) == 1:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the first answer
        yield GenerationResult(text=" answer")

    monkeypatch.setattr(chat, "stream_generate", fake_stream)
    monkeypatch.setattr(chat, "load", lambda *a, **k: (None, None))
    result = CliRunner().invoke(chat.main, [], input="first\nsecond\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "partial [stopped]" in result.output
    assert seen == [["first"], ["first", "partial", "second"]]


def test_chat_shares_generates_sampling_flags():
    out = CliRunner().invoke(chat.main, ["--help"]).output
    for flag in ("--top-k", "--min-p", "--repetition-penalty", "--kv-bits", "--dtype",
                 "--max-kv-size", "--adapter-path", "--history-file", "--no-image-splitting"):  # fmt: skip
        assert flag in out


def test_generate_shows_progress_on_a_terminal_only(checkpoint, image):
    args = ["-m", "mlx_smolvlm.generate", "--model", str(checkpoint), "--image", str(image),
            "--max-tokens", "2"]  # fmt: skip
    term = Terminal(args)
    assert term.wait(300) == 0, term.output
    tiles = re.findall(r"\[encoding image tiles (\d+)/(\d+)\]", term.output)
    assert tiles and tiles[-1][0] == tiles[-1][1] and int(tiles[0][0]) < int(tiles[0][1])
    assert re.search(r"\[prefilling prompt tokens 512/\d+\]", term.output)
    quiet = Terminal([*args, "--quiet"])
    assert quiet.wait(300) == 0, quiet.output
    assert "encoding image tiles" not in quiet.output and "prefilling" not in quiet.output


def test_progress_line_erases_itself_and_chunked_encoding_is_exact(checkpoint, image):
    import io

    import mlx.core as mx
    import numpy as np

    from mlx_smolvlm import load

    stream = io.StringIO()
    progress = TerminalProgress(stream)
    progress("tiles", 1, 3)
    progress("prefill", 512, 1000)
    progress("prefill", 1000, 1000)
    assert stream.getvalue() == (
        "\r\x1b[K[encoding image tiles 1/3]\r\x1b[K[prefilling prompt tokens 512/1000]\r\x1b[K"
    )
    model, processor = load(checkpoint)
    inputs = processor(text="<image>", images=[str(image)])
    pixels, mask = inputs["pixel_values"], inputs["pixel_attention_mask"]
    calls = []
    chunked = encode_tiles(model, pixels, mask, 2, lambda *a: calls.append(a))
    whole = encode_tiles(model, pixels, mask, 2)
    tiles = pixels.shape[1]
    assert calls == [("tiles", min(n, tiles), tiles) for n in range(2, tiles + 2, 2)]
    np.testing.assert_allclose(np.array(chunked), np.array(whole), atol=1e-5)
    assert chunked.dtype == mx.float32


def test_ctrl_c_at_the_prompt_works_when_started_with_sigint_ignored(checkpoint):
    # A script's background job (or nohup) starts programs with SIGINT ignored.
    term = Terminal(["-m", "mlx_smolvlm.chat", "--model", str(checkpoint)], sigint_ignored=True)
    try:
        term.expect(">> ")
        term.send("half a question")
        term.expect("half a question")
        term.send(KEYS["ctrl-c"])
        term.expect(">> ")
        term.send("/exit" + KEYS["enter"])
        assert term.wait() == 0
    finally:
        term.close()
