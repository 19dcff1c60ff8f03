"""Progress of a long prompt (image tiles encoded, tokens prefilled) on the terminal."""

from __future__ import annotations

import sys
from typing import Any, TextIO


class TerminalProgress:
    """A `stream_generate(progress=...)` callback: one self-erasing line on stderr."""

    LABELS = {"tiles": "encoding image tiles", "prefill": "prefilling prompt tokens"}

    def __init__(self, stream: TextIO | Any = None):
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
