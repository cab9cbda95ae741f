"""Placement by counts: a want that asks Ray for amounts (GPUs, CPUs, memory, custom) goes to
the best free fit, else where the cheapest idle victims make room, else waits. Functions over the
pass's state; the victim search and the texts come from the parts below (victims, explain).
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Set as AbstractSet

from proxifier.scheduler.actions import Action, Evict, Fail, Place, Wait
from proxifier.scheduler.explain import busy_reason, fail_reason
from proxifier.scheduler.facts import EPSILON, NeedsKey, SelectorKey, Want, evict_reason, needs_key
from proxifier.scheduler.state import BusyPlan, FitList, PassState, PlacePlan, Reach, reach_of
from proxifier.scheduler.victims import capacity_victims, search


def decide_by_counts(state: PassState, want: Want, actions: list[Action]) -> None:
    """Append what to do for one want placed by its amounts (DESIGN §3.1) to `actions`."""
    needs = needs_key(want.needs)
    selector: SelectorKey = tuple(sorted(want.selector.items()))
    reach = reach_of(state, selector, needs)
    if not reach.nodes:
        actions.append(Fail(want.name, fail_reason(state, want.name, selector, needs)))
        return
    priority = want.evicts_below
    if state.over_capacity(0) and not capacity_victims(state, priority, 1, set()):
        state.wait(actions, want.name, ("capacity", priority))
        return
    plan = plan_for(state, selector, needs, priority, reach, state.siblings_on(want))
    if isinstance(plan, BusyPlan):
        state.reserve(want.name, needs, plan)
        actions.append(Wait(want.name, busy_reason(state, plan)))
        return
    if plan is None:
        state.wait(actions, want.name, ("wait", selector, needs, priority))
        return
    # Room enough; now slots enough. The plan's own victims count as freed slots.
    while state.over_capacity(len(plan.victims)):
        missing = state.running - len(plan.victims) + 1 - state.limit
        extra = capacity_victims(state, priority, missing, {r.name for r in plan.victims})
        if extra is None:
            state.wait(actions, want.name, ("capacity", priority))
            return
        for resident in extra:
            state.evict(resident)
            actions.append(Evict(resident.name, want.name, "capacity"))
        # What they freed may offer a better node or a free fit. The old plan still works,
        # so this is a place plan again.
        replanned = plan_for(state, selector, needs, priority, reach, state.siblings_on(want))
        if not isinstance(replanned, PlacePlan):  # unreachable; never place blind
            state.wait(actions, want.name, ("wait", selector, needs, priority))
            return
        plan = replanned
    for resident in plan.victims:
        state.evict(resident)
        actions.append(Evict(resident.name, want.name, evict_reason(resident, want)))
    state.place(want.name, needs, plan.node_id, of=want.of)
    actions.append(Place(want.name, plan.node_id))


def plan_for(
    state: PassState,
    selector: SelectorKey,
    needs: NeedsKey,
    priority: float,
    reach: Reach,
    siblings: AbstractSet[str] = frozenset(),
) -> PlacePlan | BusyPlan | None:
    """A free fit (on a node without another instance of the model first: a host loss
    never takes every replica); else the cheapest idle victim set; else busy
    lower-priority blockers."""
    node_id = None
    if siblings:
        node_id = best_fit(state, needs, reach.node_set - siblings)
    if node_id is None:
        node_id = best_fit(state, needs, reach.node_set)
    if node_id is not None:
        return PlacePlan(node_id, [])
    if known_failure(state, selector, needs, priority):
        return None
    plan = search(state, needs, priority, reach)
    if plan is None:
        state.failures.setdefault(selector, []).append((needs, priority))
    return plan


def best_fit(state: PassState, needs: NeedsKey, nodes: frozenset[str]) -> str | None:
    """The node where it fits now with the least left of what it needs, scarcest first.

    Nodes are kept sorted by their free amounts of the needed resources (scarcest first,
    then node_id): the first one that fits is the best fit, and the search starts at the
    first node with enough of the scarcest resource.
    """
    signature = tuple(resource for resource, _ in needs)
    entries = fit_list(state, signature)
    wanted = [amount - EPSILON for _, amount in needs]
    start = bisect.bisect_left(entries, ((wanted[0],),)) if wanted else 0
    for at in range(start, len(entries)):
        free, node_id = entries[at]
        if node_id in nodes and all(map(operator.ge, free, wanted)):
            return node_id
    return None


def fit_list(state: PassState, signature: tuple[str, ...]) -> list[tuple[tuple[float, ...], str]]:
    """Alive nodes as (free amounts of `signature`, node_id), sorted; kept up to date."""
    fit = state.fit_lists.get(signature)
    if fit is None:
        fit = state.fit_lists[signature] = FitList(len(state.log))
        for node_id, free in state.free.items():
            fit.current[node_id] = (tuple(free.get(r, 0.0) for r in signature), node_id)
        fit.entries = sorted(fit.current.values())
    elif fit.seen != len(state.log):
        for node_id in set(state.log[fit.seen :]):
            old = fit.current[node_id]
            del fit.entries[bisect.bisect_left(fit.entries, old)]
            free = state.free[node_id]
            new = fit.current[node_id] = (tuple(free.get(r, 0.0) for r in signature), node_id)
            bisect.insort(fit.entries, new)
        fit.seen = len(state.log)
    return fit.entries


def known_failure(
    state: PassState, selector: SelectorKey, needs: NeedsKey, priority: float
) -> bool:
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
        for failed, earlier in state.failures.get(selector, ())
    )
