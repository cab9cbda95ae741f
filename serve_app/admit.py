"""Admission: one object per inference request (`Admission`) that owns its slot, or its place in
a queue, from the gate to the last byte and gives it back whatever happens; `LeaseGuard` makes
sure of that at the ASGI edge. It settles the request's slot first (held, handed over, granted,
or a place in the queue) and then hands the relay one `Grant`; the relay gives the slot back
through the grant's `release`, and never calls back here. It applies the replica's lease rules
(serve_app.replica_slots, proxifier.lease_reuse); it may not read request bodies or touch
upstream bytes (serve_app.relay).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from proxifier.errors import ProxifierError, QueueTimeout, Rerouted, Unavailable
from serve_app.backend import ATTEMPTS, time_left
from serve_app.call import MOVED, Accepted, Call, Grant, Granted, Owned
from serve_app.gate import Inbound
from serve_app.relay import Relay, StaleLease, Unreachable
from serve_app.replica_slots import RayBackend

REROUTES = 4  # times a waiting request may be sent on to a replica with room (then it waits)
QUICK_ANSWER = 1.0  # seconds a queued stream waits before it commits to a 200 and keep-alives
LEASES = "proxifier.leases"  # where LeaseGuard leaves a request's Owned in the ASGI scope


class LeaseGuard:
    """ASGI middleware: every request owns its slots through one `Owned`, and whatever it
    still holds when the app returns (the answer sent, an error, the client gone at any
    moment) goes back then, whichever path inside forgot it."""

    def __init__(self, app: ASGIApp, backend: RayBackend) -> None:
        self.app, self.slots = app, backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        owned = self.slots.open_request()
        scope[LEASES] = owned
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.close_request(owned)


class Requeue(Exception):
    """The model instance a request waited for was retired or went away before granting it a
    slot (the request starts over with the instance the controller has now), or gave its place
    up to a replica with room (`rerouted`: it is routed again)."""

    def __init__(self, rerouted: bool = False) -> None:
        super().__init__()
        self.rerouted = rerouted


def owned_by(scope: Scope) -> Owned:
    """The request's slots ledger, which LeaseGuard left in its scope."""
    owned = scope.get(LEASES)
    assert isinstance(owned, Owned), "the app must run behind LeaseGuard"
    return owned


