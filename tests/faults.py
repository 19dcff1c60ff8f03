"""Fault injection for tests: run a command until it pauses at a named point, then SIGKILL it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from mlx_smolvlm.utils.atomic import PAUSE_ENV


def kill_at(pause: str, args: list[str], env: dict | None = None, timeout: float = 300) -> None:
    """Run `python ARGS` with MLX_SMOLVLM_PAUSE_AT=pause; SIGKILL it once it has paused there."""
    child = subprocess.Popen(
        [sys.executable, *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {}), PAUSE_ENV: pause},
    )
    deadline = time.monotonic() + timeout
    line = ""
    while f"[paused at {pause}]" not in line:
        line = child.stderr.readline()
        assert line or child.poll() is None, f"{args} ended before {pause}"
        assert time.monotonic() < deadline, f"{args} did not reach {pause}"
    child.send_signal(signal.SIGKILL)
    child.wait()
