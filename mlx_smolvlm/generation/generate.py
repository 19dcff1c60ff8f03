"""Text generation about images: `stream_generate`, `generate` and the inputs they build.

The token loop is mlx-lm's `generate_step` (asynchronous decode, its samplers and logits
processors); greedy decoding on the CPU backend's host decoder takes that backend's loop of
numpy steps (`backends.cpu.greedy_tokens`). What is SmolVLM-specific lives here: turning a
prompt and images into input embeddings once, prefilling them in one pass (`prefill`), and
reusing a conversation's KV cache so that a new turn prefills only its new tokens and new
images.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import chain
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream, maybe_quantize_kv_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from ..backends.cpu import greedy_tokens, prepare
from ..model import Model
from ..processing.messages import prompt_messages
from ..utils.validation import (
    IMAGE_KWARGS,
    check_image_kwargs,
    check_int,
    check_keywords,
    check_kv,
    check_sampling,
    check_text,
    fit_to_window,
)
from .cache import PromptCache


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
    notice: str | None = None  # e.g. max_tokens lowered to fit the context window

    def __str__(self) -> str:
        """The text, so that `print(generate(...))` prints the answer as with mlx-vlm."""
        return self.text


def _as_list(value: Any) -> list[Any]:
    """None -> [], a list or tuple -> a list, anything else -> [value]."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def render_prompt(
    processor: Any,
    prompt: str | list[dict],
    image: Any = None,
    system: str | None = None,
    video: Any = None,
) -> tuple[str, list[Any], list[Any]]:
    """The chat-template text of a prompt string or chat messages, with its images and videos.

    A prompt already rendered with the chat template (it starts as the template's renderings
    do, e.g. from `apply_chat_template` as mlx-vlm users do) is used as it is; a plain prompt
    is wrapped in a user turn with its images. `video` (a file path or a
    `processing.video.Video`, or a list of them) goes before the images of a string prompt, or
    fills the bare video parts of chat messages; `image` fills the bare image parts, the rest
    follow.
    """
    if isinstance(prompt, str) and processor.is_rendered(prompt):
        if system is not None:
            raise ValueError(
                "system cannot be added to a prompt that is already rendered with the chat "
                "template: put it in the messages you render"
            )
        return check_text("prompt", prompt), _as_list(image), _as_list(video)
    messages, images, videos = prompt_messages(prompt, _as_list(image), _as_list(video), system)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return check_text("prompt", text), images, videos


