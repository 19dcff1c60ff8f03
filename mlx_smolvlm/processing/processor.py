"""Tokenizer, prompt expansion, chat template and the multimodal `Processor`.

Reproduces transformers' `Idefics3Processor` / `SmolVLMProcessor` (prompt strings, token
ids, pixel arrays) with only tokenizers, jinja2, numpy and PIL at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
    """Read a JSON object from an optional config file; {} when it is absent."""
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return data


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
        # Every added token flagged special: what decode(skip_special_tokens=True) drops.
        self.skipped_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and the config files beside it."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"Missing tokenizer file: {file}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"Cannot load tokenizer {file}: {err}") from err
        return cls(
            backend,
            _read_json(path / "tokenizer_config.json"),
            _read_json(path / "special_tokens_map.json"),
            _read_json(path / "generation_config.json"),
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

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


def _pad_left(ids: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-pad sequences to the longest one; returns (ids, attention_mask)."""
    length = max(len(seq) for seq in ids)
    padded = [[pad_id] * (length - len(seq)) + seq for seq in ids]
    mask = [[0] * (length - len(seq)) + [1] * len(seq) for seq in ids]
    return padded, mask


def _to_tensors(out: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
    """Convert token lists (and pixel arrays) to numpy or mlx arrays."""
    if return_tensors is None:
        return out
    if return_tensors not in ("np", "mlx"):
        raise ValueError(f"return_tensors must be 'np', 'mlx' or None, got {return_tensors!r}")
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
        text: str | list[str],
        images: Any = None,
        return_tensors: str | None = "np",
        padding: bool = True,
        *,
        videos: Any = None,
        fps: float | None = None,
        max_frames: int | None = None,
        do_sample_frames: bool = True,
        **image_kwargs: Any,
    ) -> dict[str, Any]:
        """Expand <image> and <video> placeholders, tokenize and process images and videos.

        Several prompts are padded on the LEFT with the tokenizer's pad id (generation
        appends on the right); transformers pads on the right unless told otherwise.
        Videos (file paths or `Video`s) are sampled at `fps`, at most `max_frames` frames
        (the checkpoint's video_sampling by default), as transformers does in
        apply_chat_template; its bare processor call keeps every frame unless asked to sample.
        """
        prompts = [text] if isinstance(text, str) else list(text)
        out: dict[str, Any] = {}
        groups = _arrange_images(prompts, [] if images is None else images)
        video_groups = self._arrange_videos(prompts, videos)
        if any(video_groups):
            sampling = {"fps": fps, "max_frames": max_frames, "sample": do_sample_frames}
            prompts, out = self._process_media(
                prompts, groups, video_groups, image_kwargs, sampling
            )
        elif any(groups):
            groups = [[fetch_image(x) for x in g] for g in groups]
            processed = self.image_processor(groups, **image_kwargs)
            prompts = self._expand_prompts(prompts, processed["rows"], processed["cols"])
            out["pixel_values"] = processed["pixel_values"]
            if "pixel_attention_mask" in processed:
                out["pixel_attention_mask"] = processed["pixel_attention_mask"]
        ids = [self.tokenizer.encode(p) for p in prompts]
        if padding:
            # Any id would do where the mask is 0; 0 when the checkpoint names no pad token.
            ids, mask = _pad_left(ids, self.tokenizer.pad_token_id or 0)
        else:
            mask = [[1] * len(seq) for seq in ids]
        return _to_tensors({"input_ids": ids, "attention_mask": mask, **out}, return_tensors)

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
        image_kwargs: dict[str, Any],
        sampling: dict[str, Any],
    ) -> tuple[list[str], dict[str, Any]]:
        """Expand images and videos in prompt order, with pixel_values holding frames in that order."""
        # transformers keeps image and video pixels under one key and the videos' overwrite
        # the images'; here both stay, in the order their tokens appear.
        frame_prompt = image_prompt_string(0, 0, self.image_seq_len)
        texts, frames = [], []
        for prompt, images, videos in zip(prompts, image_groups, video_groups):
            image_items = [self._image_item(image, image_kwargs) for image in images]
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

    def _image_item(self, image: Any, image_kwargs: dict[str, Any]) -> tuple[str, np.ndarray]:
        """One image's prompt string and tiles."""
        processed = self.image_processor([[fetch_image(image)]], **image_kwargs)
        rows, cols = processed["rows"][0][0], processed["cols"][0][0]
        return image_prompt_string(rows, cols, self.image_seq_len), processed["pixel_values"][0]

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
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render messages with the checkpoint's jinja template; tokenize=True returns input ids.

        With tokenize=True, image and video blocks must carry their source ("image"/"video",
        "url" or "path") so that each is expanded like the processor does; videos are then
        sampled with `fps` and `max_frames` (the checkpoint's video_sampling by default).
        """
        conversation = [normalize_message(m) for m in messages]
        # Like transformers' SmolVLMProcessor: messages with a video get its video-aware
        # template unless one is passed, since SmolVLM2 checkpoints' templates drop videos.
        has_video = bool(media_parts(conversation, "video"))
        default = VIDEO_CHAT_TEMPLATE if has_video else self.chat_template
        template = chat_template or default
        if template is None:
            raise ValueError("This processor has no chat template; pass chat_template=...")
        special = {k: v for k, v in self.tokenizer.special_tokens.items() if v is not None}
        prompt = _compile_template(template).render(
            messages=_plain(conversation),
            add_generation_prompt=add_generation_prompt,
            **_plain({**special, **kwargs}),
        )
        if not tokenize:
            return prompt
        images = [s for s in media_parts(conversation, "image") if s is not None]
        videos = [s for s in media_parts(conversation, "video") if s is not None]
        out = self(
            prompt,
            images=images or None,
            videos=videos or None,
            return_tensors=None,
            fps=fps,
            max_frames=max_frames,
        )
        return out["input_ids"][0]


def _image_seq_len(path: Path, config: dict[str, Any]) -> int:
    """processor_config.json's image_seq_len, else (image_size // patch_size)^2 / scale_factor^2."""
    processor_config = _read_json(path / "processor_config.json")
    if "image_seq_len" in processor_config:
        return int(processor_config["image_seq_len"])
    vision = config.get("vision_config", {})
    try:
        patches = vision["image_size"] // vision["patch_size"]
        return int(patches**2 / config["scale_factor"] ** 2)
    except KeyError as err:
        raise ValueError(
            f"Cannot tell image_seq_len: {path / 'processor_config.json'} lacks it and "
            f"{path / 'config.json'} lacks {err}"
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


def apply_chat_template(processor: Processor, prompt: str | list, num_images: int = 0, **kw) -> str:
    """Render a prompt string (with `num_images` images) or chat messages with the model's template."""
    messages = build_messages(prompt, num_images) if isinstance(prompt, str) else prompt
    return processor.apply_chat_template(messages, add_generation_prompt=True, **kw)


__all__ = [
    "Processor",
    "apply_chat_template",
    "StreamingDetokenizer",
    "Tokenizer",
    "build_messages",
    "image_prompt_string",
]
