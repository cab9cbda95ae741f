"""Placement by GPU memory: a want that needs a share of one GPU (or whole GPUs) goes to the GPU
where it fits (binpack or spread), else where the cheapest idle victims on one GPU make room,
else waits. Functions over the pass's state; victim search and texts come from victims, explain.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any

from proxifier.scheduler.actions import Action, Evict, Fail, Place, Wait
from proxifier.scheduler.explain import memory_fail_reason, memory_wait_reason
from proxifier.scheduler.facts import (
    EPSILON,
    NeedsKey,
    Resident,
    SelectorKey,
    Want,
    evict_reason,
    fits,
    labels_match,
    needs_key,
)
from proxifier.scheduler.gpus import gpu_fraction, whole_count, whole_key
from proxifier.scheduler.state import (
    PassState,
    candidate_set,
    takes_whole_somewhere,
)
from proxifier.scheduler.victims import capacity_victims, memory_victims


def on_gpus(state: PassState, want: Want) -> bool:
    """Whether a want goes through the per-GPU tables: one placed by memory, and, once
    GPUs are shared (some GPU partly held, or a share asked for in this pass), any that
    needs a GPU, so a whole GPU is never counted where only shares of two are free."""
    gpus = want.needs.get("GPU", 0.0)
    return want.gpu_memory > 0 or (gpus > 0 and state.shared_gpus)


def decide_by_memory(state: PassState, want: Want, actions: list[Action]) -> None:
    """A want placed on GPUs by their shares: where one GPU has room (binpack: the least
    room left after it; spread: on the node with the most free), else the cheapest idle
    victims on one GPU (or whole GPUs), else wait. On a node, the GPU is the one Ray
    picks for a share: the one with the least room that holds it."""
    other = needs_key({k: v for k, v in want.needs.items() if k != "GPU"})
    selector: SelectorKey = tuple(sorted(want.selector.items()))
    candidates = memory_nodes(state, want, selector, other)
    if not candidates:
        actions.append(Fail(want.name, memory_fail_reason(state, want, other, selector)))
        return
    priority = want.evicts_below
    if state.over_capacity(0) and not capacity_victims(state, priority, 1, set()):
        state.wait(actions, want.name, ("capacity", priority))
        return
    victims: list[Resident] = []
    fit = memory_fit(state, want, other, candidates)
    if fit is None:
        # An earlier want of this pass (of no lower priority: demand order) of the same
        # kind that needed no more found no victims: nothing it could free has grown
        # since, so neither does this one (the reasoning of `counts.known_failure`).
        kind = (selector, other, want.gpu_memory > 0)
        failed = state.memory_failures.get(kind)
        amount = want.gpu_memory or want.needs.get("GPU", 0.0)
        plan = None
        if failed is None or amount < failed:
            plan = memory_victims(state, want, other, candidates, priority)
        if plan is None:
            state.memory_failures[kind] = min(amount, failed if failed is not None else amount)
            actions.append(Wait(want.name, memory_wait_reason(state, want, selector)))
            return
        victims = plan
    exclude = {r.name for r in victims}
    extra: list[Resident] = []
    if state.over_capacity(len(victims)):
        missing = state.running - len(victims) + 1 - state.limit
        found = capacity_victims(state, priority, missing, exclude)
        if found is None:
            state.wait(actions, want.name, ("capacity", priority))
            return
        extra = found
    for resident in extra:
        state.evict(resident)
        actions.append(Evict(resident.name, want.name, "capacity"))
    for resident in victims:
        state.evict(resident)
        actions.append(Evict(resident.name, want.name, evict_reason(resident, want)))
    if victims or extra:  # what they freed may offer a better GPU
        fit = memory_fit(state, want, other, candidates)
    if fit is None:  # unreachable: the victims freed room; never place blind
        actions.append(Wait(want.name, memory_wait_reason(state, want, selector)))
        return
    node_id, gpus = fit
    total = sum(gpus.values())
    state.place(want.name, (*other, ("GPU", total)), node_id, gpus, of=want.of)
    asked = round(total, 4) if want.gpu_memory > 0 else None
    actions.append(Place(want.name, node_id, asked))


def memory_nodes(state: PassState, want: Want, selector: SelectorKey, other: NeedsKey) -> list[str]:
    """Alive nodes that could ever hold the want: labels match, enough GPUs for its share
    there, and totals that cover its other needs."""
    # Totals never change in a pass: the answer depends on the want only through its
    # share on each kind of node.
    shape = (want.gpu_memory, want.needs.get("GPU", 0.0) if want.gpu_memory <= 0 else 0.0)
    key = (selector, other, whole_key(shape, state.gpu_slots))
    found = state.memory_reach.get(key)
    if found is not None:
        return found
    matching = state.matching.get(selector)
    if matching is None:
        wanted = dict(selector)
        matching = [n for n in state.nodes.values() if labels_match(wanted, n.labels)]
        state.matching[selector] = matching
    found = state.memory_reach[key] = [
        node.node_id
        for node in matching
        if node.node_id in state.gpu_free
        and len(state.gpu_free[node.node_id]) >= whole_count(state.share(want, node.node_id))
        and all(node.total.get(k, 0.0) + EPSILON >= amount for k, amount in other)
    ]
    return found


def memory_fit(
    state: PassState, want: Want, other: NeedsKey, candidates: list[str]
) -> tuple[str, dict[int, float]] | None:
    """Where it fits now, and on which GPUs of that node (Ray's choice: the one with the
    least room that holds a share; the first free ones for whole GPUs). Another replica of
    the model's node comes last, and a GPU it holds a share of after that (DESIGN §13)."""
    other_needs = dict(other)
    spread = state.placement == "spread"
    siblings = state.siblings_on(want)
    if want.gpu_memory > 0 and not spread and siblings.isdisjoint(candidates):
        fast = tightest_sized(state, want, other_needs, candidates)
        if fast is not None or all(state.nodes[n].gpu_memory > 0 for n in candidates):
            return fast[1:] if fast is not None else None
    best: tuple[tuple[Any, ...], str, dict[int, float]] | None = None
    for node_id in candidates:
        share = state.share(want, node_id)
        if state.free[node_id].get("GPU", 0.0) + EPSILON < share:
            continue  # Ray's own count (other workloads hold GPUs too)
        if not fits(other_needs, state.free[node_id]):
            continue
        table = state.gpu_free[node_id]
        if share < 1 - EPSILON:
            room = [(f, g) for g, f in enumerate(table) if f + EPSILON >= share]
            if not room:
                continue
            free, gpu = min(room)
            left = (free - share) * max(state.nodes[node_id].gpu_memory, 1.0)
            gpus = {gpu: share}
        else:
            empty = [g for g, f in enumerate(table) if f >= 1 - EPSILON]
            count = whole_count(share)
            if len(empty) < count:
                continue
            left = float(len(empty) - count)
            gpus = dict.fromkeys(empty[:count], 1.0)
        whole = 0 if share < 1 - EPSILON else 1
        apart = sibling_rank(state, want, node_id, gpus) if siblings else 0
        key = (apart, whole, -sum(table) if spread else left, node_id)
        if best is None or key < best[0]:
            best = (key, node_id, gpus)
    return None if best is None else (best[1], best[2])


