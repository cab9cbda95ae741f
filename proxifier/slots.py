"""A model's request slots and its bounded FIFO of waiting requests, as plain data.

No I/O, no clock, no asyncio: callers pass `now` and act on what each method returns (which
waiters were granted, which expired). The model actor owns one `SlotQueue` and turns its answers
into resolved futures; the unit tests drive it directly.
"""

from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from proxifier.errors import LeaseError

# How many voided or reaped lease ids are remembered, so a late release of one is a no-op
# rather than a "never granted" bug.
_FORGOTTEN_LEASES_KEPT = 4096


class Outcome(Enum):
    """What happened to one request for a slot."""

    GRANTED = "granted"
    QUEUED = "queued"
    FULL = "full"


@dataclass(frozen=True)
class Lease:
    lease_id: str
    request_id: str
    instance: int
    granted_at: float
    seq: int  # grant order
    ticket: int | None  # queue order, for a lease that waited


@dataclass(frozen=True)
class Waiter:
    request_id: str
    enqueued_at: float
    deadline: float
    ticket: int


class SlotQueue:
    """`slots` requests run at once while the model is open; `max_queue` more wait in order."""

    def __init__(self, slots: int, max_queue: int) -> None:
        if slots < 1 or max_queue < 0:
            raise ValueError("slots must be >= 1 and max_queue >= 0")
        self.slots = slots
        self.max_queue = max_queue
        self.instance: int | None = None  # the llama-server instance leases are granted on
        self.leases: dict[str, Lease] = {}
        self.holders: set[str] = set()  # request ids holding a lease, for O(1) duplicate checks
        self.waiters: OrderedDict[str, Waiter] = OrderedDict()
        self.forgotten: OrderedDict[str, None] = OrderedDict()
        self.last_release: float | None = None
        self.opened_at: float | None = None
        self.served = 0
        self.granted = 0  # leases handed out; fewer than `served` when replicas reuse them
        self._seq = itertools.count()
        self._tickets = itertools.count()

    # --- questions ----------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.instance is not None

    @property
    def busy(self) -> bool:
        """Leases out or requests waiting: a busy model is never idle and never evicted."""
        return bool(self.leases or self.waiters)

    def free_slots(self) -> int:
        return self.slots - len(self.leases) if self.is_open else 0

    def position(self, request_id: str) -> int | None:
        """1-based place in the queue, or None when not waiting."""
        for index, waiting in enumerate(self.waiters):
            if waiting == request_id:
                return index + 1
        return None

    def oldest_wait(self, now: float) -> float:
        first = next(iter(self.waiters.values()), None)
        return 0.0 if first is None else now - first.enqueued_at

    def idle_for(self, now: float) -> float:
        """Seconds since the last request ended (or the model opened); 0 while busy or closed."""
        if self.busy or not self.is_open:
            return 0.0
        marks = [t for t in (self.last_release, self.opened_at) if t is not None]
        return max(0.0, now - max(marks))

    # --- changes ------------------------------------------------------------------------------
    def request(self, request_id: str, now: float, deadline: float) -> tuple[Outcome, Lease | None]:
        """Grant a slot at once, queue the request, or refuse it because the queue is full."""
        if request_id in self.waiters or request_id in self.holders:
            raise LeaseError(f"request {request_id!r} already holds or awaits a slot")
        if self.free_slots() > 0 and not self.waiters:
            return Outcome.GRANTED, self._grant(request_id, now)
        if len(self.waiters) >= self.max_queue:
            return Outcome.FULL, None
        self.waiters[request_id] = Waiter(request_id, now, deadline, next(self._tickets))
        return Outcome.QUEUED, None

    def release(self, lease_id: str, now: float, served: int = 1) -> list[Lease]:
        """Free a slot after `served` requests ran on it (an ingress replica may hand one lease
        from request to request); returns the leases this grants to waiters, oldest first."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            if lease_id in self.forgotten:
                return []
            raise LeaseError(f"lease {lease_id!r} was never granted")
        self.holders.discard(lease.request_id)
        self.served += served
        self.last_release = now
        return self._grant_waiters(now)

    def open(self, instance: int, now: float) -> list[Lease]:
        """The model is ready on `instance`: grant waiters up to the slot count."""
        self.instance = instance
        self.opened_at = now
        return self._grant_waiters(now)

    def close(self) -> list[Lease]:
        """The instance is gone (stopped or crashed): its leases are void; waiters stay queued."""
        self.instance = None
        voided = list(self.leases.values())
        for lease in voided:
            self._forget(lease.lease_id)
        self.leases.clear()
        self.holders.clear()
        return voided

    def cancel(self, request_id: str) -> Waiter | None:
        """Take one waiter out (its caller gave up or went away)."""
        return self.waiters.pop(request_id, None)

    def expire(self, now: float) -> list[Waiter]:
        """Take out every waiter whose deadline has passed."""
        expired = [w for w in self.waiters.values() if w.deadline <= now]
        for waiter in expired:
            del self.waiters[waiter.request_id]
        return expired

    def clear(self) -> list[Waiter]:
        """Take out every waiter (an admin cleared the queue, or the model failed)."""
        cleared = list(self.waiters.values())
        self.waiters.clear()
        return cleared

    def reap(self, now: float, max_lease_time: float) -> tuple[list[Lease], list[Lease]]:
        """Reclaim leases held longer than max_lease_time (their holder died without releasing).

        Returns (reclaimed leases, leases granted to waiters with the freed slots).
        """
        stale = [lease for lease in self.leases.values() if now - lease.granted_at > max_lease_time]
        for lease in stale:
            del self.leases[lease.lease_id]
            self.holders.discard(lease.request_id)
            self._forget(lease.lease_id)
        return stale, (self._grant_waiters(now) if stale else [])

    # --- internals ----------------------------------------------------------------------------
    def _grant(self, request_id: str, now: float, ticket: int | None = None) -> Lease:
        assert self.instance is not None and len(self.leases) < self.slots, "no free slot"
        lease = Lease(uuid.uuid4().hex, request_id, self.instance, now, next(self._seq), ticket)
        self.leases[lease.lease_id] = lease
        self.holders.add(request_id)
        self.granted += 1
        return lease

    def _grant_waiters(self, now: float) -> list[Lease]:
        granted = []
        while self.waiters and self.free_slots() > 0:
            request_id, waiter = self.waiters.popitem(last=False)
            granted.append(self._grant(request_id, now, waiter.ticket))
        return granted

    def _forget(self, lease_id: str) -> None:
        self.forgotten[lease_id] = None
        while len(self.forgotten) > _FORGOTTEN_LEASES_KEPT:
            self.forgotten.popitem(last=False)
