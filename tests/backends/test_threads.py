"""Host threads: sized to the cores this process may use, fewer when other programs keep them
busy, never spinning, and the same numbers whatever the count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_smolvlm.backends import kernels, threads
from mlx_smolvlm.backends.kernels import host_attention, host_swiglu


@pytest.fixture(autouse=True)
def restore_decision():
    yield
    threads.threads = 0


def test_cores_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "CGROUP", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert threads.available_cores() == 4  # no quota file: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.available_cores() == 4
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 cores
    assert threads.available_cores() == 1
    (tmp_path / "cpu.max").write_text("800000 100000\n")  # more than the affinity allows
    assert threads.available_cores() == 4
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert threads.available_cores() == 4


def test_cgroup_v1_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "CGROUP", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.available_cores() == 3
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert threads.available_cores() == 8


@pytest.mark.parametrize("busy, expected", [(0, 4), (1, 3), (2.6, 1), (9, 1)])
def test_busy_cores_leave_fewer_threads(monkeypatch, busy, expected):
    monkeypatch.delenv("MLX_SMOLVLM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: busy)
    assert threads.decide() == expected == threads.current()
    assert f"Host threads: {expected} (4 cores available" in threads.status()


def test_a_fresh_reading_is_reused_and_a_stale_one_taken_again(monkeypatch):
    readings = []
    monkeypatch.setattr(threads, "_runnable_elsewhere", lambda: readings.append(1) or 2)
    monkeypatch.setattr(threads, "_last_reading", None)
    clock = [100.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    first = threads.busy_cores()
    assert len(readings) == threads.SAMPLES
    clock[0] += threads.FRESH / 2
    assert threads.busy_cores() == first and len(readings) == threads.SAMPLES  # reused
    clock[0] += threads.FRESH
    threads.busy_cores()
    assert len(readings) == 2 * threads.SAMPLES  # sampled again


def test_tasks_use_every_core_on_a_busy_machine_unless_told(monkeypatch):
    monkeypatch.delenv("MLX_SMOLVLM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: 3.5)
    assert threads.decide() == 1  # synchronised work (decode steps): one thread
    assert threads.for_tasks() == 4  # independent tasks: every core
    monkeypatch.setenv("MLX_SMOLVLM_THREADS", "2")
    threads.decide()
    assert threads.for_tasks() == 2


def test_environment_forces_the_count_and_names_a_bad_one(monkeypatch):
    monkeypatch.setenv("MLX_SMOLVLM_THREADS", "3")
    assert threads.decide() == 3
    assert "MLX_SMOLVLM_THREADS" in threads.status()
    monkeypatch.setenv("MLX_SMOLVLM_THREADS", "many")
    with pytest.raises(ValueError, match="MLX_SMOLVLM_THREADS must be a whole number"):
        threads.decide()


def test_competing_processes_are_counted():
    # Two busy loops of another program: runnable, so counted as busy (ours are not). Without
    # /proc (macOS) nothing is counted and the available cores are used.
    # Each says when it is spinning, however long its start took on a busy machine.
    spin = "import time\nend = time.time() + 30\nprint(flush=True)\nwhile time.time() < end: pass"
    others = [
        subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE) for _ in range(2)
    ]
    try:
        for process in others:
            process.stdout.readline()
        readings = [threads._runnable_elsewhere() for _ in range(20)]
        if os.path.exists("/proc/loadavg"):
            assert max(readings) >= 2
        else:
            assert readings == [None] * 20 and threads.busy_cores() == 0.0
    finally:
        for process in others:
            process.kill()
            process.wait()


def test_one_thread_runs_in_the_caller_and_more_use_the_pool(monkeypatch):
    seen = set()
    lock = threading.Lock()

    both = threading.Event()

    def task(i):
        with lock:
            seen.add(threading.current_thread().name)
            if len(seen) == 2:
                both.set()

    def task_waiting_for_both(i):
        # A task returns only once two threads have taken one, so that the calling thread
        # cannot drain every task before the helper starts, however slow the machine.
        task(i)
        both.wait(timeout=60)

    monkeypatch.setattr(kernels, "_threads", lambda: 1)
    kernels.run_tasks(task, 8)
    assert seen == {threading.current_thread().name}
    seen.clear()
    monkeypatch.setattr(kernels, "_threads", lambda: 2)
    kernels.run_tasks(task_waiting_for_both, 8)
    assert len(seen) == 2 and threading.current_thread().name in seen


def test_a_failing_task_is_raised(monkeypatch):
    def task(i):
        if i == 5:
            raise RuntimeError("task 5 failed")

    monkeypatch.setattr(kernels, "_threads", lambda: 2)
    with pytest.raises(RuntimeError, match="task 5 failed"):
        kernels.run_tasks(task, 8)


def test_kernels_give_the_same_numbers_on_one_thread_or_several(monkeypatch):
    mx.random.seed(0)
    q, k, v = (mx.random.normal((1, 4, 300, 16)) for _ in range(3))
    x = mx.random.normal((4, 300, 700))
    results = []
    for count in (1, 2, 3):
        monkeypatch.setattr(kernels, "_threads", lambda count=count: count)
        results.append((host_attention(q, k, v, 0.25, "causal"), host_swiglu(x, x)))
    for attention, swiglu in results[1:]:
        assert mx.array_equal(attention, results[0][0]).item()
        assert mx.array_equal(swiglu, results[0][1]).item()


def test_host_vision_tower_gives_the_same_numbers_on_any_thread_count(monkeypatch):
    from reference import tiny_config

    from mlx_smolvlm.backends import cpu
    from mlx_smolvlm.backends import vision as host_vision
    from mlx_smolvlm.model import Model, ModelConfig

    model = cpu.prepare(Model(ModelConfig.from_dict(tiny_config())).eval())
    config = model.config.vision_config
    mx.random.seed(1)
    pixels = mx.random.normal((3, config.image_size, config.image_size, 3))
    ids = mx.broadcast_to(
        mx.arange(config.patches_per_side**2)[None], (3, config.patches_per_side**2)
    )
    monkeypatch.setattr(host_vision, "ROWS", 10)
    results = []
    for count in (1, 2, 3):
        monkeypatch.setattr(kernels, "_threads", lambda count=count: count)
        results.append(model.vision_model(pixels, ids))
    assert all(mx.array_equal(r, results[0]).item() for r in results[1:])


def test_prepare_decides_and_sets_mlx_blas_threads(monkeypatch):
    from mlx_smolvlm.backends import blas, cpu

    calls = []
    monkeypatch.setattr(blas, "set_threads", calls.append)
    monkeypatch.setenv("MLX_SMOLVLM_THREADS", "1")
    monkeypatch.setenv("MLX_SMOLVLM_HOST_KERNELS", "0")  # the pure-MLX path is bounded too
    cpu.prepare(nn.Linear(2, 2))
    assert calls == [1] and threads.current() == 1


def test_mlx_blas_thread_count_is_applied():
    # In a fresh process: MLX's OpenBLAS (the system one) takes the count, numpy's keeps its own.
    code = (
        "import mlx_smolvlm, json\n"
        "from mlx_smolvlm.backends import blas\n"
        "from threadpoolctl import threadpool_info\n"
        "blas.set_threads(1)\n"
        "print(json.dumps([[i['filepath'], i['num_threads']] for i in threadpool_info()"
        " if i['internal_api'] == 'openblas']))\n"
    )
    env = {**os.environ, "MLX_SMOLVLM_BLAS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    counts = {
        "numpy" if "scipy_openblas" in path else "mlx": n for path, n in json.loads(out.stdout)
    }
    assert counts["mlx"] == 1
    assert counts.get("numpy", threads.available_cores()) == threads.available_cores()
