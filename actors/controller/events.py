"""The controller's lifecycle event feed (`/admin/events`, the dashboard): numbered, bounded;
and the controller's actor name, where model actors send their events. Nothing else.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

CONTROLLER_NAME = "proxifier:controller"


class EventFeed:
    def __init__(self, keep: int = 1000) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=keep)
        self.seq = 0

    def add(self, kind: str, **details: Any) -> dict[str, Any]:
        self.seq += 1
        details.pop("seq", None)  # a model actor's own numbering means nothing here
        details.setdefault("time", time.time())
        event = {"seq": self.seq, "kind": kind, **details}
        self.events.append(event)
        return event

    def since(self, seq: int = -1, limit: int = 500) -> list[dict[str, Any]]:
        return [e for e in self.events if e["seq"] > seq][-limit:]

    def __iter__(self) -> Any:
        return iter(self.events)
