"""Why a model is refused for a while after it failed, and when that ends. Pure: no Ray, no clock.

Two kinds of failure, one record: a model that failed to start or crashed (a crash loop) waits
out `cooldown`; a model no alive node could hold waits only until the cluster gains a node it
did not have (a host joins, or a lost one comes back under a new node id), since that is what
could change the answer. Nodes leaving change nothing: fewer nodes never fit more.
"""

from __future__ import annotations

from typing import NamedTuple


class Failure(NamedTuple):
    at: float  # wall clock
    reason: str  # shown to users
    nodes: frozenset[str] | None = None  # the alive nodes none of which could hold the model


def in_force(failure: Failure, now: float, cooldown: float, alive: frozenset[str]) -> bool:
    """Whether `failure` still refuses its model: within `cooldown`, and for a placement
    failure only while every alive node is one it was decided on."""
    if now - failure.at >= cooldown:
        return False
    return failure.nodes is None or alive <= failure.nodes
