"""The scheduler's facts: what a pass is told (nodes, residents, wants, limits), with the plain
rules every part shares (labels, fits, demand order, victim order). Pure values and functions:
it imports no other part of the scheduler.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Ray's resource amounts are multiples of 1e-4; sums of floats drift far below that.
EPSILON = 1e-6

# A model in these states holds nothing useful: never a reason to wait, always a cheap victim.
GONE = frozenset({"stopped", "failed"})
STARTING = frozenset({"starting", "restarting"})


@dataclass(frozen=True)
class Node:
    """One node of the cluster, in Ray's resource names ("CPU", "GPU", "memory", custom)."""

    node_id: str
    address: str  # for messages
    total: Mapping[str, float]
    free: Mapping[str, float]  # the caller already subtracted placements in progress
    labels: Mapping[str, str] = field(default_factory=dict)
    alive: bool = True
    gpu_memory: float = 0.0  # bytes per GPU (declared or detected); 0 = not known


@dataclass(frozen=True)
class Resident:
    """A model whose actor exists (placed, starting or ready): what it holds and how busy it is."""

    name: str
    node_id: str
    holds: Mapping[str, float]
    priority: int  # 1-10, 10 highest
    preload: bool
    state: str  # "starting", "ready", "restarting", "stopping", "stopped", "failed"
    in_flight: int
    queued: int
    last_used: float  # end of its last request, else when it became ready (wall clock)
    ready_since: float | None  # None while starting
    # GPU index on its node -> the fraction of it held, as Ray assigned them (the actor reports
    # them); empty while not known, when the pass assumes Ray's first fit.
    gpus: Mapping[int, float] = field(default_factory=dict)
    model: str = ""  # the model it is a replica of ("": its name is the model's)
    # A replica above what its model keeps (min_replicas; every one beyond the first of an
    # on-demand model): the first victim of any want of its priority or above (DESIGN §13).
    surplus: bool = False

    @property
    def of(self) -> str:
        """The model this instance serves."""
        return self.model or self.name


@dataclass(frozen=True)
class Want:
    """A model that must run and has no actor."""

    name: str
    needs: Mapping[str, float]  # same resource names as Node.total
    selector: Mapping[str, str]  # Ray label selector: "a100", "!a100", "in(a,b)", "!in(a,b)"
    priority: int
    since: float  # its oldest waiting request (or when it was asked to start)
    # Bytes of GPU memory: placed on one GPU with that much free (a fraction of it), or on
    # whole GPUs when it needs more than one holds; `needs` then says nothing of "GPU".
    # 0: placed by `needs` alone.
    gpu_memory: float = 0.0
    model: str = ""  # the model it is a replica of ("": its name is the model's)
    # One more replica of a model that already runs: it may stop only lower priorities
    # (scaling out never swaps out an equal-priority model, DESIGN §13).
    scale_out: bool = False

    @property
    def of(self) -> str:
        """The model this instance would serve."""
        return self.model or self.name

    @property
    def evicts_below(self) -> float:
        """The priority it competes with for victims: its own, or for a scale-out half a
        level below it, so that `eligible` lets it stop lower priorities only."""
        return self.priority - 0.5 if self.scale_out else float(self.priority)


@dataclass(frozen=True)
class Limits:
    """The settings a pass enforces besides what fits."""

    max_running_models: int = 0  # 0 = no limit; residents + placements decided in this pass
    min_residency: float = 10.0  # seconds an equal-priority model is safe from a swap
    # Where a model placed by GPU memory goes: "binpack" fills the fullest GPU it fits on
    # (big holes stay free for big models), "spread" the emptiest.
    placement: str = "binpack"


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Ray's label selector: "x" equals, "!x" differs, "in(a,b)" one of, "!in(a,b)" none of.

    Ray's own matching, written out so the scheduler can test nodes without asking Ray.
    """
    for key, wanted in selector.items():
        value = labels.get(key)
        if wanted.startswith("!in(") and wanted.endswith(")"):
            if value in wanted[4:-1].split(","):
                return False
        elif wanted.startswith("in(") and wanted.endswith(")"):
            if value not in wanted[3:-1].split(","):
                return False
        elif wanted.startswith("!"):
            if value == wanted[1:]:
                return False
        elif value != wanted:
            return False
    return True


def fits(needs: Mapping[str, float], free: Mapping[str, float]) -> bool:
    """Whether `free` covers every amount in `needs`; an amount of 0 is not needed."""
    return all(
        free.get(key, 0.0) + EPSILON >= amount for key, amount in needs.items() if amount > 0
    )


def demand_order(wants: Iterable[Want]) -> list[Want]:
    """Priority first, then the oldest waiting request, then the name: who gets capacity first."""
    return sorted(wants, key=lambda want: (-want.priority, want.since, want.name))


# A want's needs and selector as keys of the pass's caches.
NeedsKey = tuple[tuple[str, float], ...]
SelectorKey = tuple[tuple[str, str], ...]


def _scarcity(resource: str) -> tuple[int, str]:
    """Best fit compares leftovers scarcest first: GPUs, custom resources, CPUs, memory."""
    if resource == "GPU":
        return (0, resource)
    if resource == "CPU":
        return (2, resource)
    if resource == "memory":
        return (3, resource)
    return (1, resource)


def needs_key(needs: Mapping[str, float]) -> NeedsKey:
    """The amounts needed (none of 0), scarcest resource first; the same for any dict order."""
    return tuple(
        sorted(
            ((key, float(amount)) for key, amount in needs.items() if amount > 0),
            key=lambda item: _scarcity(item[0]),
        )
    )


def rank(resident: Resident) -> int:
    """Where a resident stands in the victim order: its priority, or 0 for a surplus replica
    (before every other candidate; whom it may be stopped for is `PassState.eligible`'s)."""
    return 0 if resident.surplus else resident.priority


def victim_order(resident: Resident) -> tuple[int, float, str]:
    """Surplus replicas first, then the lowest priority, then least recently used, then the
    name. Searches stop at the first rank above what a want may stop."""
    return (rank(resident), resident.last_used, resident.name)


def evict_reason(victim: Resident, want: Want) -> str:
    """Why a victim goes: "surplus" (a replica above its model's count), "priority" (lower),
    "swap" (equal, past min_residency)."""
    if victim.surplus:
        return "surplus"
    return "priority" if victim.priority < want.priority else "swap"
