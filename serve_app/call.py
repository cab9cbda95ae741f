"""One inference request's state on its way (`Call`), the ledger of the slots it holds
(`Owned`), and what admission hands the relay (`Grant`: a slot, a place in a queue, or a 202):
plain data and bookkeeping; no I/O, no actor calls, no clock.

`serve_app.admit` owns these for the request's whole life; the relay only reads and marks them,
and gives a slot back through the `Release` it was handed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxifier.endpoints import Endpoint, Shape
from proxifier.errors import ActorGone, ModelRetired
from proxifier.lease_reuse import HeldLease

# A request waiting for a slot hears this when its instance stops or dies: it is not the
# request's failure (DESIGN §4, the stop handshake), so it waits again for a fresh instance.
MOVED = (ModelRetired, ActorGone)


class Owned:
    """The slots one request holds. Whatever is left when the request ends goes back
    (`LeaseGuard`), whichever way it ended; meanwhile the backend renews them with their model
    actors, so a slot outlives its request by at most lease_ttl even if this bookkeeping
    itself were lost (the actor reclaims what nobody renews)."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[Any, Callable[[], None]]] = {}
        self.places: dict[str, Callable[[], None]] = {}  # request id -> leave the queue
        self.closed = False
        self.done: Callable[[], None] = _nothing  # the router's count of it ends (backend.pick)

    def add(self, lease_id: str, handle: Any, release: Callable[[], None]) -> None:
        """The request got a slot; `release` gives it back (it calls `drop`). A slot that
        arrives after the request ended goes straight back."""
        self.leases[lease_id] = (handle, release)
        if self.closed:
            release()

    def drop(self, lease_id: str) -> bool:
        """The slot is being given back: True the first time, False after (no double release)."""
        return self.leases.pop(lease_id, None) is not None

    def queued(self, request_id: str, leave: Callable[[], None]) -> None:
        """The request waits in a model's queue; `leave` takes it out (or gives back the slot
        it was granted) if the request ends before its wait does."""
        self.places[request_id] = leave
        if self.closed:
            self.left(request_id)()

    def left(self, request_id: str) -> Callable[[], None]:
        """The wait is over (a slot came, or an error): nothing to take out any more."""
        return self.places.pop(request_id, _nothing)

    def close(self) -> None:
        self.closed = True
        self.done()
        self.done = _nothing
        for request_id in list(self.places):
            self.left(request_id)()
        for _, release in list(self.leases.values()):
            release()


def _nothing() -> None:
    return None


@dataclass
class Call:
    """One inference request on its way through: where it goes and what it carries."""

    model: str
    endpoint: Endpoint
    raw: bytes
    request_id: str
    arrived: float  # monotonic, for the queue-wait metric
    handle: Any = None  # the model actor that holds its place or slot
    queued: bool = False  # its lease was granted from the queue (others may wait too)
    reused: bool = False  # its lease was taken over from an earlier request of this replica
    granted_at: float | None = None  # monotonic, when its lease was granted
    served: int = 0  # requests the lease served before this one
    streaming: bool = False  # its response body has started (OwnedStream)
    stream: bool = False  # an SSE answer was asked for
    deadline: float = 0.0  # wall clock: when it must have been answered (queue_timeout)
    arrived_at: float = 0.0  # wall clock, for the actor's honest wait times
    owned: Owned = field(default_factory=Owned)  # the slots the request holds (LeaseGuard)

    @property
    def path(self) -> str:
        return self.endpoint.path

    @property
    def shape(self) -> Shape:
        return self.endpoint.errors

    def take_over(self, held: HeldLease) -> Call:
        self.handle, self.granted_at, self.served = held.handle, held.granted_at, held.served
        self.reused = True
        return self


class Release(Protocol):
    """Gives a granted slot back, once: `clean`, the request ended cleanly (the slot may serve
    the next one); `count`, it reached llama-server (it counts as served on the slot)."""

    def __call__(self, *, clean: bool = False, count: bool = True) -> None: ...


@dataclass(frozen=True, slots=True)
class Granted:
    """A slot the request owns: what the relay sends on, and how it gives the slot back."""

    call: Call
    lease: dict[str, Any]  # the llama-server's url and key, and the lease's id
    release: Release


@dataclass(frozen=True, slots=True)
class Accepted:
    """A place in the model's queue, answered 202 (respond-async): the actor runs it."""

    model: str
    queued: dict[str, Any]  # request_id, position, model_state


class Waiting(Protocol):
    """A streaming request's place in the queue, which the relay keeps open with SSE comments
    until its slot comes."""

    call: Call
    queued: dict[str, Any]  # its first position and the model's state
    keepalive: float  # seconds between comments

    async def granted(self, timeout: float) -> Granted | None:
        """Its slot, or None when none came within `timeout` (it still waits)."""

    async def position(self) -> dict[str, Any]:
        """Where it stands now: position and model_state."""

    def abandon(self) -> None:
        """Its client went away: the place, or a slot already granted, goes back."""


Grant = Granted | Accepted | Waiting
