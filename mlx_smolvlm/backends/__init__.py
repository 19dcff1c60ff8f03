"""Speed-ups for MLX's CPU backend (Linux): an optimized BLAS, numpy host kernels, a numpy decoder.

`blas` runs at package import (it must precede `import mlx.core`) and prints nothing;
`cpu.prepare(model)` is the one seam through which generation installs the rest on a model,
and `cpu.report(model)` says what was chosen. Training never goes through the seam.
"""
