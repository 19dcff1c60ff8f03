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
import os
import sys

CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "libopenblasp.so.0",
)

loaded: str | None = None
reason = "not tried"  # why no library was loaded, when none was


def _candidates(choice: str | None) -> list[str]:
    if choice and choice not in ("1", "auto"):
        return [choice]
    found = ctypes.util.find_library("openblas")
    return ([found] if found else []) + list(CANDIDATES)


def _load_with_sleeping_threads(name: str) -> None:
    """Load `name` globally, its idle threads set to sleep at once instead of spinning.

    OpenBLAS's idle threads spin for about 2^28 cycles after each call: between MLX's matrix
    products that takes a core from the numpy host kernels (the vision tower runs ~10%
    slower); MLX's products are large enough not to notice a thread's wake-up. The setting is
    read once, when the library loads, so only this copy gets it: numpy's own OpenBLAS, whose
    small decode products do gain from spinning, keeps its default.
    """
    previous = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    if previous is None:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"  # 2^4 cycles, the least OpenBLAS allows
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    finally:
        if previous is None:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]


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
    for name in _candidates(choice):
        try:
            _load_with_sleeping_threads(name)
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


def status() -> str:
    """One line saying which BLAS MLX's CPU backend multiplies matrices with."""
    if loaded:
        return f"MLX CPU backend: {loaded} for matrix products (MLX_SMOLVLM_BLAS=0 to turn off)"
    return f"MLX CPU backend: reference BLAS ({reason})"
