"""The slots this ingress replica holds across its requests (`RayBackend`): every request's
`Owned` ledger, renewed with the model actors; finished leases held a moment for the next
request (proxifier.lease_reuse decides, this applies it: hand-over, the replica's line, the
hold timers, releases riding along). It may not route, read request bodies, or relay bytes.

`RayBackend` is the cluster view (serve_app.backend) with these slots on top: one object per
replica, so the held leases always follow the handles that view caches.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
import uuid
from typing import Any

from proxifier.lease_reuse import HeldLease, ModelLeases, releases
from serve_app.backend import Cluster
from serve_app.call import Owned

MAX_REUSE_AGE = 1.0  # seconds one lease may pass from request to request (lease_reuse)
RENEWALS_PER_TTL = 6  # a replica renews its slots this often per lease_ttl (5 may be missed)


class RayBackend(Cluster):
    def __init__(self, controller: Any = None) -> None:
        super().__init__(controller)
        self._held: dict[str, ModelLeases] = {}  # finished leases not yet given back
        self._timers: dict[str, asyncio.TimerHandle] = {}  # sends them when nobody takes them
        # Requests waiting for a slot one of this replica's requests is about to free
        # (proxifier.lease_reuse): each gets a lease, or None to go and ask the actor.
        self._lines: dict[str, collections.deque[asyncio.Future[HeldLease | None]]] = {}
        # Who renews this replica's slots: model actors reclaim them when the renewals stop.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._owners: set[Owned] = set()
        self._told: dict[int, int] = {}  # handle id -> the line length its actor last heard
        self._renewer: asyncio.Task[None] | None = None

    # -------------------------------------------------------------- slots owned and renewed
    def open_request(self) -> Owned:
        owned = Owned()
        self._owners.add(owned)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        return owned

    def close_request(self, owned: Owned) -> None:
        self._owners.discard(owned)
        owned.close()

    async def _renew_forever(self) -> None:
        while True:
            ttl = self._config.settings.lease_ttl if self._config is not None else 6.0
            await asyncio.sleep(ttl / RENEWALS_PER_TTL)
            with contextlib.suppress(Exception):
                await self.renew_once()

    async def renew_once(self) -> None:
        """Tell each model actor which of its slots this replica still uses; forget held
        slots an actor no longer counts as ours (voided by a restart, or reclaimed)."""
        groups: dict[int, tuple[Any, list[str]]] = {}
        lines = {
            id(self._handles[model]): sum(1 for waiter in line if not waiter.done())
            for model, line in self._lines.items()
            if model in self._handles
        }
        for owned in list(self._owners):
            for lease_id, (handle, _) in list(owned.leases.items()):
                groups.setdefault(id(handle), (handle, []))[1].append(lease_id)
        for held in self._held.values():
            for entry in held.held:
                groups.setdefault(id(entry.handle), (entry.handle, []))[1].append(
                    entry.lease["lease_id"]
                )
        for model, handle in self._handles.items():
            # A line the actor last heard was longer than it is: tell it, even with no slot
            # to renew there (else /admin/queue/status counts gone waiters for lease_ttl).
            if lines.get(id(handle), 0) != self._told.get(id(handle), 0) and model in self._lines:
                groups.setdefault(id(handle), (handle, []))
        if not groups:
            return
        ttl = self._config.settings.lease_ttl if self._config is not None else 6.0
        answers = await asyncio.gather(
            *(
                asyncio.wait_for(
                    handle.renew.remote(self.holder, ids, lines.get(id(handle), 0)), ttl
                )
                for handle, ids in groups.values()
            ),
            return_exceptions=True,
        )
        self._told = {key: lines.get(key, 0) for key in groups}
        unknown = {
            lease_id for answer in answers if isinstance(answer, list) for lease_id in answer
        }
        if unknown:
            for held in self._held.values():
                held.held = [h for h in held.held if h.lease["lease_id"] not in unknown]

    # -------------------------------------------------------------- leases held between requests
    def take_over(self, model: str, handle: Any) -> HeldLease | None:
        """A lease this replica holds for `model` on `handle` (the instance serve_app.route
        chose) that a new request may use with no actor call."""
        held = self._held.get(model)
        if handle is None or held is None:
            return None
        return held.take_over(handle, time.monotonic())

    def finish(
        self,
        model: str,
        handle: Any,
        lease: dict[str, Any],
        *,
        granted_at: float,
        served: int,
        from_queue: bool,
        clean: bool,
    ) -> None:
        """A request on `lease` is over: hand the lease to the oldest request in this
        replica's line, hold it a moment, or give it back now (see proxifier.lease_reuse)."""
        held = self._leases(model)
        held.in_use.discard(lease["lease_id"])
        now = time.monotonic()
        line = self._lines.get(model)
        if line and any(not waiter.done() for waiter in line):
            entry = HeldLease(handle, lease, granted_at, served, now, clean)
            current = handle is self._handles.get(model)  # not an instance on its way out
            if current and held.hands_over(granted_at, now, clean, len(line)):
                waiter = _first_waiting(line)
                assert waiter is not None
                held.handing += 1
                waiter.set_result(entry)
                return
            # Not for the line (too old, an unclean end, or ours wait at the actor): back to
            # the actor now, and the oldest in the line asks for it there unless one of ours
            # already waits at the actor for it. When none of ours runs or waits there any
            # more, nothing will come to the line: all of it asks.
            self._send([entry])
            if not (held.in_use or held.handing or held.waiting):
                _wake(line, everyone=True)
            elif held.waiting == 0:
                _wake(line, everyone=False)
            return
        held.saturated = False  # a slot frees up (here or at the actor): worth asking again
        kept, to_release = held.finish(
            handle,
            lease,
            granted_at=granted_at,
            served=served,
            now=now,
            from_queue=from_queue,
            clean=clean,
        )
        self._send(to_release)
        if kept and model not in self._timers:
            self._schedule(model, held)

    def using(self, model: str, lease_id: str) -> None:
        """A request of this replica now runs on `lease_id` (its finish will free it)."""
        self._leases(model).in_use.add(lease_id)

    def answered(self, model: str, queued: bool) -> None:
        """The actor granted a slot at once (`queued` False), or queued the request: whether
        the model's slots are all taken, as far as this replica knows. A slot that was free
        may not be the only one: the oldest in the line asks the actor too (and, granted at
        once in turn, wakes the next), until one is queued."""
        self._leases(model).saturated = queued
        line = self._lines.get(model)
        if line and not queued:
            _wake(line, everyone=False)

    async def wait_in_line(self, model: str, deadline: float) -> HeldLease | None:
        """A lease one of this replica's requests hands over when it finishes, or None when
        the request should ask the actor instead: no hand-over is due, none came in time (the
        lease age limit, after which the slots go back to the actor anyway; or the request's
        `deadline`, wall clock, which the actor then enforces), or the slots went back."""
        held = self._leases(model)
        line = self._lines.setdefault(model, collections.deque())
        if self.replica_count(model) > 1:
            # The router chose a replica for it: its slot is asked there (a hand-over here
            # would tie it to whichever replica this one's requests hold; measured slower).
            return None
        if not held.may_wait_locally(len(line)):
            return None
        future: asyncio.Future[HeldLease | None] = asyncio.get_running_loop().create_future()
        line.append(future)
        limit = max(0.0, min(held.max_reuse_age, deadline - time.time()))
        try:
            await asyncio.wait({future}, timeout=limit)
        except asyncio.CancelledError:
            self._left_line(model, line, future)
            raise
        if not future.done():
            future.cancel()
        with contextlib.suppress(ValueError):
            line.remove(future)
        if future.cancelled() or future.result() is None:
            return None
        handed = future.result()
        held.handing -= 1
        held.in_use.add(handed.lease["lease_id"])
        return handed

    def _left_line(
        self,
        model: str,
        line: collections.deque[asyncio.Future[HeldLease | None]],
        future: asyncio.Future[HeldLease | None],
    ) -> None:
        """A request left the line (its client went away): a lease already handed to it
        passes on as if its request had finished, served nothing."""
        with contextlib.suppress(ValueError):
            line.remove(future)
        if future.done() and not future.cancelled() and future.result() is not None:
            handed = future.result()
            held = self._leases(model)
            held.handing -= 1
            held.in_use.add(handed.lease["lease_id"])
            self.finish(
                model,
                handed.handle,
                handed.lease,
                granted_at=handed.granted_at,
                served=handed.served,
                from_queue=False,
                clean=True,
            )
        else:
            future.cancel()

    def take_releases(self, model: str, handle: Any) -> list[tuple[str, int]]:
        """The held leases that ride with a call to `handle` (the caller must send them)."""
        held = self._held.get(model)
        return releases(held.take_all(handle)) if held is not None else []

    def joined_queue(self, model: str) -> None:
        """A request of ours waits for this model: give back what is held, hold nothing."""
        self._send(self._leases(model).joined_queue(time.monotonic()))

    def left_queue(self, model: str) -> None:
        held = self._leases(model)
        held.left_queue(time.monotonic())
        line = self._lines.get(model)
        if line and not (held.in_use or held.handing or held.waiting):
            _wake(line, everyone=True)  # that wait ended without a slot: nothing comes to the line

    def _leases(self, model: str) -> ModelLeases:
        held = self._held.setdefault(model, ModelLeases())
        if self._config is not None:  # follows config reloads
            settings = self._config.settings
            held.hold = settings.queue.lease_hold
            # Never near max_lease_time: the actor would reclaim a slot still in use here.
            held.max_reuse_age = min(max(MAX_REUSE_AGE, 2 * held.hold), settings.max_lease_time / 2)
        return held

    def _schedule(self, model: str, held: ModelLeases) -> None:
        due = held.next_due()
        if due is None:
            self._timers.pop(model, None)
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, due - time.monotonic())
        self._timers[model] = loop.call_later(delay, self._on_timer, model)

    def _on_timer(self, model: str) -> None:
        self._timers.pop(model, None)
        held = self._held[model]
        try:
            self._send(held.due(time.monotonic()))
        finally:
            self._schedule(model, held)

    async def give_back_all(self, timeout: float = 5.0) -> None:
        """The replica is shutting down: every held slot goes back now (else it would wait
        for the actor's max_lease_time)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        refs = []
        for held in self._held.values():
            entries, held.held = held.held, []
            refs += [h.release_many.remote(releases(g)) for h, g in _by_handle(entries)]
        if refs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*refs, return_exceptions=True), timeout)

    def _send(self, entries: list[HeldLease]) -> None:
        for handle, group in _by_handle(entries):
            self.fire(handle.release_many.remote(releases(group)))


def _first_waiting(
    line: collections.deque[asyncio.Future[HeldLease | None]],
) -> asyncio.Future[HeldLease | None] | None:
    while line:
        waiter = line.popleft()
        if not waiter.done():
            return waiter
    return None


def _wake(line: collections.deque[asyncio.Future[HeldLease | None]], everyone: bool) -> None:
    """Send the oldest in the line (or all of them) to ask the actor for a slot."""
    while line:
        waiter = line.popleft()
        if not waiter.done():
            waiter.set_result(None)
            if not everyone:
                return


def _by_handle(entries: list[HeldLease]) -> list[tuple[Any, list[HeldLease]]]:
    """Held leases grouped by the actor they go back to (handles are not hashable by value)."""
    groups: dict[int, tuple[Any, list[HeldLease]]] = {}
    for entry in entries:
        groups.setdefault(id(entry.handle), (entry.handle, []))[1].append(entry)
    return list(groups.values())
