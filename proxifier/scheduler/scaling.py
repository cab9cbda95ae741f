"""How many replicas a model should run: Ray Serve's rule (the ongoing requests over the target
per replica, held for a delay before it acts) over the facts of one pass, which replicas are
surplus (the first victims), and which one a scale-in drains. Pure: no Ray, no clock (`now`
comes in); the reconcile loop turns the answer into wants and `Drain`s (DESIGN §13).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Replicas in these states are leaving: they count neither as capacity nor toward the count.
LEAVING = frozenset({"draining", "stopping", "stopped", "failed"})


@dataclass(frozen=True)
class Policy:
    """A model's replica rule: `replicas: N` is min = max = N; neither field is (0, 1)."""

    min_replicas: int = 0
    max_replicas: int = 1
    target: float = 4.0  # ongoing requests (in flight + queued) per replica
    upscale_delay: float = 30.0
    downscale_delay: float = 600.0

    @property
    def floor(self) -> int:
        """The replicas a running model keeps: min_replicas, at least the one it runs (0 is
        the idle timeout's, not the scaler's: an on-demand model stops when idle)."""
        return max(1, self.min_replicas)


@dataclass(frozen=True)
class Replica:
    """One replica's facts, as its actor reported them."""

    name: str
    state: str  # "starting", "ready", "restarting", "draining", "stopping", ...
    in_flight: int
    queued: int
    ready_since: float | None  # None while starting

    @property
    def ongoing(self) -> int:
        return self.in_flight + self.queued


@dataclass(frozen=True)
class Trend:
    """What the scaler remembers between passes: since when the load has asked for more
    replicas than run, or for fewer (None: it does not)."""

    over_since: float | None = None
    under_since: float | None = None


@dataclass(frozen=True)
class Scale:
    """The count a model should run now, what to remember, and why (shown to users)."""

    desired: int
    trend: Trend
    reason: str


def counted(replicas: Sequence[Replica]) -> list[Replica]:
    """The replicas that count: every one not leaving (starting ones included: they are
    capacity on its way, and counting them keeps a pass from asking twice)."""
    return [r for r in replicas if r.state not in LEAVING]


def desired_replicas(
    policy: Policy,
    replicas: Sequence[Replica],
    waiting: int,
    trend: Trend,
    now: float,
) -> Scale:
    """The count for a model that runs (at least one replica counted), from the ongoing
    requests of its replicas plus `waiting` (requests waiting for an instance not yet
    placed): ceil(ongoing / target) within [floor, max]. Below the floor (a replica lost,
    a fixed count raised) it acts at once; above or below the current count only once the
    load has stayed so for upscale_delay (or downscale_delay) seconds."""
    current = len(counted(replicas))
    ongoing = sum(r.ongoing for r in counted(replicas)) + waiting
    raw = math.ceil(ongoing / policy.target) if policy.target > 0 else policy.max_replicas
    wanted = min(policy.max_replicas, max(policy.floor, raw))
    load = f"{ongoing} ongoing, target {policy.target:g} per replica"
    if current < policy.floor:
        return Scale(wanted, Trend(), f"{current} of at least {policy.floor} running ({load})")
    if current > policy.max_replicas:
        return Scale(wanted, Trend(), f"{current} running, at most {policy.max_replicas}")
    if wanted > current:
        since = trend.over_since if trend.over_since is not None else now
        if now - since >= policy.upscale_delay:
            return Scale(wanted, Trend(), f"scaled out: {load} for {now - since:.0f} s")
        return Scale(
            current,
            Trend(over_since=since),
            f"{load}: {wanted} wanted once it lasts {policy.upscale_delay:g} s"
            f" ({now - since:.0f} s so far)",
        )
    if wanted < current:
        since = trend.under_since if trend.under_since is not None else now
        if now - since >= policy.downscale_delay:
            return Scale(wanted, Trend(), f"scaled in: {load} for {now - since:.0f} s")
        return Scale(
            current,
            Trend(under_since=since),
            f"{load}: {wanted} enough once it lasts {policy.downscale_delay:g} s"
            f" ({now - since:.0f} s so far)",
        )
    if current >= policy.max_replicas and raw > current:
        return Scale(current, Trend(), f"{load}: at max_replicas ({policy.max_replicas})")
    return Scale(current, Trend(), f"{load}: {current} enough")


def keep_order(replicas: Sequence[Replica]) -> list[Replica]:
    """The replicas in the order a model keeps them: ready ones first, the longest ready
    first (its prompt caches are the warmest), then the starting ones, by name."""
    return sorted(
        counted(replicas),
        key=lambda r: (r.ready_since is None, r.ready_since or 0.0, r.name),
    )


def surplus(policy: Policy, replicas: Sequence[Replica]) -> set[str]:
    """The replicas above what the model keeps (its floor), newest first to go: the
    scheduler's first victims for any want of the model's priority or above."""
    return {r.name for r in keep_order(replicas)[policy.floor :]}


def to_drain(replicas: Sequence[Replica], count: int) -> list[str]:
    """Which `count` replicas a scale-in drains: the starting ones first (no request has
    reached them), then the ready ones with the fewest ongoing requests, newest first.
    The longest-ready replica is kept."""
    kept = keep_order(replicas)
    candidates = sorted(
        kept[1:],
        key=lambda r: (r.ready_since is not None, r.ongoing, -(r.ready_since or 0.0), r.name),
    )
    return [r.name for r in candidates[: max(0, count)]]


def to_move(replicas: Sequence[Replica], slots: int) -> dict[str, int]:
    """How many waiting requests leave each replica's queue for the replicas with free slots
    (DESIGN §13: a burst does not stay stuck behind the first replica once others are ready):
    as many as the ready replicas nobody waits for have free slots, one at a time from the
    longest queue, so the queues even out. Their ingress routes them again, to the room."""
    free = sum(
        max(0, slots - r.in_flight) for r in replicas if r.state == "ready" and r.queued == 0
    )
    queues = {r.name: r.queued for r in replicas if r.queued > 0}
    moves: dict[str, int] = {}
    while free > 0 and queues:
        name = max(queues, key=lambda n: (queues[n], n))
        moves[name] = moves.get(name, 0) + 1
        free -= 1
        queues[name] -= 1
        if queues[name] == 0:
            del queues[name]
    return moves
