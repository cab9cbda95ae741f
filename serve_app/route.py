"""Which replica of a model serves a request: a pure choice over a snapshot of the replicas this
ingress replica knows, with the load it last heard from each. No I/O, no actor calls, no clock;
looking replicas up (the controller, retries on moved actors) is the cluster view's
(serve_app.backend), and the randomness comes in (`rng`), so every choice is a unit test.

The rule (DESIGN §13): power of two choices. Two replicas drawn at random, the less loaded one
wins: close to the least loaded replica's wait without every request asking every replica, and
no herd onto the one that looked emptiest. A draining, stopping or starting replica is never
chosen while a ready one has a free slot. This is where the KV-cache issue teaches affinity.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

READY = "ready"
WAITING_ALLOWED = frozenset({"ready", "starting", "restarting"})  # a request may queue there


@dataclass(frozen=True)
class ReplicaView:
    """One replica as this ingress replica last heard of it."""

    handle: Any  # its actor handle (opaque here)
    name: str  # the replica's name ("chat", "chat#2"), for the response header and logs
    state: str = READY  # "starting", "ready", "restarting", "draining", "stopping", ...
    in_use: int = 0  # slots held
    queued: int = 0
    parallel: int = 1  # its slots

    @property
    def has_room(self) -> bool:
        return self.state == READY and self.in_use < self.parallel

    @property
    def load(self) -> float:
        """Ongoing requests per slot: what the two choices compare."""
        return (self.in_use + self.queued) / max(1, self.parallel)


Snapshot = tuple[ReplicaView, ...]  # the model's replicas this ingress replica knows


def route(snapshot: Sequence[ReplicaView], rng: random.Random | None = None) -> Any | None:
    """The handle of the replica to send the request to; None when none may take it (none
    known, or every one leaving: ask the controller)."""
    view = choose(snapshot, rng)
    return None if view is None else view.handle


def choose(snapshot: Sequence[ReplicaView], rng: random.Random | None = None) -> ReplicaView | None:
    """The replica for one request: among the ready ones with a free slot if any, else among
    those a request may wait in (ready, starting, restarting), the less loaded of two drawn
    at random (ties: fewer queued, then the first drawn: equal replicas share the load)."""
    pool = [v for v in snapshot if v.has_room]
    if not pool:
        pool = [v for v in snapshot if v.state in WAITING_ALLOWED]
    if len(pool) <= 1:
        return pool[0] if pool else None
    first, second = (rng or random).sample(pool, 2)
    return min(first, second, key=lambda v: (v.load, v.queued))
