"""Victim search: whom a want may stop, and the cheapest set that makes room for it on one node
(by counts), on one GPU or whole GPUs (by memory), or frees a slot under max_running_models.
Functions over the pass's state that only look; they apply nothing and write no text.
"""

from __future__ import annotations

import bisect

from proxifier.scheduler.facts import (
    EPSILON,
    NeedsKey,
    Resident,
    Want,
    fits,
    rank,
    victim_order,
)
from proxifier.scheduler.gpus import whole_count
from proxifier.scheduler.state import (
    BusyPlan,
    PassState,
    PlacePlan,
    Reach,
    candidate_set,
    takes_whole_somewhere,
)


def _set_cost(victims: list[Resident], node_id: str) -> tuple[int, int, float, str]:
    """Cheapest first: the highest rank stopped (surplus replicas rank 0), how many, how
    recently the newest was used."""
    return (
        max(rank(r) for r in victims),
        len(victims),
        max(r.last_used for r in victims),
        node_id,
    )


def capacity_victims(
    state: PassState, priority: float, count: int, exclude: set[str]
) -> list[Resident] | None:
    """The first `count` idle eligible residents anywhere, in victim order; None if fewer."""
    if priority <= state.no_capacity_victim_at_or_below:
        return None
    chosen: list[Resident] = []
    for resident in state.victim_order:
        if rank(resident) > priority:
            break
        name = resident.name
        if name in state.evicted or name in state.reserved or name in exclude:
            continue
        if name not in state.busy and state.eligible(resident, priority):
            chosen.append(resident)
            if len(chosen) == count:
                return chosen
    if not chosen and not exclude:
        state.no_capacity_victim_at_or_below = priority
    return None


def search(
    state: PassState, needs: NeedsKey, priority: float, reach: Reach
) -> PlacePlan | BusyPlan | None:
    """When it fits nowhere free: the cheapest idle victim set, else busy lower-priority
    blockers (with idle victims) on one node."""
    best: tuple[tuple[int, int, float, str], list[Resident]] | None = None
    for node_id in reach.cheap_first:
        # A set's cost starts with its highest victim priority: once one is found, a node
        # is only searched up to that priority.
        ceiling = priority if best is None else best[0][0]
        if rank(state.victims_on[node_id][0]) > ceiling or not may_free(
            state, node_id, needs[0], ceiling, with_busy=False
        ):
            continue
        taken = node_victims(state, node_id, needs, priority, False, ceiling)
        if taken:
            cost = _set_cost(taken, node_id)
            if best is None or cost < best[0]:
                best = (cost, taken)
    if best is not None:
        return PlacePlan(best[0][3], best[1])
    blocked: tuple[tuple[int, int, int, float, str], list[Resident]] | None = None
    for node_id in reach.nodes:
        if state.lowest_busy.get(node_id, priority) >= priority:
            continue  # no busy model of lower priority there
        if not may_free(state, node_id, needs[0], priority, with_busy=True):
            continue
        taken = node_victims(state, node_id, needs, priority, True, priority)
        if taken:
            busy_cost = busy_set_cost(state, taken, node_id)
            if busy_cost[0] and (blocked is None or busy_cost < blocked[0]):
                blocked = (busy_cost, taken)
    if blocked is None:
        return None
    taken = blocked[1]
    return BusyPlan(
        blocked[0][4],
        [r for r in taken if r.name not in state.busy],
        [r for r in taken if r.name in state.busy],
    )


def may_free(
    state: PassState, node_id: str, need: tuple[str, float], ceiling: float, with_busy: bool
) -> bool:
    """Whether stopping every candidate up to `ceiling` (busy ones too, `with_busy`) would
    free enough of the want's scarcest resource: a cheap bound before the real search."""
    resource, amount = need
    gap = amount - state.free[node_id].get(resource, 0.0)
    if gap <= EPSILON:
        return True
    key = (node_id, resource, with_busy)
    stamp = state.stamps.get(node_id, 0)
    cached = state.potentials.get(key)
    if cached is None or cached[0] != stamp:
        priorities: list[int] = []
        freed: list[float] = []
        total = 0.0
        for resident in state.victims_on[node_id]:
            name = resident.name
            if name in state.evicted or name in state.reserved:
                continue
            if name in state.busy and not with_busy:
                continue
            total += state.holds[name].get(resource, 0.0)
            priorities.append(rank(resident))
            freed.append(total)
        cached = state.potentials[key] = (stamp, priorities, freed)
    upto = bisect.bisect_right(cached[1], ceiling)
    return upto > 0 and cached[2][upto - 1] + EPSILON >= gap


def busy_set_cost(
    state: PassState, taken: list[Resident], node_id: str
) -> tuple[int, int, int, float, str]:
    """Fewest busy blockers first, then as for an idle set."""
    busy = sum(1 for r in taken if r.name in state.busy)
    return (busy, *_set_cost(taken, node_id))


