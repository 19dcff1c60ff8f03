"""Text generation about images: the Python API and `python -m mlx_smolvlm.generate`.

The token loop is mlx-lm's `generate_step` (chunked prefill that only evaluates the KV cache,
logits for the last prompt position only, asynchronous decode). What is SmolVLM-specific
lives here: turning a prompt and images into input embeddings once, and reusing a
conversation's KV cache so that a new turn prefills only its new tokens and new images.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import click
import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache, can_trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .cpu_kernels import host_kernels
from .model import Model

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
MODEL_HELP = (
    f"Hub repo id or local path [default: the base model of --adapter-path, else {DEFAULT_MODEL}]."
)
IMAGE_TYPES = ("image", "image_url")


@dataclass
class GenerationResult:
    """Generated text and statistics. From `stream_generate`, `text` is the newest segment."""

    text: str = ""
    token: int | None = None
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB, as reported by mx.get_peak_memory()
    finish_reason: str | None = None  # "stop" (end-of-turn token) or "length" (max_tokens)

    def __str__(self) -> str:
        """The text, so that `print(generate(...))` prints the answer as with mlx-vlm."""
        return self.text


class PromptCache:
    """A conversation's KV cache and the token ids it holds, reused across turns.

    With `max_kv_size` the cache is bounded; it always keeps the first prompt's tokens up to
    its last image token, so images are never evicted.
    """

    def __init__(self, model: Model, max_kv_size: int | None = None):
        self.model = model
        self.max_kv_size = max_kv_size
        self.cache: list | None = None
        self.tokens: list[int] = []

    def reuse(self, ids: list[int], image_token_id: int, image_seq_len: int) -> int:
        """Keep the longest cached prefix of `ids` that ends outside an image; return its length."""
        if self.cache is not None and not can_trim_prompt_cache(self.cache):
            self.cache, self.tokens = None, []  # a rotated cache cannot be rewound
        common = 0
        for cached, new in zip(self.tokens, ids):
            if cached != new:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must be fed for logits
        # Never split an image's block of <image> tokens between cache and new input.
        while common > 0 and ids[common] == image_token_id and ids[common - 1] == image_token_id:
            common -= 1
        # The cache may hold more than `tokens` when a generation was stopped midway.
        if self.cache is not None and self.cache[0].offset > common:
            for c in self.cache:
                c.trim(c.offset - common)
        self.tokens = self.tokens[:common]
        return common

    def ensure(self, ids: list[int], image_token_id: int, capacity: int) -> list:
        """The per-layer caches, created on first use and sized for `capacity` tokens."""
        if self.cache is None:
            if self.max_kv_size is not None:
                images = [i for i, t in enumerate(ids) if t == image_token_id]
                keep = images[-1] + 1 if images else 0
                if keep >= self.max_kv_size:
                    raise ValueError(
                        f"max_kv_size {self.max_kv_size} cannot hold the {keep} prompt tokens "
                        "up to the last image, which are never evicted"
                    )
                self.cache = [
                    RotatingKVCache(max_size=self.max_kv_size, keep=keep)
                    for _ in self.model.language_model.layers
                ]
            else:
                self.cache = self.model.make_cache()
        for c in self.cache:
            if isinstance(c, KVCache):
                # One allocation for the whole generation instead of growing 256 tokens at a time.
                c.step = max(256, -(-capacity // 256) * 256)
        return self.cache


def images_from_messages(messages: list[dict]) -> list[Any]:
    """Image sources named inside chat messages, in order (None where only a placeholder)."""
    found = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for item in content:
                if item.get("type") in IMAGE_TYPES:
                    found.append(image_source(item))
    return found


def image_source(item: dict) -> Any:
    """The image an `image` / `image_url` message part names, or None for a bare placeholder."""
    for key in ("image", "path", "url"):
        if item.get(key) is not None:
            return item[key]
    url = item.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Map OpenAI-style `image_url` parts onto the template's `image` type."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {**item, "type": "image"} if item.get("type") == "image_url" else item
                for item in content
            ]
        out.append({**message, "content": content})
    return out


def videos_from_messages(messages: list[dict], extra: list[Any]) -> list[Any]:
    """Sources of the messages' video parts; bare `{"type": "video"}` parts take `extra` in order."""
    named = [
        next((item[k] for k in ("video", "path", "url") if item.get(k) is not None), None)
        for message in messages
        if isinstance(message.get("content"), list)
        for item in message["content"]
        if item.get("type") == "video"
    ]
    if named.count(None) != len(extra):
        raise ValueError(
            f"the messages have {named.count(None)} video parts without a source "
            f"but {len(extra)} videos were given"
        )
    pending = iter(extra)
    return [next(pending) if src is None else src for src in named]