class Admission:
    """One inference request's owner: it gets the request a slot (a held one, one handed over
    in the replica's line, one the actor grants at once or after a wait in its queue), hands
    it to the relay, and gives it back when the relay is done, or the request's place in the
    queue when it ends first."""

    def __init__(self, slots: RayBackend, relay: Relay, inbound: Inbound, owned: Owned) -> None:
        self.slots, self.relay, self.inbound, self.owned = slots, relay, inbound, owned
        self.choice: Any = None  # the instance serve_app.route picked (None once it moved)

    async def serve(self, choice: Any) -> Response:
        """The request's answer, on `choice` if a slot this replica holds there serves it,
        else on the instance the actor call reaches. A held slot that turns out stale (its
        llama-server restarted or went away) starts the request over, once, through the
        queue: nothing reached the client yet."""
        model = self.inbound.model
        self.choice = choice
        try:
            for may_take_over in (True, False):
                grant = await self.settle(may_take_over)
                try:
                    return await self.relay.answer(grant)
                except StaleLease:
                    continue
                except Unreachable as error:
                    # Reported; confirmed by the controller, the instance is gone from its
                    # registry and the second round asks for a fresh one, placed where it is
                    # reached. A held slot's request starts over anyway (as a stale one).
                    if not isinstance(grant, Granted) or not may_take_over:
                        raise
                    lost = await self.slots.unreachable(model, grant.call.handle, error.url)
                    if not (lost or grant.call.reused):
                        raise
                    self.choice = None
            raise Unavailable(f"model '{model}' could not be reached; try again", retry_after=1)
        except ProxifierError as error:
            self.relay.metrics.answered(model, error.status)
            raise

    async def settle(self, may_take_over: bool) -> Grant:
        """The request's slot, its place in the queue, or (respond-async) its 202."""
        inbound, slots = self.inbound, self.slots
        model, deadline = inbound.model, inbound.deadline
        call = Call(
            model,
            inbound.endpoint,
            inbound.raw,
            inbound.request_id,
            inbound.arrived,
            owned=self.owned,
            deadline=deadline,
            arrived_at=inbound.arrived_at,
            stream=inbound.stream,
        )
        if may_take_over:
            # A slot this replica holds from its last request, or one that a request of this
            # replica hands over as it finishes: no actor call at all.
            held = slots.take_over(model, self.choice)
            if held is None and not inbound.respond_async:
                held = await slots.wait_in_line(model, deadline)
            if held is not None:
                return self._own(call.take_over(held), held.handle, held.lease)
        if inbound.respond_async:
            return await self.submit(call)
        moves = reroutes = 0
        while moves < ATTEMPTS:
            answer = await self.enqueue(call)
            if "queued" not in answer:
                return self._granted(call, answer["lease"])
            call.queued = True
            try:
                return await self.wait_granted(call, answer["queued"])
            except Requeue as requeue:
                if requeue.rerouted and reroutes < REROUTES:
                    reroutes += 1
                else:
                    moves += 1
        raise Unavailable(
            f"model '{model}' kept stopping while the request waited; try again",
            retry_after=1,
        )

    async def submit(self, call: Call) -> Grant:
        """respond-async: a slot at once, or a place in the queue that the actor runs itself."""
        inbound, slots = self.inbound, self.slots
        caller = inbound.caller
        call.handle, answer = await slots.on_model(
            call.model,
            call.deadline,
            lambda h: h.enqueue_or_submit.remote(
                call.request_id,
                call.path,
                inbound.payload,
                call.deadline,
                call.arrived_at,
                slots.take_releases(call.model, h),
                holder=slots.holder,
                owner=caller.name if caller is not None else None,
            ),
            lambda h, lease: self._own(call, h, lease),
            chosen=self.choice,
        )
        if "queued" in answer:
            slots.joined_queue(call.model)  # the actor runs it; we only take note
            slots.left_queue(call.model)
            return Accepted(call.model, answer["queued"])
        return self._granted(call, answer["lease"])

    async def enqueue(self, call: Call) -> dict[str, Any]:
        """Ask the model's current instance for a slot: a lease, or a place in its queue."""
        call.handle, answer = await self.slots.on_model(
            call.model,
            call.deadline,
            lambda h: h.enqueue.remote(
                call.request_id,
                call.deadline,
                call.arrived_at,
                self.slots.take_releases(call.model, h),
                holder=self.slots.holder,
            ),
            lambda h, lease: self._own(call, h, lease),
            lambda h: self._queued(call, h),
            chosen=self.choice,
        )
        self.slots.answered(call.model, queued="queued" in answer)
        return answer

    async def wait_granted(self, call: Call, queued: dict[str, Any]) -> Grant:
        """Wait in the queue; a client that goes away takes its place (or slot) back. A
        stream whose slot does not come quickly commits to a 200 and waits as a stream of
        keep-alive comments (`QueuedStream`); a quick answer (a slot, or a failure) still gets
        a plain HTTP status."""
        waiting = self.waiting(call, call.handle.wait_lease.remote(call.request_id))
        try:
            if call.stream:
                done, _ = await asyncio.wait({waiting}, timeout=QUICK_ANSWER)
                if not done:
                    return QueuedStream(self, call, queued, waiting, self.inbound.keepalive)
            lease = await asyncio.wait_for(asyncio.shield(waiting), time_left(call.deadline))
        except TimeoutError:
            self.abandon(call, waiting)
            raise unanswered(call) from None
        except asyncio.CancelledError:
            self.abandon(call, waiting)
            raise
        except MOVED:
            raise self.moved(call) from None
        except Rerouted:
            raise await self.rerouted(call) from None
        return self._granted(call, lease)

    def moved(self, call: Call) -> Requeue:
        """The instance the request waited for is gone: forget it, so the next try asks the
        controller (which places a fresh one)."""
        call.owned.left(call.request_id)
        self.slots.forget(call.model, call.handle, moved=True)
        self.choice = None
        return Requeue()

    async def rerouted(self, call: Call) -> Requeue:
        """The replica the request waited for sent it on (others have free slots): route it
        again over a fresh look at the model's replicas."""
        call.owned.left(call.request_id)
        self.choice = await self.slots.reroute(call.model, call.owned)
        return Requeue(rerouted=True)

    async def wait_again(self, call: Call) -> asyncio.Future[Any]:
        """After a move: a slot at once (as a finished future) or a new wait in the queue."""
        answer = await self.enqueue(call)
        if "queued" in answer:
            return self.waiting(call, call.handle.wait_lease.remote(call.request_id))
        granted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        granted.set_result(answer["lease"])
        return granted

    def abandon(self, call: Call, waiting: asyncio.Future[Any]) -> None:
        """The client went away while its request waited: give back its place in the queue,
        or the slot, when the lease had already come and nobody will use it."""
        if waiting.done() and not waiting.cancelled() and waiting.exception() is None:
            self.release(call, waiting.result(), count=False)
            return
        # The actor gives the place back, or the slot if it grants it first. A lease already
        # on its way still reaches `waiting`, which hands it to the request's Owned: that one
        # is closed (or closes with the request), so the slot goes straight back.
        call.owned.left(call.request_id)()

    def waiting(self, call: Call, ref: Any) -> asyncio.Future[Any]:
        """The wait for a lease, during which this replica holds no slot of the model (it
        must not serve a newcomer ahead of the queue)."""
        self.slots.joined_queue(call.model)
        # The answer's taker is set up now, not in a task that a cancel could stop before it
        # ran (the lease would reach nobody and wait for lease_ttl); awaiting it shielded, a
        # cancelled request leaves the wait going, and its place (see `abandon`) to give back.
        answer = self.slots.answer_of(
            call.handle, ref, lambda h, lease: self._own(call, h, lease), until_lost=True
        )
        future = asyncio.shield(answer)
        future.add_done_callback(lambda _: self.slots.left_queue(call.model))
        answer.add_done_callback(lambda _: call.owned.left(call.request_id))
        return future

    def _queued(self, call: Call, handle: Any) -> None:
        """The request waits in the queue: should it end before its wait does (its client
        gone before or while it waits), its place, or the slot just granted to it, goes back."""
        call.handle = handle
        call.owned.queued(
            call.request_id, lambda: self.slots.fire(handle.abandon.remote(call.request_id))
        )

    def _own(self, call: Call, handle: Any, lease: dict[str, Any]) -> Granted:
        """The request got a slot: from now on it is the request's to give back."""
        call.handle = handle
        self.slots.using(call.model, lease["lease_id"])
        call.owned.add(lease["lease_id"], handle, lambda: self.release(call, lease, count=False))
        return self._granted(call, lease)

    def _granted(self, call: Call, lease: dict[str, Any]) -> Granted:
        return Granted(call, lease, functools.partial(self.release, call, lease))

    def release(
        self, call: Call, lease: dict[str, Any], *, clean: bool = False, count: bool = True
    ) -> None:
        """The request is over: the backend holds the lease for the next request (when it
        ended cleanly) or gives it back (proxifier.lease_reuse). `count`: whether this
        request counts as served on it (not when it never reached llama-server). Only the
        first release of a lease counts; later ones (the guard's) do nothing."""
        if not call.owned.drop(lease["lease_id"]):
            return
        self.slots.finish(
            call.model,
            call.handle,
            lease,
            granted_at=call.granted_at if call.granted_at is not None else time.monotonic(),
            served=call.served + (1 if count else 0),
            from_queue=call.queued,
            clean=clean,
        )


