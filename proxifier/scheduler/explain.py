"""The texts that explain a decision to users: why a model cannot be placed (what it needs, what
each node has), whom it waits for, and why max_running_models holds it back. Functions over the
pass's state that read it once the pass is done; they decide nothing.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from proxifier.scheduler.facts import EPSILON, GONE, STARTING, NeedsKey, Resident, SelectorKey, Want
from proxifier.scheduler.gpus import GIB
from proxifier.scheduler.state import BusyPlan, Holders, PassState, reach_of

# How many names a wait reason lists per kind of holder before it says "+N more".
_NAMES_SHOWN = 3


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


def _want_text(needs: NeedsKey, selector: SelectorKey) -> str:
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


def _gpu_want_text(want: Want) -> str:
    if want.gpu_memory > 0:
        return f"{want.gpu_memory / GIB:.1f} GiB of GPU memory"
    return f"GPU {want.needs.get('GPU', 0.0):g}"


def gpu_text(state: PassState, node_id: str) -> str:
    node = state.nodes[node_id]
    size = node.gpu_memory
    frees = ", ".join(f"{max(f, 0.0) * size / GIB:.1f}" for f in state.gpu_free[node_id])
    return f"{len(state.gpu_free[node_id])} GPU(s) of {size / GIB:.1f} GiB, free {frees} GiB"


def memory_fail_reason(state: PassState, want: Want, other: NeedsKey, selector: SelectorKey) -> str:
    lines = []
    for node in state.nodes.values():
        if node.node_id in state.gpu_free and node.gpu_memory > 0:
            lines.append(f"  node {node.address}: {gpu_text(state, node.node_id)}")
        elif node.node_id in state.gpu_free:
            frees = ", ".join(f"{max(f, 0.0):.2f}" for f in state.gpu_free[node.node_id])
            lines.append(
                f"  node {node.address}: {len(state.gpu_free[node.node_id])} GPU(s) of "
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


def memory_wait_reason(state: PassState, want: Want, selector: SelectorKey) -> str:
    holders = find_holders(state, selector, (("GPU", EPSILON),))
    said = holders_text(state, holders, want.priority)
    return f"waiting for {_gpu_want_text(want)} on one node: {said}"


def fail_reason(state: PassState, model: str, selector: SelectorKey, needs: NeedsKey) -> str:
    cluster = state.cluster_text
    if cluster is None:
        lines = []
        for node in state.nodes.values():
            labels = ", ".join(
                f"{k}={v}" for k, v in sorted(node.labels.items()) if "ray.io" not in k
            )
            lines.append(
                f"  node {node.address}: free {_amounts(node.free)} of "
                f"{_amounts(node.total)}" + (f"; labels {labels}" if labels else "")
            )
        cluster = state.cluster_text = "\n".join(lines or ["  no alive node"])
    return (
        f"model '{model}' cannot be placed: it needs {_want_text(needs, selector)}; "
        f"no node has that at all. Cluster:\n{cluster}"
    )


def busy_reason(state: PassState, plan: BusyPlan) -> str:
    node = state.nodes[plan.node_id]
    whom = _and(
        [
            f"'{r.name}' (priority {r.priority}, busy: {r.in_flight} in flight, {r.queued} queued)"
            for r in plan.busy
        ]
    )
    one = len(plan.busy) == 1
    return (
        f"waiting for {whom} to finish on node {node.address}; "
        f"{'it' if one else 'they'} will be evicted as soon as "
        f"{'it is' if one else 'they are'} idle"
    )


def wait_text(state: PassState, key: tuple[Any, ...]) -> str:
    reason = state.reasons.get(key)
    if reason is None:
        if key[0] == "capacity":
            reason = capacity_reason(state, key[1])
        else:
            reason = wait_reason(state, key[1], key[2], key[3])
        state.reasons[key] = reason
    return reason


def recent(state: PassState) -> str:
    return f"ready for less than min_residency ({state.min_residency:g}s)"


def find_holders(state: PassState, selector: SelectorKey, needs: NeedsKey) -> Holders:
    """Who holds what the want needs on the nodes that could hold it, sorted into kinds."""
    wanted = frozenset(resource for resource, _ in needs)
    ever = reach_of(state, selector, needs).nodes
    key = (wanted, tuple(ever))
    found = state.holders.get(key)
    if found is not None:
        return found
    holders = Holders()
    for node_id in ever:
        for resident in state.on_node[node_id]:
            name = resident.name
            if name in state.evicted or name in state.reserved:
                continue
            if wanted.isdisjoint(state.holds[name]):
                continue
            if resident.preload:
                holders.fixed.setdefault("preloaded", []).append(name)
            elif resident.state in STARTING:
                holders.fixed.setdefault("starting", []).append(name)
            elif resident.state == "ready" or resident.state in GONE:
                if resident.state in GONE:
                    bucket = holders.gone
                elif name in state.busy:
                    bucket = holders.busy
                elif not state.eligible(resident, resident.priority):
                    bucket = holders.recent
                else:
                    bucket = holders.idle
                bucket.setdefault(resident.priority, []).append(name)
            else:
                holders.fixed.setdefault(resident.state, []).append(name)
        holders.fixed.setdefault("starting", []).extend(
            model
            for model, held in state.placed_on.get(node_id, [])
            if any(resource in wanted for resource, _ in held)
        )
        holders.kept_for.update(state.reserved_on.get(node_id, []))
    for lists in (holders.fixed, holders.busy, holders.recent, holders.idle, holders.gone):
        for names in lists.values():
            names.sort()
    state.holders[key] = holders
    return holders


def wait_reason(state: PassState, selector: SelectorKey, needs: NeedsKey, priority: int) -> str:
    holders = find_holders(state, selector, needs)
    said = holders.said.get(priority)
    if said is None:
        said = holders.said[priority] = holders_text(state, holders, priority)
    return f"waiting for {_want_text(needs, selector)}: {said}"


def holders_text(state: PassState, holders: Holders, priority: int) -> str:
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
        parts.append(f"{recent(state)}: {_names([holders.recent[priority]])}")
    if holders.kept_for:
        parts.append(f"kept for waiting {_names([sorted(holders.kept_for)])}")
    if not parts:
        parts.append("not free on any node that has it")
    return "; ".join(parts)


def kept_because(state: PassState, resident: Resident, priority: int) -> str | None:
    """Why a resident cannot be stopped for a want of `priority` (None: it could be)."""
    if resident.name in state.reserved:
        return "kept for a waiting model"
    if resident.preload:
        return "preloaded"
    if resident.state in GONE:
        return None if resident.priority <= priority else "stopped or failed"
    if resident.state in STARTING:
        return "starting"
    if resident.state != "ready":
        return resident.state
    if resident.priority > priority:
        return "of higher priority"
    if resident.name in state.busy:
        return "busy"
    if not state.eligible(resident, priority):
        return recent(state)
    return None


def capacity_reason(state: PassState, priority: int) -> str:
    counts: dict[str, int] = {}
    for resident in state.residents.values():
        if resident.name not in state.evicted:
            why = kept_because(state, resident, priority) or "idle"
            counts[why] = counts.get(why, 0) + 1
    placed = sum(len(models) for models in state.placed_on.values())
    if placed:
        counts["starting"] = counts.get("starting", 0) + placed
    order = ["busy", "starting", "stopping", "stopped or failed", "preloaded"]
    order += ["of higher priority"]
    order += [recent(state), "kept for a waiting model"]
    order += [*sorted(set(counts) - {*order, "idle"}), "idle"]
    listed = ", ".join(f"{counts[why]} {why}" for why in order if counts.get(why))
    lead = "not enough running models" if counts.get("idle") else "no running model"
    return (
        f"max_running_models ({state.limit}) reached; {lead} can be stopped for it now "
        f"({listed or 'none running'})"
    )
