"""The working tables of one scheduler pass: free amounts per node and per GPU, the victim pool,
what the pass has evicted, placed and reserved so far, and the caches that keep it fast. Its
methods apply a decision to the tables; it decides nothing and may use only facts and gpus.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxifier.scheduler.actions import Action, Wait
from proxifier.scheduler.facts import (
    EPSILON,
    GONE,
    Limits,
    NeedsKey,
    Node,
    Resident,
    SelectorKey,
    Want,
    labels_match,
    rank,
    victim_order,
)
from proxifier.scheduler.gpus import first_fit, gpu_fraction


@dataclass(frozen=True)
class PlacePlan:
    """Where a want goes, and whom to stop there first."""

    node_id: str
    victims: list[Resident]  # stopped first, in victim order


@dataclass(frozen=True)
class BusyPlan:
    """The node where a want would fit once its busy lower-priority models (and idle ones) go."""

    node_id: str
    idle: list[Resident]
    busy: list[Resident]


@dataclass(frozen=True)
class Reach:
    """The alive nodes that could ever hold a kind of want (labels match, totals cover)."""

    nodes: list[str]  # by node_id
    node_set: frozenset[str]
    cheap_first: list[str]  # those with candidate victims, lowest-priority candidate first


class FitList:
    """Alive nodes sorted by their free amounts of some resources, and where each one is."""

    __slots__ = ("current", "entries", "seen")

    def __init__(self, seen: int) -> None:
        self.entries: list[tuple[tuple[float, ...], str]] = []
        self.current: dict[str, tuple[tuple[float, ...], str]] = {}
        self.seen = seen  # length of the pass's change log when last brought up to date


@dataclass
class Holders:
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


class PassState:
    """The mutable state of one `decide` call: free amounts, the victim pool, and what keeps a
    pass over a thousand wants and a hundred nodes from searching every node for every want.

    - Nodes are grouped by their totals (clusters have few kinds of node): which nodes could
      ever hold a want is worked out per kind (`Reach`).
    - For the free fit, nodes are kept sorted by their free amounts (`FitList`): the first
      one that fits is the best fit, and the search starts where the scarcest resource suffices.
    - A want that finds nothing proves the same for later wants with the same selector, no
      higher priority and no smaller needs (`counts.known_failure`).
    - The victim search visits nodes cheapest candidate first, never looks past the priority of
      the best set found so far, and skips a node that could not free enough of the scarcest
      resource even by stopping everything allowed (`victims.may_free`).
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
            if r.state not in GONE and (r.in_flight > 0 or r.queued > 0)
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
                if not r.preload and (r.state == "ready" or r.state in GONE)
            ),
            key=victim_order,
        )
        self.victims_on: dict[str, list[Resident]] = {nid: [] for nid in self.nodes}
        for resident in self.victim_order:
            if resident.node_id in self.victims_on:
                self.victims_on[resident.node_id].append(resident)
        self.lowest_busy: dict[str, int] = {}  # node -> lowest priority of a busy candidate
        for resident in self.victim_order:
            if resident.name in self.busy:
                lowest = self.lowest_busy.get(resident.node_id, resident.priority)
                self.lowest_busy[resident.node_id] = min(lowest, resident.priority)
        # model -> the nodes its instances are on (residents, then placements of this pass):
        # its next replica goes elsewhere when it can (DESIGN §13)
        self.model_nodes: dict[str, set[str]] = {}
        for resident in self.residents.values():
            self.model_nodes.setdefault(resident.of, set()).add(resident.node_id)
        self.evicted: set[str] = set()
        self.reserved: dict[str, str] = {}  # resident -> the waiting want it is kept for
        self.reserved_on: dict[str, list[str]] = {}  # node -> waiting wants it is kept for
        self.placed_on: dict[str, list[tuple[str, NeedsKey]]] = {}
        self.placed_of: dict[str, str] = {}  # placed in this pass -> the model it serves
        self.running = len(self.residents)
        self.log: list[str] = []  # nodes in the order this pass changed them
        self.stamps: dict[str, int] = {}  # node -> length of the log at its last change
        self.potentials: dict[tuple[str, str, bool], tuple[int, list[int], list[float]]] = {}
        self.matching: dict[SelectorKey, list[Node]] = {}
        self.kinds: list[Mapping[str, float]] = []  # the distinct totals among alive nodes
        self.kind_of: dict[str, int] = {}
        kind_at: dict[tuple[tuple[str, float], ...], int] = {}
        for node_id, node in self.nodes.items():
            totals = tuple(sorted(node.total.items()))
            if totals not in kind_at:
                kind_at[totals] = len(self.kinds)
                self.kinds.append(node.total)
            self.kind_of[node_id] = kind_at[totals]
        self.reach_by_kinds: dict[tuple[SelectorKey, frozenset[int]], Reach] = {}
        self.reach: dict[tuple[SelectorKey, NeedsKey], Reach] = {}
        self.fit_lists: dict[tuple[str, ...], FitList] = {}
        # Wants that found nothing at all: (needs, priority) by selector.
        self.failures: dict[SelectorKey, list[tuple[NeedsKey, int]]] = {}
        # The victim pool only shrinks: once none is left at a priority, none is for the pass.
        self.no_capacity_victim_at_or_below = float("-inf")
        self.cluster_text: str | None = None
        # Wait reasons describe the pass's outcome, so they are written once it is complete.
        self.pending: list[tuple[int, str, tuple[Any, ...]]] = []
        self.reasons: dict[tuple[Any, ...], str] = {}
        self.holders: dict[tuple[frozenset[str], tuple[str, ...]], Holders] = {}
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
        # Whether GPUs are shared in this pass: `decide` sets it once it has seen the wants.
        self.shared_gpus = False
        self._gpu_tables()

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
                self.gpu_holds[resident.name] = first_fit(table, self.holds[resident.name]["GPU"])
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

    def wait(self, actions: list[Action], model: str, key: tuple[Any, ...]) -> None:
        """Answer Wait; its reason, keyed by `key`, is written once the pass is complete."""
        self.pending.append((len(actions), model, key))
        actions.append(Wait(model, ""))

    def over_capacity(self, leaving: int) -> bool:
        """Whether one more model would exceed max_running_models once `leaving` are stopped."""
        return self.limit > 0 and self.running - leaving + 1 > self.limit

    def eligible(self, resident: Resident, priority: float) -> bool:
        """Whether `resident` may be stopped for a want of `priority` (idleness aside): a
        lower priority; a surplus replica of no higher one; an equal one past min_residency.
        (A scale-out competes half a level below its model: lower priorities only.)"""
        if resident.priority < priority:
            return True
        if resident.surplus:
            return resident.priority <= priority
        return resident.priority == priority and (
            resident.state in GONE
            or (
                resident.ready_since is not None
                and self.now - resident.ready_since >= self.min_residency
            )
        )

    def share(self, want: Want, node_id: str) -> float:
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

    def gpu_change(self, node_id: str, gpu: int, delta: float) -> None:
        table = self.gpu_free[node_id]
        old = table[gpu]
        table[gpu] = old + delta
        size = self.nodes[node_id].gpu_memory
        if size > 0:
            entries = self.gpu_slots[size]
            del entries[bisect.bisect_left(entries, (old, node_id, gpu))]
            bisect.insort(entries, (old + delta, node_id, gpu))

    def evict(self, resident: Resident) -> None:
        self.evicted.add(resident.name)
        self.running -= 1
        free = self.free.get(resident.node_id)
        if free is not None:
            for resource, amount in self.holds[resident.name].items():
                free[resource] = free.get(resource, 0.0) + amount
            self.log.append(resident.node_id)
            self.stamps[resident.node_id] = len(self.log)
            for gpu, fraction in self.gpu_holds.get(resident.name, {}).items():
                self.gpu_change(resident.node_id, gpu, fraction)

    def siblings_on(self, want: Want) -> set[str]:
        """The nodes where another instance of the want's model runs or was just placed."""
        return self.model_nodes.get(want.of, set())

    def place(
        self,
        model: str,
        needs: NeedsKey,
        node_id: str,
        gpus: Mapping[int, float] | None = None,
        of: str = "",
    ) -> None:
        """Take what the model needs on the node; `gpus`: which GPUs, when the pass chose
        them (by memory), else Ray's first fit of its GPU count. `of`: the model it is an
        instance of (when not `model`)."""
        self.model_nodes.setdefault(of or model, set()).add(node_id)
        self.placed_of[model] = of or model
        free = self.free[node_id]
        for resource, amount in needs:
            free[resource] = free.get(resource, 0.0) - amount
        table = self.gpu_free.get(node_id)
        if table is not None:
            if gpus is None:
                wanted = dict(needs).get("GPU", 0.0)
                gpus = first_fit(list(table), wanted) if wanted > 0 else {}
            self.gpu_holds[model] = dict(gpus)
            for gpu, fraction in gpus.items():
                self.gpu_change(node_id, gpu, -fraction)
        self.running += 1
        self.placed_on.setdefault(node_id, []).append((model, needs))
        self.log.append(node_id)
        self.stamps[node_id] = len(self.log)

    def reserve(self, model: str, needs: NeedsKey, plan: BusyPlan) -> None:
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


