"""Which model runs where: one pass over the cluster's facts that returns what to do.

The controller gathers the facts (each node's totals, free amounts and labels, the models whose
actors exist, the models that must run and have none) and applies the actions; this package only
decides (DESIGN §3.1). It is pure, with no Ray and no clock (`now` comes in), so every rule is a
unit test, a pass is cheap enough to rerun on every change, and the same facts always give the
same actions.

A pass handles the demand in order (priority, then the oldest waiting request) and each decision
consumes what it takes, so two models never get the same free GPU, a victim is never stopped
twice, and a burst of starts never overruns `max_running_models`.

`decide` is the one door. Its parts, each calling only those after it (DESIGN §12): decision
(the pass loop), counts (placement by amounts), memory (placement by GPU memory), victims (whom
to stop), explain (the reason texts), state (the pass's working tables), gpus (GPU arithmetic),
facts (what a pass is told, and the rules every part shares), actions (what it answers).
`scaling` decides how many replicas each model runs; its answer becomes wants and drains.
"""

from proxifier.scheduler.actions import Action, Drain, Evict, Fail, Place, Wait
from proxifier.scheduler.decision import decide
from proxifier.scheduler.facts import (
    EPSILON,
    Limits,
    Node,
    Resident,
    Want,
    demand_order,
    fits,
    labels_match,
)
from proxifier.scheduler.failures import Failure, in_force
from proxifier.scheduler.gpus import GIB, gpu_fraction
from proxifier.scheduler.scaling import (
    Policy,
    Replica,
    Scale,
    Trend,
    counted,
    desired_replicas,
    keep_order,
    surplus,
    to_drain,
    to_move,
)

__all__ = [
    "EPSILON",
    "GIB",
    "Action",
    "Drain",
    "Evict",
    "Fail",
    "Failure",
    "Limits",
    "Node",
    "Place",
    "Policy",
    "Replica",
    "Resident",
    "Scale",
    "Trend",
    "Wait",
    "Want",
    "counted",
    "decide",
    "demand_order",
    "desired_replicas",
    "fits",
    "gpu_fraction",
    "in_force",
    "keep_order",
    "labels_match",
    "surplus",
    "to_drain",
    "to_move",
]
