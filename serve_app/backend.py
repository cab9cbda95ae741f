"""What an ingress replica knows of the cluster (`Cluster`): the controller, a short-lived copy of
the config, cached model actor handles and the rate limiter (DESIGN §3: step 2). It holds no
request's slot and knows no request's path (serve_app.admit and serve_app.relay do).

All state that matters lives in actors, so any number of replicas can run side by side.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import ray

from actors.controller import get_controller
from actors.rate_limiter import get_or_create_rate_limiter
from actors.ray_glue import Background, call, from_gcs
from proxifier.auth import ADMIN, Caller, may_use_model, models_for
from proxifier.config import AuthConfig, ModelsConfig
from proxifier.errors import ActorGone, ModelNotFound, ModelRetired, ProxifierError, Unavailable
from serve_app.call import Owned
from serve_app.route import ReplicaView, Snapshot, choose, route

CONFIG_TTL = 1.0  # seconds a replica trusts its copy of the config (reloads show up this fast)
CONFIG_STALE = 2.0  # ... and uses it while a fresh one comes (never longer: revoked keys)
CONTROLLER_WAIT = 5.0  # seconds a config refresh waits for the controller before going on without
ATTEMPTS = 3  # a retired or dead model actor is replaced this many times per request
LOST_KEPT = 1024  # instances whose lost signal a replica keeps (actor id -> future)
# seconds a replica list is used before it is asked again (in the background: a request
# never waits for it but the first, and that one a second at most)
REPLICAS_TTL = 1.0
REPLICAS_WAIT = 1.0
# seconds a model actor may take to answer a request for a slot before this replica asks the
# controller whether its host can be reached (a report costs one connection attempt there)
ACTOR_ANSWER = 5.0
# seconds past a request's deadline (queue_timeout) the ingress waits for the actor that keeps
# it (the controller, a model actor) to say so itself, before it ends the wait on its own
DEADLINE_GRACE = 5.0


def time_left(deadline: float) -> float:
    """Seconds until a wait for the request with this deadline (wall clock) ends here even
    if the actor that should end it never answers (its loop stuck, its host cut off)."""
    return max(0.0, deadline + DEADLINE_GRACE - time.time())


def actor_key(handle: Any) -> Any:
    """The same key for every handle of one actor (a test's stand-in: itself)."""
    actor_id = getattr(handle, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else id(handle)


class Cluster:
    def __init__(self, controller: Any = None) -> None:
        self._controller = controller
        self._rate_limiter: Any = None
        self._limiter_lookup: asyncio.Future[Any] | None = None
        self._config: ModelsConfig | None = None
        self._auth: tuple[int, AuthConfig] | None = None
        self._fetched = 0.0
        self._refreshing: asyncio.Future[None] | None = None
        self._handles: dict[str, Any] = {}
        self._moved: dict[str, str] = {}  # model -> actor id seen retired or dead, to report
        # actor -> set once the controller confirms it cannot be reached (`unreachable`)
        self._lost: dict[Any, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._background = Background()
        # model -> (when fetched, its replicas as the controller last said), and the requests
        # this replica has on each now (the router counts them as load at once: no herd onto
        # the one that looked emptiest a second ago)
        self._replicas: dict[str, tuple[float, Snapshot]] = {}
        self._replica_lookups: dict[str, asyncio.Future[None]] = {}
        self._routed: dict[str, collections.Counter[str]] = {}
        self._replica_handles: dict[str, dict[Any, Any]] = {}  # model -> actor key -> handle
        self._routed_then: dict[str, dict[str, int]] = {}  # ... as it was when last fetched

    @property
    def controller(self) -> Any:
        if self._controller is None:
            self._controller = get_controller()
        return self._controller

    async def controller_now(self) -> Any:
        """The controller's handle, looked up (by name, in the GCS) off the event loop."""
        if self._controller is None:
            self._controller = await from_gcs(get_controller, CONTROLLER_WAIT)
        return self._controller

    async def rate_limiter(self) -> Any:
        """The cluster's rate limiter, looked up (or created) once, off the loop: requests
        that arrive meanwhile share that one lookup."""
        if self._rate_limiter is None:
            if self._limiter_lookup is None or self._limiter_lookup.done():
                self._limiter_lookup = asyncio.ensure_future(
                    from_gcs(get_or_create_rate_limiter, CONTROLLER_WAIT)
                )
            self._rate_limiter = await asyncio.shield(self._limiter_lookup)
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

    def config_changed(self) -> None:
        """A reload or restore went through this replica: its next request reads the config
        afresh, so a model just added answers at once here (others see it within CONFIG_TTL)."""
        self._fetched = 0.0

    async def _refresh(self) -> None:
        async with self._lock:
            if self._config is not None and time.monotonic() - self._fetched <= CONFIG_TTL:
                return  # another caller just did
            try:
                controller = await self.controller_now()
                self._config, self._auth = await asyncio.wait_for(
                    asyncio.gather(
                        self.call(controller.get_config.remote()),
                        self.call(controller.get_auth.remote()),
                    ),
                    CONTROLLER_WAIT,
                )
            except (ray.exceptions.RayError, ProxifierError, TimeoutError, ValueError) as error:
                if isinstance(error, ActorGone | ray.exceptions.RayActorError | ValueError):
                    # Gone for good (one Ray restarts keeps its id, and this handle works
                    # again): the next refresh looks the name up. A slow answer, or the GCS
                    # away, keeps the handle: a lookup then would only block.
                    self._controller = None
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
        """The configured model a name or alias means, if the caller's key may use it; else
        404, listing the models the key may use. A model outside the key's allow-list is the
        same 404 as an unknown name, word for word: the answer tells no key which other
        models exist."""
        config = await self.config()
        model = config.resolve_name(name)
        if model is None or (caller is not None and not may_use_model(caller, model)):
            visible = models_for(caller, config.models)
            raise ModelNotFound.named(name, visible)
        return model

    async def find(self, name: str, caller: Caller | None) -> tuple[str, Snapshot]:
        """The model `name` means for this caller (as `resolve`), and the instances of it this
        replica knows, for serve_app.route to choose from."""
        model = await self.resolve(name, caller)
        return model, await self.replicas_of(model)

    async def replicas_of(self, model: str) -> Snapshot:
        """The model's replicas with their load, as the controller said at most REPLICAS_TTL
        s ago; refreshed in the background, so only a first request waits (REPLICAS_WAIT at
        most). None known: the instance this replica has cached, if any."""
        entry = self._replicas.get(model)
        if entry is None or time.monotonic() - entry[0] > REPLICAS_TTL:
            lookup = self._replica_lookup(model)
            if entry is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(lookup), REPLICAS_WAIT)
                entry = self._replicas.get(model)
        return (entry[1] if entry else ()) or self.snapshot(model)

    def _replica_lookup(self, model: str) -> asyncio.Future[None]:
        """The controller asked for the model's replicas: the lookup under way, or a new one."""
        lookup = self._replica_lookups.get(model)
        if lookup is None or lookup.done():
            lookup = asyncio.ensure_future(self._fetch_replicas(model))
            lookup.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._replica_lookups[model] = lookup
        return lookup

    async def _fetch_replicas(self, model: str) -> None:
        controller = await self.controller_now()
        found = await self.call(controller.replicas.remote(model), CONTROLLER_WAIT)
        # One handle object per actor: held slots are matched to a replica by identity
        # (proxifier.lease_reuse), so a replica keeps the object this replica already uses.
        known = self._replica_handles.get(model, {})
        cached = self._handles.get(model)
        if cached is not None:
            known = {**known, actor_key(cached): cached}
        handles = {}
        views = []
        for r in found:
            key = actor_key(r["handle"])
            handles[key] = known.get(key, r["handle"])
            views.append(
                ReplicaView(
                    handles[key], r["name"], r["state"], r["in_use"], r["queued"], r["slots"]
                )
            )
        self._replica_handles[model] = handles
        self._replicas[model] = (time.monotonic(), tuple(views))
        self._routed_then[model] = dict(self._routed.get(model, {}))

    async def reroute(self, model: str, owned: Owned) -> Any:
        """A new choice for a request a replica sent on (the controller saw free slots
        elsewhere): the replicas' load read afresh, not the snapshot that sent it there."""
        owned.done()  # off the count of the replica it leaves
        owned.done = lambda: None
        lookup = self._replica_lookup(model)  # one for every request sent on at once
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(lookup), REPLICAS_WAIT)
        entry = self._replicas.get(model)
        return self.pick(model, entry[1] if entry else (), owned)

    def replica_count(self, model: str) -> int:
        """How many replicas of the model this replica last heard of (0: none known)."""
        entry = self._replicas.get(model)
        return len(entry[1]) if entry else 0

    def pick(self, model: str, snapshot: Snapshot, owned: Owned | None = None) -> Any:
        """serve_app.route's choice among the snapshot. A replica's load is the requests this
        ingress replica has on it now (known at once) plus what the replica reported beyond
        those it had then (other ingress replicas': up to a second old); `owned`: the
        request, whose end takes it off."""
        if len(snapshot) <= 1:
            return route(snapshot)
        local = self._routed.setdefault(model, collections.Counter())
        # Others' load: what the replica reported beyond what this one had on it then.
        then = self._routed_then.get(model, {})
        seen = tuple(
            replace(
                v,
                in_use=local[v.name] + max(0, v.in_use + v.queued - then.get(v.name, 0)),
                queued=0,
            )
            for v in snapshot
        )
        view = choose(seen)
        if view is None:
            return None
        if owned is not None:
            local[view.name] += 1

            def done() -> None:
                local[view.name] -= 1

            owned.done = done
        return view.handle

    async def visible_models(self, caller: Caller | None) -> list[str] | None:
        """The models the caller's key may use; None when it may use every model."""
        if caller is None or caller.models is None or ADMIN in caller.permissions:
            return None
        config = await self.config()
        return sorted(models_for(caller, config.models))

    async def on_model(
        self,
        model: str,
        deadline: float,
        call: Callable[[Any], Awaitable[Any]],
        got_lease: Callable[[Any, dict[str, Any]], None] | None = None,
        got_place: Callable[[Any], None] | None = None,
        chosen: Any = None,
    ) -> tuple[Any, Any]:
        """Run `call(handle)` on the model's actor (`chosen`, the instance serve_app.route
        picked; else the one this replica knows, else the controller's); when the actor is
        retiring or gone, ask the controller for the current one and try again. Returns
        (handle, result).
        `got_lease(handle, lease)` runs as soon as an answer with a lease arrives, even when
        the caller was cancelled meanwhile (its client went away): the slot is never lost;
        `got_place(handle)` likewise when the answer is a place in the queue."""
        last_error: Exception | None = None
        for _ in range(ATTEMPTS):
            handle = chosen if chosen is not None else self._handles.get(model)
            if handle is None:
                # An actor that retired or died is named, so the controller checks it and
                # places a fresh one rather than handing the same one out again.
                moved = self._moved.pop(model, None)
                ref = (await self.controller_now()).get_model.remote(model, deadline, moved)
                handle = await self._placed(model, ref, deadline)
                self._handles[model] = handle
            try:
                if got_lease is None:
                    return handle, await self.call(call(handle))
                return handle, await self.leased(
                    handle, call(handle), got_lease, got_place, model, deadline
                )
            except (ModelRetired, ActorGone, ray.exceptions.RayActorError) as error:
                self.forget(model, handle, moved=True)
                chosen, last_error = None, error
        raise Unavailable(
            f"model '{model}' kept moving while the request was placed ({last_error}); try again",
            retry_after=1,
        )

    async def _placed(self, model: str, ref: Any, deadline: float) -> Any:
        """The controller's answer to get_model: it keeps the request's deadline itself, and
        this one holds when the controller cannot (its loop stuck, Ray restarting it)."""
        try:
            return await asyncio.wait_for(self.call(ref), time_left(deadline))
        except TimeoutError:
            raise Unavailable(
                f"model '{model}': the controller did not answer before the request's deadline",
                retry_after=5,
            ) from None

    async def leased(
        self,
        handle: Any,
        ref: Any,
        got_lease: Callable[[Any, dict[str, Any]], None],
        got_place: Callable[[Any], None] | None,
        model: str,
        deadline: float,
    ) -> Any:
        """Await an actor call whose answer may carry a lease (`{"lease": ...}` or the lease
        itself). The answer is taken in a task of its own: a caller cancelled while it travels
        does not lose it, `got_lease` still receives it. An actor that does not answer within
        ACTOR_ANSWER s is reported (`unreachable`): one the controller cannot reach either is
        ActorGone (the request asks for a fresh instance); else the wait goes on, to the
        request's `deadline` at most."""
        answer = self.answer_of(handle, ref, got_lease, got_place)
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(answer), ACTOR_ANSWER)
        if await self.unreachable(model, handle, None):
            raise ActorGone(f"model '{model}': its instance cannot be reached", retry_after=1)
        try:
            return await asyncio.wait_for(asyncio.shield(answer), time_left(deadline))
        except TimeoutError:
            raise Unavailable(
                f"model '{model}': its instance did not answer before the request's deadline",
                retry_after=5,
            ) from None

    def answer_of(
        self,
        handle: Any,
        ref: Any,
        got_lease: Callable[[Any, dict[str, Any]], None],
        got_place: Callable[[Any], None] | None = None,
        *,
        until_lost: bool = False,
    ) -> asyncio.Future[Any]:
        """The task that takes the answer of `ref`, set up before this returns: nothing the
        caller does next (cancelled before the task ever ran) can lose a lease in it.
        Await it shielded. `until_lost`: it ends with ActorGone as soon as the controller
        confirms this replica's report that the instance cannot be reached (`unreachable`),
        so a request waiting in that instance's queue goes to a fresh one, before Ray would
        declare the host dead."""

        def take(task: asyncio.Future[Any]) -> None:
            if task.cancelled() or task.exception() is not None:
                return
            answer = task.result()
            lease = answer.get("lease", answer) if isinstance(answer, dict) else None
            if isinstance(lease, dict) and "lease_id" in lease:
                got_lease(handle, lease)
            elif got_place is not None and isinstance(answer, dict) and "queued" in answer:
                got_place(handle)

        answer = self.call(ref) if not until_lost else self._unless_lost(handle, ref)
        task = asyncio.ensure_future(answer)
        task.add_done_callback(take)
        return task

    def lost_signal(self, handle: Any, by_key: bool = False) -> asyncio.Future[None]:
        """Set once the controller confirms a report of this replica's that `handle`'s
        instance cannot be reached (`unreachable`): whatever waits on it goes elsewhere.
        Kept (set) after that, so a send that still reaches that instance later goes too;
        the oldest are dropped past LOST_KEPT."""
        key = handle if by_key else actor_key(handle)
        signal = self._lost.get(key)
        if signal is None:
            signal = self._lost[key] = asyncio.get_running_loop().create_future()
            while len(self._lost) > LOST_KEPT:
                del self._lost[next(iter(self._lost))]
        return signal

    async def _unless_lost(self, handle: Any, ref: Any) -> Any:
        lost = self.lost_signal(handle)
        answer = asyncio.ensure_future(self.call(ref))
        await asyncio.wait({answer, lost}, return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            return answer.result()
        # The answer can no longer come (the actor is killed): a late one is dropped with it.
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise ActorGone("the model's instance cannot be reached", retry_after=1)

    async def unreachable(self, model: str, handle: Any, url: str | None) -> bool:
        """Tell the controller this replica could not connect to `handle`'s llama-server at
        `url` (None: its actor did not answer). Whether it confirmed: the instance has left
        its registry, and asking for the model again places a fresh one where the head can
        reach it."""
        wait = (await self.config()).settings.upstream_connect_timeout + CONTROLLER_WAIT
        try:
            controller = await self.controller_now()
            ref = controller.instance_unreachable.remote(model, actor_key(handle), url)
            answer = await asyncio.wait_for(self.call(ref), wait)
        except (ProxifierError, ray.exceptions.RayError, TimeoutError, ValueError):
            return False  # unconfirmed: the request's own 504 stands
        dropped = list(answer["dropped"])
        for key in dropped:  # the reported instance, and any other on its host
            signal = self.lost_signal(key, by_key=True)
            if not signal.done():  # requests waiting on it or in flight there go elsewhere,
                signal.set_result(None)  # and any that still reach it later (kept set)
        for name, cached in list(self._handles.items()):
            if actor_key(cached) in dropped:
                self.forget(name, cached)
        if answer["confirmed"]:
            self.forget(model, handle)
        return bool(answer["confirmed"])

    def report_unreachable(self, model: str, handle: Any, url: str) -> None:
        """`unreachable`, for a request that cannot start over (its stream has begun)."""
        self._background.keep(asyncio.ensure_future(self.unreachable(model, handle, url)))

    def snapshot(self, model: str) -> Snapshot:
        """The instances of `model` this replica knows, for `serve_app.route` to choose from
        (one today: its load is the model actor's to weigh, in its own queue)."""
        handle = self._handles.get(model)
        return () if handle is None else (ReplicaView(handle, model),)

    def forget(self, model: str, handle: Any = None, moved: bool = False) -> None:
        """Stop using this model's cached actor (`moved`: it retired or died, which the next
        ask for the model tells the controller)."""
        if handle is not None and moved:
            self._moved[model] = actor_key(handle)
        if handle is None or self._handles.get(model) is handle:
            self._handles.pop(model, None)
        if handle is not None:
            self._replicas.pop(model, None)  # it moved: ask which replicas there are now

    async def call(self, ref: Any, within: float | None = None) -> Any:
        """Await an actor call; its typed error comes back as itself (ray_glue.call)."""
        return await call(ref, within)

    def fire(self, ref: Any) -> None:
        """Send a call without waiting for it (release), but still observe its outcome."""
        self._background.fire(ref)
