"""A model actor's recent events, each copied to the controller when it can be reached.

Every part of the actor records through `EventLog.record`; it decides nothing and calls no
other part.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import ray


class EventLog:
    """The last 200 events of one model (numbered), and a copy of each to the named sink."""

    def __init__(self, name: str, events_to: str | None, namespace: str) -> None:
        self.name = name
        # The named actor (the controller) that gets a copy of every event; looked up by name
        # each time it is missing, so a restarted controller keeps receiving them.
        self.events_to = events_to
        self.namespace = namespace
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self._sink: Any = None
        self._sink_missing_at = -math.inf

    def record(self, kind: str, **details: Any) -> None:
        seq = self.events[-1]["seq"] + 1 if self.events else 0
        event = {"seq": seq, "time": time.time(), "model": self.name, "kind": kind, **details}
        self.events.append(event)
        if self.events_to is None or not ray.is_initialized():
            return
        now = time.monotonic()
        if self._sink is None and now - self._sink_missing_at < 5.0:
            return  # looked a moment ago and found no controller: do not block the loop again
        try:
            if self._sink is None:
                self._sink = ray.get_actor(self.events_to, namespace=self.namespace)
            self._sink.record_event.remote(event)
        except Exception:  # no controller now: the event stays local
            self._sink, self._sink_missing_at = None, now

    def since(self, seq: int) -> list[dict[str, Any]]:
        return [event for event in self.events if event["seq"] > seq]
