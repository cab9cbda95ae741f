"""Which instance of a model serves a request: a pure choice over a snapshot of the instances
this replica knows. No I/O, no actor calls, no clock; looking instances up (the controller,
retries on moved actors) is the cluster view's (serve_app.backend).

Today a replica knows at most one instance per model (its cached actor handle). The shape is
the one a replica router needs (DESIGN §13: several replicas, power of two choices): the
snapshot grows, the caller does not change.
"""

from __future__ import annotations

from typing import Any

Snapshot = tuple[Any, ...]  # the model's instances this replica knows (opaque actor handles)


def route(snapshot: Snapshot) -> Any | None:
    """The instance to send the request to; None when none is known (ask the controller)."""
    return snapshot[0] if snapshot else None