def sibling_rank(state: PassState, want: Want, node_id: str, gpus: dict[int, float]) -> int:
    """0: no other instance of the model on the node; 1: on the node, not on these GPUs;
    2: on one of these GPUs (shared only when nothing else fits)."""
    if node_id not in state.siblings_on(want):
        return 0
    for resident in state.on_node.get(node_id, ()):
        if (
            resident.of == want.of
            and resident.name not in state.evicted
            and not gpus.keys().isdisjoint(state.gpu_holds.get(resident.name, {}))
        ):
            return 2
    for name, _ in state.placed_on.get(node_id, ()):
        if state.placed_of.get(name) == want.of and not gpus.keys().isdisjoint(
            state.gpu_holds.get(name, {})
        ):
            return 2
    return 1


def tightest_sized(
    state: PassState, want: Want, other_needs: dict[str, float], candidates: list[str]
) -> tuple[tuple[Any, ...], str, dict[int, float]] | None:
    """Binpack over nodes of known GPU size: every GPU is kept sorted by its free share
    per size, so the tightest one that holds the share is a bisection away."""
    allowed = candidate_set(state, candidates)
    best: tuple[tuple[Any, ...], str, dict[int, float]] | None = None
    for size, entries in state.gpu_slots.items():
        if want.gpu_memory > size:
            continue
        share = gpu_fraction(want.gpu_memory, size)
        start = bisect.bisect_left(entries, (share - EPSILON,))
        for free, node_id, gpu in itertools.islice(entries, start, None):
            if node_id not in allowed or not fits(other_needs, state.free[node_id]):
                continue
            if state.free[node_id].get("GPU", 0.0) + EPSILON < share:
                continue
            key = (0, (free - share) * size, node_id, gpu)
            if best is None or key < best[0]:
                best = (key, node_id, {gpu: share})
            break
    if best is not None or not takes_whole_somewhere(state, want, candidates):
        return best
    # None fits on one GPU: whole GPUs, where the need is bigger than one.
    for node_id in candidates:
        share = state.share(want, node_id)
        count = whole_count(share)
        if share < 1 - EPSILON or state.free[node_id].get("GPU", 0.0) + EPSILON < count:
            continue  # too little free on the node for that many GPUs, whole or not
        if not fits(other_needs, state.free[node_id]):
            continue
        empty = [g for g, f in enumerate(state.gpu_free[node_id]) if f >= 1 - EPSILON]
        if len(empty) < count:
            continue
        key = (1, float(len(empty) - count), node_id, 0)
        if best is None or key < best[0]:
            best = (key, node_id, dict.fromkeys(empty[:count], 1.0))
    return best