class QueuedStream:
    """A streaming request's place in the queue (serve_app.call.Waiting), kept open by the
    relay's keep-alive comments: its slot when it comes, waiting again (up to ATTEMPTS times)
    for the instance there is now when the one it waited for goes away."""

    def __init__(
        self,
        admission: Admission,
        call: Call,
        queued: dict[str, Any],
        waiting: asyncio.Future[Any],
        keepalive: float,
    ) -> None:
        self.admission, self.call, self.queued = admission, call, queued
        self.waiting, self.keepalive, self.moves = waiting, keepalive, 0
        self.reroutes = 0

    async def granted(self, timeout: float) -> Granted | None:
        while True:
            done, _ = await asyncio.wait({self.waiting}, timeout=timeout)
            if not done:
                if time_left(self.call.deadline) <= 0:
                    self.abandon()
                    raise unanswered(self.call)
                return None
            if _moved_away(self.waiting) and self.moves < ATTEMPTS:
                self.moves += 1
                self.admission.moved(self.call)
                self.waiting = await self.admission.wait_again(self.call)
                continue
            if _rerouted(self.waiting) and (self.reroutes < REROUTES or self.moves < ATTEMPTS):
                if self.reroutes < REROUTES:
                    self.reroutes += 1
                else:  # sent on that often: each more counts as a move
                    self.moves += 1
                await self.admission.rerouted(self.call)
                self.waiting = await self.admission.wait_again(self.call)
                continue
            return self.admission._granted(self.call, self.waiting.result())

    async def position(self) -> dict[str, Any]:
        return await self.call.handle.queue_position.remote(self.call.request_id)

    def abandon(self) -> None:
        self.admission.abandon(self.call, self.waiting)


def unanswered(call: Call) -> QueueTimeout:
    return QueueTimeout(
        f"model '{call.model}' did not answer the queued request by its deadline"
        " (its host may be unreachable); try again",
        retry_after=5,
    )


def _moved_away(waiting: asyncio.Future[Any]) -> bool:
    return not waiting.cancelled() and isinstance(waiting.exception(), MOVED)


def _rerouted(waiting: asyncio.Future[Any]) -> bool:
    return not waiting.cancelled() and isinstance(waiting.exception(), Rerouted)
