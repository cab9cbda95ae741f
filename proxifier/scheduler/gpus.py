"""GPU arithmetic: the share of one GPU a need of memory takes, whole GPUs, and Ray's own first
fit of a share or of whole GPUs on a node's table of free fractions. Pure functions over numbers;
it may use the facts module only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from proxifier.scheduler.facts import EPSILON

GIB = 1024**3


def gpu_fraction(need: float, gpu_memory: float) -> float:
    """The `num_gpus` a need of GPU memory asks of a node with GPUs of this size: its share of
    one GPU rounded up to 0.01 (Ray's fractions pack several models on one GPU), or whole GPUs
    when one is too small."""
    if need <= 0:
        return 0.0
    if need > gpu_memory:
        return float(_whole(need, gpu_memory))
    return max(0.01, math.ceil(need / gpu_memory * 100 - 1e-9) / 100)


def _whole(need: float, gpu_memory: float) -> int:
    """How many GPUs of this size the need takes: 1 when it fits one, else whole GPUs."""
    return 1 if need <= gpu_memory else math.ceil(need / gpu_memory - 1e-9)


def whole_count(share: float) -> int:
    """GPUs a share takes: one for a fraction, else the whole number."""
    return 1 if share < 1 - EPSILON else math.ceil(share - 1e-9)


def whole_key(shape: tuple[float, float], sizes: Mapping[float, Any]) -> tuple[int, ...]:
    """How many GPUs a want takes on each kind of node (each known GPU size, and nodes of
    unknown size), for caching which nodes could ever hold it."""
    memory, gpus = shape
    if memory > 0:
        return (*(_whole(memory, size) for size in sizes), 1)
    return (whole_count(gpus),)


def first_fit(table: list[float], amount: float) -> dict[int, float]:
    """Ray's choice of GPUs for `amount`, taken from `table`: for a share, the GPU with the
    least room that holds it; else the first GPUs that are all free."""
    if amount < 1 - EPSILON:
        room = [(free, gpu) for gpu, free in enumerate(table) if free + EPSILON >= amount]
        if not room:
            if not table:
                return {}
            room = [(max(table), table.index(max(table)))]  # inconsistent facts
        _, gpu = min(room)
        table[gpu] -= amount
        return {gpu: amount}
    taken: dict[int, float] = {}
    for gpu, free in enumerate(table):
        if len(taken) >= round(amount):
            break
        if free >= 1 - EPSILON:
            taken[gpu] = 1.0
            table[gpu] = 0.0
    return taken
