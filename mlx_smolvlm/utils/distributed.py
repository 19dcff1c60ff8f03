"""The process group of a run started by `mlx.launch` (one process when started alone).

Thin helpers over `mx.distributed`: the group is created once, collectives run on the CPU
stream (where MLX implements them), and `barrier` is an `all_sum` of a scalar.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import mlx.core as mx


@cache
def init() -> mx.distributed.Group:
    """The group of all ranks (`mlx.launch` sets it up; a lone process is a group of one)."""
    return mx.distributed.init()


def rank() -> int:
    """This process's rank in the group."""
    return init().rank()


def size() -> int:
    """How many processes the group has."""
    return init().size()


def is_main() -> bool:
    """Whether this is rank 0, the process that writes shared files and prints."""
    return rank() == 0


def barrier() -> None:
    """Return only once every rank has reached this point."""
    group = init()
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums of `values` over all ranks (each rank gives a list of equal length)."""
    group = init()
    if group.size() == 1:
        return list(values)
    total = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=group, stream=mx.cpu)
    return total.tolist()


def print_main(*args: Any, **kwargs: Any) -> None:
    """`print` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)
