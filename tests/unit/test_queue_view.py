"""/admin/queue/status shows request ids (other keys' requests) to admin only."""

from __future__ import annotations

from proxifier.auth import Caller
from serve_app.api import _queue_view

STATUS = {
    "model": "chat",
    "depth": 1,
    "waiting": [{"request_id": "req_a", "position": 1, "waited": 2.0}],
    "leases": [{"request_id": "req_b", "holder": "host:1:x", "held_for": 3.0, "renewed_ago": 0.5}],
}


def caller(*permissions: str) -> Caller:
    return Caller("k", frozenset(permissions), None, None, None)


def test_request_ids_and_holders_are_for_admin_only() -> None:
    shown = _queue_view(STATUS, caller("read"))
    assert shown["waiting"] == [{"position": 1, "waited": 2.0}]
    assert shown["leases"] == [{"held_for": 3.0}]
    assert shown["depth"] == 1
    assert _queue_view(STATUS, caller("admin")) == STATUS
    assert _queue_view(STATUS, None) == STATUS  # auth off: the operator's own machine
