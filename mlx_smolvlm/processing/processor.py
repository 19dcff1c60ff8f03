"""Tokenizer, prompt expansion, chat template and the multimodal `Processor`.

Reproduces transformers' `Idefics3Processor` / `SmolVLMProcessor` (prompt strings, token
ids, pixel arrays) with only tokenizers, jinja2, numpy and PIL at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import mlx.core as mx
import numpy as np
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..model.config import ConfigError, ModelConfig
from ..utils.validation import read_json
from .image import ImageProcessor, _pad, fetch_image
from .messages import build_messages, media_parts, normalize_message
from .video import (
    VIDEO_CHAT_TEMPLATE,
    VIDEO_TOKEN,
    VideoProcessor,
    video_prompt_string,
)

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"

# transformers' clean_up_tokenization replacements, applied in this order.
_CLEAN_UP = {
    " .": ".",
    " ?": "?",
    " !": "!",
    " ,": ",",
    " ' ": "'",
    " n't": "n't",
    " 'm": "'m",
    " 's": "'s",
    " 've": "'ve",
    " 're": "'re",
}


def _read_json(file: Path) -> dict[str, Any]:
    """The JSON object of an optional config file; {} when it is absent."""
    return read_json(file) if file.exists() else {}


def _token_text(value: Any) -> str | None:
    """A special-token entry as a string (configs store either a string or an AddedToken dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value


# ---------------------------------------------------------------------------
# Tokenizer


class StreamingDetokenizer:
    """Incremental decoding with mlx-lm's interface; special tokens are left out of the text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text."""
        self.tokens: list[int] = []
        self._text = ""  # text of the committed tokens
        self._window: list[int] = []  # tokens not committed yet
        self._window_text = ""
        self._offset = 0  # how much of `text` last_segment has handed out

    def add_token(self, token: int) -> None:
        """Append one generated token id."""
        self.tokens.append(token)
        if token in self._tokenizer.skipped_ids:
            return
        self._window.append(token)
        text = self._tokenizer.decode(self._window, skip_special_tokens=False)
        # A trailing U+FFFD is an incomplete UTF-8 sequence: wait for the next byte tokens.
        self._window_text = text[:-1] if text.endswith("\ufffd") else text
        # Commit at line ends so the window (re-decoded on every token) stays short.
        if text.endswith("\n"):
            self._commit(text)

    def finalize(self) -> None:
        """Flush the pending tokens, including an unfinished character."""
        if self._window:
            self._commit(self._tokenizer.decode(self._window, skip_special_tokens=False))

    def _commit(self, text: str) -> None:
        self._text += text
        self._window, self._window_text = [], ""

    @property
    def text(self) -> str:
        """All text decoded so far."""
        return self._text + self._window_text

    @property
    def last_segment(self) -> str:
        """Text added since the previous call."""
        text = self.text
        segment = text[self._offset :]
        self._offset = len(text)
        return segment


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens from the checkpoint's config files."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: dict[str, Any] | None = None,
        special_tokens_map: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        config = config or {}
        tokens_map = special_tokens_map or {}
        # tokenizer_config.json wins over special_tokens_map.json, as in transformers.
        self.special_tokens = {
            key: _token_text(config.get(key, tokens_map.get(key)))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        extra = config.get("additional_special_tokens", tokens_map.get("additional_special_tokens"))
        self.additional_special_tokens = [_token_text(t) for t in extra or []]
        self._generation_config = generation_config or {}
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        self.truncation_side = config.get("truncation_side", "right")
        self.model_max_length = config.get("model_max_length")
        # Every added token flagged special: what decode(skip_special_tokens=True) drops.
        self.skipped_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (else vocab.json + merges.txt) and the config files beside it."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        tokens_map = _read_json(path / "special_tokens_map.json")
        file = path / "tokenizer.json"
        if file.exists():
            try:
                backend = tokenizers.Tokenizer.from_file(str(file))
            except Exception as err:  # tokenizers raises a bare Exception on bad files
                raise ValueError(f"Cannot load tokenizer {file}: {err}") from err
        elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
            backend = _byte_level_bpe(path, config, tokens_map)
        else:
            raise FileNotFoundError(
                f"Missing tokenizer file: {file} (or vocab.json and merges.txt beside it)"
            )
        _set_bos_eos(backend, config, tokens_map, from_json=file.exists())
        return cls(backend, config, tokens_map, _read_json(path / "generation_config.json"))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the tokenizer adds (e.g. a BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def starts_with_bos(self, text: str) -> bool:
        """Whether `text` begins with the BOS token (then transformers' apply_chat_template
        adds no special tokens when it tokenizes a rendered prompt)."""
        bos = self.special_tokens.get("bos_token")
        return bool(bos) and text.startswith(bos)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a rendered chat prompt as transformers' apply_chat_template makes them: the
        tokenizer's special tokens (a BOS) are added unless the text starts with the BOS."""
        return self.encode(text, add_special_tokens=not self.starts_with_bos(text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._clean_up_spaces(text) if self._clean_up else text

    def batch_decode(
        self, ids: Iterable[Iterable[int]], skip_special_tokens: bool = True
    ) -> list[str]:
        """Decode several sequences."""
        return [self.decode(seq, skip_special_tokens) for seq in ids]

    def _clean_up_spaces(self, text: str) -> str:
        """transformers' clean_up_tokenization, which it skips for BPE models (they keep the spaces)."""
        if self.backend.model.__class__.__name__ == "BPE":
            return text
        for before, after in _CLEAN_UP.items():
            text = text.replace(before, after)
        return text

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Id of a token string (or list of them); the unk id, else None, when unknown."""
        if isinstance(tokens, str):
            token_id = self.backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        """Id of the bos token."""
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of the tokenizer config's eos token."""
        return self._special_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        """Id of the unknown token."""
        return self._special_id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id used to pad batches (the config's pad token, else generation_config's, else eos)."""
        pad = self._special_id("pad_token")
        if pad is None:
            pad = self._generation_config.get("pad_token_id")
        return self.eos_token_id if pad is None else pad

    @property
    def eos_token_ids(self) -> set[int]:
        """Stop tokens for generation: <end_of_utterance>, generation_config's and the config's eos."""
        ids = {self.backend.token_to_id(END_OF_UTTERANCE), self.eos_token_id}
        generation_eos = self._generation_config.get("eos_token_id")
        if isinstance(generation_eos, list):
            ids.update(generation_eos)
        else:
            ids.add(generation_eos)
        return {i for i in ids if i is not None}

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens (bos, eos, unk, pad, additional), like transformers."""
        names = [*self.special_tokens.values(), *self.additional_special_tokens]
        ids = [self.backend.token_to_id(t) for t in names if t is not None]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' len(tokenizer))."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer."""
        return StreamingDetokenizer(self)


def _added_token(value: Any, special: bool = True) -> tokenizers.AddedToken:
    """An AddedToken from a config entry (a string or an AddedToken dict)."""
    if isinstance(value, str):
        return tokenizers.AddedToken(value, special=special, normalized=not special)
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return tokenizers.AddedToken(value["content"], **{k: value[k] for k in flags if k in value})


def _byte_level_bpe(
    path: Path, config: dict[str, Any], tokens_map: dict[str, Any]
) -> tokenizers.Tokenizer:
    """The byte-level BPE tokenizer transformers' GPT2Tokenizer builds from vocab.json and
    merges.txt, with the added tokens of tokenizer_config.json and the named special tokens."""
    try:
        vocab, merges = tokenizers.models.BPE.read_file(
            str(path / "vocab.json"), str(path / "merges.txt")
        )
    except Exception as err:  # tokenizers raises a bare Exception on bad files
        raise ValueError(f"Cannot read {path / 'vocab.json'} / merges.txt: {err}") from err
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    prefix_space = bool(config.get("add_prefix_space", False))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    backend.decoder = tokenizers.decoders.ByteLevel()
    decoder = config.get("added_tokens_decoder") or {}
    added = [_added_token(decoder[i]) for i in sorted(decoder, key=int)]
    # Named special tokens the config does not list are added as special, as transformers does.
    named = [config.get(k, tokens_map.get(k)) for k in ("bos_token", "eos_token", "unk_token")]
    named.append(config.get("pad_token", tokens_map.get("pad_token")))
    extra = config.get("additional_special_tokens", tokens_map.get("additional_special_tokens"))
    known = {t.content for t in added}
    for value in [*named, *(extra or [])]:
        content = _token_text(value)
        if content is not None and content not in known:
            added.append(_added_token(value))
            known.add(content)
    backend.add_tokens(added)
    return backend


def _set_bos_eos(
    backend: tokenizers.Tokenizer,
    config: dict[str, Any],
    tokens_map: dict[str, Any],
    from_json: bool,
) -> None:
    """Make encode(add_special_tokens=True) add the BOS/EOS that transformers 5 adds: a
    tokenizer.json's own post-processor (its add_bos_token/add_eos_token config keys are
    dropped then), else the tokenizer_config's add_bos_token/add_eos_token."""
    if from_json and backend.post_processor is not None:
        return
    flags = {} if from_json else config
    template, special = ["$A:0"], []
    for key, at_start in (("bos_token", True), ("eos_token", False)):
        token = _token_text(config.get(key, tokens_map.get(key)))
        if not flags.get(f"add_{key}") or token is None:
            continue
        template.insert(0 if at_start else len(template), f"{token}:0")
        special.append((token, backend.token_to_id(token)))
    single = " ".join(template)
    pair = single + " " + " ".join(t.replace(":0", ":1").replace("$A", "$B") for t in template)
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special
    )


# ---------------------------------------------------------------------------
# Chat template


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any
) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandbox setup as transformers."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Rebuild template data from JSON types; other objects (images, arrays) become '<Type>'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    # The sandbox still lets templates call public methods, so rich objects stay out.
    return f"<{type(value).__name__}>"


# ---------------------------------------------------------------------------
# Prompt expansion


def image_prompt_string(rows: int, cols: int, image_seq_len: int) -> str:
    """The text that replaces one <image>: tile blocks row by row, then the global view."""
    image_tokens = IMAGE_TOKEN * image_seq_len
    global_view = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image_tokens}{FAKE_IMAGE_TOKEN}"
    if rows == 0 and cols == 0:
        return global_view
    grid = "".join(
        "".join(f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>{image_tokens}" for c in range(cols))
        + "\n"
        for r in range(rows)
    )
    return f"{grid}\n{global_view}"


def _expand(prompt: str, replacements: list[str]) -> str:
    """Replace the <image> placeholders of `prompt`, in order, by `replacements`."""
    parts = prompt.split(IMAGE_TOKEN)
    return parts[0] + "".join(rep + part for rep, part in zip(replacements, parts[1:], strict=True))


def _arrange_images(prompts: list[str], images: Any) -> list[list[Any]]:
    """Group images per prompt by counting each prompt's <image> placeholders."""
    counts = [p.count(IMAGE_TOKEN) for p in prompts]
    if not isinstance(images, (list, tuple)):
        images = [images]
    if images and all(isinstance(x, (list, tuple)) for x in images):
        groups = [list(x) for x in images]
        if len(groups) != len(prompts):
            raise ValueError(f"Got {len(groups)} image lists for {len(prompts)} prompts")
    else:
        _check_total(counts, len(images))
        starts = np.cumsum([0, *counts]).tolist()
        groups = [list(images[a:b]) for a, b in zip(starts[:-1], starts[1:])]
    for i, (count, group) in enumerate(zip(counts, groups)):
        if count != len(group):
            raise ValueError(
                f"Prompt {i} has {count} {IMAGE_TOKEN} placeholder(s) but {len(group)} image(s) were given for it"
            )
    return groups


def _check_total(counts: list[int], num_images: int) -> None:
    """Clear errors when placeholders and images don't add up."""
    total = sum(counts)
    if total == num_images:
        return
    if total == 0:
        raise ValueError(
            f"{num_images} image(s) were given but the prompt has no {IMAGE_TOKEN} placeholder; "
            f"put one {IMAGE_TOKEN} per image in the text (apply_chat_template with image blocks does this)"
        )
    more = "more" if total > num_images else "fewer"
    raise ValueError(
        f"The prompts have {more} {IMAGE_TOKEN} placeholders ({total}, per prompt {counts}) "
        f"than images ({num_images})"
    )


def _arrange_videos(prompts: list[str], videos: Any) -> list[list[Any]]:
    """Spread a flat list of videos over the prompts by their <video> placeholder counts."""
    counts = [p.count(VIDEO_TOKEN) for p in prompts]
    if videos is None:
        videos = []
    elif not isinstance(videos, (list, tuple)):
        videos = [videos]
    if sum(counts) != len(videos):
        raise ValueError(
            f"The prompts have {sum(counts)} {VIDEO_TOKEN} placeholder(s) (per prompt {counts}) "
            f"but {len(videos)} video(s) were given"
        )
    starts = np.cumsum([0, *counts]).tolist()
    return [list(videos[a:b]) for a, b in zip(starts[:-1], starts[1:])]


_MEDIA_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")


def _expand_media(
    prompt: str, images: list[tuple[str, np.ndarray]], videos: list[tuple[str, np.ndarray]]
) -> tuple[str, list[np.ndarray]]:
    """Replace each <image> and <video> by its (text, frames) item; frames follow the text order."""
    pending = {IMAGE_TOKEN: iter(images), VIDEO_TOKEN: iter(videos)}
    text, frames = [], []
    for piece in _MEDIA_PLACEHOLDER.split(prompt):
        if piece in pending:
            piece, pixels = next(pending[piece])
            frames.extend(pixels)
        text.append(piece)
    return "".join(text), frames


def _pad_ids(
    ids: list[list[int]], pad_id: int, length: int, side: str
) -> tuple[list[list[int]], list[list[int]]]:
    """Pad sequences to `length` on `side` ("left" or "right"); returns (ids, attention_mask)."""
    padded, mask = [], []
    for seq in ids:
        fill = max(0, length - len(seq))
        if side == "left":
            padded.append([pad_id] * fill + seq)
            mask.append([0] * fill + [1] * len(seq))
        else:
            padded.append(seq + [pad_id] * fill)
            mask.append([1] * len(seq) + [0] * fill)
    return padded, mask


def _is_text(value: Any) -> bool:
    """A string or a non-empty list of strings."""
    if isinstance(value, str):
        return True
    return (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)
    )


def _to_tensors(out: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
    """Convert token lists (and pixel arrays) to numpy, mlx or torch ("pt") arrays."""
    if return_tensors is None:
        return out
    if return_tensors not in ("np", "mlx", "pt"):
        raise ValueError(
            f"return_tensors must be 'np', 'mlx', 'pt' or None, got {return_tensors!r}"
        )
    if "input_ids" in out:
        if len({len(seq) for seq in out["input_ids"]}) > 1:
            raise ValueError("Prompts have different lengths: use padding=True to get arrays")
        out = dict(out, input_ids=np.array(out["input_ids"], dtype=np.int64))
        out["attention_mask"] = np.array(out["attention_mask"], dtype=np.int64)
    if return_tensors == "mlx":
        dtypes = {"input_ids": np.int32, "attention_mask": np.int32}
        out = {
            k: mx.array(v.astype(dtypes.get(k, v.dtype))) if isinstance(v, np.ndarray) else v
            for k, v in out.items()
        }
    elif return_tensors == "pt":
        import torch  # optional dependency: only for transformers-style torch outputs

        out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------
# Processor


@dataclasses.dataclass
class Processor:
    """Text + images -> model inputs, as transformers' Idefics3Processor/SmolVLMProcessor."""

    tokenizer: Tokenizer
    image_processor: ImageProcessor
    image_seq_len: int
    chat_template: str | None = None
    model_type: str = "idefics3"
    image_token_id: int | None = None
    # SmolVLM2 video input; None for checkpoints without `video_sampling` (SmolVLM 1).
    video_processor: VideoProcessor | None = None

    def __post_init__(self) -> None:
        token_id = self.tokenizer.backend.token_to_id(IMAGE_TOKEN)
        if self.image_token_id is None:
            self.image_token_id = token_id
        elif token_id is not None and token_id != self.image_token_id:
            raise ValueError(
                f"image_token_id {self.image_token_id} disagrees with the tokenizer's {IMAGE_TOKEN} id {token_id}"
            )

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> Processor:
        """Load tokenizer, image processor, image_seq_len and chat template from a checkpoint directory.

        Keyword arguments replace the loaded fields (e.g. `chat_template=...`).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"Checkpoint directory not found: {path}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"Unknown Processor fields: {sorted(unknown)}")
        config = _read_json(path / "config.json")
        loaded = {
            "tokenizer": lambda: Tokenizer.from_pretrained(path),
            "image_processor": lambda: ImageProcessor.from_pretrained(path),
            "image_seq_len": lambda: _image_seq_len(path, config),
            "chat_template": lambda: _load_chat_template(path),
            "model_type": lambda: config.get("model_type", "idefics3"),
            "image_token_id": lambda: config.get("image_token_id"),
            "video_processor": lambda: VideoProcessor.from_pretrained(path),
        }
        # Only load what is not overridden, so e.g. a given chat_template skips the file lookup.
        fields = {name: load() for name, load in loaded.items() if name not in overrides}
        return cls(**fields, **overrides)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        return_tensors: str | None = "np",
        padding: bool | str = True,
        *,
        videos: Any = None,
        fps: float | None = None,
        max_frames: int | None = None,
        do_sample_frames: bool = True,
        add_special_tokens: bool = True,
        truncation: bool | str = False,
        max_length: int | None = None,
        padding_side: str = "left",
        **image_kwargs: Any,
    ) -> dict[str, Any]:
        """Expand <image> and <video> placeholders, tokenize and process images and videos.

        Takes transformers' keywords: `add_special_tokens` (the tokenizer's BOS, if it adds
        one), `padding` (True/"longest", "max_length", False), `max_length`, `truncation`,
        `padding_side`, image options such as `size={"longest_edge": N}`,
        `max_image_size={"longest_edge": M}` or `do_image_splitting`, and images as PIL,
        paths, URLs, or numpy/torch arrays (HWC or CHW). Images without text give only
        `pixel_values` and `pixel_attention_mask`, as in transformers.

        Unlike transformers, several prompts are padded by default, on the LEFT (generation
        appends on the right). Videos (file paths or `Video`s) are sampled at `fps`, at most
        `max_frames` frames (the checkpoint's video_sampling by default), as transformers does
        in apply_chat_template; its bare processor call keeps every frame unless asked to sample.
        """
        if text is not None and not _is_text(text):
            if images is None or _is_text(images):  # transformers' positional order: images, text
                text, images = images, text
            else:
                raise ValueError(
                    f"text must be a string or a list of strings, got {type(text).__name__}"
                )
        image_processor, image_kwargs = self._image_settings(image_kwargs)
        if text is None:
            return self._images_only(images, image_processor, image_kwargs, return_tensors)
        prompts = [text] if isinstance(text, str) else list(text)
        out: dict[str, Any] = {}
        groups = _arrange_images(prompts, [] if images is None else images)
        video_groups = self._arrange_videos(prompts, videos)
        if any(video_groups):
            sampling = {"fps": fps, "max_frames": max_frames, "sample": do_sample_frames}
            prompts, out = self._process_media(
                prompts, groups, video_groups, image_processor, image_kwargs, sampling
            )
        elif any(groups):
            groups = [[fetch_image(x) for x in g] for g in groups]
            processed = image_processor(groups, **image_kwargs)
            prompts = self._expand_prompts(prompts, processed["rows"], processed["cols"])
            out["pixel_values"] = processed["pixel_values"]
            if "pixel_attention_mask" in processed:
                out["pixel_attention_mask"] = processed["pixel_attention_mask"]
        ids = [self.tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
        if truncation not in (False, None, "do_not_truncate"):
            ids = self._truncate(ids, max_length)
        ids, mask = self._pad(ids, padding, max_length, padding_side)
        return _to_tensors({"input_ids": ids, "attention_mask": mask, **out}, return_tensors)

    def _image_settings(self, kwargs: dict[str, Any]) -> tuple[ImageProcessor, dict[str, Any]]:
        """The image processor with transformers-style overrides of its fields (dict-shaped
        `size`/`max_image_size`, `do_resize`, `image_mean`...) applied, and the call options."""
        names = {f.name for f in dataclasses.fields(ImageProcessor)}
        call_options = {"do_image_splitting", "max_image_size"}
        fields = {
            k: v
            for k, v in kwargs.items()
            if k in names and (k not in call_options or isinstance(v, dict))
        }
        rest = {k: v for k, v in kwargs.items() if k not in fields}
        unknown = sorted(set(rest) - _IMAGE_CALL_OPTIONS)
        if unknown:
            raise TypeError(f"Unknown processor keyword argument(s): {', '.join(unknown)}")
        if not fields:
            return self.image_processor, rest
        try:
            return dataclasses.replace(self.image_processor, **fields), rest
        except (TypeError, ValueError) as err:
            raise ValueError(f"Bad image option: {err}") from err

    def _images_only(
        self,
        images: Any,
        image_processor: ImageProcessor,
        image_kwargs: dict[str, Any],
        return_tensors: str | None,
    ) -> dict[str, Any]:
        """pixel_values and pixel_attention_mask of images given without text."""
        if images is None:
            raise ValueError("Give text, images or both to the processor")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if images and all(isinstance(x, (list, tuple)) for x in images):
            groups = [[fetch_image(x) for x in group] for group in images]
        else:
            groups = [[fetch_image(x) for x in images]]
        processed = image_processor(groups, **image_kwargs)
        out = {k: v for k, v in processed.items() if k not in ("rows", "cols")}
        return _to_tensors(out, return_tensors)

    def _truncate(self, ids: list[list[int]], max_length: int | None) -> list[list[int]]:
        """Cut sequences to `max_length` on the tokenizer's truncation side; refuse to cut
        inside an image's tokens (transformers raises there too)."""
        if max_length is None:
            max_length = self.tokenizer.model_max_length
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"truncation needs a positive integer max_length, got {max_length!r}")
        left = self.tokenizer.truncation_side == "left"
        cut = [seq[len(seq) - max_length :] if left else seq[:max_length] for seq in ids]
        if any(len(seq) > max_length for seq in ids):
            image_id = self.image_token_id
            if [seq.count(image_id) for seq in cut] != [seq.count(image_id) for seq in ids]:
                raise ValueError(
                    f"truncation to max_length={max_length} would cut image tokens: "
                    "raise max_length or leave truncation off"
                )
        return cut

    def _pad(
        self, ids: list[list[int]], padding: bool | str, max_length: int | None, side: str
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Pad as transformers' `padding` asks: True/"longest", "max_length", False/"do_not_pad"."""
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if padding in (False, None, "do_not_pad"):
            return ids, [[1] * len(seq) for seq in ids]
        if padding in (True, "longest"):
            length = max(len(seq) for seq in ids)
        elif padding == "max_length":
            length = max_length if max_length is not None else self.tokenizer.model_max_length
            if not isinstance(length, int) or isinstance(length, bool) or length < 1:
                raise ValueError(
                    f'padding="max_length" needs a positive max_length, got {length!r}'
                )
        else:
            raise ValueError(
                f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}"
            )
        # Any id would do where the mask is 0; 0 when the checkpoint names no pad token.
        return _pad_ids(ids, self.tokenizer.pad_token_id or 0, length, side)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of token ids (a list, numpy, mlx or torch array), as transformers' processor."""
        return self.tokenizer.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens)

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        """Texts of a batch of token id sequences, as transformers' processor."""
        return [self.decode(seq, skip_special_tokens) for seq in ids]

    def _arrange_videos(self, prompts: list[str], videos: Any) -> list[list[Any]]:
        """Videos per prompt; without a video processor "<video>" is plain text."""
        if self.video_processor is None:
            if videos is not None:
                raise ValueError(
                    "This checkpoint has no video settings (video_sampling in "
                    "preprocessor_config.json): use a SmolVLM2 checkpoint for video input"
                )
            return [[] for _ in prompts]
        return _arrange_videos(prompts, videos)

    def _process_media(
        self,
        prompts: list[str],
        image_groups: list[list[Any]],
        video_groups: list[list[Any]],
        image_processor: ImageProcessor,
        image_kwargs: dict[str, Any],
        sampling: dict[str, Any],
    ) -> tuple[list[str], dict[str, Any]]:
        """Expand images and videos in prompt order, with pixel_values holding frames in that order."""
        # transformers keeps image and video pixels under one key and the videos' overwrite
        # the images'; here both stay, in the order their tokens appear.
        frame_prompt = image_prompt_string(0, 0, self.image_seq_len)
        texts, frames = [], []
        for prompt, images, videos in zip(prompts, image_groups, video_groups):
            image_items = [
                _image_item(image, image_processor, image_kwargs, self.image_seq_len)
                for image in images
            ]
            video_items = []
            for source in videos:
                video = self.video_processor.load(source, **sampling)
                video_items.append(
                    (video_prompt_string(video, frame_prompt), self.video_processor(video))
                )
            text, sample_frames = _expand_media(prompt, image_items, video_items)
            texts.append(text)
            frames.append(sample_frames)
        pixel_values, mask = _pad(frames)
        return texts, {"pixel_values": pixel_values, "pixel_attention_mask": mask}

    def _expand_prompts(
        self, prompts: list[str], rows: list[list[int]], cols: list[list[int]]
    ) -> list[str]:
        """Each prompt with its <image>s replaced by the tile/global token strings."""
        return [
            _expand(p, [image_prompt_string(r, c, self.image_seq_len) for r, c in zip(rs, cs)])
            for p, rs, cs in zip(prompts, rows, cols)
        ]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        return_dict: bool = False,
        return_tensors: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render messages (or a batch of conversations) with the checkpoint's jinja template.

        As transformers' processors: tokenize=True returns the batch's input ids (a list per
        conversation), return_dict=True the whole processor output (input_ids, attention_mask,
        pixel_values, pixel_attention_mask) for the images and videos named in the messages
        ("image"/"video", "url" or "path" keys). Processor keywords (padding, max_length,
        truncation, size...) go to the processor, the rest to the template. The BOS is added
        only when the rendered text does not start with it. Unlike transformers, the
        generation prompt is added unless add_generation_prompt=False.
        """
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = [list(c) for c in messages] if batched else [messages]
        options = dict(processor_kwargs or {})
        for key in list(kwargs):
            if key in _PROCESSOR_KEYWORDS:
                options[key] = kwargs.pop(key)
        prompts = [
            self._render(conversation, add_generation_prompt, chat_template, kwargs)
            for conversation in conversations
        ]
        if not tokenize:
            return prompts if batched else prompts[0]
        normalized = [[normalize_message(m) for m in c] for c in conversations]
        images = [[s for s in media_parts(c, "image") if s is not None] for c in normalized]
        videos = [v for c in normalized for v in media_parts(c, "video") if v is not None]
        if self.tokenizer.starts_with_bos(prompts[0]):
            options.setdefault("add_special_tokens", False)
        out = self(
            prompts,
            images=images if any(images) else None,
            videos=videos or None,
            return_tensors=return_tensors,
            fps=fps,
            max_frames=max_frames,
            **options,
        )
        return out if return_dict else out["input_ids"]

    def _render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        chat_template: str | None,
        variables: dict[str, Any],
    ) -> str:
        """One conversation rendered with the chat template."""
        conversation = [normalize_message(m) for m in messages]
        # Like transformers' SmolVLMProcessor: messages with a video get its video-aware
        # template unless one is passed, since SmolVLM2 checkpoints' templates drop videos.
        has_video = bool(media_parts(conversation, "video"))
        default = VIDEO_CHAT_TEMPLATE if has_video else self.chat_template
        template = chat_template or default
        if template is None:
            raise ValueError("This processor has no chat template; pass chat_template=...")
        special = {k: v for k, v in self.tokenizer.special_tokens.items() if v is not None}
        return _compile_template(template).render(
            messages=_plain(conversation),
            add_generation_prompt=add_generation_prompt,
            **_plain({**special, **variables}),
        )

    def is_rendered(self, prompt: str) -> bool:
        """Whether `prompt` is already a chat-template rendering rather than a plain question:
        it starts as every rendering does (e.g. "<|im_start|>"), or, for templates without
        such an opening, it ends with the generation prompt (e.g. "Assistant:")."""
        if self.chat_template is None:
            return False
        probe = "q9zProbe"  # text no template writes by itself
        user = [{"role": "user", "content": [{"type": "text", "text": probe}]}]
        system = [{"role": "system", "content": [{"type": "text", "text": "s" + probe}]}]
        plain = self._render(user, False, None, {})
        prompted = self._render(user, True, None, {})
        try:
            opening = os.path.commonprefix([prompted, self._render(system + user, True, None, {})])
        except jinja2.exceptions.TemplateError:  # a template without a system role
            opening = ""
        if opening:
            return prompt.startswith(opening)
        suffix = prompted[len(plain) :].strip() if prompted.startswith(plain) else ""
        return bool(suffix) and prompt.rstrip().endswith(suffix)


# Options of ImageProcessor.__call__ (the rest of the image options are its fields).
_IMAGE_CALL_OPTIONS = {
    "do_image_splitting",
    "longest_edge",
    "max_image_size",
    "upscale",
    "max_tiles",
}

# Keywords of apply_chat_template that configure the processor call, not the template.
_PROCESSOR_KEYWORDS = {
    "padding",
    "padding_side",
    "truncation",
    "max_length",
    "add_special_tokens",
    "do_sample_frames",
    "longest_edge",
    "max_tiles",
    "upscale",
    *(f.name for f in dataclasses.fields(ImageProcessor)),
}


def _image_item(
    image: Any, image_processor: ImageProcessor, image_kwargs: dict[str, Any], image_seq_len: int
) -> tuple[str, np.ndarray]:
    """One image's prompt string and tiles."""
    processed = image_processor([[fetch_image(image)]], **image_kwargs)
    rows, cols = processed["rows"][0][0], processed["cols"][0][0]
    return image_prompt_string(rows, cols, image_seq_len), processed["pixel_values"][0]


def _image_seq_len(path: Path, config: dict[str, Any]) -> int:
    """processor_config.json's image_seq_len, else the model config's (patches / scale_factor)^2."""
    processor_config = _read_json(path / "processor_config.json")
    if "image_seq_len" in processor_config:
        return int(processor_config["image_seq_len"])
    try:
        return ModelConfig.from_dict(config, str(path / "config.json")).image_seq_len
    except ConfigError as err:
        raise ValueError(
            f"Cannot tell image_seq_len: {path / 'processor_config.json'} lacks it and {err}"
        ) from err


def _load_chat_template(path: Path) -> str | None:
    """The chat template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = _read_json(path / name).get("chat_template")
        if isinstance(template, list):  # a list of named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is not None:
            return template
    return None


def apply_chat_template(
    processor: Processor,
    config: ModelConfig | dict | str | list | None = None,
    prompt: str | dict | list | None = None,
    num_images: int = 0,
    add_generation_prompt: bool = True,
    return_messages: bool = False,
    **kw: Any,
) -> str | list:
    """Render a prompt string (with `num_images` images in front) or chat messages with the
    model's template, with mlx-vlm's signature: `apply_chat_template(processor, config,
    prompt, num_images=1)`. `config` (model.config, a config dict or None) may be left out:
    `apply_chat_template(processor, prompt, num_images=1)`; the processor holds the template.
    """
    if prompt is None and isinstance(config, (str, list, tuple)):
        config, prompt = None, config
    if config is not None and not isinstance(config, (ModelConfig, dict)):
        raise TypeError(
            f"config must be a ModelConfig, a dict or None, got {type(config).__name__}"
        )
    if prompt is None:
        raise TypeError("apply_chat_template needs a prompt (a string or chat messages)")
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 0:
        raise ValueError(f"num_images must be a non-negative integer, got {num_images!r}")
    if isinstance(prompt, str):
        messages = build_messages(prompt, num_images)
    else:
        messages = [prompt] if isinstance(prompt, dict) else list(prompt)
    if return_messages:
        return messages
    return processor.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, **kw
    )


__all__ = [
    "Processor",
    "apply_chat_template",
    "StreamingDetokenizer",
    "Tokenizer",
    "build_messages",
    "image_prompt_string",
]
