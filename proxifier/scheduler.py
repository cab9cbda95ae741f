"""Which model runs where: one pass over the cluster's facts that returns what to do.

The controller gathers the facts (each node's totals, free amounts and labels, the models whose
actors exist, the models that must run and have none) and applies the actions; this module only
decides (DESIGN §3.1). It is pure, with no Ray and no clock (`now` comes in), so every rule is a
unit test, a pass is cheap enough to rerun on every change, and the same facts always give the
same actions.

A pass handles the demand in order (priority, then the oldest waiting request) and each decision
consumes what it takes, so two models never get the same free GPU, a victim is never stopped
twice, and a burst of starts never overruns `max_running_models`.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Ray's resource amounts are multiples of 1e-4; sums of floats drift far below that.
EPSILON = 1e-6

# A model in these states holds nothing useful: never a reason to wait, always a cheap victim.
_GONE = frozenset({"stopped", "failed"})
_STARTING = frozenset({"starting", "restarting"})
# How many names a wait reason lists per kind of holder before it says "+N more".
_NAMES_SHOWN = 3


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


@dataclass(frozen=True)
class Limits:
    """The settings a pass enforces besides what fits."""

    max_running_models: int = 0  # 0 = no limit; residents + placements decided in this pass
    min_residency: float = 10.0  # seconds an equal-priority model is safe from a swap
    # Where a model placed by GPU memory goes: "binpack" fills the fullest GPU it fits on
    # (big holes stay free for big models), "spread" the emptiest.
    placement: str = "binpack"


@dataclass(frozen=True)
class Place:
    """Create the model's actor pinned to this node."""

    model: str
    node_id: str
    gpus: float | None = None  # its num_gpus, when placed by GPU memory


@dataclass(frozen=True)
class Evict:
    """Stop `victim` to make room for `for_model`; the Place that follows needs it gone first.

    reason: "priority" (lower priority), "swap" (equal priority), "capacity" (max_running_models).
    """

    victim: str
    for_model: str
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


Action = Place | Evict | Wait | Fail


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


def decide(
    nodes: Sequence[Node],
    residents: Sequence[Resident],
    wants: Sequence[Want],
    limits: Limits,
    now: float,
) -> list[Action]:
    """One pass: an action list for the wants, in demand order.

    For each want: `Fail` when no alive node could ever hold it; else `Place` where it fits now
    (best fit); else `Evict` the cheapest set of idle victims on one node, then `Place` there;
    else `Wait`, reserving the node when only busy lower-priority models stand in the way. At
    max_running_models a placement also needs one model stopped (`Evict`, "capacity") first.
    """
    return _Pass(nodes, residents, limits, now).run(wants)


# --- the pass ---------------------------------------------------------------------------------

_NeedsKey = tuple[tuple[str, float], ...]
_SelectorKey = tuple[tuple[str, str], ...]


def _scarcity(resource: str) -> tuple[int, str]:
    """Best fit compares leftovers scarcest first: GPUs, custom resources, CPUs, memory."""
    if resource == "GPU":
        return (0, resource)
    if resource == "CPU":
        return (2, resource)
    if resource == "memory":
        return (3, resource)
    return (1, resource)


def _needs_key(needs: Mapping[str, float]) -> _NeedsKey:
    """The amounts needed (none of 0), scarcest resource first; the same for any dict order."""
    return tuple(
        sorted(
            ((key, float(amount)) for key, amount in needs.items() if amount > 0),
            key=lambda item: _scarcity(item[0]),
        )
    )


def _amounts(resources: Mapping[str, float]) -> str:
    """Amounts for people: memory in GiB, Ray's internals left out."""
    shown = []
    for key in sorted(resources):
        if key.startswith("node:") or key.startswith("object_store"):
            continue
        amount = resources[key]
        if key == "memory":
            shown.append(f"memory {amount / 1024**3:.1f} GiB")
        else:
            shown.append(f"{key} {amount:g}")
    return ", ".join(shown) or "nothing"


def _want_text(needs: _NeedsKey, selector: _SelectorKey) -> str:
    text = _amounts(dict(needs)) if needs else "no resources"
    if selector:
        text += " on a node labelled " + ", ".join(f"{k}={v}" for k, v in selector)
    return text


def _names(sorted_lists: Sequence[list[str]]) -> str:
    """The first few names of several sorted lists, and how many more there are."""
    count = sum(len(names) for names in sorted_lists)
    shown = ", ".join(itertools.islice(heapq.merge(*sorted_lists), _NAMES_SHOWN))
    return shown + (f" +{count - _NAMES_SHOWN} more" if count > _NAMES_SHOWN else "")


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _victim_order(resident: Resident) -> tuple[int, float, str]:
    """Lowest priority first, then least recently used, then the name."""
    return (resident.priority, resident.last_used, resident.name)


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


def _gpu_want_text(want: Want) -> str:
    if want.gpu_memory > 0:
        return f"{want.gpu_memory / GIB:.1f} GiB of GPU memory"
    return f"GPU {want.needs.get('GPU', 0.0):g}"


def _whole_count(share: float) -> int:
    """GPUs a share takes: one for a fraction, else the whole number."""
    return 1 if share < 1 - EPSILON else math.ceil(share - 1e-9)


def _whole_key(shape: tuple[float, float], sizes: Mapping[float, Any]) -> tuple[int, ...]:
    """How many GPUs a want takes on each kind of node (each known GPU size, and nodes of
    unknown size), for caching which nodes could ever hold it."""
    memory, gpus = shape
    if memory > 0:
        return (*(_whole(memory, size) for size in sizes), 1)
    return (_whole_count(gpus),)


def _first_fit(table: list[float], amount: float) -> dict[int, float]:
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


def _set_cost(victims: list[Resident], node_id: str) -> tuple[int, int, float, str]:
    """Cheapest first: the highest priority stopped, how many, how recently the newest was used."""
    return (
        max(r.priority for r in victims),
        len(victims),
        max(r.last_used for r in victims),
        node_id,
    )


@dataclass(frozen=True)
class _PlacePlan:
    """Where a want goes, and whom to stop there first."""

    node_id: str
    victims: list[Resident]  # stopped first, in victim order


@dataclass(frozen=True)
class _BusyPlan:
    """The node where a want would fit once its busy lower-priority models (and idle ones) go."""

    node_id: str
    idle: list[Resident]
    busy: list[Resident]


@dataclass(frozen=True)
class _Reach:
    """The alive nodes that could ever hold a kind of want (labels match, totals cover)."""

    nodes: list[str]  # by node_id
    node_set: frozenset[str]
    cheap_first: list[str]  # those with candidate victims, lowest-priority candidate first