def _as_list(value: Any) -> list[Any]:
    """None -> [], a list or tuple -> a list, anything else -> [value]."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def prepare_inputs(
    processor: Any,
    prompt: str | list[dict],
    image: Any = None,
    system: str | None = None,
    video: Any = None,
    **image_kwargs: Any,
) -> dict:
    """Render the chat template for `prompt` and process it with its images and videos.

    A prompt already rendered with the chat template (it starts as the template's renderings
    do) is processed as it is; a plain prompt is wrapped in a user turn with its images.

    `video` (a file path or a `video_processing.Video`, or a list of them) goes before the
    images of a string prompt, or fills the bare video parts of chat messages.
    """
    from .processing import build_messages

    extra = _as_list(image)
    videos = _as_list(video)
    if isinstance(prompt, str) and processor.is_rendered(prompt):
        # Already rendered (e.g. by apply_chat_template, as mlx-vlm users do): used as it is.
        if system is not None:
            raise ValueError(
                "system cannot be added to a prompt that is already rendered with the chat "
                "template: put it in the messages you render"
            )
        return processor(
            text=prompt,
            images=extra or None,
            videos=videos or None,
            return_tensors="np",
            add_special_tokens=not processor.tokenizer.starts_with_bos(prompt),
            **image_kwargs,
        )
    if isinstance(prompt, str):
        messages = build_messages(prompt, len(extra), system, num_videos=len(videos))
        images = extra
    else:
        messages = normalize_messages(prompt)
        if system is not None:
            messages = [
                {"role": "system", "content": [{"type": "text", "text": system}]},
                *messages,
            ]
        named = images_from_messages(messages)
        pending = iter(extra)
        images = [src if src is not None else next(pending, None) for src in named]
        if any(src is None for src in images):
            raise ValueError(
                f"the messages have {len(named)} image parts but only "
                f"{len(extra) + len(named) - images.count(None)} images were given"
            )
        images += list(pending)
        videos = videos_from_messages(messages, videos)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(
        text=text,
        images=images or None,
        videos=videos or None,
        return_tensors="np",
        add_special_tokens=not processor.tokenizer.starts_with_bos(text),
        **image_kwargs,
    )


def stream_generate(
    model: Model,
    processor: Any,
    prompt: str | list[dict],
    image: Any = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    system: str | None = None,
    kv_bits: int | None = None,
    kv_group_size: int | None = None,
    max_kv_size: int | None = None,
    prompt_cache: PromptCache | None = None,
    prefill_step_size: int = 512,
    vision_chunk_size: int = 2,  # tiles encoded at once: bounds the attention scores in memory
    video: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
    **image_kwargs: Any,
) -> Iterator[GenerationResult]:
    """Yield a `GenerationResult` per generated token (`text` holds the new text segment).

    `video` adds a video (SmolVLM2); `fps` and `max_frames` in `image_kwargs` override the
    checkpoint's frame sampling. `progress(stage, done, total)` hears how the prompt goes:
    stage "tiles" (image tiles encoded) then "prefill" (prompt tokens in the KV cache).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if seed is not None:
        mx.random.seed(seed)
    if kv_bits is not None and max_kv_size is not None:
        raise ValueError(
            "kv_bits and max_kv_size cannot be combined (mlx-lm has no rotating quantized cache)"
        )
    # Quantization groups run along head_dim (64 in the family).
    kv_group_size = kv_group_size or min(64, model.config.text_config.head_dim)
    tokenizer = processor.tokenizer
    start = time.perf_counter()
    inputs = prepare_inputs(processor, prompt, image, system, video=video, **image_kwargs)
    ids = [int(t) for t in inputs["input_ids"][0]]
    prompt_cache = prompt_cache or PromptCache(model, max_kv_size)
    config = model.config
    reused = prompt_cache.reuse(ids, config.image_token_id, config.image_seq_len)
    new_ids = ids[reused:]
    cache = prompt_cache.ensure(ids, config.image_token_id, len(new_ids) + max_tokens)

    features = None
    if "pixel_values" in inputs and config.image_token_id in new_ids:
        # Tiles whose <image> tokens are already in the cache are not encoded again.
        first = ids[:reused].count(config.image_token_id) // config.image_seq_len
        features = encode_tiles(
            model,
            inputs["pixel_values"][:, first:],
            inputs["pixel_attention_mask"][:, first:],
            vision_chunk_size,
            progress,
        )
    embeddings = model.embed([new_ids], image_features=features)[0]

    sampler = make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty)
    stops = tokenizer.eos_token_ids
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    steps = with_host_kernels(
        generate_step(
            mx.array(new_ids),
            model.language_model,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=cache,
            prefill_step_size=prefill_step_size,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            quantized_kv_start=0,
            input_embeddings=embeddings,
            prompt_progress_callback=progress and partial(progress, "prefill"),
        )
    )
    result = GenerationResult(prompt_tokens=len(new_ids))
    decode_start = start
    for n, (token, _) in enumerate(steps):
        if n == 0:
            decode_start = time.perf_counter()
            result.prompt_tps = len(new_ids) / (decode_start - start)
        else:
            result.generation_tps = n / (time.perf_counter() - decode_start)
        result.token = token
        if token in stops:
            result.finish_reason = "stop"
            break
        detokenizer.add_token(token)
        result.token_ids.append(token)
        result.generation_tokens = len(result.token_ids)
        if result.generation_tokens == max_tokens:
            result.finish_reason = "length"
            break
        result.text = detokenizer.last_segment
        yield replace(result)
    detokenizer.finalize()
    result.text = detokenizer.last_segment
    result.finish_reason = result.finish_reason or "length"
    result.peak_memory = mx.get_peak_memory() / 1e9
    fed = new_ids + result.token_ids + ([result.token] if result.finish_reason == "stop" else [])
    prompt_cache.tokens = (prompt_cache.tokens + fed)[: cache[0].offset]
    yield result


