"""Leases an ingress replica has finished with but not yet given back, as plain data.

A request through the product costs two calls to the model actor: take a slot, give it back.
On a busy model the next request often arrives a few milliseconds after the last one finished,
so a replica holds a finished lease for `hold` seconds (`settings.queue.lease_hold`): a new
request for the same model takes it over (no actor call at all), or the release rides along
with the next request's enqueue (one call instead of two), or, when nothing comes, it is sent
alone.

Fairness is kept by three rules: a lease that was granted from the queue is never held (others
were waiting for that slot); a replica holds nothing for a model while one of its own requests
waits in that model's queue, nor for `contention_hold` seconds after; and one lease is handed
from request to request for at most `max_reuse_age` seconds before it goes back to the actor's
FIFO, so requests queued through other replicas wait at most that much longer.

When the model's slots are all taken (the actor queued our last request) and some of them run
this replica's requests, a new request of ours waits in the replica's own line for one of them
to finish instead of joining the actor's queue: a finished request hands its lease straight to
the oldest request in that line (no actor call on either side). The same age limit sends each
lease back to the FIFO at least once per `max_reuse_age`, and a request waits in the line at
most that long before it queues at the actor; one of ours already queued at the actor is
served first, through it.

No I/O and no clock: callers pass `now` (monotonic seconds) and act on what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class HeldLease:
    handle: Any  # the model actor that granted it (opaque here)
    lease: dict[str, Any]
    granted_at: float  # when the actor granted it
    served: int  # requests finished on it, reported to the actor when it goes back
    held_at: float  # when its last request finished
    reusable: bool  # may a new request take it over (its last request ended cleanly)


@dataclass
class ModelLeases:
    """One model's held leases at one replica."""

    hold: float = 0.05  # settings.queue.lease_hold; 0 = nothing is held
    max_reuse_age: float = 1.0
    contention_hold: float = 1.0
    held: list[HeldLease] = field(default_factory=list)
    waiting: int = 0  # our requests now in the model's queue
    contended_until: float = float("-inf")
    in_use: set[str] = field(default_factory=set)  # lease ids our requests are running on
    handing: int = 0  # leases on their way from a finished request to one in the line
    saturated: bool = False  # the actor queued our last request: its slots are all taken

    def may_wait_locally(self, in_line: int) -> bool:
        """Should a new request wait in this replica's line rather than ask the actor? Only
        when one of our running requests will free a slot for it, and asking would only queue
        it (the model is saturated, or ours already wait)."""
        if self.hold <= 0 or not (self.in_use or self.handing):
            return False  # none of ours runs: whatever frees comes from the actor, ask it
        return in_line > 0 or self.waiting > 0 or self.saturated

    def hands_over(self, granted_at: float, now: float, clean: bool, in_line: int) -> bool:
        """Does a finished request's lease go straight to the oldest request in the line? Not
        when ours wait at the actor (they came first), nor once the lease is old enough to go
        back to the FIFO, nor after an unclean end."""
        return (
            self.hold > 0
            and clean
            and in_line > 0
            and self.waiting == 0
            and now - granted_at < self.max_reuse_age
        )

    def joined_queue(self, now: float) -> list[HeldLease]:
        """A request of ours must queue for this model: others may be waiting too, so nothing
        is held for it any more. Returns what was held, to give back at once."""
        self.waiting += 1
        self.contended_until = now + self.contention_hold
        released, self.held = self.held, []
        return released

    def left_queue(self, now: float) -> None:
        self.waiting = max(0, self.waiting - 1)
        self.contended_until = max(self.contended_until, now + self.contention_hold)

    def contended(self, now: float) -> bool:
        return self.waiting > 0 or now < self.contended_until

    def finish(
        self,
        handle: Any,
        lease: dict[str, Any],
        *,
        granted_at: float,
        served: int,
        now: float,
        from_queue: bool,
        clean: bool,
    ) -> tuple[bool, list[HeldLease]]:
        """A request on `lease` is over. Returns (held, to_release_now): whether the lease is
        held here, and what must go back to the actor at once (this lease when it may not be
        held, and leases held for another actor, which the model has left)."""
        stale = [h for h in self.held if h.handle is not handle]
        self.held = [h for h in self.held if h.handle is handle]
        entry = HeldLease(handle, lease, granted_at, served, now, clean)
        if self.hold <= 0 or from_queue or self.contended(now):
            return False, [*stale, entry]
        entry.reusable = clean and now - granted_at < self.max_reuse_age
        self.held.append(entry)
        return True, stale

    def take_over(self, handle: Any, now: float) -> HeldLease | None:
        """A held lease a new request may use without asking the actor, newest first."""
        if self.contended(now):
            return None
        for index in range(len(self.held) - 1, -1, -1):
            entry = self.held[index]
            young = now - entry.granted_at < self.max_reuse_age
            if entry.handle is handle and entry.reusable and young:
                return self.held.pop(index)
        return None

    def take_all(self, handle: Any) -> list[HeldLease]:
        """Everything held for `handle`, to ride along with a call to it."""
        taken = [h for h in self.held if h.handle is handle]
        self.held = [h for h in self.held if h.handle is not handle]
        return taken

    def due(self, now: float) -> list[HeldLease]:
        """Held leases whose time is up: nobody took them over, nothing carried them back."""
        expired = [h for h in self.held if now - h.held_at >= self.hold]
        self.held = [h for h in self.held if now - h.held_at < self.hold]
        return expired

    def next_due(self) -> float | None:
        return min((h.held_at + self.hold for h in self.held), default=None)


def releases(held: list[HeldLease]) -> list[tuple[str, int]]:
    """What the actor needs to give the slots back: (lease id, requests served on it)."""
    return [(h.lease["lease_id"], h.served) for h in held]
