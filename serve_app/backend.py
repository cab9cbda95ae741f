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

CONFIG_TTL = 1.0  # seconds a replica trusts its copy of the config (reloads show up this fast)
ATTEMPTS = 3  # a retired or dead model actor is replaced this many times per request
# How long a release may wait to ride along with the next request's enqueue (one actor call
# instead of two per request); only releases of leases granted without queueing wait at all.
RELEASE_DELAY = 0.01


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
        # model -> (actor handle, lease ids to give back, timer that sends them alone)
        self._releases: dict[str, tuple[Any, list[str], asyncio.TimerHandle]] = {}

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

    def release(self, model: str, handle: Any, lease_id: str, *, defer: bool) -> None:
        """Give a lease back: at once, or (`defer`) with the model's next enqueue, or alone
        after RELEASE_DELAY when no request comes. A lease granted after queueing is never
        deferred: others were waiting for that slot."""
        pending = self._releases.get(model)
        if pending is not None and pending[0] is not handle:
            self.flush_releases(model)
            pending = None
        if not defer:
            self.fire(handle.release.remote(lease_id))
        elif pending is None:
            timer = asyncio.get_running_loop().call_later(RELEASE_DELAY, self.flush_releases, model)
            self._releases[model] = (handle, [lease_id], timer)
        else:
            pending[1].append(lease_id)

    def take_releases(self, model: str, handle: Any) -> list[str]:
        """The deferred releases that ride with a call to `handle` (it must send them)."""
        pending = self._releases.get(model)
        if pending is None or pending[0] is not handle:
            return []
        del self._releases[model]
        pending[2].cancel()
        return pending[1]

    def flush_releases(self, model: str) -> None:
        pending = self._releases.pop(model, None)
        if pending is not None:
            handle, lease_ids, timer = pending
            timer.cancel()
            self.fire(handle.release_many.remote(lease_ids))

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
