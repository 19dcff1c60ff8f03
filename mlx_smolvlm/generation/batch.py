"""Batched generation: several prompts, each with its own images, decoded together.

Each prompt is rendered as `generate.prepare_inputs` renders it (`render_prompt`), then ONE
processor call tokenizes the batch, left-padding the ids and padding every prompt's image tiles
with zero tiles (which the model drops). The decoder runs on mlx-lm's `BatchKVCache`, whose
per-sequence offsets start each sequence's RoPE positions at its first real token, so every
sequence sees the positions it would see alone. A sequence that finishes (end-of-turn token,
stop string, `max_tokens`) is filtered out of the cache and the others carry on.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import make_sampler

from ..backends.cpu import prepare
from ..model import Model
from ..model.mask import with_self
from ..utils.validation import (
    IMAGE_KWARGS,
    check_image_kwargs,
    check_int,
    check_keywords,
    check_sampling,
    fit_to_window,
)
from .cache import make_cache
from .generate import GenerationResult, render_prompt


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt of a batch is sampled and when it stops."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()  # stop strings: the text is cut before the first one


def render_batch(
    processor: Any,
    prompts: Sequence[str | list[dict]],
    images: Sequence[Any] | None = None,
    system: str | None = None,
    **image_kwargs: Any,
) -> dict:
    """Render every prompt's chat template and process the batch in one left-padded call."""
    images = list(images) if images is not None else [None] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} image entries for {len(prompts)} prompts")
    rendered = [render_prompt(processor, p, im, system) for p, im in zip(prompts, images)]
    texts = [text for text, _, _ in rendered]
    groups = [group for _, group, _ in rendered]
    return processor(
        text=texts,
        images=groups if any(groups) else None,
        return_tensors="np",
        add_special_tokens=not processor.tokenizer.starts_with_bos(texts[0]),
        **image_kwargs,
    )


@dataclass
class _Sequence:
    """Decoding state of one prompt: its tokens, text, and what was handed out so far."""

    params: SamplingParams
    detokenizer: Any
    result: GenerationResult
    emitted: int = 0  # characters of the text already handed out
    longest_stop: int = field(init=False)

    def __post_init__(self) -> None:
        self.longest_stop = max(map(len, self.params.stop), default=0)

    @property
    def done(self) -> bool:
        return self.result.finish_reason is not None

    def add(self, token: int, eos: Iterable[int]) -> str:
        """Take one sampled token; return the text that may be handed out now."""
        result = self.result
        if self.params.max_tokens == 0:
            return self._finish("length")
        result.token = token
        if token in eos:
            return self._finish("stop")
        self.detokenizer.add_token(token)
        result.token_ids.append(token)
        result.generation_tokens = len(result.token_ids)
        text = self.detokenizer.text
        cut = self._find_stop(text)
        if cut is not None:
            return self._finish("stop", cut)
        if result.generation_tokens >= self.params.max_tokens:
            return self._finish("length")
        return self._hand_out(len(text) - self._held_back(text))

    def _find_stop(self, text: str) -> int | None:
        """Where the first stop string starts in `text`, if any appeared."""
        start = max(0, self.emitted - self.longest_stop)
        found = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
        return min(found, default=None)

    def _held_back(self, text: str) -> int:
        """Length of the text's tail that may still grow into a stop string."""
        tails = [k for s in self.params.stop for k in range(1, len(s)) if text.endswith(s[:k])]
        return max(tails, default=0)

    def _hand_out(self, end: int) -> str:
        segment = self.detokenizer.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return segment

    def _finish(self, reason: str, cut: int | None = None) -> str:
        self.result.finish_reason = reason
        if cut is not None:
            return self._hand_out(cut)
        self.detokenizer.finalize()
        return self._hand_out(len(self.detokenizer.text))


def _attention_mask(cache: BatchKVCache, length: int) -> mx.array:
    """Causal mask hiding each sequence's left padding, for the next `length` positions."""
    return with_self(cache.make_mask(length))


