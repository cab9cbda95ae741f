"""The model state machine (DESIGN §4), the crash-restart budget and the readiness poll schedule.

Pure: no I/O, no clock (callers pass the time), no asyncio.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum


class ModelState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    FAILED = "failed"


_ALLOWED: dict[ModelState, frozenset[ModelState]] = {
    ModelState.STOPPED: frozenset({ModelState.STARTING}),
    ModelState.STARTING: frozenset({ModelState.READY, ModelState.FAILED, ModelState.STOPPING}),
    ModelState.READY: frozenset({ModelState.STOPPING, ModelState.RESTARTING}),
    ModelState.RESTARTING: frozenset({ModelState.STARTING, ModelState.FAILED, ModelState.STOPPING}),
    ModelState.STOPPING: frozenset({ModelState.STOPPED}),
    ModelState.FAILED: frozenset({ModelState.STARTING, ModelState.STOPPING, ModelState.STOPPED}),
}


class InvalidTransition(RuntimeError):
    """A state change the machine does not allow: a bug, never a user error."""


def check_transition(old: ModelState, new: ModelState) -> ModelState:
    if new not in _ALLOWED[old]:
        raise InvalidTransition(f"{old} -> {new} is not a transition of the model state machine")
    return new


def health_poll_delays(
    first: float = 0.02, ceiling: float = 0.5, factor: float = 1.2
) -> Iterator[float]:
    """Seconds to wait before each /health poll: every 20 ms at first (a small model loads in
    tens of milliseconds), each wait a fifth longer than the last, so a long load is polled
    every `ceiling` seconds and a ready server waits at most ~20% of its load time on top."""
    delay = first
    while True:
        yield delay
        delay = min(ceiling, delay * factor)


@dataclass
class RestartBudget:
    """Crash restarts allowed: `max_restarts` within `window` seconds, with doubling delays."""

    max_restarts: int = 3
    window: float = 300.0
    base_delay: float = 1.0
    crashes: list[float] = field(default_factory=list)

    def on_crash(self, now: float) -> float | None:
        """Record a crash; return the delay before the restart, or None when the budget is spent."""
        self.crashes = [t for t in self.crashes if now - t < self.window]
        if len(self.crashes) >= self.max_restarts:
            return None
        delay = self.base_delay * (2 ** len(self.crashes))
        self.crashes.append(now)
        return delay

    def reset(self) -> None:
        self.crashes.clear()


def start_phases(timeline: dict[str, float], spawned: float, ready: float) -> dict[str, float]:
    """Seconds each phase of a start took, in order, for those this start went through:
    `decide` (asked for until placed by the controller), `actor` (placed until its actor ran),
    `prepare` (until llama-server was spawned: the call to start, the actor's own checks, the
    port, the key; a restart begins here), `download` (fetching its file from Hugging Face, when
    this node had no copy), `load` (spawned until /health first answered 200)."""
    marks = [
        ("decide", "wanted", "placed"),
        ("actor", "placed", "actor"),
        ("prepare", "actor", None),
    ]
    phases: dict[str, float] = {}
    for phase, begin, end in marks:
        start = timeline.get(begin)
        stop = spawned if end is None else timeline.get(end)
        if start is not None and stop is not None:
            phases[phase] = round(max(0.0, stop - start), 4)
    began, fetched = timeline.get("download"), timeline.get("downloaded")
    if began is not None and fetched is not None:  # a model file fetched from Hugging Face
        took = max(0.0, fetched - began)
        phases["download"] = round(took, 4)
        if "prepare" in phases:
            phases["prepare"] = round(max(0.0, phases["prepare"] - took), 4)
    phases["load"] = round(max(0.0, ready - spawned), 4)
    return phases


def serve_apps_gone(watched: set[str], statuses: dict[str, str] | None) -> bool:
    """Whether every Serve application whose ingress uses this controller has been deleted
    (or Serve itself shut down): `serve shutdown`, `serve delete`, a Ctrl-C of `serve run`.
    `statuses`: Serve's applications by name, None when Serve no longer runs."""
    if not watched:
        return False
    if statuses is None:
        return True
    return all(statuses.get(app) in (None, "DELETING") for app in watched)
