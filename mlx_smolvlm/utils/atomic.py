"""Files and folders written all or nothing, so that a crash, a kill or a full disk never
leaves half a file or a lost model behind.

- `write_file` (`write_text`, `write_json`, `save_safetensors`): a temporary file beside the
  target, then a rename.
- `model_folder(target, force, source)`: a staging folder beside `target` that replaces it
  when the block completes. Only an absent target, an empty folder or a folder holding
  nothing but a model's files may be replaced (`force`), never the source's own folder or a
  folder around or inside it. The old folder is swapped out in one atomic exchange where the
  system has one (Linux `renameat2`, macOS `renamex_np`), else by two renames whose gap the
  next run repairs; so a SIGKILL at any moment leaves the old model or the new one at
  `target`, and what a killed run left beside it is cleaned up by the next run.

Temporary names carry the writer's process id (`.NAME.PID.tmp`, `.NAME.PID.old`): leftovers
of a process that is gone are removed, those of a live one are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import mlx.core as mx

# The files a model folder holds: weights, configs, tokenizer, chat template, model card.
MODEL_FILES = ("*.safetensors", "*.json", "*.txt", "*.jinja", "*.md", "tokenizer.model")
FOLDER_MODE = 0o755
PAUSE_ENV = "MLX_SMOLVLM_PAUSE_AT"  # tests: stop at a named point so that a kill lands there


class TargetError(ValueError):
    """A target folder that may not be written or replaced; the message says why."""


def pause_point(name: str) -> None:
    """For fault tests: with MLX_SMOLVLM_PAUSE_AT=name, say so on stderr and wait to be killed."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"[paused at {name}]", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def _temporary(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{kind}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path) -> Iterator[tuple[Path, str]]:
    """(leftover, kind) beside `path` from writers that are no longer running."""
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid, _, kind = entry.name[len(prefix) :].partition(".")
        if pid.isdigit() and kind.startswith(("tmp", "old")) and not _alive(int(pid)):
            yield entry, kind


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(path: Path) -> None:
    """Repair what killed writers left beside `path`: an old folder whose replacement never
    arrived goes back in place; staging folders, temporary files and old copies are removed."""
    leftovers = list(_leftovers(path))
    if not path.exists():
        olds = sorted(
            (p for p, kind in leftovers if kind == "old"), key=lambda p: p.stat().st_mtime
        )
        if olds:
            olds[-1].rename(path)
            leftovers = [(p, k) for p, k in leftovers if p != olds[-1]]
    for leftover, _ in leftovers:
        _remove(leftover)


def write_file(file: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Call `write(temporary)` on a temporary file beside `file` (ending in `suffix`, for
    writers that go by it), then rename it to `file`, so readers never see half of it."""
    file = Path(file)
    recover(file)
    tmp = _temporary(file, "tmp" + suffix)
    try:
        write(tmp)
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(file: Path, text: str) -> None:
    """`text` in `file`, atomically."""
    write_file(file, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(file: Path, value: Any, indent: int = 2) -> None:
    """`value` as JSON in `file`, atomically."""
    write_text(file, json.dumps(value, indent=indent) + "\n")


def save_safetensors(file: Path, arrays: dict[str, mx.array], metadata: dict | None = None) -> None:
    """`mx.save_safetensors`, atomically (it appends ".safetensors" to names without it)."""
    write_file(
        file,
        lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata=metadata or {}),
        ".safetensors",
    )


def is_model_folder(path: Path) -> bool:
    """Whether `path` holds a model (config.json and safetensors) and nothing but its files."""
    entries = list(path.iterdir())
    names = {e.name for e in entries}
    return (
        "config.json" in names
        and any(n.endswith(".safetensors") for n in names)
        and all(e.is_file() and any(fnmatch(e.name, p) for p in MODEL_FILES) for e in entries)
    )


def check_target(target: Path, force: bool, source: Path | None = None, option: str = "") -> None:
    """Refuse a target that may not be (re)written: see the module's docstring."""
    name = f"{option} {target}".strip()
    if source is not None:
        src, dst = source.resolve(), target.resolve()
        if src == dst or src.is_relative_to(dst) or dst.is_relative_to(src):
            raise TargetError(
                f"{name} is the source checkpoint's folder, inside it or around it: "
                "choose a folder outside the source"
            )
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise TargetError(f"{name} exists and is not a directory")
    if not target.exists() or not any(target.iterdir()):
        return
    if not force:
        raise TargetError(f"{name} already exists; pass --force to replace it")
    if not is_model_folder(target):
        raise TargetError(
            f"{name} holds files that are not a model's: it is not replaced even with "
            "--force (choose another folder, or empty it yourself)"
        )


def _exchange_function() -> Any:
    """libc's atomic exchange of two paths, or None where there is none."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2

        def exchange(a: bytes, b: bytes) -> int:
            return libc.renameat2(at_fdcwd, a, at_fdcwd, b, rename_exchange)

        return exchange
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        return lambda a, b: libc.renamex_np(a, b, rename_swap)
    return None


def _swap(new: Path, target: Path) -> Path:
    """Put `new` at `target`; return where the old folder went (to be deleted)."""
    exchange = _exchange_function()
    if exchange is not None and exchange(bytes(new), bytes(target)) == 0:
        return new  # the old folder now sits at the staging name
    old = _temporary(target, "old")
    target.rename(old)
    pause_point("between-renames")
    new.rename(target)
    return old


@contextmanager
def model_folder(
    target: Path, force: bool = False, source: Path | None = None, option: str = ""
) -> Iterator[Path]:
    """A staging folder beside `target` to write a model into; it replaces `target` when the
    block completes and is removed if the block fails."""
    target = Path(target)
    recover(target)
    check_target(target, force, source, option)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _temporary(target, "tmp")
    staging.mkdir()
    staging.chmod(FOLDER_MODE)
    try:
        yield staging
        pause_point("staged")
        if target.exists() and not is_model_folder(target) and any(target.iterdir()):
            raise TargetError(f"{option} {target} changed while writing: not replaced".strip())
        if target.exists():
            old = _swap(staging, target)
            pause_point("swapped")
            _remove(old)
        else:
            staging.rename(target)
    except BaseException:
        _remove(staging)
        raise
