"""The registry: each model's instance (its actor handle, options, node), the instances still
stopping, the replacements loading, placement failures and the scheduler's last word per model.
It is the only writer of that map; it never decides where a model runs (that is `reconcile`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import ray

from actors.model import NAMESPACE, model_of
from actors.ray_glue import Background, call, cluster_gpus
from proxifier.config import ModelsConfig
from proxifier.errors import ProxifierError
from proxifier.placement import actor_options
from proxifier.reachability import Unreached
from proxifier.replicas import model_of as replica_model
from proxifier.scheduler import Failure

STATS_WAIT = 2.0  # seconds a pass waits for a model's facts before it counts it as starting
# seconds a view (status, a queued result) waits for a model actor: one on a frozen or cut-off
# host would otherwise hold the view until Ray declares that host dead
VIEW_WAIT = 10.0


class Registry:
    """Model name -> its actor, and what happens to an actor once it leaves: stop, drain, kill."""

    def __init__(
        self,
        event: Callable[..., Any],
        wake: Callable[[], None],
        background: Background,
    ) -> None:
        self._event = event
        self._wake = wake  # its resources are free: the reconcile pass may place waiting models
        self.background = background
        self.handles: dict[str, Any] = {}
        self.options: dict[str, dict[str, Any]] = {}
        self.placement_failures: dict[str, Failure] = {}
        # node id -> the connection to it that failed: no new model goes there (reachability)
        self.unreached: dict[str, Unreached] = {}
        self.retiring: dict[str, Any] = {}  # instances out of the registry, still stopping
        # model -> (actor, options, node id): new instances that take over once ready (reload)
        self.pending: dict[str, tuple[Any, dict[str, Any], str]] = {}
        self.nodes_of: dict[str, str] = {}  # model -> node id it was placed on
        self.last_node: dict[str, str] = {}  # ... kept after it stops: where its log is
        self.decisions: dict[str, dict[str, Any]] = {}  # the scheduler's last word per model
        self.orphans: list[tuple[str, Any]] = []
        # Finished async (respond-async) results of model actors that were stopped since.
        self.results: dict[str, dict[str, Any]] = {}
        self.evictions: dict[str, int] = {}

    # ------------------------------------------------------------------ adoption
    def adopt(self, config: ModelsConfig) -> None:
        """Take over model actors that outlived a previous controller: no second llama-server."""
        # The namespace of a detached actor is its creator's, not the one its name lives in.
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            model = model_of(name)
            if entry["namespace"] != NAMESPACE or model is None:
                continue
            with contextlib.suppress(ValueError):
                handle = ray.get_actor(name, namespace=NAMESPACE)
                of = replica_model(model, config.models)  # `model` names an instance
                if of is not None and model not in self.handles:
                    self.handles[model] = handle
                    self.options[model] = actor_options(config.models[of], cluster_gpus())
                    self._event("adopted", model=model)
                else:
                    self.orphans.append((model, handle))  # retired once the loop runs

    def retire_orphans(self) -> None:
        while self.orphans:
            self.background.keep(asyncio.create_task(self.retire(*self.orphans.pop())))

    async def check_moved(self, name: str, handle: Any, model: str) -> None:
        """A caller saw the instance `name` (of `model`) retired or dead: out of the registry
        if so, so a fresh one is placed."""
        try:
            stats = await asyncio.wait_for(handle.stats.remote(), STATS_WAIT)
        except ray.exceptions.RayActorError as error:
            if self.handles.get(name) is handle:
                self.lost(name, handle, model, error)
            return
        except TimeoutError:
            return  # alive but slow: keep it
        if stats["retired"]:
            self.unregister(name, handle)  # its stop is under way; requests need a new one

    # ------------------------------------------------------------------ in and out
    def register(self, name: str, handle: Any, options: dict[str, Any], node_id: str) -> None:
        self.handles[name] = handle
        self.options[name] = options
        self.nodes_of[name] = node_id
        self.last_node[name] = node_id
        self.placement_failures.pop(name, None)

    def unregister(self, name: str, handle: Any) -> None:
        """Out of the registry: no new request reaches this instance (it may still be
        stopping or draining, shown as "stopping" until its actor is gone)."""
        if self.handles.get(name) is handle:
            del self.handles[name]
            self.options.pop(name, None)
            self.nodes_of.pop(name, None)
            self.retiring[name] = handle

    def forget(self, name: str, handle: Any) -> None:
        self.unregister(name, handle)
        if self.retiring.get(name) is handle:
            del self.retiring[name]
        ray.kill(handle)
        self._wake()  # its resources are free: waiting models may fit now

    def lost(self, name: str, handle: Any, model: str | None, error: Exception) -> None:
        """The instance's actor died (its node lost, or killed): forget it, and say so; a
        replica's loss is the model's event too (the scaler restores the count)."""
        self.forget(name, handle)
        self._event("lost", model=name, reason=f"its actor died: {error}")
        if model is not None and model != name:
            self._event("replica_lost", model=model, replica=name, reason=f"{error}")

    def discard_pending(self, name: str, handle: Any) -> None:
        entry = self.pending.get(name)
        if entry is not None and entry[0] is handle:
            del self.pending[name]

    def explain(self, model: str, decision: str, reason: str) -> None:
        self.decisions[model] = {
            "model": model,
            "decision": decision,
            "reason": reason,
            "time": time.time(),
        }

    def count_eviction(self, reason: str) -> None:
        self.evictions[reason] = self.evictions.get(reason, 0) + 1

    # ------------------------------------------------------------------ stopping
    async def end(self, name: str, handle: Any, reason: str) -> None:
        """Stop an instance no request reaches any more (retiring, or a replacement not
        needed) and kill its actor."""
        with contextlib.suppress(ray.exceptions.RayError):
            await handle.stop.remote(reason, retire=True)
        self.forget(name, handle)

    async def stop_if_idle(self, name: str, handle: Any, reason: str) -> bool:
        """The stop handshake (DESIGN §4): the actor refuses while busy; once it accepts, it
        leaves the registry before anything else happens, so a request that races the stop
        waits for a fresh instance instead of reaching this one."""
        try:
            answer = await handle.retire.remote(reason)
        except ray.exceptions.RayActorError:
            answer = {"accepted": True}
        ours = self.handles.get(name) is handle or self.retiring.get(name) is handle
        if not answer["accepted"] or not ours:
            return False
        self.unregister(name, handle)  # (a request that saw it retired may have done so)
        with contextlib.suppress(ray.exceptions.RayActorError):
            await handle.stop.remote(reason)
        await self.dispose(name, handle)
        return True

    async def stop(self, name: str, reason: str) -> None:
        handle = self.handles.get(name)
        if handle is None:
            return
        self.unregister(name, handle)
        with contextlib.suppress(ray.exceptions.RayActorError):
            await handle.stop.remote(reason, retire=True)
        await self.dispose(name, handle)

    async def retire(self, name: str, handle: Any, timeout: float = 60.0) -> None:
        """Drain a model that left the config (or moves to a new actor), then kill it."""
        with contextlib.suppress(ray.exceptions.RayActorError):
            await handle.drain.remote("removed from the configuration", timeout)
        await self.dispose(name, handle)
        self._event("removed", model=name)

    async def scale_in(self, name: str, handle: Any, timeout: float) -> None:
        """A replica out of the registry (scale-in): it finishes what it has, then stops."""
        with contextlib.suppress(ray.exceptions.RayActorError):
            await handle.drain.remote("scaled in", timeout)
        await self.dispose(name, handle)

    async def dispose(self, name: str, handle: Any) -> None:
        """Keep the actor's finished async results, then kill it and forget it."""
        with contextlib.suppress(ray.exceptions.RayActorError):
            self.results.update(await handle.take_results.remote())
        self.forget(name, handle)

    async def shutdown(self) -> None:
        """Stop every instance: registered, retiring and replacements still loading."""
        pending = [(f"{n}@next", entry[0]) for n, entry in self.pending.items()]
        self.pending.clear()
        await asyncio.gather(
            *(self.stop(n, "shutdown") for n in list(self.handles)),
            *(self.end(n, h, "shutdown") for n, h in [*self.retiring.items(), *pending]),
        )

    # ------------------------------------------------------------------ replacing
    async def take_over(self, name: str, old: Any, new: Any) -> None:
        try:
            await call(new.start.remote(force=True))  # until its llama-server is ready
        except (ProxifierError, ray.exceptions.RayError) as error:
            # The new config does not start; it is the one in force, so the model fails.
            self.discard_pending(name, new)
            await self.end(f"{name}@next", new, "failed to start after a reload")
            message = error.message if isinstance(error, ProxifierError) else str(error)
            self.placement_failures[name] = Failure(time.time(), message)
            if self.handles.get(name) is old:
                self.unregister(name, old)
                await self.retire(name, old)
            return
        entry = self.pending.get(name)
        if entry is None or entry[0] is not new or self.handles.get(name) is not old:
            # Overtaken by a stop or another reload meanwhile: this instance is not needed.
            self.discard_pending(name, new)
            await self.end(f"{name}@next", new, "replaced before it took over")
            return
        _, options, node_id = self.pending.pop(name)
        self.unregister(name, old)
        self.register(name, new, options, node_id)
        self._event("replaced", model=name, node_id=node_id)
        self.explain(name, "placed", f"placed on node {node_id} (replaced after a reload)")
        await self.retire(name, old)

    async def drop_failed(self, name: str) -> None:
        """A failed model holds nothing (DESIGN §3): its reason and cooldown stay here, its
        actor (and the GPU it reserved) goes. The next request after the cooldown, or an
        admin start, places it afresh."""
        handle = self.handles.get(name)
        if handle is None:
            return
        try:
            stats = await handle.stats.remote()
        except ray.exceptions.RayActorError:
            return  # gone already: upkeep's replace_lost deals with it
        if stats["state"] != "failed" or self.handles.get(name) is not handle:
            return
        reason = f"model '{name}' failed: {stats['last_error']}"
        self.placement_failures[name] = Failure(time.time(), reason)
        self.explain(name, "failed", reason)
        self.unregister(name, handle)
        await self.dispose(name, handle)

    # ------------------------------------------------------------------ async results
    def job_result(self, request_id: str) -> dict[str, Any]:
        """A finished async result kept after its model stopped, or status unknown."""
        return self.results.get(request_id) or {"status": "unknown", "request_id": request_id}

    async def find_result(self, request_id: str) -> dict[str, Any]:
        """An async request's state, wherever it is: kept here, or with a running model."""
        if request_id in self.results:
            return self.results[request_id]
        actors = [*self.handles.items(), *self.retiring.items()]
        answers = await asyncio.gather(
            *(asyncio.wait_for(h.result.remote(request_id), VIEW_WAIT) for _, h in actors),
            return_exceptions=True,
        )
        for (name, _), answer in zip(actors, answers, strict=True):
            if isinstance(answer, dict) and answer["status"] != "unknown":
                return {**answer, "model": name}
        if request_id in self.results:  # taken from an actor that stopped meanwhile
            return self.results[request_id]
        return {"status": "unknown", "request_id": request_id}

    def expire_results(self, ttl: float) -> None:
        for request_id, result in list(self.results.items()):
            if time.time() - (result.get("done_at") or 0) > ttl:
                del self.results[request_id]
