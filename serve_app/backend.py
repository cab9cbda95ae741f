"""What an ingress replica knows of the cluster: the controller, a short-lived copy of the config,
and cached model actor handles (DESIGN §3: step 2). All state that matters lives in actors, so
any number of replicas can run side by side."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from actors.controller import get_controller
from actors.rate_limiter import get_or_create_rate_limiter
from actors.ray_glue import Background, call
from proxifier.auth import ADMIN, Caller, may_use_model
from proxifier.config import AuthConfig, ModelsConfig
from proxifier.errors import ActorGone, ModelNotFound, ModelRetired, Unavailable
from proxifier.lease_reuse import HeldLease, ModelLeases, releases

CONFIG_TTL = 1.0  # seconds a replica trusts its copy of the config (reloads show up this fast)
CONFIG_STALE = 2.0  # ... and uses it while a fresh one comes (never longer: revoked keys)
CONTROLLER_WAIT = 5.0  # seconds a config refresh waits for the controller before going on without
ATTEMPTS = 3  # a retired or dead model actor is replaced this many times per request
MAX_REUSE_AGE = 1.0  # seconds one lease may pass from request to request (lease_reuse)
RENEWALS_PER_TTL = 6  # a replica renews its slots this often per lease_ttl (5 may be missed)


class Owned:
    """The slots one request holds. Whatever is left when the request ends goes back
    (`LeaseGuard`), whichever way it ended; meanwhile the backend renews them with their model
    actors, so a slot outlives its request by at most lease_ttl even if this bookkeeping
    itself were lost (the actor reclaims what nobody renews)."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[Any, Callable[[], None]]] = {}
        self.places: dict[str, Callable[[], None]] = {}  # request id -> leave the queue
        self.closed = False

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
        for request_id in list(self.places):
            self.left(request_id)()
        for _, release in list(self.leases.values()):
            release()


def _nothing() -> None:
    return None


