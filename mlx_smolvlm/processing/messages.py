"""Chat messages and the media they name: the one parser of prompts, chat messages, OpenAI
content parts and training records, used by generation, the processor, the trainer and the
server.

A message is `{"role": ..., "content": str | [part, ...]}`; a part is `{"type": "text",
"text": ...}`, an image part (`{"type": "image"}` with its source under "image", "path" or
"url", or OpenAI's `{"type": "image_url", "image_url": {"url": ...}}`) or a video part
(`{"type": "video"}` with "video", "path" or "url"). A part without a source is a
placeholder that takes the next image (or video) given beside the messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..utils.validation import ValidationError, check_text

ROLES = ("system", "user", "assistant")
IMAGE_TYPES = ("image", "image_url")
SOURCE_KEYS = {"image": ("image", "path", "url"), "video": ("video", "path", "url")}


class MessageError(ValueError):
    """A malformed message or part; `where` says which (e.g. "messages[1].content[0]")."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message


def part_source(part: Mapping[str, Any]) -> Any:
    """The source an image or video part names, or None for a bare placeholder."""
    media = "video" if part.get("type") == "video" else "image"
    for key in SOURCE_KEYS[media]:
        if part.get(key) is not None:
            return part[key]
    url = part.get("image_url")
    return url.get("url") if isinstance(url, Mapping) else url


def normalize_part(part: Any) -> Any:
    """OpenAI's image_url part as a template image part, its source under "url"."""
    if isinstance(part, Mapping) and part.get("type") == "image_url":
        rest = {k: v for k, v in part.items() if k not in ("type", "image_url")}
        source = part_source(part)
        return {"type": "image", **rest, **({"url": source} if source is not None else {})}
    return part


def normalize_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message for the chat template: None fields dropped, string content as one text part
    (SmolVLM-1 templates index content[0]['type']), image_url parts as image parts."""
    message = {k: v for k, v in message.items() if v is not None}
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        message["content"] = [normalize_part(part) for part in content]
    return message


def media_parts(messages: list[Mapping[str, Any]], media: str = "image") -> list[Any]:
    """The sources of the messages' image (or video) parts in order, None for placeholders."""
    types = IMAGE_TYPES if media == "image" else (media,)
    return [
        part_source(part)
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, Mapping) and part.get("type") in types
    ]


def fill_placeholders(named: list[Any], given: list[Any], media: str = "image") -> list[Any]:
    """Sources of the parts, the placeholders (None) taking `given` in order; images given
    beyond the placeholders follow (videos must match them exactly)."""
    placeholders = named.count(None)
    if placeholders > len(given) or (media == "video" and placeholders != len(given)):
        raise ValueError(
            f"the messages have {placeholders} {media} parts without a source "
            f"but {len(given)} {media}s were given"
        )
    pending = iter(given)
    return [next(pending) if src is None else src for src in named] + list(pending)


