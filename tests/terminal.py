"""Drive a command through a pseudo-terminal, as a person at a keyboard would (stdlib pty)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

KEYS = {"ctrl-c": "\x03", "ctrl-d": "\x04", "left": "\x1b[D", "up": "\x1b[A", "enter": "\r"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _take_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty on stdin, so that
    Ctrl-C sends SIGINT to it as a terminal does."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _take_terminal_ignoring_sigint() -> None:
    """As `_take_terminal`, with SIGINT ignored, as a script's background job starts."""
    _take_terminal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Terminal:
    """A child process whose stdin, stdout and stderr are one pseudo-terminal."""

    def __init__(
        self,
        args: list[str],
        cwd: Path | None = None,
        env: dict | None = None,
        sigint_ignored: bool = False,
    ):
        self.master, slave = pty.openpty()
        environment = {**os.environ, "TERM": "xterm", "MLX_SMOLVLM_QUIET": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=environment,
            preexec_fn=_take_terminal_ignoring_sigint if sigint_ignored else _take_terminal,
        )
        os.close(slave)
        self.output = ""  # everything read so far, escape sequences removed
        self.seen = 0  # how much of `output` earlier expects consumed

    def read(self, timeout: float) -> bool:
        """Read what the child wrote within `timeout` seconds; False at end of output."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        self.output += ANSI.sub("", data.decode("utf-8", "replace"))
        return True

    def expect(self, pattern: str, timeout: float = 120) -> str:
        """Wait for `pattern` (a regex) after the last match; return the text up to its end."""
        deadline = time.monotonic() + timeout
        alive = True
        while True:
            match = re.compile(pattern).search(self.output, self.seen)
            if match:
                text = self.output[self.seen : match.end()]
                self.seen = match.end()
                return text
            if not alive or time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen; output so far:\n{self.output}")
            alive = self.read(0.2)

    def send(self, text: str) -> None:
        """Type `text` (KEYS names special keys)."""
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 60) -> int:
        """Read to the end and return the exit status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.read(0.2):
            if self.process.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                break
        code = self.process.wait(timeout=max(deadline - time.monotonic(), 1))
        os.close(self.master)
        return code

    def close(self) -> None:
        """Stop the child if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