# --- the nodes a want could ever use (cached per pass) ---------------------------------


def reach_of(state: PassState, selector: SelectorKey, needs: NeedsKey) -> Reach:
    """The alive nodes whose labels match and whose totals cover the needs."""
    key = (selector, needs)
    found = state.reach.get(key)
    if found is None:
        matching = state.matching.get(selector)
        if matching is None:
            wanted = dict(selector)
            matching = [n for n in state.nodes.values() if labels_match(wanted, n.labels)]
            state.matching[selector] = matching
        # Clusters have few kinds of node: compare the needs with each kind's totals once.
        kinds = frozenset(
            at
            for at, total in enumerate(state.kinds)
            if all(total.get(res, 0.0) + EPSILON >= amount for res, amount in needs)
        )
        found = state.reach_by_kinds.get((selector, kinds))
        if found is None:
            nodes = [node.node_id for node in matching if state.kind_of[node.node_id] in kinds]
            # Lowest-priority candidate first: searched in this order, a cheap victim set
            # is found early and bounds the search of the other nodes.
            cheap = sorted(
                (nid for nid in nodes if state.victims_on[nid]),
                key=lambda nid: (rank(state.victims_on[nid][0]), nid),
            )
            found = Reach(nodes, frozenset(nodes), cheap)
            state.reach_by_kinds[(selector, kinds)] = found
        state.reach[key] = found
    return found


def candidate_set(state: PassState, candidates: list[str]) -> frozenset[str]:
    """The candidates as a set, made once per candidate list (they are cached)."""
    return candidates_about(state, candidates)[0]


def candidates_about(state: PassState, candidates: list[str]) -> tuple[frozenset[str], float]:
    """Per candidate list (cached): its set, and its smallest GPU size (0 when some
    node's size is unknown): a need up to that takes a share of one GPU on every one."""
    key = id(candidates)
    found = state.allowed_sets.get(key)
    if found is None or found[0] is not candidates:
        smallest = min((state.nodes[n].gpu_memory for n in candidates), default=0.0)
        found = state.allowed_sets[key] = (candidates, frozenset(candidates), smallest)
    return found[1], found[2]


def takes_whole_somewhere(state: PassState, want: Want, candidates: list[str]) -> bool:
    if want.gpu_memory <= 0:
        return want.needs.get("GPU", 0.0) >= 1 - EPSILON
    smallest = candidates_about(state, candidates)[1]
    return smallest <= 0 or want.gpu_memory > smallest