def _sample(logits: mx.array, params: Sequence[SamplingParams]) -> mx.array:
    """One token per row, with each row's own sampler (one call when all rows agree)."""
    keys = [(p.temperature, p.top_p, p.min_p, p.top_k) for p in params]
    if all(key[0] == 0 for key in keys):
        # Greedy rows: the argmax of the logits is their log-softmax's, without computing it
        # (~1 ms a row on MLX's CPU backend, which computes exponentials one at a time).
        return mx.argmax(logits, axis=-1)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    samplers = {
        key: make_sampler(temp=key[0], top_p=key[1], min_p=key[2], top_k=key[3])
        for key in set(keys)
    }
    if len(samplers) == 1:
        return samplers[keys[0]](logprobs)
    return mx.concatenate([samplers[key](logprobs[i : i + 1]) for i, key in enumerate(keys)])


def _prefill(
    model: Model, inputs: dict, capacity: int, step: int, vision_chunk_size: int
) -> tuple[list, mx.array]:
    """Run the padded prompts through the decoder in chunks; logits of the last position only.

    A batch of one has no padding: it gets the model's own cache, as `stream_generate` does.
    """
    padding = (inputs["attention_mask"] == 0).sum(axis=1).tolist()
    language = model.language_model
    single = len(padding) == 1
    cache = make_cache(model, capacity, left_padding=padding)
    embeddings = model.embed(
        inputs["input_ids"],
        inputs.get("pixel_values"),
        inputs.get("pixel_attention_mask"),
        chunk_size=vision_chunk_size,
    )
    length = embeddings.shape[1]
    for start in range(0, length, step):
        chunk = embeddings[:, start : start + step]
        mask = None if single else _attention_mask(cache[0], chunk.shape[1])  # None: causal
        hidden = language.hidden_states(cache=cache, input_embeddings=chunk, mask=mask)
        if start + step < length:
            mx.eval([c.state for c in cache])
    return cache, language.logits(hidden[:, -1])


def _decode_step(
    model: Model, cache: list, tokens: mx.array, params: Sequence[SamplingParams]
) -> mx.array:
    """Feed one token per sequence and sample the next ones (lazily, on the MLX path)."""
    language = model.language_model
    if not isinstance(cache[0], BatchKVCache):
        return _sample(language(tokens[:, None], cache=cache)[:, -1], params)
    mask = _attention_mask(cache[0], 1)
    hidden = language.hidden_states(tokens[:, None], cache=cache, mask=mask)
    return _sample(language.logits(hidden[:, -1]), params)