class RayBackend:
    def __init__(self, controller: Any = None) -> None:
        self._controller = controller
        self._rate_limiter: Any = None
        self._config: ModelsConfig | None = None
        self._auth: tuple[int, AuthConfig] | None = None
        self._fetched = 0.0
        self._refreshing: asyncio.Future[None] | None = None
        self._handles: dict[str, Any] = {}
        self._moved: dict[str, str] = {}  # model -> actor id seen retired or dead, to report
        self._lock = asyncio.Lock()
        self._background = Background()
        self._held: dict[str, ModelLeases] = {}  # finished leases not yet given back
        self._timers: dict[str, asyncio.TimerHandle] = {}  # sends them when nobody takes them
        # Requests waiting for a slot one of this replica's requests is about to free
        # (proxifier.lease_reuse): each gets a lease, or None to go and ask the actor.
        self._lines: dict[str, collections.deque[asyncio.Future[HeldLease | None]]] = {}
        # Who renews this replica's slots: model actors reclaim them when the renewals stop.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._owners: set[Owned] = set()
        self._renewer: asyncio.Task[None] | None = None

    @property
    def controller(self) -> Any:
        if self._controller is None:
            self._controller = get_controller()
        return self._controller

    @property
    def rate_limiter(self) -> Any:
        if self._rate_limiter is None:
            self._rate_limiter = get_or_create_rate_limiter()
        return self._rate_limiter

    async def config(self) -> ModelsConfig:
        """The config, refreshed every CONFIG_TTL s. A copy up to CONFIG_STALE s old is used
        at once while a fresher one is fetched in the background, so no request waits for the
        controller on the hot path; an older one (after an idle spell) is refreshed first, so
        a revoked key never outlives CONFIG_STALE. While the controller is away (Ray restarts
        it) the replica goes on with its last copy, so ready models keep answering."""
        age = time.monotonic() - self._fetched
        if self._config is not None and age <= CONFIG_TTL:
            return self._config
        if self._config is not None and age <= CONFIG_STALE:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.ensure_future(self._refresh())
            return self._config
        await self._refresh()
        assert self._config is not None
        return self._config

    async def _refresh(self) -> None:
        async with self._lock:
            if self._config is not None and time.monotonic() - self._fetched <= CONFIG_TTL:
                return  # another caller just did
            try:
                self._config, self._auth = await asyncio.wait_for(
                    asyncio.gather(
                        self.call(self.controller.get_config.remote()),
                        self.call(self.controller.get_auth.remote()),
                    ),
                    CONTROLLER_WAIT,
                )
            except (ray.exceptions.RayError, ActorGone, TimeoutError, ValueError) as error:
                self._controller = None  # look it up again next time
                if self._config is None:
                    raise Unavailable(
                        f"the controller is unreachable ({type(error).__name__})",
                        retry_after=5,
                    ) from None
            self._fetched = time.monotonic()

    async def auth(self) -> AuthConfig:
        await self.config()
        assert self._auth is not None
        return self._auth[1]

    async def resolve(self, name: str, caller: Caller | None = None) -> str:
        """The configured model a name or alias means; 404 otherwise, listing the models the
        caller's key may use (not the others)."""
        config = await self.config()
        model = config.resolve_name(name)
        if model is None:
            visible = [m for m in config.models if caller is None or may_use_model(caller, m)]
            available = ", ".join(sorted(visible)) or "none"
            raise ModelNotFound(f"The model '{name}' does not exist. Available models: {available}")
        return model

    async def visible_models(self, caller: Caller | None) -> list[str] | None:
        """The models the caller's key may use; None when it may use every model."""
        if caller is None or caller.models is None or ADMIN in caller.permissions:
            return None
        config = await self.config()
        return sorted(m for m in config.models if may_use_model(caller, m))

    async def on_model(
        self,
        model: str,
        deadline: float,
        call: Callable[[Any], Awaitable[Any]],
        got_lease: Callable[[Any, dict[str, Any]], None] | None = None,
        got_place: Callable[[Any], None] | None = None,
    ) -> tuple[Any, Any]:
        """Run `call(handle)` on the model's actor; when the actor is retiring or gone, ask the
        controller for the current one and try again. Returns (handle, result).
        `got_lease(handle, lease)` runs as soon as an answer with a lease arrives, even when
        the caller was cancelled meanwhile (its client went away): the slot is never lost;
        `got_place(handle)` likewise when the answer is a place in the queue."""
        last_error: Exception | None = None
        for _ in range(ATTEMPTS):
            handle = self._handles.get(model)
            if handle is None:
                # An actor that retired or died is named, so the controller checks it and
                # places a fresh one rather than handing the same one out again.
                moved = self._moved.pop(model, None)
                ref = self.controller.get_model.remote(model, deadline, moved)
                handle = await self.call(ref)
                self._handles[model] = handle
            try:
                if got_lease is None:
                    return handle, await self.call(call(handle))
                return handle, await self.leased(handle, call(handle), got_lease, got_place)
            except (ModelRetired, ActorGone, ray.exceptions.RayActorError) as error:
                self.forget(model, handle, moved=True)
                last_error = error
        raise Unavailable(
            f"model '{model}' kept moving while the request was placed ({last_error}); try again",
            retry_after=1,
        )

    async def leased(
        self,
        handle: Any,
        ref: Any,
        got_lease: Callable[[Any, dict[str, Any]], None],
        got_place: Callable[[Any], None] | None = None,
    ) -> Any:
        """Await an actor call whose answer may carry a lease (`{"lease": ...}` or the lease
        itself). The answer is taken in a task of its own: a caller cancelled while it travels
        does not lose it, `got_lease` still receives it."""

        def take(task: asyncio.Future[Any]) -> None:
            if task.cancelled() or task.exception() is not None:
                return
            answer = task.result()
            lease = answer.get("lease", answer) if isinstance(answer, dict) else None
            if isinstance(lease, dict) and "lease_id" in lease:
                got_lease(handle, lease)
            elif got_place is not None and isinstance(answer, dict) and "queued" in answer:
                got_place(handle)

        task = asyncio.ensure_future(self.call(ref))
        task.add_done_callback(take)
        return await asyncio.shield(task)

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
        unknown = {
            lease_id for answer in answers if isinstance(answer, list) for lease_id in answer
        }
        if unknown:
            for held in self._held.values():
                held.held = [h for h in held.held if h.lease["lease_id"] not in unknown]

    # -------------------------------------------------------------- leases held between requests
    def take_over(self, model: str) -> HeldLease | None:
        """A lease this replica holds for `model` that a new request may use with no actor call."""
        handle = self._handles.get(model)
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

    def forget(self, model: str, handle: Any = None, moved: bool = False) -> None:
        """Stop using this model's cached actor (`moved`: it retired or died, which the next
        ask for the model tells the controller)."""
        if handle is not None and moved:
            self._moved[model] = handle._actor_id.hex()
        if handle is None or self._handles.get(model) is handle:
            self._handles.pop(model, None)

    async def call(self, ref: Any) -> Any:
        """Await an actor call; its typed error comes back as itself."""
        return await call(ref)

    def fire(self, ref: Any) -> None:
        """Send a call without waiting for it (release), but still observe its outcome."""
        self._background.fire(ref)


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
