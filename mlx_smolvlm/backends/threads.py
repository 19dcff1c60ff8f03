"""How many threads the CPU backend's host work runs on: the cores this process may use, less
those other programs keep busy right now.

A decode step synchronises its threads hundreds of times per token (each of its ~120 BLAS
products waits for every BLAS thread). When other programs keep the cores busy, one of our
threads is often descheduled, and every product then waits a whole scheduler slice for it:
with two competing multi-threaded BLAS jobs on a 2-core machine, a two-thread decode step ran
ten times slower than a one-thread one. So `decide()`, called once per generation call by
`cpu.prepare`, counts the cores available (CPU affinity and the cgroup CPU quota, not
`os.cpu_count()`) and the threads of other processes runnable at that moment (the
instantaneous count behind the load average, sampled a few times; the 1-minute load average
lags a minute behind and counts this process's own past work), and gives synchronised work
(decode steps, MLX's BLAS) the cores left, at least one. The prefill's host work is split into
independent tasks instead and runs on every available core (`for_tasks`): under the same
load, one thread made an image's prefill 4.3x slower than on the quiet machine, every core
3.1x. MLX_SMOLVLM_THREADS=N overrides both.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

SAMPLES = 5  # readings of the runnable count, SAMPLE_INTERVAL apart (their median is used)
SAMPLE_INTERVAL = 0.002
FRESH = 1.0  # seconds a reading of the busy cores is reused (calls in a burst sample once)
CGROUP = Path("/sys/fs/cgroup")

threads = 0  # the current decision (0: not decided yet); read through `current()`
task_threads = 0  # threads for independent tasks, decided with it; read through `for_tasks()`
reason = "not decided yet"
_last_reading: tuple[float, float] | None = None  # (time.monotonic(), busy cores)


def _cgroup_quota() -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 `cpu.max`, v1 `cfs_quota_us`), or
    None when there is none or it cannot be read."""
    root = CGROUP
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, bounded by a cgroup quota."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _runnable_elsewhere() -> int | None:
    """Threads of other processes runnable now (Linux), or None where this cannot be read."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        ours = 0
        for task in Path("/proc/self/task").iterdir():
            # The state follows the command name's closing parenthesis.
            if (task / "stat").read_text().rpartition(")")[2].split()[0] == "R":
                ours += 1
    except (OSError, IndexError, ValueError):
        return None
    return max(0, running - ours)


def busy_cores() -> float:
    """Of the available cores, how many other programs keep busy now: the median of a few
    readings of their runnable threads, scaled to our share of the machine's cores. Sampling
    takes ~10 ms, so a reading less than FRESH seconds old is reused (a server's requests)."""
    global _last_reading
    now = time.monotonic()
    if _last_reading and now - _last_reading[0] < FRESH:
        return _last_reading[1]
    readings = []
    for i in range(SAMPLES):
        if i:
            time.sleep(SAMPLE_INTERVAL)
        reading = _runnable_elsewhere()
        if reading is None:
            return 0.0
        readings.append(reading)
    online = os.cpu_count() or 1
    busy = statistics.median(readings) * available_cores() / online
    _last_reading = (now, busy)
    return busy


def decide() -> int:
    """Decide (again) how many threads host work uses, and return it."""
    global threads, task_threads, reason
    cores = available_cores()
    forced = os.environ.get("MLX_SMOLVLM_THREADS")
    if forced:
        try:
            threads = task_threads = max(1, int(forced))
        except ValueError as error:
            raise ValueError(
                f"MLX_SMOLVLM_THREADS must be a whole number of threads, got {forced!r}"
            ) from error
        reason = "MLX_SMOLVLM_THREADS"
        return threads
    busy = busy_cores()
    threads, task_threads = max(1, min(cores, round(cores - busy))), cores
    reason = f"{cores} cores available, {busy:.1f} busy with other programs"
    return threads


def for_tasks() -> int:
    """Threads for host work split into independent tasks taken from a shared counter (the
    prefill's kernels, the vision tower): every available core even on a busy machine, since
    a descheduled thread then delays only the task it holds (tens of milliseconds of work)
    while the others take the rest, and more threads get a larger share of a shared machine.
    MLX_SMOLVLM_THREADS, when set, counts here too. Decided with `decide`, not re-read per call
    (the kernels ask several times per layer)."""
    current()  # decided at least once
    return task_threads


def current() -> int:
    """The threads host work uses (decided at the first call when `decide` was not called)."""
    return threads or decide()


def status() -> str:
    """One line saying how many threads host work uses, and why."""
    return f"Host threads: {current()} ({reason}; MLX_SMOLVLM_THREADS=N to choose)"
