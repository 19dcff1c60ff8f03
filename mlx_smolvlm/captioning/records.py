"""The output of a captioning run: JSONL records, per-rank part files, and the final merge.

While a run is going, each rank appends its finished batches to its own part file
(`OUTPUT.parts/rank-R.jsonl`), one whole batch per `write` followed by `fsync`. A process
killed mid-write can leave at most an unterminated last line; readers ignore it and the rank
that owns the file cuts it off before appending again. When every rank is done, rank 0 merges
the earlier output and all parts, one record per id in the run's order, into OUTPUT through a
temporary file and a rename, and removes the parts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..utils import atomic
from .inputs import InputError

PART_NAME = re.compile(r"rank-(\d+)\.jsonl")


def parts_dir(output: Path) -> Path:
    """Where the ranks of a run keep their part files until the merge."""
    return output.with_name(output.name + ".parts")


def part_path(output: Path, rank: int) -> Path:
    """The part file rank `rank` appends its records to."""
    return parts_dir(output) / f"rank-{rank}.jsonl"


def read_records(path: Path, allow_partial_tail: bool = False) -> list[dict]:
    """The records of a JSONL output or part file (none when it does not exist).

    With `allow_partial_tail`, an unterminated last line (a write cut short) is left out;
    any other line that is not a record is an error naming the file and the line.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from err
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail and not allow_partial_tail:
        lines.append(tail)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise InputError(
                f"{path} line {number} is not a caption record (a JSON object with an id); "
                "choose another --output"
            )
        records.append(record)
    return records


def done_ids(output: Path) -> set[str]:
    """Ids already written to `output` or to any part file left by an earlier run."""
    done = {record["id"] for record in read_records(output)}
    for part in _part_files(output):
        done.update(record["id"] for record in read_records(part, allow_partial_tail=True))
    return done


def cut_partial_tail(path: Path) -> None:
    """Drop an unterminated last line (left by a killed writer) so that appends start clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())


def append_records(path: Path, records: Sequence[dict]) -> None:
    """Append whole records in one write and make them durable before returning."""
    if not records:
        return
    data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def merge(output: Path, order: Sequence[str]) -> int:
    """Merge `output` and every part file into `output`, in `order`; return the record count.

    Each id keeps its first record (the earlier output first, then the parts by rank); ids
    not in `order` (from an earlier run over other inputs) follow in the order they were
    found. The parts are removed once the merged file is in place.
    """
    records = {}
    for record in _all_records(output):
        records.setdefault(record["id"], record)
    position = {key: i for i, key in enumerate(order)}
    ordered = sorted(records.values(), key=lambda r: position.get(r["id"], len(position)))
    write_synced(output, (json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    shutil.rmtree(parts_dir(output), ignore_errors=True)
    return len(ordered)


def write_synced(path: Path, lines: Iterable[str]) -> None:
    """Write a text file whole or not at all (a temporary file, fsync, then a rename)."""

    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())

    atomic.write_file(path, write)


def _all_records(output: Path) -> Iterable[dict]:
    yield from read_records(output)
    for part in _part_files(output):
        yield from read_records(part, allow_partial_tail=True)


def _part_files(output: Path) -> list[Path]:
    """Part files of any earlier or current run, rank 0 first (whatever its number of ranks)."""
    folder = parts_dir(output)
    if not folder.is_dir():
        return []
    ranks = {int(m[1]): p for p in folder.iterdir() if (m := PART_NAME.fullmatch(p.name))}
    return [ranks[r] for r in sorted(ranks)]
