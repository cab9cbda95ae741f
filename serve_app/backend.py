"""What an ingress replica knows of the cluster: the controller, a short-lived copy of the config,
and cached model actor handles (DESIGN §3: step 2). All state that matters lives in actors, so
any number of replicas can run side by side."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from actors.controller import get_controller
from actors.rate_limiter import get_or_create_rate_limiter
from proxifier.config import AuthConfig, ModelsConfig
from proxifier.errors import ModelNotFound, ModelRetired, ProxifierError, Unavailable
from proxifier.lease_reuse import HeldLease, ModelLeases, releases

CONFIG_TTL = 1.0  # seconds a replica trusts its copy of the config (reloads show up this fast)
ATTEMPTS = 3  # a retired or dead model actor is replaced this many times per request
MAX_REUSE_AGE = 1.0  # seconds one lease may pass from request to request (lease_reuse)


class RayBackend:
    def __init__(self, controller: Any = None) -> None:
        self._controller = controller
        self._rate_limiter: Any = None
        self._config: ModelsConfig | None = None
        self._auth: tuple[int, AuthConfig] | None = None
        self._fetched = 0.0
        self._handles: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._held: dict[str, ModelLeases] = {}  # finished leases not yet given back
        self._timers: dict[str, asyncio.TimerHandle] = {}  # sends them when nobody takes them

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
        if self._config is None or time.monotonic() - self._fetched > CONFIG_TTL:
            async with self._lock:
                if self._config is None or time.monotonic() - self._fetched > CONFIG_TTL:
                    self._config, self._auth = await asyncio.gather(
                        self.call(self.controller.get_config.remote()),
                        self.call(self.controller.get_auth.remote()),
                    )
                    self._fetched = time.monotonic()
        return self._config

    async def auth(self) -> AuthConfig:
        await self.config()
        assert self._auth is not None
        return self._auth[1]

    async def resolve(self, name: str) -> str:
        """The configured model a name or alias means; 404 listing the models otherwise."""
        config = await self.config()
        model = config.resolve_name(name)
        if model is None:
            available = ", ".join(sorted(config.models)) or "none"
            raise ModelNotFound(f"The model '{name}' does not exist. Available models: {available}")
        return model

    async def on_model(
        self, model: str, deadline: float, call: Callable[[Any], Awaitable[Any]]
    ) -> tuple[Any, Any]:
        """Run `call(handle)` on the model's actor; when the actor is retiring or gone, ask the
        controller for the current one and try again. Returns (handle, result)."""
        last_error: Exception | None = None
        for _ in range(ATTEMPTS):
            handle = self._handles.get(model)
            if handle is None:
                handle = await self.call(self.controller.get_model.remote(model, deadline))
                self._handles[model] = handle
            try:
                return handle, await self.call(call(handle))
            except (ModelRetired, ray.exceptions.RayActorError) as error:
                self.forget(model, handle)
                last_error = error
        raise Unavailable(
            f"model '{model}' kept moving while the request was placed ({last_error}); try again",
            retry_after=1,
        )

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
        """A request on `lease` is over: hold the lease a moment (see proxifier.lease_reuse) or
        give it back now."""
        held = self._leases(model)
        kept, to_release = held.finish(
            handle,
            lease,
            granted_at=granted_at,
            served=served,
            now=time.monotonic(),
            from_queue=from_queue,
            clean=clean,
        )
        self._send(to_release)
        if kept and model not in self._timers:
            self._schedule(model, held)

    def take_releases(self, model: str, handle: Any) -> list[tuple[str, int]]:
        """The held leases that ride with a call to `handle` (the caller must send them)."""
        held = self._held.get(model)
        return releases(held.take_all(handle)) if held is not None else []

    def joined_queue(self, model: str) -> None:
        """A request of ours waits for this model: give back what is held, hold nothing."""
        self._send(self._leases(model).joined_queue(time.monotonic()))

    def left_queue(self, model: str) -> None:
        self._leases(model).left_queue(time.monotonic())

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

    def forget(self, model: str, handle: Any = None) -> None:
        if handle is None or self._handles.get(model) is handle:
            self._handles.pop(model, None)

    async def call(self, ref: Any) -> Any:
        """Await an actor call; its typed error comes back as itself."""
        try:
            return await ref
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, ProxifierError | ValueError):
                raise error.cause from None
            raise

    def fire(self, ref: Any) -> None:
        """Send a call without waiting for it (release), but still observe its outcome."""

        async def observe() -> None:
            with contextlib.suppress(Exception):
                await ref

        task = asyncio.get_running_loop().create_task(observe())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _by_handle(entries: list[HeldLease]) -> list[tuple[Any, list[HeldLease]]]:
    """Held leases grouped by the actor they go back to (handles are not hashable by value)."""
    groups: dict[int, tuple[Any, list[HeldLease]]] = {}
    for entry in entries:
        groups.setdefault(id(entry.handle), (entry.handle, []))[1].append(entry)
    return list(groups.values())
