"""The scheduler's one door: `decide`, a pass over the facts in demand order that hands each want
to placement by counts or by GPU memory, then writes the wait reasons once the pass is complete.
Pure: no Ray, no I/O, no clock; it calls the parts below it and nothing calls it from inside.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxifier.scheduler.actions import Action, Wait
from proxifier.scheduler.counts import decide_by_counts
from proxifier.scheduler.explain import wait_text
from proxifier.scheduler.facts import EPSILON, Limits, Node, Resident, Want, demand_order
from proxifier.scheduler.memory import decide_by_memory, on_gpus
from proxifier.scheduler.state import PassState


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
    state = PassState(nodes, residents, limits, now)
    # GPUs are shared once some GPU is partly held or a want asks for a share: then every
    # GPU want is placed on the per-GPU tables (whole GPUs counted as whole).
    state.shared_gpus = any(
        EPSILON < free < 1 - EPSILON for table in state.gpu_free.values() for free in table
    ) or any(w.gpu_memory > 0 or not float(w.needs.get("GPU", 0.0)).is_integer() for w in wants)
    actions: list[Action] = []
    seen: set[str] = set()
    for want in demand_order(wants):
        if want.name in seen or want.name in state.residents:
            continue  # a duplicate, or a model whose actor exists: nothing to place
        seen.add(want.name)
        if on_gpus(state, want):
            decide_by_memory(state, want, actions)
        else:
            decide_by_counts(state, want, actions)
    for at, model, key in state.pending:
        actions[at] = Wait(model, wait_text(state, key))
    return actions
