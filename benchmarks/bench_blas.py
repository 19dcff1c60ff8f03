"""Matrix-product speed of the BLAS libraries a generation uses on a Linux CPU.

MLX's products run on the OpenBLAS `mlx_smolvlm` loads, with the kernels chosen from the CPU's
flags (`blas.core_type`); this compares them with the kernels OpenBLAS falls back to for a CPU
model it does not know (`--fallback`, Prescott for x86_64), numpy's bundled OpenBLAS (the
vision tower's host code) and torch's MKL when torch is installed. Each
runs in a fresh process and multiplies by a transposed weight, as a linear layer does; the
best of five products counts.

    python benchmarks/bench_blas.py                 # the vision tower's fc1 product, 13 tiles
    python benchmarks/bench_blas.py --shape 2048x768x3072 --fallback Prescott
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

WORKER = """
import sys, time
which, m, k, n = sys.argv[1], *map(int, sys.argv[2:5])
import numpy as np
a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
w = np.random.default_rng(1).standard_normal((n, k), dtype=np.float32)  # a layer's (out, in)
if which == "torch":
    import torch
    ta, tw = torch.from_numpy(a), torch.from_numpy(w)
    run = lambda: ta @ tw.T
elif which == "numpy":
    run = lambda: a @ w.T
else:
    import mlx_smolvlm  # loads OpenBLAS before MLX
    import mlx.core as mx
    from mlx_smolvlm.backends import blas
    xa, xw = mx.array(a), mx.array(w)
    run = lambda: mx.eval(xa @ xw.T)
    which = f"MLX on {blas.loaded} ({blas.corename()} kernels)"
run()
times = []
for _ in range(5):
    start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
print(f"{which}: {2 * m * k * n / min(times) / 1e9:.0f} GFLOP/s")
"""


def measure(which: str, shape: tuple[int, int, int], env: dict) -> str:
    """One library's GFLOP/s line, from a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", WORKER, which, *map(str, shape)],
        capture_output=True,
        text=True,
        env=env,
    )
    return out.stdout.strip() or f"{which}: failed ({out.stderr.strip().splitlines()[-1:]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="13312x768x3072", help="MxKxN of the float32 product")
    parser.add_argument("--fallback", default="Prescott", help="OpenBLAS kernels to compare with")
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.lower().split("x"))
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    print(f"float32 product {args.shape}, best of 5:")
    print(measure("mlx", shape, env))
    print(measure("mlx", shape, {**env, "OPENBLAS_CORETYPE": args.fallback}))
    print(measure("numpy", shape, env))
    print(measure("torch", shape, env))


if __name__ == "__main__":
    main()