def batch_stream_generate(
    model: Model,
    processor: Any,
    prompts: Sequence[str | list[dict]],
    images: Sequence[Any] | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    stop: Sequence[str] = (),
    sampling: Sequence[SamplingParams] | None = None,
    seed: int | None = None,
    system: str | None = None,
    eos_token_ids: Iterable[int] | None = None,
    should_stop: Callable[[int], bool] | None = None,
    prefill_step_size: int = 512,
    vision_chunk_size: int = 2,  # tiles encoded at once: bounds the attention scores in memory
    **image_kwargs: Any,
) -> Iterator[tuple[int, GenerationResult]]:
    """Yield `(prompt index, result)` as text arrives; `text` holds the new segment.

    Each prompt's last result has its `finish_reason` set ("stop", "length", or "cancelled"
    when `should_stop(index)` turned true). `sampling` gives each prompt its own
    `SamplingParams`; otherwise the keyword arguments apply to all. `eos_token_ids`
    replaces the tokenizer's end-of-turn tokens (an empty set never stops early). Each
    prompt's `max_tokens` is lowered to what the context window leaves after it (its
    results' `notice` says so); a prompt that fills the window is an error.
    """
    check_keywords("batch_stream_generate", image_kwargs, [*IMAGE_KWARGS, *BATCH_PARAMETERS])
    check_image_kwargs(image_kwargs)
    check_int("prefill_step_size", prefill_step_size, 1)
    check_int("vision_chunk_size", vision_chunk_size, 1)
    prepare(model)
    shared = SamplingParams(max_tokens, temperature, top_p, top_k, min_p, tuple(stop))
    params = list(sampling) if sampling is not None else [shared] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} sampling entries for {len(prompts)} prompts")
    for p in params:
        check_sampling(p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, seed=seed)
    if seed is not None:
        mx.random.seed(seed)
    if not prompts:
        return
    tokenizer = processor.tokenizer
    eos = set(tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)
    start = time.perf_counter()
    inputs = render_batch(processor, prompts, images, system, **image_kwargs)
    prompt_lengths = inputs["attention_mask"].sum(axis=1).tolist()
    window = model.config.text_config.max_position_embeddings
    fitted = [fit_to_window(n, p.max_tokens, window) for p, n in zip(params, prompt_lengths)]
    params = [replace(p, max_tokens=m) for p, (m, _) in zip(params, fitted)]
    sequences = [
        _Sequence(p, tokenizer.detokenizer, GenerationResult(prompt_tokens=n, notice=notice))
        for p, n, (_, notice) in zip(params, prompt_lengths, fitted)
    ]
    capacity = inputs["input_ids"].shape[1] + max(p.max_tokens for p in params)
    cache, logits = _prefill(model, inputs, capacity, prefill_step_size, vision_chunk_size)
    active = list(range(len(prompts)))  # prompt index of each batch row
    tokens = _sample(logits, params)
    mx.eval(tokens)
    decode_start = time.perf_counter()
    prompt_tps = sum(prompt_lengths) / (decode_start - start)
    while active:
        # Queue the next step before reading this one so that the device keeps busy.
        following = _decode_step(model, cache, tokens, [params[i] for i in active])
        mx.async_eval(following)
        for i, token in zip(active, tokens.tolist()):
            sequence = sequences[i]
            segment = sequence.add(token, eos)
            if not sequence.done and should_stop is not None and should_stop(i):
                sequence.result.finish_reason = "cancelled"
            if segment or sequence.done:
                yield i, _snapshot(sequence, segment, prompt_tps, decode_start)
        keep = [row for row, i in enumerate(active) if not sequences[i].done]
        if len(keep) < len(active):
            active = [active[row] for row in keep]
            if keep:
                rows = mx.array(keep)
                for c in cache:
                    c.filter(rows)
                following = following[rows]
        tokens = following


BATCH_PARAMETERS = tuple(inspect.signature(batch_stream_generate).parameters)[:-1]


def _snapshot(
    sequence: _Sequence, segment: str, prompt_tps: float, decode_start: float
) -> GenerationResult:
    """A copy of the sequence's result carrying the new text segment and current statistics."""
    result = sequence.result
    result.prompt_tps = prompt_tps
    elapsed = time.perf_counter() - decode_start
    result.generation_tps = result.generation_tokens / elapsed if elapsed > 0 else 0.0
    if sequence.done:
        result.peak_memory = mx.get_peak_memory() / 1e9
    return replace(result, text=segment, token_ids=list(result.token_ids))


def batch_generate(
    model: Model,
    processor: Any,
    prompts: Sequence[str | list[dict]],
    images: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[GenerationResult]:
    """Generate whole answers for several prompts at once, in the prompts' order.

    `images[i]` is prompt i's image, list of images, or None; keyword arguments are those of
    `batch_stream_generate`. Greedy results equal `generate(...)` run on each prompt alone.
    """
    check_keywords("batch_generate", kwargs, [*IMAGE_KWARGS, *BATCH_PARAMETERS])
    texts: list[list[str]] = [[] for _ in prompts]
    results = [GenerationResult() for _ in prompts]
    for i, result in batch_stream_generate(model, processor, prompts, images, **kwargs):
        texts[i].append(result.text)
        results[i] = result
    for result, text in zip(results, texts):
        result.text = "".join(text)
    return results


__all__ = [
    "SamplingParams",
    "batch_generate",
    "batch_stream_generate",
    "render_batch",
]