def encode_tiles(
    model: Model,
    pixel_values: Any,
    pixel_attention_mask: Any,
    chunk_size: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> mx.array:
    """Image features of the prompt's tiles, `chunk_size` tiles at a time, reporting each."""
    if progress is None:
        with host_kernels():
            return model.get_image_features(pixel_values, pixel_attention_mask, chunk_size)
    total = pixel_values.shape[1]
    parts = []
    for start in range(0, total, chunk_size):
        with host_kernels():
            part = model.get_image_features(
                pixel_values[:, start : start + chunk_size],
                pixel_attention_mask[:, start : start + chunk_size],
                chunk_size,
            )
        if part.size:  # a chunk of padding tiles has no features
            parts.append(part)
        progress("tiles", min(start + chunk_size, total), total)
    return mx.concatenate(parts)


def with_host_kernels(steps: Iterator[Any]) -> Iterator[Any]:
    """Run each step of a generation loop inside `host_kernels()`, but not the caller's code."""
    while True:
        with host_kernels():
            item = next(steps, None)
        if item is None:
            return
        yield item


def generate(
    model: Model,
    processor: Any,
    prompt: str | list[dict],
    image: Any = None,
    verbose: bool = False,
    **kwargs: Any,
) -> GenerationResult:
    """Generate a whole answer; with `verbose`, stream it to stdout and print statistics."""
    text = []
    result = GenerationResult()
    for result in stream_generate(model, processor, prompt, image, **kwargs):
        text.append(result.text)
        if verbose:
            print(result.text, end="", flush=True)
    result.text = "".join(text)
    if verbose:
        print()
        print_stats(result)
    return result


def print_stats(result: GenerationResult) -> None:
    """The mlx-lm style summary of a generation."""
    print("=" * 10)
    print(f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.3f} tokens-per-sec")
    print(
        f"Generation: {result.generation_tokens} tokens, {result.generation_tps:.3f} tokens-per-sec"
    )
    print(f"Peak memory: {result.peak_memory:.3f} GB")


def _apply(f, options: list) -> Any:
    """Decorate `f` with click options, listed in the order --help shows them."""
    for option in reversed(options):
        f = option(f)
    return f


def model_options(f):
    """--model, --adapter-path and --dtype, shared by the generate and chat commands."""
    return _apply(f, [
        click.option("--model", default=None, help=MODEL_HELP),
        click.option(
            "--adapter-path",
            default=None,
            help="LoRA adapters to apply (from mlx_smolvlm.lora); their base model and image "
            "settings are the defaults.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "float16", "bfloat16"]),
            default=None,
            help="Compute dtype (default: float32 on the CPU backend, the checkpoint's on Metal).",
        ),
    ])  # fmt: skip


def sampling_options(f):
    """Sampling and KV-cache options, shared by the generate and chat commands."""
    return _apply(f, [
        click.option("--temperature", "--temp", default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling threshold."),
        click.option("--top-k", default=0, show_default=True, help="Sample from the k likeliest (0: off)."),
        click.option("--min-p", default=0.0, show_default=True, help="Minimum relative probability."),
        click.option("--repetition-penalty", type=float, default=None, help="e.g. 1.1; off by default."),
        click.option("--seed", type=int, default=None, help="Random seed for reproducible sampling."),
        click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None, help="Quantize the KV cache."),
        click.option("--max-kv-size", type=int, default=None, help="Bound the KV cache (images kept)."),
    ])  # fmt: skip


def sampling_kwargs(
    temperature, top_p, top_k, min_p, repetition_penalty, seed, kv_bits, max_kv_size
) -> dict[str, Any]:
    """`stream_generate` keyword arguments for the sampling options given on the command line."""
    return {
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
        "repetition_penalty": repetition_penalty, "seed": seed,
        "kv_bits": int(kv_bits) if kv_bits else None, "max_kv_size": max_kv_size,
    }  # fmt: skip


def image_options(f):
    """The processor's image options, shared by the generate and chat commands."""
    return _apply(f, [
        click.option(
            "--resize-shape",
            type=int,
            nargs=2,
            default=None,
            help="Resize every input image to HEIGHT WIDTH before processing.",
        ),
        click.option(
            "--image-splitting/--no-image-splitting",
            default=None,
            help="Cut images into tiles plus a global view (the checkpoint's or the adapters' "
            "setting by default), or encode each image as one tile (fewer tokens, less detail).",
        ),
        click.option(
            "--longest-edge",
            type=int,
            default=None,
            help="Resize images to this longest edge before tiling (checkpoint default otherwise).",
        ),
        click.option(
            "--max-tiles",
            type=int,
            default=None,
            help="At most this many tiles per image (plus the global view): saves tokens.",
        ),
        click.option(
            "--no-upscale",
            is_flag=True,
            help="Do not upscale images smaller than the longest edge.",
        ),
    ])  # fmt: skip


def image_kwargs_from_cli(resize_shape, image_splitting, longest_edge, max_tiles, no_upscale):
    """Processor keyword arguments for the image options given on the command line."""
    kwargs: dict[str, Any] = {}
    if image_splitting is not None:
        kwargs["do_image_splitting"] = image_splitting
    if longest_edge is not None:
        kwargs["longest_edge"] = longest_edge
    if max_tiles is not None:
        kwargs["max_tiles"] = max_tiles
    if no_upscale:
        kwargs["upscale"] = False
    return kwargs


def load_images(paths: tuple[str, ...], resize_shape: tuple[int, int] | None) -> list[Any]:
    """Load the images named on the command line, resized if asked."""
    from PIL import Image

    from .image_processing import load_image

    images = [load_image(p) for p in paths]
    if resize_shape:
        height, width = resize_shape
        images = [im.resize((width, height), Image.Resampling.LANCZOS) for im in images]
    return images


class TerminalProgress:
    """Image tiles encoded and prompt tokens prefilled, on one self-erasing line of stderr."""

    LABELS = {"tiles": "encoding image tiles", "prefill": "prefilling prompt tokens"}

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stderr
        self.shown = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == "prefill" and done >= total:
            self.clear()  # the answer starts on a clean line
            return
        self.stream.write(f"\r\033[K[{self.LABELS[stage]} {done}/{total}]")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        """Erase the progress line."""
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def terminal_progress(enabled: bool) -> TerminalProgress | None:
    """A progress reporter when `enabled` and stderr is a terminal, else None."""
    return TerminalProgress() if enabled and sys.stderr.isatty() else None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@click.option("--image", multiple=True, help="Image path or URL; repeat for several images.")
@click.option("--video", default=None, help="Video file (mp4, mov, webm, gif...); needs PyAV.")
@click.option("--fps", type=float, default=None, help="Video frames sampled per second [1].")
@click.option("--max-frames", type=int, default=None, help="Most video frames sampled [64].")
@click.option(
    "--prompt", default=None, help="The question [Describe this image. / Describe this video.]"
)
@click.option("--system", default=None, help="System prompt.")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Most tokens to generate.",
)
@sampling_options
@image_options
@click.option(
    "--verbose/--quiet",
    default=True,
    show_default=True,
    help="Progress of long prompts on the terminal and statistics at the end.",
)
def main(
    model,
    adapter_path,
    dtype,
    image,
    video,
    fps,
    max_frames,
    prompt,
    system,
    max_tokens,
    resize_shape,
    image_splitting,
    longest_edge,
    max_tiles,
    no_upscale,
    verbose,
    **sampling,
):
    """Answer PROMPT about the given images or video with a SmolVLM model, streaming the text."""
    from .loading import load

    if video is None and (fps is not None or max_frames is not None):
        raise click.UsageError("--fps and --max-frames apply to --video")
    prompt = prompt or ("Describe this video." if video else "Describe this image.")
    # Unset sampling options fall back to the checkpoint's video_sampling.
    frames = {k: v for k, v in {"fps": fps, "max_frames": max_frames}.items() if v is not None}
    try:
        images = load_images(image, resize_shape)
        vlm, processor = load(model, adapter_path=adapter_path, dtype=dtype)
        result = GenerationResult()
        for result in stream_generate(
            vlm,
            processor,
            prompt,
            images,
            max_tokens=max_tokens,
            system=system,
            video=video,
            progress=terminal_progress(verbose),
            **sampling_kwargs(**sampling),
            **frames,
            **image_kwargs_from_cli(
                resize_shape, image_splitting, longest_edge, max_tiles, no_upscale
            ),
        ):
            print(result.text, end="", flush=True)
        print()
    except (FileNotFoundError, ValueError, OSError, ImportError) as e:
        raise click.ClickException(str(e)) from e
    if verbose:
        print_stats(result)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
