"""Use an optimized BLAS for MLX's CPU backend on Linux.

The `mlx[cpu]` wheel links the reference BLAS (about 5 GFLOP/s for an fp32 GEMM on a 2-core
x86 machine); an OpenBLAS loaded into the global symbol scope before `mlx.core` is imported
takes over `cblas_sgemm` (60-190 GFLOP/s on the same machine) and gives identical results to
float32 rounding. libmlx binds its BLAS symbols when it is loaded, so this must run before the
first `import mlx.core`: `mlx_smolvlm/__init__.py` calls it first thing. It prints nothing
unless no optimized BLAS could be loaded (a one-line warning; MLX_SMOLVLM_QUIET=1 hides it);
`status()` says what was chosen (the CLIs report it with --verbose).

Opt out with MLX_SMOLVLM_BLAS=0; point MLX_SMOLVLM_BLAS at a library file to choose one.
Nothing of this applies on macOS, where MLX uses Metal and Accelerate.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from pathlib import Path

from . import threads

CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "libopenblasp.so.0",
)

# OpenBLAS kernel families, the best first, with the CPU flags each needs (x86_64 only).
CORE_TYPES = (
    ("SkylakeX", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}),
    ("Haswell", {"avx2", "fma"}),
)

loaded: str | None = None
reason = "not tried"  # why no library was loaded, when none was
_library: ctypes.CDLL | None = None


def _candidates(choice: str | None) -> list[str]:
    if choice and choice not in ("1", "auto"):
        return [choice]
    found = ctypes.util.find_library("openblas")
    return ([found] if found else []) + list(CANDIDATES)


def core_type(cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS kernel family this x86_64 CPU's flags allow (`CORE_TYPES`), or None.

    OpenBLAS picks its kernels from the CPU model number, and a model it does not know (the
    generic "Intel Xeon Processor" a hypervisor shows, a CPU newer than the library) gets its
    slowest x86_64 kernels: Debian's 0.3.21 ran an fp32 GEMM at 43-66 GFLOP/s on a virtual
    AVX-512 Xeon, 199-238 with its AVX-512 kernels (torch's MKL: 243-279; see
    benchmarks/bench_blas.py). The flags say what the CPU can run whatever its model, so the
    family is chosen from them.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    return next((name for name, needs in CORE_TYPES if needs <= set(flags)), None)


def host_kernels_wanted() -> bool:
    """Whether the user left the CPU backend's host kernels on (MLX_SMOLVLM_HOST_KERNELS=0 turns
    them off; whether they fit a model is `cpu.host_kernels_apply`'s)."""
    return os.environ.get("MLX_SMOLVLM_HOST_KERNELS") != "0"


def _load_globally(name: str) -> None:
    """Load `name` globally, with as many threads as this process has cores (affinity and
    cgroup quota: OpenBLAS itself counts the machine's), the kernels the CPU's flags allow
    (`core_type`; an OPENBLAS_CORETYPE of the user's wins), and, where the host kernels will
    run, its idle threads set to sleep at once instead of spinning.

    OpenBLAS's idle threads spin for about 2^28 cycles after each call: between MLX's matrix
    products that takes a core from the numpy host kernels (the vision tower runs ~10%
    slower), and on a busy machine from other programs; MLX's prefill products are large
    enough not to notice a thread's wake-up. Without the host kernels (the pure-MLX path) MLX
    also decodes, ~200 small products a token, each waiting for the sleeping threads to wake:
    there the spinning default decodes ~12 % faster (13.2 -> 15.1 tokens/s for SmolVLM-256M on
    2 cores), so it is kept. The settings are read once, when the library loads, so only
    this copy gets them: numpy's own OpenBLAS, whose small decode products do gain from
    spinning, keeps its defaults (the host work bounds its threads, `threads.decide`).
    """
    settings = {"OPENBLAS_NUM_THREADS": str(threads.available_cores())}
    if host_kernels_wanted():
        settings["OPENBLAS_THREAD_TIMEOUT"] = "4"  # 2^4 cycles, the least OpenBLAS allows
    family = core_type()
    if family:
        settings["OPENBLAS_CORETYPE"] = family
    previous = {key: os.environ.get(key) for key in settings}
    for key, value in settings.items():
        if previous[key] is None:
            os.environ[key] = value
    global _library
    try:
        _library = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    finally:
        for key, value in previous.items():
            if value is None:
                del os.environ[key]


def _bind_torch_first() -> None:
    """Import torch, when installed, before OpenBLAS is loaded globally. transformers (imported
    by mlx-lm) imports it anyway; imported after, torch's own BLAS calls bind to that OpenBLAS,
    and its attention, which calls BLAS from its OpenMP threads, runs ~18x slower (0.14 -> 2.6 s
    for 9 images' SigLIP attention on 2 cores)."""
    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401  (optional: only to bind its libraries first)


def enable_fast_blas() -> str | None:
    """Load an optimized BLAS globally before MLX does; return its name, or None."""
    global loaded, reason
    choice = os.environ.get("MLX_SMOLVLM_BLAS")
    if loaded:
        return loaded
    if sys.platform != "linux":
        reason = "not Linux: MLX uses its platform's BLAS"
        return None
    if choice == "0":
        reason = "MLX_SMOLVLM_BLAS=0"
        return None
    if "mlx.core" in sys.modules:
        # Too late: libmlx already bound its reference BLAS.
        reason = (
            "mlx.core was imported before mlx_smolvlm, so MLX keeps its slow reference BLAS: "
            "import mlx_smolvlm first (or run with LD_PRELOAD=libopenblas.so.0)"
        )
        return None
    _bind_torch_first()
    for name in _candidates(choice):
        try:
            _load_globally(name)
        except OSError:
            continue
        loaded = name
        return loaded
    reason = (
        f"MLX_SMOLVLM_BLAS={choice} could not be loaded"
        if choice and choice not in ("1", "auto")
        else "no OpenBLAS found (apt install libopenblas0-pthread): MLX's reference BLAS is slow"
    )
    if os.environ.get("MLX_SMOLVLM_QUIET") != "1":  # a slow setup is worth one line
        print(f"[mlx-smolvlm] warning: {reason}", file=sys.stderr)
    return None


def set_threads(count: int) -> None:
    """Run MLX's matrix products on `count` threads (the loaded OpenBLAS's setting; nothing
    when MLX uses its own BLAS)."""
    setter = getattr(_library, "openblas_set_num_threads", None)
    if setter is not None:
        setter(ctypes.c_int(count))


def corename() -> str:
    """The kernel family the loaded OpenBLAS runs ("unknown" for another BLAS)."""
    getter = getattr(_library, "openblas_get_corename", None)
    if getter is None:
        return "unknown"
    getter.restype = ctypes.c_char_p
    return getter().decode(errors="replace")


def status() -> str:
    """One line saying which BLAS MLX's CPU backend multiplies matrices with."""
    if loaded:
        return (
            f"MLX CPU backend: {loaded} ({corename()} kernels) for matrix products "
            "(MLX_SMOLVLM_BLAS=0 to turn off)"
        )
    return f"MLX CPU backend: reference BLAS ({reason})"