def node_victims(
    state: PassState,
    node_id: str,
    needs: NeedsKey,
    priority: float,
    allow_busy: bool,
    ceiling: float | None = None,
) -> list[Resident] | None:
    """Victims on one node, in victim order, until the want fits; None if they never do.

    Only models a want of `priority` may stop, none above `ceiling` (default: `priority`).
    A victim counts only if it holds something still short: stopping a CPU model never
    frees a GPU. With `allow_busy`, busy models of lower priority count too (to name whom a
    want waits for; they are never evicted busy).
    """
    if ceiling is None:
        ceiling = priority
    free = state.free[node_id]
    short: dict[str, float] = {}
    for resource, amount in needs:
        gap = amount - free.get(resource, 0.0)
        if gap > EPSILON:
            short[resource] = gap
    if not short:
        return []
    taken: list[Resident] = []
    for resident in state.victims_on[node_id]:
        if rank(resident) > ceiling:
            break
        name = resident.name
        if name in state.evicted or name in state.reserved:
            continue
        if name in state.busy:
            if not allow_busy or resident.priority >= priority:
                continue
        elif not state.eligible(resident, priority):
            continue
        holds = state.holds[name]
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


def memory_victims(
    state: PassState, want: Want, other: NeedsKey, candidates: list[str], priority: float
) -> list[Resident] | None:
    """The cheapest idle victims that free room on one GPU (or whole GPUs) of one node;
    stopping a model on another GPU frees nothing for it."""
    allowed = candidate_set(state, candidates)
    other_needs = dict(other)
    best = one_gpu_victims(state, want, other_needs, allowed, priority)
    if not takes_whole_somewhere(state, want, candidates):
        return None if best is None else best[1]
    for node_id in candidates:
        share = state.share(want, node_id)
        if share < 1 - EPSILON:
            continue
        ceiling = priority if best is None else best[0][0]
        ranked = state.victims_on[node_id]
        if not ranked or rank(ranked[0]) > ceiling:
            continue  # in victim order: its cheapest candidate is already too dear
        if not fits(other_needs, state.free[node_id]):
            continue
        taken = whole_gpu_victims(state, node_id, whole_count(share), priority, ceiling)
        if taken:
            cost = _set_cost(taken, node_id)
            if best is None or cost < best[0]:
                best = (cost, taken)
    return None if best is None else best[1]


def one_gpu_victims(
    state: PassState,
    want: Want,
    other_needs: dict[str, float],
    allowed: frozenset[str],
    priority: float,
) -> tuple[tuple[int, int, float, str], list[Resident]] | None:
    """The cheapest set on one GPU of a node where the want takes a share of one GPU.
    On a GPU the set is the shortest run of its victims, in victim order, that frees
    enough. A set's cost starts with its highest victim priority, so GPUs are visited as
    their victims come in victim order, each once, until the next victim's priority
    is above the best set's: only GPUs holding a cheap enough victim are looked at."""
    best: tuple[tuple[int, int, float, str], list[Resident]] | None = None
    tried: set[tuple[str, int]] = set()
    usable: dict[str, float | None] = {}  # node -> the share, when it can take it
    evicted, reserved, busy = state.evicted, state.reserved, state.busy
    holds_of, free_of = state.gpu_holds, state.gpu_free
    for resident in state.gpu_victim_order:
        if rank(resident) > priority:
            break
        if best is not None and rank(resident) > best[0][0]:
            break
        node_id = resident.node_id
        if node_id not in allowed:
            continue
        if node_id in usable:
            share = usable[node_id]
        else:
            share = state.share(want, node_id)
            if share >= 1 - EPSILON or not fits(other_needs, state.free[node_id]):
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
            for victim in state.victims_on_gpu.get((node_id, gpu), ()):
                if rank(victim) > priority:
                    break
                name = victim.name
                if name in evicted or name in reserved or name in busy:
                    continue
                if not state.eligible(victim, priority):
                    continue
                taken.append(victim)
                free += holds_of[name][gpu]
                if free + EPSILON >= share:
                    cost = _set_cost(taken, node_id)
                    if best is None or cost < best[0]:
                        best = (cost, taken)
                    break
    return best


def whole_gpu_victims(
    state: PassState, node_id: str, count: int, priority: float, ceiling: float
) -> list[Resident] | None:
    """For whole GPUs: those of one node that are cheapest to empty entirely, and
    everyone on them."""
    pool = {
        r.name
        for r in state.victims_on[node_id]
        if rank(r) <= ceiling
        and r.name not in state.evicted
        and r.name not in state.reserved
        and r.name not in state.busy
        and state.eligible(r, priority)
    }
    emptied: list[tuple[tuple[int, int], int, list[Resident]]] = []
    for gpu, free in enumerate(state.gpu_free[node_id]):
        holders = [
            r for r in state.residents_on_gpu.get((node_id, gpu), ()) if r.name not in state.evicted
        ]
        held = free + sum(state.gpu_holds[r.name][gpu] for r in holders)
        if held < 1 - EPSILON:  # a model placed in this pass holds some of it
            continue
        if all(r.name in pool for r in holders):
            worst = max((rank(r) for r in holders), default=0)
            emptied.append(((worst, len(holders)), gpu, holders))
    if len(emptied) < count:
        return None
    emptied.sort(key=lambda item: (item[0], item[1]))
    chosen: dict[str, Resident] = {}
    for _, _, holders in emptied[:count]:
        chosen.update((r.name, r) for r in holders)
    return sorted(chosen.values(), key=victim_order) or None
