"""The scheduler's actions: what a pass answers for each want (place, evict, wait, fail), as
small immutable values the controller applies. Pure values: it imports no other module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    """Create the model's actor pinned to this node."""

    model: str
    node_id: str
    gpus: float | None = None  # its num_gpus, when placed by GPU memory


@dataclass(frozen=True)
class Evict:
    """Stop `victim` to make room for `for_model`; the Place that follows needs it gone first.

    reason: "priority" (lower priority), "swap" (equal priority), "surplus" (a replica above its
    model's count), "capacity" (max_running_models).
    """

    victim: str
    for_model: str
    reason: str


@dataclass(frozen=True)
class Drain:
    """Scale in: the replica takes no new request, finishes what it has, then stops."""

    model: str
    replica: str
    reason: str


@dataclass(frozen=True)
class Wait:
    """Not now; the reason says what for (shown to users)."""

    model: str
    reason: str


@dataclass(frozen=True)
class Fail:
    """No alive node could ever hold the model; the reason says what it needs and what there is."""

    model: str
    reason: str


Action = Place | Evict | Drain | Wait | Fail
