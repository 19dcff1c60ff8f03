"""What to caption: images from a folder, a JSONL or CSV table, or a list file, in a fixed order.

Every item gets an id that does not depend on the run (the folder-relative path, the image as
the table or list names it, or an id column), so that a rerun recognises what is done, and
the order is fixed (sorted folder paths, file order otherwise) before `--shuffle` and
`--limit` pick from it with a seed.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_PROMPT = "Describe this image."


class InputError(ValueError):
    """Unusable captioning input; the one-line message names the file, line or column."""


@dataclass(frozen=True)
class Item:
    """One image to caption: its stable id, where it is, and the question asked about it."""

    id: str
    path: str
    prompt: str


def read_items(
    source: str | Path,
    prompt: str | None = None,
    image_column: str = "image",
    prompt_column: str | None = None,
    id_column: str | None = None,
) -> list[Item]:
    """The items named by `source`: a folder (recursive, by extension), .jsonl, .csv, or a list.

    `prompt` applies to every image (default "Describe this image."); `prompt_column` takes
    each row's own prompt from a table instead. Relative image paths in a table or a list are
    relative to that file's folder.
    """
    source = Path(source)
    if prompt is not None and prompt_column is not None:
        raise InputError("give --prompt or --prompt-column, not both")
    if not source.exists():
        raise InputError(f"input {source} does not exist")
    if source.is_dir():
        if prompt_column is not None or id_column is not None:
            raise InputError(
                f"--prompt-column and --id-column need a table, but {source} is a folder"
            )
        return _folder_items(source, prompt or DEFAULT_PROMPT)
    suffix = source.suffix.lower()
    if suffix in (".jsonl", ".csv"):
        rows = _jsonl_rows(source) if suffix == ".jsonl" else _csv_rows(source)
        return _table_items(source, rows, prompt, image_column, prompt_column, id_column)
    if prompt_column is not None or id_column is not None:
        raise InputError(
            f"--prompt-column and --id-column need a .jsonl or .csv table, but {source} is a list"
        )
    return _list_items(source, prompt or DEFAULT_PROMPT)


def select(items: Sequence[Item], shuffle: bool = False, seed: int = 0, limit: int | None = None):
    """The items to run, in run order: shuffled with `seed` if asked, then the first `limit`."""
    chosen = list(items)
    if shuffle:
        random.Random(seed).shuffle(chosen)
    return chosen if limit is None else chosen[:limit]


def shard(items: Sequence[Item], batch_size: int, rank: int, size: int) -> list[list[Item]]:
    """This rank's batches: the run cut into batches, batch k going to rank k mod `size`.

    Whole batches are dealt out so that every batch holds the same images as in a one-process
    run, which keeps batched greedy decoding identical however many ranks there are.
    """
    batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    return batches[rank::size]


def _folder_items(folder: Path, prompt: str) -> list[Item]:
    """Images under `folder` by extension, sorted by their folder-relative path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(root, name).relative_to(folder).as_posix())
    if not found:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return [Item(rel, str(folder / rel), prompt) for rel in sorted(found)]


def _list_items(path: Path, prompt: str) -> list[Item]:
    """One image per line of a list file; blank lines and lines starting with # are skipped."""
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        name = line.strip()
        if name and not name.startswith("#"):
            rows.append((number, {"image": name}))
    return _table_items(path, rows, prompt, "image", None, None)


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file."""
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} line {number} is not valid JSON: {err.msg}") from err
        if not isinstance(row, dict):
            raise InputError(f"{path} line {number} is not a JSON object")
        rows.append((number, row))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each data row of a CSV file with a header line."""
    try:
        reader = csv.DictReader(_read_text(path).splitlines())
        return [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise InputError(f"{path} is not a readable CSV file: {err}") from err


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text") from err
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from err


def _table_items(
    path: Path,
    rows: list[tuple[int, dict]],
    prompt: str | None,
    image_column: str,
    prompt_column: str | None,
    id_column: str | None,
) -> list[Item]:
    """Items from table rows, checking every row has its columns and that ids are unique."""
    items = []
    seen: dict[str, int] = {}
    for number, row in rows:
        image = _cell(path, number, row, image_column, "--image-column")
        text = (
            _cell(path, number, row, prompt_column, "--prompt-column")
            if prompt_column is not None
            else prompt or DEFAULT_PROMPT
        )
        key = image if id_column is None else _cell(path, number, row, id_column, "--id-column")
        if key in seen:
            hint = " (give each row an id with --id-column)" if id_column is None else ""
            raise InputError(
                f"{path} names {key!r} on lines {seen[key]} and {number}; ids must be unique{hint}"
            )
        seen[key] = number
        is_remote = image.startswith(("http://", "https://", "data:"))
        location = image if is_remote or Path(image).is_absolute() else str(path.parent / image)
        items.append(Item(key, location, text))
    if not items:
        raise InputError(f"{path} lists no images")
    return items


def _cell(path: Path, number: int, row: dict, column: str, option: str) -> str:
    """A row's non-empty text value in `column`, or an error naming the line and option."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{path} line {number} has no {column!r} value ({option})")
    if not isinstance(value, (str, int)):
        raise InputError(
            f"{path} line {number}: {column!r} must be text, not {type(value).__name__}"
        )
    return str(value).strip()
