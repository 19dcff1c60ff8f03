"""`python -m mlx_smolvlm.chat`: a multi-turn conversation about images in the terminal.

The KV cache of earlier turns is kept, so each turn prefills only its new tokens and each
image is encoded once.
"""

from __future__ import annotations

import sys

import click

from .backends.cpu import report
from .generation import GenerationResult, PromptCache, stream_generate
from .generation.generate import print_stats
from .loading import load
from .processing.image import load_images
from .utils.options import image_kwargs, image_options, model_option, sampling_options
from .utils.validation import Command, check_generation_options, check_text, print_error

HELP = "Commands: /image PATH (attach an image to your next message), /reset, /exit"


def read_lines():
    """Lines from a pipe, or from the terminal with a prompt until Ctrl-D.

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
    while True:
        try:
            yield input(">> ")
        except UnicodeDecodeError as e:
            yield e
        except EOFError:
            return


def user_message(text: str, images: list) -> dict:
    """A user turn: the attached images first, then the text."""
    parts = [{"type": "image", "image": im} for im in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@model_option()
@click.option("--image", multiple=True, help="Image(s) for the first message; repeat for several.")
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-tokens", default=512, show_default=True, help="Most tokens per answer.")
@sampling_options
@click.option("--adapter-path", default=None, help="LoRA adapters to apply.")
@image_options
@click.option(
    "--verbose/--quiet",
    default=False,
    show_default=True,
    help="Statistics per turn and the backend's choices.",
)
def main(model, image, system, max_tokens, adapter_path, resize_shape, verbose, **options):
    """Chat with a SmolVLM model about one or more images."""
    sampling = {
        k: options.pop(k)
        for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    }
    kwargs = image_kwargs(**options)
    check_generation_options(max_tokens, sampling, kwargs, resize_shape, system=system)
    try:
        pending = load_images(image, resize_shape)
        vlm, processor = load(model, adapter_path=adapter_path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    messages: list[dict] = []
    cache = PromptCache(vlm)
    print(HELP, flush=True)
    for number, line in enumerate(read_lines(), start=1):
        if isinstance(line, UnicodeDecodeError):
            byte = line.object[line.start]
            print_error(f"line {number} is not valid UTF-8 (byte {byte:#04x}); ignored")
            continue
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            messages, pending, cache = [], [], PromptCache(vlm)
            print("[conversation cleared]", flush=True)
            continue
        if line.startswith("/image"):
            try:
                pending += load_images((line[len("/image") :].strip(),), resize_shape)
                print(f"[{len(pending)} image(s) attached to your next message]", flush=True)
            except (FileNotFoundError, ValueError, OSError) as e:
                print_error(str(e))
            continue
        turn = [*messages, user_message(line, pending)]
        reply, result = [], GenerationResult()
        try:
            check_text("message", line)
            for result in stream_generate(
                vlm,
                processor,
                turn,
                max_tokens=max_tokens,
                system=system,
                prompt_cache=cache,
                **sampling,
                **kwargs,
            ):
                if result.notice and not reply:
                    print(f"[{result.notice}]", file=sys.stderr, flush=True)
                reply.append(result.text)
                print(result.text, end="", flush=True)
        except (ValueError, OSError) as e:
            if reply:
                print(flush=True)
            # The message is dropped (its images stay attached) and the chat goes on.
            print_error(f"{e}; message ignored (/reset starts over)")
            continue
        messages, pending = turn, []
        print(flush=True)
        if verbose:
            print_stats(result)
            click.echo(report(vlm), err=True)
        messages.append(
            {"role": "assistant", "content": [{"type": "text", "text": "".join(reply)}]}
        )


if __name__ == "__main__":
    main()
