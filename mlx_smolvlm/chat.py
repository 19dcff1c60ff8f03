"""`python -m mlx_smolvlm.chat`: a multi-turn conversation about images in the terminal.

The KV cache of earlier turns is kept, so each turn prefills only its new tokens and each
image is encoded once. In a terminal the prompt has line editing and history (readline);
Ctrl-C during an answer stops it and keeps the conversation, the part of the answer shown
so far included; Ctrl-C at the prompt clears the line; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import atexit
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .backends.cpu import report
from .generation import GenerationResult, PromptCache, stream_generate
from .generation.generate import print_stats
from .loading import load
from .processing.image import load_images
from .utils.options import (
    dtype_option,
    image_kwargs,
    image_options,
    kv_cache_options,
    model_option,
    sampling_options,
)
from .utils.progress import terminal_progress
from .utils.validation import Command, check_generation_options, check_text, print_error

PROMPT = ">> "
COMMANDS = {
    "/image PATH": "attach an image to your next message (repeat for several)",
    "/reset": "forget the conversation and the attached images",
    "/help": "list these commands",
    "/exit": "leave (Ctrl-D too)",
}
HELP = "Commands:\n" + "\n".join(f"  {name:12} {what}" for name, what in COMMANDS.items())
HELP += "\n  Ctrl-C stops an answer; a line starting with // sends the rest of it with one /."


def setup_readline(history_file: Path | None) -> None:
    """Line editing and history at the prompt, read from and saved to `history_file` if given."""
    try:
        import readline  # optional: absent on some platforms (Windows)
    except ImportError:
        return
    if history_file is None:
        return
    try:
        readline.read_history_file(history_file)
    except OSError:
        pass  # no history yet
    readline.set_history_length(1000)
    atexit.register(_save_history, readline, history_file)


def _save_history(readline: Any, history_file: Path) -> None:
    """Write the prompt history, silently skipping an unwritable file."""
    try:
        readline.write_history_file(history_file)
    except OSError:
        pass


def read_lines() -> Iterator[str | UnicodeDecodeError]:
    """Lines from a pipe, or from the terminal with a prompt until Ctrl-D (Ctrl-C clears).

    A line that is not valid UTF-8 comes out as the `UnicodeDecodeError` it raised, so that
    the chat can report it and go on.
    """
    if not sys.stdin.isatty():
        for raw in sys.stdin.buffer:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield e
        return
    # Ctrl-C must reach the prompt even when the chat was started with SIGINT ignored (from a
    # script's background job or nohup, a disposition that programs inherit): Python then
    # keeps it ignored and Ctrl-C would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    while True:
        try:
            yield input(PROMPT)
        except UnicodeDecodeError as e:
            yield e
        except KeyboardInterrupt:
            print(flush=True)  # the typed line is dropped; a fresh prompt follows
        except EOFError:
            print(flush=True)  # leave the shell's prompt on a line of its own
            return


def user_message(text: str, images: list) -> dict:
    """A user turn: the attached images first, then the text."""
    parts = [{"type": "image", "image": im} for im in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def assistant_message(text: str) -> dict:
    """An assistant turn holding `text`."""
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


class CtrlC:
    """A SIGINT handler that raises KeyboardInterrupt and remembers that it did: a native
    library that swallows the exception cannot hide the key press from the token loop."""

    def __init__(self) -> None:
        self.pressed = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.pressed = True
        raise KeyboardInterrupt


def answer(vlm, processor, messages: list[dict], **kwargs) -> tuple[str, GenerationResult, bool]:
    """Stream the answer to `messages`; (text, last result, whether Ctrl-C stopped it)."""
    reply, result = [], GenerationResult()
    progress = kwargs.get("progress")
    steps = stream_generate(vlm, processor, messages, **kwargs)
    ctrl_c = CtrlC()
    previous = signal.signal(signal.SIGINT, ctrl_c)
    try:
        for result in steps:
            if result.notice and not reply:
                print(f"[{result.notice}]", file=sys.stderr, flush=True)
            reply.append(result.text)
            print(result.text, end="", flush=True)
            if ctrl_c.pressed:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        steps.close()
        if progress is not None:
            progress.clear()
        print(" [stopped]", flush=True)
        return "".join(reply), result, True
    except (ValueError, OSError):
        if progress is not None:
            progress.clear()
        if reply:
            print(flush=True)
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    print(flush=True)
    return "".join(reply), result, False


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@model_option(adapter_default=True)
@click.option("--image", multiple=True, help="Image(s) for the first message; repeat for several.")
@click.option("--system", default=None, help="System prompt.")
@click.option(
    "--max-tokens",
    default=512,
    show_default=True,
    help="Most tokens per answer.",
)
@sampling_options
@click.option(
    "--adapter-path",
    default=None,
    help="LoRA adapters to apply; their base model and image settings are the defaults.",
)
@dtype_option()
@image_options
@kv_cache_options
@click.option(
    "--history-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Keep the prompt's line history in this file across sessions.",
)
@click.option(
    "--verbose/--quiet",
    default=None,
    help="Statistics and the backend's choices after each answer / no progress line either "
    "[default: the progress line only].",
)
def main(
    model,
    image,
    system,
    max_tokens,
    adapter_path,
    dtype,
    resize_shape,
    kv_bits,
    max_kv_size,
    history_file,
    verbose,
    **options,
):
    """Chat with a SmolVLM model about one or more images."""
    sampling = {
        k: options.pop(k)
        for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    }
    kwargs = image_kwargs(**options)
    # Checked before the model loads: a bad option fails at once, naming its flag.
    check_generation_options(max_tokens, sampling, kwargs, resize_shape, system=system)
    generation = {
        "max_tokens": max_tokens,
        "system": system,
        "kv_bits": int(kv_bits) if kv_bits else None,
        "progress": terminal_progress(verbose is not False),
        **sampling,
        **kwargs,
    }
    try:
        pending = load_images(image, resize_shape)
        vlm, processor = load(model, adapter_path=adapter_path, dtype=dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    setup_readline(history_file)
    messages: list[dict] = []
    cache = PromptCache(vlm, max_kv_size)
    print("Type a message, or /help for the commands.", flush=True)
    for number, line in enumerate(read_lines(), start=1):
        if isinstance(line, UnicodeDecodeError):
            byte = line.object[line.start]
            print_error(f"line {number} is not valid UTF-8 (byte {byte:#04x}); ignored")
            continue
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if line.startswith("//"):
            line = line[1:]
        elif command in ("/exit", "/quit"):
            break
        elif command == "/help":
            print(HELP, flush=True)
            continue
        elif command == "/reset":
            messages, pending, cache = [], [], PromptCache(vlm, max_kv_size)
            print("[conversation cleared]", flush=True)
            continue
        elif command == "/image":
            if not argument.strip():
                print("Usage: /image PATH (an image file or URL for your next message)", flush=True)
                continue
            try:
                pending += load_images((argument.strip(),), resize_shape)
                print(f"[{len(pending)} image(s) attached to your next message]", flush=True)
            except (FileNotFoundError, ValueError, OSError) as e:
                print_error(str(e))
            continue
        elif line.startswith("/"):
            print(f"Unknown command {command}: /help lists the commands.", flush=True)
            continue
        turn = [*messages, user_message(line, pending)]
        try:
            check_text("message", line)
            text, result, stopped = answer(vlm, processor, turn, prompt_cache=cache, **generation)
        except (ValueError, OSError) as e:
            # The message is dropped (its images stay attached) and the chat goes on.
            print_error(f"{e}; message ignored (/reset starts over)")
            continue
        # A stopped answer stays in the conversation as far as it was shown.
        messages, pending = [*turn, assistant_message(text)], []
        if verbose and not stopped:
            print_stats(result)
            click.echo(report(vlm), err=True)


if __name__ == "__main__":
    main()
