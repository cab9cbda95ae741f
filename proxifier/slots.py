"""A model's request slots and its bounded FIFO of waiting requests, as plain data.

No I/O, no clock, no asyncio: callers pass `now` and act on what each method returns (which
waiters were granted, which expired). The model actor owns one `SlotQueue` and turns its answers
into resolved futures; the unit tests drive it directly.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections import OrderedDict
from collections.abc import Iterable
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
    holder: str | None = None  # the ingress replica that renews it; None: the actor's own


@dataclass(frozen=True)
class Waiter:
    request_id: str
    enqueued_at: float
    deadline: float
    ticket: int
    holder: str | None = None


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
        self.renewed: dict[str, float] = {}  # lease id -> last renewal by its holder
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
    def touch(self, now: float) -> None:
        """The model was used without a slot (a raw passthrough): not idle since `now`."""
        self.last_release = max(self.last_release or now, now)

    def request(
        self, request_id: str, now: float, deadline: float, holder: str | None = None
    ) -> tuple[Outcome, Lease | None]:
        """Grant a slot at once, queue the request, or refuse it because the queue is full.
        A lease with a `holder` must be renewed by it (see `renew` and `reap`)."""
        if request_id in self.waiters or request_id in self.holders:
            raise LeaseError(f"request {request_id!r} already holds or awaits a slot")
        if self.free_slots() > 0 and not self.waiters:
            return Outcome.GRANTED, self._grant(request_id, now, holder=holder)
        if len(self.waiters) >= self.max_queue:
            return Outcome.FULL, None
        self.waiters[request_id] = Waiter(request_id, now, deadline, next(self._tickets), holder)
        return Outcome.QUEUED, None

    def renew(self, holder: str, lease_ids: Iterable[str], now: float) -> list[str]:
        """`holder` still uses these leases. Returns the ids this queue no longer knows as the
        holder's (voided by a stop or crash, or reaped): the holder must stop counting on them."""
        unknown = []
        for lease_id in lease_ids:
            lease = self.leases.get(lease_id)
            if lease is None or lease.holder != holder:
                unknown.append(lease_id)
            else:
                self.renewed[lease_id] = now
        return unknown

    def release(self, lease_id: str, now: float, served: int = 1) -> list[Lease]:
        """Free a slot after `served` requests ran on it (an ingress replica may hand one lease
        from request to request); returns the leases this grants to waiters, oldest first."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            if lease_id in self.forgotten:
                return []
            raise LeaseError(f"lease {lease_id!r} was never granted")
        self.holders.discard(lease.request_id)
        self.renewed.pop(lease_id, None)
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
        self.renewed.clear()
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

    def reap(
        self, now: float, max_lease_time: float, lease_ttl: float = math.inf
    ) -> tuple[list[Lease], list[Lease]]:
        """Reclaim the slots nobody uses any more: a lease with a holder that has not been
        renewed for `lease_ttl` seconds (the holder died, or lost track of it), and a lease
        without one held longer than `max_lease_time`.

        Returns (reclaimed leases, leases granted to waiters with the freed slots).
        """
        stale = [
            lease
            for lease in self.leases.values()
            if self._stale(lease, now, max_lease_time, lease_ttl)
        ]
        for lease in stale:
            del self.leases[lease.lease_id]
            self.holders.discard(lease.request_id)
            self.renewed.pop(lease.lease_id, None)
            self._forget(lease.lease_id)
        return stale, (self._grant_waiters(now) if stale else [])

    def _stale(self, lease: Lease, now: float, max_lease_time: float, lease_ttl: float) -> bool:
        if lease.holder is None:
            return now - lease.granted_at > max_lease_time
        return now - self.renewed.get(lease.lease_id, lease.granted_at) > lease_ttl

    # --- internals ----------------------------------------------------------------------------
    def _grant(
        self, request_id: str, now: float, ticket: int | None = None, holder: str | None = None
    ) -> Lease:
        assert self.instance is not None and len(self.leases) < self.slots, "no free slot"
        lease = Lease(
            uuid.uuid4().hex, request_id, self.instance, now, next(self._seq), ticket, holder
        )
        self.leases[lease.lease_id] = lease
        self.holders.add(request_id)
        self.granted += 1
        return lease

    def _grant_waiters(self, now: float) -> list[Lease]:
        granted = []
        while self.waiters and self.free_slots() > 0:
            request_id, waiter = self.waiters.popitem(last=False)
            granted.append(self._grant(request_id, now, waiter.ticket, waiter.holder))
        return granted

    def _forget(self, lease_id: str) -> None:
        self.forgotten[lease_id] = None
        while len(self.forgotten) > _FORGOTTEN_LEASES_KEPT:
            self.forgotten.popitem(last=False)