def prepare_inputs(
    processor: Any,
    prompt: str | list[dict],
    image: Any = None,
    system: str | None = None,
    video: Any = None,
    **image_kwargs: Any,
) -> dict:
    """Render the chat template for `prompt` and process it with its images and videos."""
    text, images, videos = render_prompt(processor, prompt, image, system, video)
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
    checkpoint's frame sampling. `max_tokens` is lowered to what the context window leaves
    after the prompt (the results' `notice` says so); a prompt that fills it is an error; with
    `max_tokens=0` nothing is encoded or prefilled. `progress(stage, done, total)` hears how
    the prompt goes: stage "tiles" (image tiles encoded) then "prefill" (prompt tokens in the
    KV cache).
    """
    check_keywords("stream_generate", image_kwargs, [*IMAGE_KWARGS, *STREAM_PARAMETERS])
    check_sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed)
    check_kv(kv_bits, kv_group_size, max_kv_size, model.config.text_config.head_dim)
    check_image_kwargs(image_kwargs)
    check_int("prefill_step_size", prefill_step_size, 1)
    check_int("vision_chunk_size", vision_chunk_size, 1)
    prepare(model)
    if seed is not None:
        mx.random.seed(seed)
    # Quantization groups run along head_dim (64 in the family).
    kv_group_size = kv_group_size or min(64, model.config.text_config.head_dim)
    tokenizer = processor.tokenizer
    start = time.perf_counter()
    inputs = prepare_inputs(processor, prompt, image, system, video=video, **image_kwargs)
    ids = [int(t) for t in inputs["input_ids"][0]]
    config = model.config
    # The cache is sized by what can be generated, never by an unchecked max_tokens.
    max_tokens, notice = fit_to_window(
        len(ids), max_tokens, config.text_config.max_position_embeddings
    )
    if max_tokens == 0:  # nothing to generate: no image encoding, no prefill
        yield GenerationResult(finish_reason="length", notice=notice)
        return
    prompt_cache = prompt_cache or PromptCache(model, max_kv_size)
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
    quantize = partial(
        maybe_quantize_kv_cache,
        quantized_kv_start=0,
        kv_group_size=kv_group_size,
        kv_bits=kv_bits,
    )
    history = mx.array(new_ids)
    first = prefill(
        model.language_model,
        embeddings,
        cache,
        prefill_step_size,
        partial(_sample, sampler, processors, history),
        quantize,
        progress and partial(progress, "prefill"),
    )
    # The processors (repetition penalty) see the prompt before the tokens generated.
    processors = [partial(_with_history, history, p) for p in processors]
    greedy = temperature == 0 and not processors
    host = greedy and greedy_tokens(model.language_model, first, cache, max_tokens - 1)
    steps = ((token, None) for token in host) if host else generate_step(
        mx.array([first]),
        model.language_model,
        max_tokens=max_tokens - 1,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=cache,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=0,
    )  # fmt: skip
    steps = chain([(first, None)], steps if max_tokens > 1 else [])
    result = GenerationResult(prompt_tokens=len(new_ids), notice=notice)
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


def prefill(
    model: Any,
    embeddings: mx.array,
    cache: list,
    step_size: int,
    sample: Callable[[mx.array], mx.array],
    quantize: Callable[[list], None],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Fill `cache` with the prompt's (length, hidden) input embeddings, `step_size` positions
    at a time, and return the first generated token, sampled by `sample` from the logits of the
    last position.

    Written here rather than left to mlx-lm's `generate_step`, whose prefill stops one token
    short and runs the last one alone: a second read of every weight, a third of a short
    prompt's time to the first token on the CPU."""
    total = embeddings.shape[0]
    progress = progress or (lambda done, total: None)
    progress(0, total)
    with mx.stream(generation_stream):
        for start in range(0, total, step_size):
            chunk = embeddings[start : start + step_size][None]
            if start + step_size < total:
                model.hidden_states(None, cache, chunk)
                quantize(cache)
                mx.eval([c.state for c in cache])
            else:
                hidden = model.hidden_states(None, cache, chunk)[:, -1:]
                quantize(cache)
                token = sample(model.logits(hidden)[:, -1, :])
                mx.eval(token)
            progress(min(start + step_size, total), total)
            mx.clear_cache()
    return int(token.item())


def _with_history(history: mx.array, processor: Callable, tokens: mx.array, logits: mx.array):
    """A logits processor that sees `history` (the prompt) before the generated `tokens`."""
    return processor(mx.concatenate([history, tokens]), logits)


def _sample(
    sampler: Callable, processors: list[Callable], tokens: mx.array, logits: mx.array
) -> mx.array:
    """A token from `logits`, as mlx-lm's steps sample: processors, log-softmax, sampler."""
    for processor in processors:
        logits = processor(tokens, logits)
    return sampler(logits - mx.logsumexp(logits, keepdims=True))


def encode_tiles(
    model: Model,
    pixel_values: Any,
    pixel_attention_mask: Any,
    chunk_size: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> mx.array:
    """Image features of the prompt's tiles, `chunk_size` tiles at a time, reporting each."""
    if progress is None:
        return model.get_image_features(pixel_values, pixel_attention_mask, chunk_size)
    total = pixel_values.shape[1]
    parts = []
    for start in range(0, total, chunk_size):
        part = model.get_image_features(
            pixel_values[:, start : start + chunk_size],
            pixel_attention_mask[:, start : start + chunk_size],
            chunk_size,
        )
        if part.size:  # a chunk of padding tiles has no features
            parts.append(part)
        progress("tiles", min(start + chunk_size, total), total)
    return mx.concatenate(parts)


STREAM_PARAMETERS = tuple(inspect.signature(stream_generate).parameters)[:-1]  # not **image_kwargs


def generate(
    model: Model,
    processor: Any,
    prompt: str | list[dict],
    image: Any = None,
    verbose: bool = False,
    **kwargs: Any,
) -> GenerationResult:
    """Generate a whole answer; with `verbose`, stream it to stdout and print statistics."""
    check_keywords("generate", kwargs, [*IMAGE_KWARGS, *STREAM_PARAMETERS, "verbose"])
    text = []
    result = GenerationResult()
    for result in stream_generate(model, processor, prompt, image, **kwargs):
        if verbose and not text and result.notice:
            print(f"[{result.notice}]", file=sys.stderr, flush=True)
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