class _FitList:
    """Alive nodes sorted by their free amounts of some resources, and where each one is."""

    __slots__ = ("current", "entries", "seen")

    def __init__(self, seen: int) -> None:
        self.entries: list[tuple[tuple[float, ...], str]] = []
        self.current: dict[str, tuple[tuple[float, ...], str]] = {}
        self.seen = seen  # length of the pass's change log when last brought up to date


class _Pass:
    """The mutable state of one `decide` call: free amounts, the victim pool, and what keeps a
    pass over a thousand wants and a hundred nodes from searching every node for every want.

    - Nodes are grouped by their totals (clusters have few kinds of node): which nodes could
      ever hold a want is worked out per kind (`_Reach`).
    - For the free fit, nodes are kept sorted by their free amounts (`_FitList`): the first
      one that fits is the best fit, and the search starts where the scarcest resource suffices.
    - A want that finds nothing proves the same for later wants with the same selector, no
      higher priority and no smaller needs (`_known_failure`).
    - The victim search visits nodes cheapest candidate first, never looks past the priority of
      the best set found so far, and skips a node that could not free enough of the scarcest
      resource even by stopping everything allowed (`_may_free`).
    """

    def __init__(
        self, nodes: Sequence[Node], residents: Sequence[Resident], limits: Limits, now: float
    ) -> None:
        self.limit = max(0, limits.max_running_models)
        self.min_residency = limits.min_residency
        self.now = now
        self.nodes: dict[str, Node] = {}
        for node in sorted(nodes, key=lambda n: n.node_id):
            if node.alive:
                self.nodes.setdefault(node.node_id, node)
        self.free: dict[str, dict[str, float]] = {
            nid: {key: float(amount) for key, amount in node.free.items()}
            for nid, node in self.nodes.items()
        }
        self.residents: dict[str, Resident] = {}
        for resident in sorted(residents, key=lambda r: r.name):
            self.residents.setdefault(resident.name, resident)
        self.holds = {
            name: {key: float(amount) for key, amount in r.holds.items() if amount > 0}
            for name, r in self.residents.items()
        }
        self.busy = {
            name
            for name, r in self.residents.items()
            if r.state not in _GONE and (r.in_flight > 0 or r.queued > 0)
        }
        self.on_node: dict[str, list[Resident]] = {nid: [] for nid in self.nodes}
        for resident in self.residents.values():
            if resident.node_id in self.on_node:
                self.on_node[resident.node_id].append(resident)
        # Who could ever be stopped for someone: ready (or gone), not preloaded. Sorted once.
        self.victim_order = sorted(
            (
                r
                for r in self.residents.values()
                if not r.preload and (r.state == "ready" or r.state in _GONE)
            ),
            key=_victim_order,
        )
        self.victims_on: dict[str, list[Resident]] = {nid: [] for nid in self.nodes}
        for resident in self.victim_order:
            if resident.node_id in self.victims_on:
                self.victims_on[resident.node_id].append(resident)
        self.lowest_busy: dict[str, int] = {}  # node -> lowest priority of a busy candidate
        for resident in self.victim_order:
            if resident.name in self.busy:
                self.lowest_busy.setdefault(resident.node_id, resident.priority)
        self.evicted: set[str] = set()
        self.reserved: dict[str, str] = {}  # resident -> the waiting want it is kept for
        self.reserved_on: dict[str, list[str]] = {}  # node -> waiting wants it is kept for
        self.placed_on: dict[str, list[tuple[str, _NeedsKey]]] = {}
        self.running = len(self.residents)
        self.log: list[str] = []  # nodes in the order this pass changed them
        self.stamps: dict[str, int] = {}  # node -> length of the log at its last change
        self.potentials: dict[tuple[str, str, bool], tuple[int, list[int], list[float]]] = {}
        self.matching: dict[_SelectorKey, list[Node]] = {}
        self.kinds: list[Mapping[str, float]] = []  # the distinct totals among alive nodes
        self.kind_of: dict[str, int] = {}
        kind_at: dict[tuple[tuple[str, float], ...], int] = {}
        for node_id, node in self.nodes.items():
            totals = tuple(sorted(node.total.items()))
            if totals not in kind_at:
                kind_at[totals] = len(self.kinds)
                self.kinds.append(node.total)
            self.kind_of[node_id] = kind_at[totals]
        self.reach_by_kinds: dict[tuple[_SelectorKey, frozenset[int]], _Reach] = {}
        self.reach: dict[tuple[_SelectorKey, _NeedsKey], _Reach] = {}
        self.fit_lists: dict[tuple[str, ...], _FitList] = {}
        # Wants that found nothing at all: (needs, priority) by selector.
        self.failures: dict[_SelectorKey, list[tuple[_NeedsKey, int]]] = {}
        # The victim pool only shrinks: once none is left at a priority, none is for the pass.
        self.no_capacity_victim_at_or_below = float("-inf")
        self.cluster_text: str | None = None
        # Wait reasons describe the pass's outcome, so they are written once it is complete.
        self.pending: list[tuple[int, str, tuple[Any, ...]]] = []
        self.reasons: dict[tuple[Any, ...], str] = {}
        self.holders: dict[tuple[frozenset[str], tuple[str, ...]], _Holders] = {}
        # GPU memory: each GPU's free fraction per node, what each model holds of which GPU,
        # and per GPU size every GPU as (free fraction, node, index), sorted: the best fit
        # for a fraction is found by bisection, not by visiting every GPU.
        self.placement = limits.placement
        self.gpu_free: dict[str, list[float]] = {}
        self.gpu_holds: dict[str, dict[int, float]] = {}
        self.gpu_slots: dict[float, list[tuple[float, str, int]]] = {}
        self.memory_reach: dict[tuple[Any, ...], list[str]] = {}
        self.allowed_sets: dict[int, tuple[list[str], frozenset[str], float]] = {}
        self.memory_failures: dict[tuple[Any, ...], float] = {}  # the least need that found none
        self.shares: dict[tuple[str, float], float] = {}
        self._gpu_tables()

    # --- the loop -------------------------------------------------------------------------

    def run(self, wants: Sequence[Want]) -> list[Action]:
        # GPUs are shared once some GPU is partly held or a want asks for a share: then every
        # GPU want is placed on the per-GPU tables (whole GPUs counted as whole).
        self.shared_gpus = any(
            EPSILON < free < 1 - EPSILON for table in self.gpu_free.values() for free in table
        ) or any(w.gpu_memory > 0 or not float(w.needs.get("GPU", 0.0)).is_integer() for w in wants)
        actions: list[Action] = []
        seen: set[str] = set()
        for want in demand_order(wants):
            if want.name in seen or want.name in self.residents:
                continue  # a duplicate, or a model whose actor exists: nothing to place
            seen.add(want.name)
            self._decide_one(want, actions)
        for at, model, key in self.pending:
            actions[at] = Wait(model, self._reason(key))
        return actions

    def _wait(self, actions: list[Action], model: str, key: tuple[Any, ...]) -> None:
        self.pending.append((len(actions), model, key))
        actions.append(Wait(model, ""))

    def _decide_one(self, want: Want, actions: list[Action]) -> None:
        if self._on_gpus(want):
            self._decide_by_memory(want, actions)
            return
        needs = _needs_key(want.needs)
        selector: _SelectorKey = tuple(sorted(want.selector.items()))
        reach = self._reach(selector, needs)
        if not reach.nodes:
            actions.append(Fail(want.name, self._fail_reason(want.name, selector, needs)))
            return
        priority = want.priority
        if self._over_capacity(0) and not self._capacity_victims(priority, 1, set()):
            self._wait(actions, want.name, ("capacity", priority))
            return
        plan = self._plan(selector, needs, priority, reach)
        if isinstance(plan, _BusyPlan):
            self._reserve(want.name, needs, plan)
            actions.append(Wait(want.name, self._busy_reason(plan)))
            return
        if plan is None:
            self._wait(actions, want.name, ("wait", selector, needs, priority))
            return
        # Room enough; now slots enough. The plan's own victims count as freed slots.
        while self._over_capacity(len(plan.victims)):
            missing = self.running - len(plan.victims) + 1 - self.limit
            extra = self._capacity_victims(priority, missing, {r.name for r in plan.victims})
            if extra is None:
                self._wait(actions, want.name, ("capacity", priority))
                return
            for resident in extra:
                self._evict(resident)
                actions.append(Evict(resident.name, want.name, "capacity"))
            # What they freed may offer a better node or a free fit. The old plan still works,
            # so this is a place plan again.
            replanned = self._plan(selector, needs, priority, reach)
            if not isinstance(replanned, _PlacePlan):  # unreachable; never place blind
                self._wait(actions, want.name, ("wait", selector, needs, priority))
                return
            plan = replanned
        for resident in plan.victims:
            self._evict(resident)
            reason = "priority" if resident.priority < priority else "swap"
            actions.append(Evict(resident.name, want.name, reason))
        self._place(want.name, needs, plan.node_id)
        actions.append(Place(want.name, plan.node_id))

    # --- capacity -------------------------------------------------------------------------

    def _over_capacity(self, leaving: int) -> bool:
        """Whether one more model would exceed max_running_models once `leaving` are stopped."""
        return self.limit > 0 and self.running - leaving + 1 > self.limit

    def _eligible(self, resident: Resident, priority: int) -> bool:
        """Whether `resident` may be stopped for a want of `priority` (idleness aside)."""
        if resident.priority < priority:
            return True
        return resident.priority == priority and (
            resident.state in _GONE
            or (
                resident.ready_since is not None
                and self.now - resident.ready_since >= self.min_residency
            )
        )

    def _capacity_victims(
        self, priority: int, count: int, exclude: set[str]
    ) -> list[Resident] | None:
        """The first `count` idle eligible residents anywhere, in victim order; None if fewer."""
        if priority <= self.no_capacity_victim_at_or_below:
            return None
        chosen: list[Resident] = []
        for resident in self.victim_order:
            if resident.priority > priority:
                break
            name = resident.name
            if name in self.evicted or name in self.reserved or name in exclude:
                continue
            if name not in self.busy and self._eligible(resident, priority):
                chosen.append(resident)
                if len(chosen) == count:
                    return chosen
        if not chosen and not exclude:
            self.no_capacity_victim_at_or_below = priority
        return None

    # --- where it goes --------------------------------------------------------------------

    def _reach(self, selector: _SelectorKey, needs: _NeedsKey) -> _Reach:
        """The alive nodes whose labels match and whose totals cover the needs."""
        key = (selector, needs)
        found = self.reach.get(key)
        if found is None:
            matching = self.matching.get(selector)
            if matching is None:
                wanted = dict(selector)
                matching = [n for n in self.nodes.values() if labels_match(wanted, n.labels)]
                self.matching[selector] = matching
            # Clusters have few kinds of node: compare the needs with each kind's totals once.
            kinds = frozenset(
                at
                for at, total in enumerate(self.kinds)
                if all(total.get(res, 0.0) + EPSILON >= amount for res, amount in needs)
            )
            found = self.reach_by_kinds.get((selector, kinds))
            if found is None:
                nodes = [node.node_id for node in matching if self.kind_of[node.node_id] in kinds]
                # Lowest-priority candidate first: searched in this order, a cheap victim set
                # is found early and bounds the search of the other nodes.
                cheap = sorted(
                    (nid for nid in nodes if self.victims_on[nid]),
                    key=lambda nid: (self.victims_on[nid][0].priority, nid),
                )
                found = _Reach(nodes, frozenset(nodes), cheap)
                self.reach_by_kinds[(selector, kinds)] = found
            self.reach[key] = found
        return found

    def _plan(
        self,
        selector: _SelectorKey,
        needs: _NeedsKey,
        priority: int,
        reach: _Reach,
    ) -> _PlacePlan | _BusyPlan | None:
        """A free fit; else the cheapest idle victim set; else busy lower-priority blockers."""
        node_id = self._best_fit(needs, reach.node_set)
        if node_id is not None:
            return _PlacePlan(node_id, [])
        if self._known_failure(selector, needs, priority):
            return None
        plan = self._search(needs, priority, reach)
        if plan is None:
            self.failures.setdefault(selector, []).append((needs, priority))
        return plan

    def _search(
        self, needs: _NeedsKey, priority: int, reach: _Reach
    ) -> _PlacePlan | _BusyPlan | None:
        """When it fits nowhere free: the cheapest idle victim set, else busy lower-priority
        blockers (with idle victims) on one node."""
        best: tuple[tuple[int, int, float, str], list[Resident]] | None = None
        for node_id in reach.cheap_first:
            # A set's cost starts with its highest victim priority: once one is found, a node
            # is only searched up to that priority.
            ceiling = priority if best is None else best[0][0]
            if self.victims_on[node_id][0].priority > ceiling or not self._may_free(
                node_id, needs[0], ceiling, with_busy=False
            ):
                continue
            taken = self._victims(node_id, needs, priority, False, ceiling)
            if taken:
                cost = _set_cost(taken, node_id)
                if best is None or cost < best[0]:
                    best = (cost, taken)
        if best is not None:
            return _PlacePlan(best[0][3], best[1])
        blocked: tuple[tuple[int, int, int, float, str], list[Resident]] | None = None
        for node_id in reach.nodes:
            if self.lowest_busy.get(node_id, priority) >= priority:
                continue  # no busy model of lower priority there
            if not self._may_free(node_id, needs[0], priority, with_busy=True):
                continue
            taken = self._victims(node_id, needs, priority, True, priority)
            if taken:
                busy_cost = self._busy_cost(taken, node_id)
                if busy_cost[0] and (blocked is None or busy_cost < blocked[0]):
                    blocked = (busy_cost, taken)
        if blocked is None:
            return None
        taken = blocked[1]
        return _BusyPlan(
            blocked[0][4],
            [r for r in taken if r.name not in self.busy],
            [r for r in taken if r.name in self.busy],
        )

    def _may_free(
        self, node_id: str, need: tuple[str, float], ceiling: int, with_busy: bool
    ) -> bool:
        """Whether stopping every candidate up to `ceiling` (busy ones too, `with_busy`) would
        free enough of the want's scarcest resource: a cheap bound before the real search."""
        resource, amount = need
        gap = amount - self.free[node_id].get(resource, 0.0)
        if gap <= EPSILON:
            return True
        key = (node_id, resource, with_busy)
        stamp = self.stamps.get(node_id, 0)
        cached = self.potentials.get(key)
        if cached is None or cached[0] != stamp:
            priorities: list[int] = []
            freed: list[float] = []
            total = 0.0
            for resident in self.victims_on[node_id]:
                name = resident.name
                if name in self.evicted or name in self.reserved:
                    continue
                if name in self.busy and not with_busy:
                    continue
                total += self.holds[name].get(resource, 0.0)
                priorities.append(resident.priority)
                freed.append(total)
            cached = self.potentials[key] = (stamp, priorities, freed)
        upto = bisect.bisect_right(cached[1], ceiling)
        return upto > 0 and cached[2][upto - 1] + EPSILON >= gap

    def _busy_cost(self, taken: list[Resident], node_id: str) -> tuple[int, int, int, float, str]:
        """Fewest busy blockers first, then as for an idle set."""
        busy = sum(1 for r in taken if r.name in self.busy)
        return (busy, *_set_cost(taken, node_id))

    def _best_fit(self, needs: _NeedsKey, nodes: frozenset[str]) -> str | None:
        """The node where it fits now with the least left of what it needs, scarcest first.

        Nodes are kept sorted by their free amounts of the needed resources (scarcest first,
        then node_id): the first one that fits is the best fit, and the search starts at the
        first node with enough of the scarcest resource.
        """
        signature = tuple(resource for resource, _ in needs)
        entries = self._fit_list(signature)
        wanted = [amount - EPSILON for _, amount in needs]
        start = bisect.bisect_left(entries, ((wanted[0],),)) if wanted else 0
        for at in range(start, len(entries)):
            free, node_id = entries[at]
            if node_id in nodes and all(map(operator.ge, free, wanted)):
                return node_id
        return None

    def _fit_list(self, signature: tuple[str, ...]) -> list[tuple[tuple[float, ...], str]]:
        """Alive nodes as (free amounts of `signature`, node_id), sorted; kept up to date."""
        fit = self.fit_lists.get(signature)
        if fit is None:
            fit = self.fit_lists[signature] = _FitList(len(self.log))
            for node_id, free in self.free.items():
                fit.current[node_id] = (tuple(free.get(r, 0.0) for r in signature), node_id)
            fit.entries = sorted(fit.current.values())
        elif fit.seen != len(self.log):
            for node_id in set(self.log[fit.seen :]):
                old = fit.current[node_id]
                del fit.entries[bisect.bisect_left(fit.entries, old)]
                free = self.free[node_id]
                new = fit.current[node_id] = (tuple(free.get(r, 0.0) for r in signature), node_id)
                bisect.insort(fit.entries, new)
            fit.seen = len(self.log)
        return fit.entries

    def _known_failure(self, selector: _SelectorKey, needs: _NeedsKey, priority: int) -> bool:
        """Whether an earlier want of this pass proved that this one finds nothing either.

        An earlier want with the same selector, at least this priority and at most these needs
        found no free fit, no victims and no busy blockers. Since then the pass only placed
        (less free), reserved (less free, fewer victims) or evicted models that the earlier
        want could have stopped as well (wants come in demand order, so every victim since was
        of no higher priority than it): what it could reach on any node has not grown. Nor has
        what this one can reach, which is no more (less or equal priority, more needs).
        """
        have = dict(needs)
        return any(
            earlier >= priority
            and all(have.get(resource, 0.0) + EPSILON >= amount for resource, amount in failed)
            for failed, earlier in self.failures.get(selector, ())
        )

    def _victims(
        self,
        node_id: str,
        needs: _NeedsKey,
        priority: int,
        allow_busy: bool,
        ceiling: int | None = None,
    ) -> list[Resident] | None:
        """Victims on one node, in victim order, until the want fits; None if they never do.

        Only models a want of `priority` may stop, none above `ceiling` (default: `priority`).
        A victim counts only if it holds something still short: stopping a CPU model never
        frees a GPU. With `allow_busy`, busy models of lower priority count too (to name whom a
        want waits for; they are never evicted busy).
        """
        if ceiling is None:
            ceiling = priority
        free = self.free[node_id]
        short: dict[str, float] = {}
        for resource, amount in needs:
            gap = amount - free.get(resource, 0.0)
            if gap > EPSILON:
                short[resource] = gap
        if not short:
            return []
        taken: list[Resident] = []
        for resident in self.victims_on[node_id]:
            if resident.priority > ceiling:
                break
            name = resident.name
            if name in self.evicted or name in self.reserved:
                continue
            if name in self.busy:
                if not allow_busy or resident.priority >= priority:
                    continue
            elif not self._eligible(resident, priority):
                continue
            holds = self.holds[name]
            if holds.keys().isdisjoint(short):
                continue
            taken.append(resident)
            for resource, amount in holds.items():
                gap = short.get(resource)
                if gap is not None:
                    if gap - amount > EPSILON:
                        short[resource] = gap - amount
                    else:
                        del short[resource]
            if not short:
                return taken
        return None

    # --- applying decisions within the pass -----------------------------------------------

    def _evict(self, resident: Resident) -> None:
        self.evicted.add(resident.name)
        self.running -= 1
        free = self.free.get(resident.node_id)
        if free is not None:
            for resource, amount in self.holds[resident.name].items():
                free[resource] = free.get(resource, 0.0) + amount
            self.log.append(resident.node_id)
            self.stamps[resident.node_id] = len(self.log)
            for gpu, fraction in self.gpu_holds.get(resident.name, {}).items():
                self._gpu_change(resident.node_id, gpu, fraction)

    def _place(
        self,
        model: str,
        needs: _NeedsKey,
        node_id: str,
        gpus: Mapping[int, float] | None = None,
    ) -> None:
        """Take what the model needs on the node; `gpus`: which GPUs, when the pass chose
        them (by memory), else Ray's first fit of its GPU count."""
        free = self.free[node_id]
        for resource, amount in needs:
            free[resource] = free.get(resource, 0.0) - amount
        table = self.gpu_free.get(node_id)
        if table is not None:
            if gpus is None:
                wanted = dict(needs).get("GPU", 0.0)
                gpus = _first_fit(list(table), wanted) if wanted > 0 else {}
            self.gpu_holds[model] = dict(gpus)
            for gpu, fraction in gpus.items():
                self._gpu_change(node_id, gpu, -fraction)
        self.running += 1
        self.placed_on.setdefault(node_id, []).append((model, needs))
        self.log.append(node_id)
        self.stamps[node_id] = len(self.log)

    def _reserve(self, model: str, needs: _NeedsKey, plan: _BusyPlan) -> None:
        """Keep what a want waits for on its node from the wants after it in this pass.

        Without this, a lower-priority want could take the node's free GPU or its idle victims
        now, and when the busy model goes idle the waiting want would need yet another eviction
        (of a model just started) instead of being placed at once.
        """
        for resident in plan.idle + plan.busy:
            self.reserved[resident.name] = model
        free = self.free[plan.node_id]
        for resource, amount in needs:
            have = free.get(resource, 0.0)
            free[resource] = have - min(max(have, 0.0), amount)
        self.reserved_on.setdefault(plan.node_id, []).append(model)
        self.log.append(plan.node_id)
        self.stamps[plan.node_id] = len(self.log)

    # --- GPU memory -----------------------------------------------------------------------

    def _gpu_tables(self) -> None:
        """Each GPU's free fraction: 1 less what residents hold of it (where Ray put them, as
        reported; else Ray's first fit, in the order the residents are known)."""
        for node_id, node in self.nodes.items():
            count = int(node.total.get("GPU", 0.0) + EPSILON)
            if count <= 0:
                continue
            table = [1.0] * count
            unknown = []
            for resident in self.on_node[node_id]:
                if self.holds[resident.name].get("GPU", 0.0) <= 0:
                    continue
                if not resident.gpus:
                    unknown.append(resident)
                    continue
                held = {int(g): float(f) for g, f in resident.gpus.items() if 0 <= int(g) < count}
                self.gpu_holds[resident.name] = held
                for gpu, fraction in held.items():
                    table[gpu] -= fraction
            for resident in unknown:
                self.gpu_holds[resident.name] = _first_fit(table, self.holds[resident.name]["GPU"])
            self.gpu_free[node_id] = table
            if node.gpu_memory > 0:
                entries = self.gpu_slots.setdefault(node.gpu_memory, [])
                entries.extend((free, node_id, gpu) for gpu, free in enumerate(table))
        for entries in self.gpu_slots.values():
            entries.sort()
        # Per GPU, the residents holding some of it, and those that could ever be stopped
        # there, in victim order.
        self.residents_on_gpu: dict[tuple[str, int], list[Resident]] = {}
        for resident in self.residents.values():
            for gpu in self.gpu_holds.get(resident.name, {}):
                self.residents_on_gpu.setdefault((resident.node_id, gpu), []).append(resident)
        self.gpu_victim_order = [r for r in self.victim_order if r.name in self.gpu_holds]
        self.victims_on_gpu: dict[tuple[str, int], list[Resident]] = {}
        for resident in self.victim_order:
            for gpu in self.gpu_holds.get(resident.name, {}):
                self.victims_on_gpu.setdefault((resident.node_id, gpu), []).append(resident)

    def _gpu_change(self, node_id: str, gpu: int, delta: float) -> None:
        table = self.gpu_free[node_id]
        old = table[gpu]
        table[gpu] = old + delta
        size = self.nodes[node_id].gpu_memory
        if size > 0:
            entries = self.gpu_slots[size]
            del entries[bisect.bisect_left(entries, (old, node_id, gpu))]
            bisect.insort(entries, (old + delta, node_id, gpu))

    def _on_gpus(self, want: Want) -> bool:
        """Whether a want goes through the per-GPU tables: one placed by memory, and, once
        GPUs are shared (some GPU partly held, or a share asked for in this pass), any that
        needs a GPU, so a whole GPU is never counted where only shares of two are free."""
        gpus = want.needs.get("GPU", 0.0)
        return want.gpu_memory > 0 or (gpus > 0 and self.shared_gpus)

    def _share(self, want: Want, node_id: str) -> float:
        """What the want asks of Ray on this node: the share of one GPU its memory needs
        there, or whole GPUs; whole GPUs where the node's GPU size is not known; else the
        `num_gpus` it gives. Kept per want and GPU size (nodes come in few kinds)."""
        size = self.nodes[node_id].gpu_memory
        key = (want.name, size)
        share = self.shares.get(key)
        if share is None:
            if want.gpu_memory <= 0:
                share = float(want.needs.get("GPU", 0.0))
            elif size <= 0:
                share = 1.0
            else:
                share = gpu_fraction(want.gpu_memory, size)
            self.shares[key] = share
        return share

    def _decide_by_memory(self, want: Want, actions: list[Action]) -> None:
        """A want placed on GPUs by their shares: where one GPU has room (binpack: the least
        room left after it; spread: on the node with the most free), else the cheapest idle
        victims on one GPU (or whole GPUs), else wait. On a node, the GPU is the one Ray
        picks for a share: the one with the least room that holds it."""
        other = _needs_key({k: v for k, v in want.needs.items() if k != "GPU"})
        selector: _SelectorKey = tuple(sorted(want.selector.items()))
        candidates = self._memory_nodes(want, selector, other)
        if not candidates:
            actions.append(Fail(want.name, self._memory_fail_reason(want, other, selector)))
            return
        priority = want.priority
        if self._over_capacity(0) and not self._capacity_victims(priority, 1, set()):
            self._wait(actions, want.name, ("capacity", priority))
            return
        victims: list[Resident] = []
        fit = self._memory_fit(want, other, candidates)
        if fit is None:
            # An earlier want of this pass (of no lower priority: demand order) of the same
            # kind that needed no more found no victims: nothing it could free has grown
            # since, so neither does this one (the reasoning of `_known_failure`).
            kind = (selector, other, want.gpu_memory > 0)
            failed = self.memory_failures.get(kind)
            amount = want.gpu_memory or want.needs.get("GPU", 0.0)
            plan = None
            if failed is None or amount < failed:
                plan = self._memory_victims(want, other, candidates, priority)
            if plan is None:
                self.memory_failures[kind] = min(amount, failed if failed is not None else amount)
                actions.append(Wait(want.name, self._memory_wait_reason(want, selector)))
                return
            victims = plan
        exclude = {r.name for r in victims}
        extra: list[Resident] = []
        if self._over_capacity(len(victims)):
            missing = self.running - len(victims) + 1 - self.limit
            found = self._capacity_victims(priority, missing, exclude)
            if found is None:
                self._wait(actions, want.name, ("capacity", priority))
                return
            extra = found
        for resident in extra:
            self._evict(resident)
            actions.append(Evict(resident.name, want.name, "capacity"))
        for resident in victims:
            self._evict(resident)
            reason = "priority" if resident.priority < priority else "swap"
            actions.append(Evict(resident.name, want.name, reason))
        if victims or extra:  # what they freed may offer a better GPU
            fit = self._memory_fit(want, other, candidates)
        if fit is None:  # unreachable: the victims freed room; never place blind
            actions.append(Wait(want.name, self._memory_wait_reason(want, selector)))
            return
        node_id, gpus = fit
        total = sum(gpus.values())
        self._place(want.name, (*other, ("GPU", total)), node_id, gpus)
        asked = round(total, 4) if want.gpu_memory > 0 else None
        actions.append(Place(want.name, node_id, asked))

    def _memory_nodes(self, want: Want, selector: _SelectorKey, other: _NeedsKey) -> list[str]:
        """Alive nodes that could ever hold the want: labels match, enough GPUs for its share
        there, and totals that cover its other needs."""
        # Totals never change in a pass: the answer depends on the want only through its
        # share on each kind of node.
        shape = (want.gpu_memory, want.needs.get("GPU", 0.0) if want.gpu_memory <= 0 else 0.0)
        key = (selector, other, _whole_key(shape, self.gpu_slots))
        found = self.memory_reach.get(key)
        if found is not None:
            return found
        matching = self.matching.get(selector)
        if matching is None:
            wanted = dict(selector)
            matching = [n for n in self.nodes.values() if labels_match(wanted, n.labels)]
            self.matching[selector] = matching
        found = self.memory_reach[key] = [
            node.node_id
            for node in matching
            if node.node_id in self.gpu_free
            and len(self.gpu_free[node.node_id]) >= _whole_count(self._share(want, node.node_id))
            and all(node.total.get(k, 0.0) + EPSILON >= amount for k, amount in other)
        ]
        return found

    def _memory_fit(
        self, want: Want, other: _NeedsKey, candidates: list[str]
    ) -> tuple[str, dict[int, float]] | None:
        """Where it fits now, and on which GPUs of that node (Ray's choice: the one with the
        least room that holds a share; the first free ones for whole GPUs)."""
        other_needs = dict(other)
        spread = self.placement == "spread"
        if want.gpu_memory > 0 and not spread:
            fast = self._tightest_sized(want, other_needs, candidates)
            if fast is not None or all(self.nodes[n].gpu_memory > 0 for n in candidates):
                return fast[1:] if fast is not None else None
        best: tuple[tuple[Any, ...], str, dict[int, float]] | None = None
        for node_id in candidates:
            share = self._share(want, node_id)
            if self.free[node_id].get("GPU", 0.0) + EPSILON < share:
                continue  # Ray's own count (other workloads hold GPUs too)
            if not fits(other_needs, self.free[node_id]):
                continue
            table = self.gpu_free[node_id]
            if share < 1 - EPSILON:
                room = [(f, g) for g, f in enumerate(table) if f + EPSILON >= share]
                if not room:
                    continue
                free, gpu = min(room)
                left = (free - share) * max(self.nodes[node_id].gpu_memory, 1.0)
                gpus = {gpu: share}
            else:
                empty = [g for g, f in enumerate(table) if f >= 1 - EPSILON]
                count = _whole_count(share)
                if len(empty) < count:
                    continue
                left = float(len(empty) - count)
                gpus = dict.fromkeys(empty[:count], 1.0)
            whole = 0 if share < 1 - EPSILON else 1
            key = (whole, -sum(table), node_id) if spread else (whole, left, node_id)
            if best is None or key < best[0]:
                best = (key, node_id, gpus)
        return None if best is None else (best[1], best[2])

    def _tightest_sized(
        self, want: Want, other_needs: dict[str, float], candidates: list[str]
    ) -> tuple[tuple[Any, ...], str, dict[int, float]] | None:
        """Binpack over nodes of known GPU size: every GPU is kept sorted by its free share
        per size, so the tightest one that holds the share is a bisection away."""
        allowed = self._allowed(candidates)
        best: tuple[tuple[Any, ...], str, dict[int, float]] | None = None
        for size, entries in self.gpu_slots.items():
            if want.gpu_memory > size:
                continue
            share = gpu_fraction(want.gpu_memory, size)
            start = bisect.bisect_left(entries, (share - EPSILON,))
            for free, node_id, gpu in itertools.islice(entries, start, None):
                if node_id not in allowed or not fits(other_needs, self.free[node_id]):
                    continue
                if self.free[node_id].get("GPU", 0.0) + EPSILON < share:
                    continue
                key = (0, (free - share) * size, node_id, gpu)
                if best is None or key < best[0]:
                    best = (key, node_id, {gpu: share})
                break
        if best is not None or not self._takes_whole_somewhere(want, candidates):
            return best
        # None fits on one GPU: whole GPUs, where the need is bigger than one.
        for node_id in candidates:
            share = self._share(want, node_id)
            count = _whole_count(share)
            if share < 1 - EPSILON or self.free[node_id].get("GPU", 0.0) + EPSILON < count:
                continue  # too little free on the node for that many GPUs, whole or not
            if not fits(other_needs, self.free[node_id]):
                continue
            empty = [g for g, f in enumerate(self.gpu_free[node_id]) if f >= 1 - EPSILON]
            if len(empty) < count:
                continue
            key = (1, float(len(empty) - count), node_id, 0)
            if best is None or key < best[0]:
                best = (key, node_id, dict.fromkeys(empty[:count], 1.0))
        return best

    def _allowed(self, candidates: list[str]) -> frozenset[str]:
        """The candidates as a set, made once per candidate list (they are cached)."""
        return self._about(candidates)[0]

    def _about(self, candidates: list[str]) -> tuple[frozenset[str], float]:
        """Per candidate list (cached): its set, and its smallest GPU size (0 when some
        node's size is unknown): a need up to that takes a share of one GPU on every one."""
        key = id(candidates)
        found = self.allowed_sets.get(key)
        if found is None or found[0] is not candidates:
            smallest = min((self.nodes[n].gpu_memory for n in candidates), default=0.0)
            found = self.allowed_sets[key] = (candidates, frozenset(candidates), smallest)
        return found[1], found[2]

    def _takes_whole_somewhere(self, want: Want, candidates: list[str]) -> bool:
        if want.gpu_memory <= 0:
            return want.needs.get("GPU", 0.0) >= 1 - EPSILON
        smallest = self._about(candidates)[1]
        return smallest <= 0 or want.gpu_memory > smallest

    def _memory_victims(
        self, want: Want, other: _NeedsKey, candidates: list[str], priority: int
    ) -> list[Resident] | None:
        """The cheapest idle victims that free room on one GPU (or whole GPUs) of one node;
        stopping a model on another GPU frees nothing for it."""
        allowed = self._allowed(candidates)
        other_needs = dict(other)
        best = self._one_gpu_victims(want, other_needs, allowed, priority)
        if not self._takes_whole_somewhere(want, candidates):
            return None if best is None else best[1]
        for node_id in candidates:
            share = self._share(want, node_id)
            if share < 1 - EPSILON:
                continue
            ceiling = priority if best is None else best[0][0]
            ranked = self.victims_on[node_id]
            if not ranked or ranked[0].priority > ceiling:
                continue  # in victim order: its cheapest candidate is already too dear
            if not fits(other_needs, self.free[node_id]):
                continue
            taken = self._whole_gpu_victims(node_id, _whole_count(share), priority, ceiling)
            if taken:
                cost = _set_cost(taken, node_id)
                if best is None or cost < best[0]:
                    best = (cost, taken)
        return None if best is None else best[1]

    def _one_gpu_victims(
        self,
        want: Want,
        other_needs: dict[str, float],
        allowed: frozenset[str],
        priority: int,
    ) -> tuple[tuple[int, int, float, str], list[Resident]] | None:
        """The cheapest set on one GPU of a node where the want takes a share of one GPU.
        On a GPU the set is the shortest run of its victims, in victim order, that frees
        enough. A set's cost starts with its highest victim priority, so GPUs are visited as
        their victims come in victim order, each once, until the next victim's priority
        is above the best set's: only GPUs holding a cheap enough victim are looked at."""
        best: tuple[tuple[int, int, float, str], list[Resident]] | None = None
        tried: set[tuple[str, int]] = set()
        usable: dict[str, float | None] = {}  # node -> the share, when it can take it
        evicted, reserved, busy = self.evicted, self.reserved, self.busy
        holds_of, free_of = self.gpu_holds, self.gpu_free
        for resident in self.gpu_victim_order:
            if resident.priority > priority:
                break
            if best is not None and resident.priority > best[0][0]:
                break
            node_id = resident.node_id
            if node_id not in allowed:
                continue
            if node_id in usable:
                share = usable[node_id]
            else:
                share = self._share(want, node_id)
                if share >= 1 - EPSILON or not fits(other_needs, self.free[node_id]):
                    share = None
                usable[node_id] = share
            if share is None:
                continue
            for gpu in holds_of[resident.name]:
                if (node_id, gpu) in tried:
                    continue
                tried.add((node_id, gpu))
                free = free_of[node_id][gpu]
                taken: list[Resident] = []
                for victim in self.victims_on_gpu.get((node_id, gpu), ()):
                    if victim.priority > priority:
                        break
                    name = victim.name
                    if name in evicted or name in reserved or name in busy:
                        continue
                    if victim.priority == priority and not self._eligible(victim, priority):
                        continue
                    taken.append(victim)
                    free += holds_of[name][gpu]
                    if free + EPSILON >= share:
                        cost = _set_cost(taken, node_id)
                        if best is None or cost < best[0]:
                            best = (cost, taken)
                        break
        return best

    def _whole_gpu_victims(
        self, node_id: str, count: int, priority: int, ceiling: int
    ) -> list[Resident] | None:
        """For whole GPUs: those of one node that are cheapest to empty entirely, and
        everyone on them."""
        pool = {
            r.name
            for r in self.victims_on[node_id]
            if r.priority <= ceiling
            and r.name not in self.evicted
            and r.name not in self.reserved
            and r.name not in self.busy
            and self._eligible(r, priority)
        }
        emptied: list[tuple[tuple[int, int], int, list[Resident]]] = []
        for gpu, free in enumerate(self.gpu_free[node_id]):
            holders = [
                r
                for r in self.residents_on_gpu.get((node_id, gpu), ())
                if r.name not in self.evicted
            ]
            held = free + sum(self.gpu_holds[r.name][gpu] for r in holders)
            if held < 1 - EPSILON:  # a model placed in this pass holds some of it
                continue
            if all(r.name in pool for r in holders):
                worst = max((r.priority for r in holders), default=0)
                emptied.append(((worst, len(holders)), gpu, holders))
        if len(emptied) < count:
            return None
        emptied.sort(key=lambda item: (item[0], item[1]))
        chosen: dict[str, Resident] = {}
        for _, _, holders in emptied[:count]:
            chosen.update((r.name, r) for r in holders)
        return sorted(chosen.values(), key=_victim_order) or None

    def _gpu_text(self, node_id: str) -> str:
        node = self.nodes[node_id]
        size = node.gpu_memory
        frees = ", ".join(f"{max(f, 0.0) * size / GIB:.1f}" for f in self.gpu_free[node_id])
        return f"{len(self.gpu_free[node_id])} GPU(s) of {size / GIB:.1f} GiB, free {frees} GiB"

    def _memory_fail_reason(self, want: Want, other: _NeedsKey, selector: _SelectorKey) -> str:
        lines = []
        for node in self.nodes.values():
            if node.node_id in self.gpu_free and node.gpu_memory > 0:
                lines.append(f"  node {node.address}: {self._gpu_text(node.node_id)}")
            elif node.node_id in self.gpu_free:
                frees = ", ".join(f"{max(f, 0.0):.2f}" for f in self.gpu_free[node.node_id])
                lines.append(
                    f"  node {node.address}: {len(self.gpu_free[node.node_id])} GPU(s) of "
                    f"unknown memory (declare it: --labels gpu-memory-gb=N), free {frees}"
                )
            else:
                lines.append(f"  node {node.address}: no GPU")
        what = _gpu_want_text(want)
        if other:
            what += " and " + _amounts(dict(other))
        if selector:
            what += " on a node labelled " + ", ".join(f"{k}={v}" for k, v in selector)
        cluster = "\n".join(lines or ["  no alive node"])
        return (
            f"model '{want.name}' cannot be placed: it needs {what}; no node has that. "
            f"Cluster:\n{cluster}"
        )

    def _memory_wait_reason(self, want: Want, selector: _SelectorKey) -> str:
        holders = self._holders(selector, (("GPU", EPSILON),))
        said = self._holders_text(holders, want.priority)
        return f"waiting for {_gpu_want_text(want)} on one node: {said}"

    # --- reasons --------------------------------------------------------------------------

    def _fail_reason(self, model: str, selector: _SelectorKey, needs: _NeedsKey) -> str:
        cluster = self.cluster_text
        if cluster is None:
            lines = []
            for node in self.nodes.values():
                labels = ", ".join(
                    f"{k}={v}" for k, v in sorted(node.labels.items()) if "ray.io" not in k
                )
                lines.append(
                    f"  node {node.address}: free {_amounts(node.free)} of "
                    f"{_amounts(node.total)}" + (f"; labels {labels}" if labels else "")
                )
            cluster = self.cluster_text = "\n".join(lines or ["  no alive node"])
        return (
            f"model '{model}' cannot be placed: it needs {_want_text(needs, selector)}; "
            f"no node has that at all. Cluster:\n{cluster}"
        )

    def _busy_reason(self, plan: _BusyPlan) -> str:
        node = self.nodes[plan.node_id]
        whom = _and(
            [
                f"'{r.name}' (priority {r.priority}, busy: {r.in_flight} in flight, "
                f"{r.queued} queued)"
                for r in plan.busy
            ]
        )
        one = len(plan.busy) == 1
        return (
            f"waiting for {whom} to finish on node {node.address}; "
            f"{'it' if one else 'they'} will be evicted as soon as "
            f"{'it is' if one else 'they are'} idle"
        )

    def _reason(self, key: tuple[Any, ...]) -> str:
        reason = self.reasons.get(key)
        if reason is None:
            if key[0] == "capacity":
                reason = self._capacity_reason(key[1])
            else:
                reason = self._wait_reason(key[1], key[2], key[3])
            self.reasons[key] = reason
        return reason

    def _recent(self) -> str:
        return f"ready for less than min_residency ({self.min_residency:g}s)"

    def _holders(self, selector: _SelectorKey, needs: _NeedsKey) -> _Holders:
        """Who holds what the want needs on the nodes that could hold it, sorted into kinds."""
        wanted = frozenset(resource for resource, _ in needs)
        ever = self._reach(selector, needs).nodes
        key = (wanted, tuple(ever))
        found = self.holders.get(key)
        if found is not None:
            return found
        holders = _Holders()
        for node_id in ever:
            for resident in self.on_node[node_id]:
                name = resident.name
                if name in self.evicted or name in self.reserved:
                    continue
                if wanted.isdisjoint(self.holds[name]):
                    continue
                if resident.preload:
                    holders.fixed.setdefault("preloaded", []).append(name)
                elif resident.state in _STARTING:
                    holders.fixed.setdefault("starting", []).append(name)
                elif resident.state == "ready" or resident.state in _GONE:
                    if resident.state in _GONE:
                        bucket = holders.gone
                    elif name in self.busy:
                        bucket = holders.busy
                    elif not self._eligible(resident, resident.priority):
                        bucket = holders.recent
                    else:
                        bucket = holders.idle
                    bucket.setdefault(resident.priority, []).append(name)
                else:
                    holders.fixed.setdefault(resident.state, []).append(name)
            holders.fixed.setdefault("starting", []).extend(
                model
                for model, held in self.placed_on.get(node_id, [])
                if any(resource in wanted for resource, _ in held)
            )
            holders.kept_for.update(self.reserved_on.get(node_id, []))
        for lists in (holders.fixed, holders.busy, holders.recent, holders.idle, holders.gone):
            for names in lists.values():
                names.sort()
        self.holders[key] = holders
        return holders

    def _wait_reason(self, selector: _SelectorKey, needs: _NeedsKey, priority: int) -> str:
        holders = self._holders(selector, needs)
        said = holders.said.get(priority)
        if said is None:
            said = holders.said[priority] = self._holders_text(holders, priority)
        return f"waiting for {_want_text(needs, selector)}: {said}"

    def _holders_text(self, holders: _Holders, priority: int) -> str:
        """Who holds it, as a want of `priority` sees them."""
        higher = [
            names
            for bucket in (holders.busy, holders.recent, holders.idle)
            for level, names in bucket.items()
            if level > priority
        ]
        busy = [names for level, names in holders.busy.items() if level <= priority]
        # Stopped or failed ones of lower or equal priority are victims, not reasons to wait.
        gone = [names for level, names in holders.gone.items() if level > priority]
        parts = []
        if any(higher):
            parts.append(f"models of higher priority hold it ({_names(higher)})")
        if any(busy):
            parts.append(f"busy: {_names(busy)}")
        for kind in ("starting", "stopping", "preloaded"):
            if holders.fixed.get(kind):
                parts.append(f"{kind}: {_names([holders.fixed[kind]])}")
        for kind in sorted(set(holders.fixed) - {"starting", "stopping", "preloaded"}):
            if holders.fixed[kind]:
                parts.append(f"{kind}: {_names([holders.fixed[kind]])}")
        if any(gone):
            parts.append(f"stopped or failed: {_names(gone)}")
        if holders.recent.get(priority):
            parts.append(f"{self._recent()}: {_names([holders.recent[priority]])}")
        if holders.kept_for:
            parts.append(f"kept for waiting {_names([sorted(holders.kept_for)])}")
        if not parts:
            parts.append("not free on any node that has it")
        return "; ".join(parts)

    def _kept_because(self, resident: Resident, priority: int) -> str | None:
        """Why a resident cannot be stopped for a want of `priority` (None: it could be)."""
        if resident.name in self.reserved:
            return "kept for a waiting model"
        if resident.preload:
            return "preloaded"
        if resident.state in _GONE:
            return None if resident.priority <= priority else "stopped or failed"
        if resident.state in _STARTING:
            return "starting"
        if resident.state != "ready":
            return resident.state
        if resident.priority > priority:
            return "of higher priority"
        if resident.name in self.busy:
            return "busy"
        if not self._eligible(resident, priority):
            return self._recent()
        return None

    def _capacity_reason(self, priority: int) -> str:
        counts: dict[str, int] = {}
        for resident in self.residents.values():
            if resident.name not in self.evicted:
                why = self._kept_because(resident, priority) or "idle"
                counts[why] = counts.get(why, 0) + 1
        placed = sum(len(models) for models in self.placed_on.values())
        if placed:
            counts["starting"] = counts.get("starting", 0) + placed
        order = ["busy", "starting", "stopping", "stopped or failed", "preloaded"]
        order += ["of higher priority"]
        order += [self._recent(), "kept for a waiting model"]
        order += [*sorted(set(counts) - {*order, "idle"}), "idle"]
        listed = ", ".join(f"{counts[why]} {why}" for why in order if counts.get(why))
        lead = "not enough running models" if counts.get("idle") else "no running model"
        return (
            f"max_running_models ({self.limit}) reached; {lead} can be stopped for it now "
            f"({listed or 'none running'})"
        )


@dataclass
class _Holders:
    """The residents a waiting want's reason names: kinds that do not depend on its priority
    (starting, stopping, preloaded), and the others by their priority (ready and busy, ready
    for less than min_residency, ready and idle, stopped or failed), each list sorted by name."""

    fixed: dict[str, list[str]] = field(default_factory=dict)
    busy: dict[int, list[str]] = field(default_factory=dict)
    recent: dict[int, list[str]] = field(default_factory=dict)
    idle: dict[int, list[str]] = field(default_factory=dict)
    gone: dict[int, list[str]] = field(default_factory=dict)
    kept_for: set[str] = field(default_factory=set)
    said: dict[int, str] = field(default_factory=dict)  # the text, by the want's priority