def build_messages(
    prompt: str, num_images: int = 0, system: str | None = None, num_videos: int = 0
) -> list[dict[str, Any]]:
    """Messages for a plain text prompt with `num_videos` videos, then `num_images` images, in front of it."""
    content: list[dict[str, Any]] = [{"type": "video"} for _ in range(num_videos)]
    content += [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": prompt})
    return with_system([{"role": "user", "content": content}], system)


def with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """`messages` with a system message in front when `system` is given."""
    if system is None:
        return messages
    return [{"role": "system", "content": [{"type": "text", "text": system}]}, *messages]


def prompt_messages(
    prompt: str | list[dict], images: list[Any], videos: list[Any], system: str | None = None
) -> tuple[list[dict], list[Any], list[Any]]:
    """Messages for a prompt string or chat messages, with their images and videos in order."""
    if isinstance(prompt, str):
        return build_messages(prompt, len(images), system, len(videos)), images, videos
    messages = with_system([normalize_message(m) for m in prompt], system)
    images = fill_placeholders(media_parts(messages, "image"), images, "image")
    videos = fill_placeholders(media_parts(messages, "video"), videos, "video")
    return messages, images, videos


# ---------------------------------------------------------------------------
# Training records


def record_messages(record: Any, base: Path) -> tuple[list[dict], list[Path]]:
    """A JSONL training record's messages (image parts as placeholders) and image files."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, not {type(record).__name__}")
    listed = listed_images(record)
    if "messages" in record:
        messages, sources = conversation(record["messages"], listed)
    elif any(k in record for k in ("answer", "completion")):
        messages, sources = question_answer(record), listed
    else:
        raise ValueError(
            "a record needs 'messages', or 'image' + 'question'/'prompt' + 'answer'/'completion'"
        )
    return messages, [image_file(s, base) for s in sources]


def listed_images(record: dict) -> list[Any]:
    """Top-level "images" (list) or "image" of a record."""
    images = record.get("images", record.get("image"))
    if images is None:
        return []
    return list(images) if isinstance(images, list) else [images]


def conversation(messages: Any, listed: list[Any]) -> tuple[list[dict], list[Any]]:
    """Checked messages; image parts without a source take the record's "images" in order."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    pending = iter(listed)
    out, sources = [], []
    for message in messages:
        message, named = checked_message(message)
        out.append(message)
        sources += [s if s is not None else next(pending, None) for s in named]
    if None in sources or next(pending, None) is not None:
        raise ValueError(f"{len(sources)} image blocks but {len(listed)} listed images")
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message to learn from")
    return out, sources


def checked_message(message: Any) -> tuple[dict, list[Any]]:
    """A training message with its image parts reduced to placeholders, and their sources
    (None for a bare placeholder)."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ValueError(f"every message needs a role among {ROLES}: got {message!r:.80}")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}, []
    if not isinstance(content, list) or not content:
        raise ValueError(f"a {role} message's content must be a string or a non-empty list")
    parts, sources = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in IMAGE_TYPES and role != "assistant":
            sources.append(part_source(part))
            parts.append({"type": "image"})
        elif kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        else:
            raise ValueError(f"unsupported {role} content block {part!r:.80}")
    return {"role": role, "content": parts}, sources


def question_answer(record: dict) -> list[dict]:
    """Messages for the {"image", "question"/"prompt", "answer"/"completion"} shape."""
    question = record.get("question", record.get("prompt"))
    answer = record.get("answer", record.get("completion"))
    if not isinstance(question, str) or not isinstance(answer, str):
        raise ValueError("'question'/'prompt' and 'answer'/'completion' must be strings")
    user = [{"type": "image"} for _ in listed_images(record)] + [{"type": "text", "text": question}]
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    if isinstance(record.get("system"), str):
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def image_file(source: Any, base: Path) -> Path:
    """A local image file named relative to the JSONL file (or absolute), which must exist."""
    if not isinstance(source, str) or source.startswith(("http://", "https://", "data:")):
        raise ValueError(f"image {source!r:.80} must be a local file path")
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ValueError(f"image {source!r} not found (looked for {path})")
    return path


# ---------------------------------------------------------------------------
# API requests


def request_messages(messages: Any, load_image: Any) -> list[dict]:
    """OpenAI chat messages checked part by part, each image_url part's URL replaced by
    `load_image(url, where)`; MessageError names the message or part at fault."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages", "must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise MessageError(where, f"must be an object with a role in {ROLES}")
        content = message.get("content")
        if isinstance(content, list):
            content = [
                request_part(part, f"{where}.content[{j}]", load_image)
                for j, part in enumerate(content)
            ]
        elif isinstance(content, str):
            request_text(content, f"{where}.content")
        else:
            raise MessageError(where, "content must be a string or a list of parts")
        out.append({"role": message["role"], "content": content})
    return out


def request_text(text: str, where: str) -> str:
    """Text a client sent, which must be valid Unicode (JSON can carry lone surrogates)."""
    try:
        return check_text(where, text)
    except ValidationError as e:
        raise MessageError(where, e.detail) from None


def request_part(part: Any, where: str, load_image: Any) -> dict:
    """One content part: text stays, an image_url part becomes an image part."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": request_text(part["text"], f"{where}.text")}
    if kind == "image_url":
        url = part_source(part)
        if not isinstance(url, str) or not url:
            raise MessageError(where, "image_url.url must be a string")
        return {"type": "image", "image": load_image(url, where)}
    raise MessageError(where, "must be a text part with a string 'text' or an image_url part")
