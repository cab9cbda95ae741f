"""The controller's actor facade: one detached actor per cluster (DESIGN §3) whose remote methods
the ingress, the CLI and the tests call; each delegates to a part. It places nothing and holds
no model state itself (DESIGN §12).

The parts: `registry` (model -> instance), `reconcile` (facts -> scheduler -> apply), `facts`
(nodes, GPUs, GGUF, calibration), `upkeep` (idle stops, preload, spares), `watchers` (auth file,
Serve applications), `configuration` (the config in force, auth keys, reloads, backups, over
`config_files`), `views` (status, explain, listings), `events`.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ray

from actors.controller import views
from actors.controller.configuration import Configuration
from actors.controller.events import CONTROLLER_NAME, EventFeed
from actors.controller.facts import Facts
from actors.controller.reachability import Reach
from actors.controller.reconcile import Reconciler, not_found_message
from actors.controller.registry import VIEW_WAIT, Registry
from actors.controller.upkeep import Spares, Upkeep, preloaded
from actors.controller.views import among, by_priority
from actors.controller.watchers import ServeWatcher, watch_auth_file
from actors.log_reader import log_lines_on
from actors.model import NAMESPACE, cluster_singleton_options
from actors.ray_glue import Background, call, nodes_now
from proxifier.config import AuthConfig, ModelsConfig
from proxifier.errors import InvalidRequest, ModelNotFound, NotFound, Refused, Unavailable
from proxifier.metrics import LOAD_BUCKETS, Histogram
from proxifier.planning import group_members, group_stop_plan, startup_order
from proxifier.replicas import model_of as replica_model

__all__ = ["CONTROLLER_NAME", "Controller", "create_controller", "get_controller"]

ROUTER_WAIT = 1.0  # seconds a replica's load may take to come for an ingress's router
DROPPED_KEPT = 256  # instances dropped as unreachable remembered (actor id -> its host)
MAX_SCALE = 64  # replicas one `scale` may ask for: a typo of 1000 should not fill a cluster
METRICS_WAIT = 2.5  # seconds /metrics waits for each model actor before it counts as unreachable


class Controller:
    """Ray actor (created by `create_controller`); every public method is a remote call."""

    async def __init__(self, models_path: str, auth_path: str | None = None) -> None:
        # async: Ray runs it on the actor's event loop, so the loops start here, also when
        # Ray restarts a controller that died (DESIGN §11).
        self.feed = EventFeed()
        # Instances dropped as unreachable, with their host ("": only their port was cut):
        # a later report of one names its host's others too (another ingress replica's).
        self._dropped: dict[str, str] = {}
        self.background = Background()
        self.spares = Spares(self.background)
        self.configuration = Configuration(
            Path(models_path).resolve(),
            Path(auth_path).resolve() if auth_path else None,
            self._event,
            # the models with an instance now (any replica of theirs)
            lambda: {replica_model(n, self.config.models) or n for n in self.registry.handles},
            lambda diff, plan, new: self.reconcile.apply(diff, plan, new),
        )
        wake = asyncio.Event()
        self.registry = Registry(self._event, wake.set, self.background)
        self.facts = Facts(
            lambda: self.config, self.registry, self._event, wake.set, self.background
        )
        self.reconcile = Reconciler(
            lambda: self.config,
            self.registry,
            self.facts,
            self._event,
            wake,
            self.background,
            self.spares.taken,
        )
        self.reach = Reach(
            self.registry.unreached,
            lambda: self.config.settings.upstream_connect_timeout,
            self.reconcile.ray_alive_nodes,
            self._event,
            wake.set,
        )
        self.upkeep = Upkeep(
            lambda: self.config,
            self.registry,
            self.facts,
            self.spares,
            self.reconcile.want,
            self._event,
            self.background,
        )
        self.viewed = views.Viewed(
            lambda: self.config,
            self.registry,
            self.facts,
            self.reconcile.wants,
            self.reconcile.scales,
        )
        self.serve_watcher = ServeWatcher(self.shutdown, self._event)
        self.replica_metrics: dict[str, tuple[float, dict[str, Any]]] = {}
        self.load_seconds: dict[str, Histogram] = {}
        for name in self.config.models:  # read now, so a first status finds them
            path = self.config.model_file(name)
            if path is not None and path.is_file():
                self.background.keep(asyncio.ensure_future(self.facts.warm(path)))
        self.registry.adopt(self.config)
        self._ensure_upkeep()
        self.reconcile.ensure_running()

    def _ensure_upkeep(self) -> None:
        if self.upkeep.ensure():
            self.background.keep(
                asyncio.create_task(
                    watch_auth_file(
                        self.configuration.files,
                        lambda: self.config,
                        lambda: self.configuration.auth,
                        self.configuration.set_auth,
                        self.configuration.accept,
                        self._event,
                    )
                )
            )
        self.registry.retire_orphans()

    async def boot(self) -> list[dict[str, Any]]:
        """Start auto_start and preload models, highest priority first, each placed before the
        next is created; their loads overlap. Safe to call again (running models are kept)."""
        self._ensure_upkeep()
        # No spare worker yet: the boot's own workers are starting (a spare comes 5 s after
        # a model loaded, or with the first upkeep).
        return await self.reconcile.start_in_order(startup_order(self.config.models))

    # ------------------------------------------------------------------ models
    async def get_model(
        self, name: str, deadline: float | None = None, moved: str | None = None
    ) -> Any:
        """The actor handle for a model name or alias, placing (and so starting) it if needed.
        `moved`: the id of an actor of this model a caller saw retired or dead; if it is still
        the registered one, it leaves the registry now (a fresh one is placed) rather than
        when its stop completes or the next upkeep finds it dead."""
        self._ensure_upkeep()
        model = self._resolve(name)
        if moved is not None:
            found = self._instance_with(model, moved)
            if found is not None:
                await self.registry.check_moved(*found, model)
        return await self.reconcile.ensure_actor(model, deadline)

    def _instance_with(self, model: str, actor_id: str) -> tuple[str, Any] | None:
        """The registered instance of the model whose actor this is: (its name, its handle)."""
        for instance in self.reconcile.instances(model):
            handle = self.registry.handles[instance]
            if handle._actor_id.hex() == actor_id:
                return instance, handle
        return None

    async def replicas(self, name: str) -> list[dict[str, Any]]:
        """The model's registered replicas for an ingress's router (serve_app.route): each
        one's name, handle, state and load as its actor says (none that does not answer
        within a second: a router must not wait for a stuck one)."""
        model = self._resolve(name)
        names = self.reconcile.instances(model)
        handles = [self.registry.handles[n] for n in names]
        stats = await asyncio.gather(
            *(asyncio.wait_for(h.stats.remote(), ROUTER_WAIT) for h in handles),
            return_exceptions=True,
        )
        return [
            {
                "name": instance,
                "handle": handle,
                "state": stat["state"],
                "in_use": stat["in_flight"],
                "queued": stat["queue_depth"],
                "slots": stat["slots"],
            }
            for instance, handle, stat in zip(names, handles, stats, strict=True)
            if isinstance(stat, dict)
        ]

    async def scale(self, name: str, replicas: int) -> dict[str, Any]:
        """`POST /admin/models/{m}/scale`: run this many replicas from now on (until the
        model's entry in models.yaml changes); the scaler applies it at its next pass."""
        model = self._resolve(name)
        if not 1 <= replicas <= MAX_SCALE:
            raise InvalidRequest(f"replicas must be 1 to {MAX_SCALE}, not {replicas}")
        config = self.config.models[model]
        if config.port is not None and replicas > 1:
            raise InvalidRequest(
                f"model '{model}' has a fixed port ({config.port}): two replicas on one node"
                " cannot share it; leave port out of its config to run more than one"
            )
        was = len(self.reconcile.instances(model))
        self.reconcile.fixed[model] = replicas
        self.reconcile.trends.pop(model, None)
        self._event("scale_set", model=model, replicas=replicas)
        if was == 0:
            self.reconcile.want(model, keep=True)  # it starts; the scaler adds the rest
        self.reconcile.ensure_running()
        return {"model": model, "replicas": replicas, "running": was}

    def resolve(self, name: str) -> str:
        return self._resolve(name)

    async def instance_unreachable(
        self, name: str, actor_id: str, url: str | None
    ) -> dict[str, Any]:
        """The ingress could not connect to this model's llama-server at `url` within
        upstream_connect_timeout (None: its actor did not answer a request for a slot).
        Tried again from here, at that address or at the raylet of the actor's node: if it
        fails too, the instance leaves the registry (its actor is killed; the kill lands
        when the host answers again, or Ray ends it with the node) and its node takes no new
        model while it stays unreachable. Returns `confirmed` (the caller should ask for the
        model again: a fresh instance, elsewhere) and `dropped`, the actor ids of the
        instances dropped as unreachable (every one on the host when the whole host is cut
        off: the caller's requests in flight on any of them go elsewhere)."""
        found = self._instance_with(name, actor_id)
        if found is None:  # replaced already: the next ask finds the one there is now
            if actor_id not in self._dropped:  # e.g. draining: its requests in flight finish
                return {"confirmed": True, "dropped": []}
            node = self._dropped[actor_id]  # and its host's others, if it was cut off
            others = [a for a, n in self._dropped.items() if n == node != "" and a != actor_id]
            return {"confirmed": True, "dropped": [actor_id, *others]}
        name, handle = found
        node_id = self.registry.nodes_of.get(name)
        if node_id is None:
            return {"confirmed": False, "dropped": []}  # nowhere known to try: Ray decides
        llama = None
        if url is not None:
            where = urlsplit(url)
            if where.hostname is None or where.port is None:
                raise ValueError(f"not a llama-server URL: {url!r}")
            llama = (where.hostname, where.port)
        view = next((v for v in await nodes_now() if v.node_id == node_id and v.alive), None)
        raylet = (view.address, view.manager_port) if view and view.manager_port else None
        away = await self.reach.judge(node_id, llama, raylet)
        if away is None:
            return {"confirmed": False, "dropped": []}
        # The llama-server's port alone may be cut (a firewall): only this instance goes.
        # The host cut off: every instance there goes with it.
        dropped = [actor_id]
        for model, lost in list(self.registry.handles.items()):
            there = away.whole_host and self.registry.nodes_of.get(model) == node_id
            if lost is not handle and there:
                dropped.append(lost._actor_id.hex())
            if lost is handle or there:
                self._dropped[lost._actor_id.hex()] = node_id if there else ""
                while len(self._dropped) > DROPPED_KEPT:
                    del self._dropped[next(iter(self._dropped))]
                self.registry.forget(model, lost)
                self.registry.explain(model, "unreachable", away.reason)
                self._event("unreachable", model=model, node_id=node_id, reason=away.reason)
                of = replica_model(model, self.config.models)
                if of is not None and of != model:  # the scaler restores the count
                    self._event("replica_lost", model=of, replica=model, reason=away.reason)
        return {"confirmed": True, "dropped": dropped}

    async def start_model(self, name: str, wait: bool = True) -> dict[str, Any]:
        """An admin start: place the model, start it (skipping a failure cooldown), and wait
        until it is ready; without `wait`, only until its start is under way."""
        model = self._resolve(name)
        deadline = time.time() + self.config.settings.placement_timeout
        self.registry.placement_failures.pop(model, None)  # an admin start skips a cooldown
        handle = await self.reconcile.ensure_actor(model, deadline)
        if wait:
            return await call(handle.start.remote(force=True))
        await call(handle.launch.remote(force=True))
        return await call(handle.stats.remote())

    async def stop_model(self, name: str, force: bool = False) -> dict[str, Any]:
        """An admin stop. A preloaded model only stops with `force`."""
        model = self._resolve(name)
        if self.config.models[model].preload and not force:
            raise Refused(
                f"model '{model}' is preloaded and stays running; stop it with force=true "
                "(or set preload: false)"
            )
        await self._stop_model(model, "stopped by an admin")
        return {"model": model, "state": "stopped"}

    async def _stop_model(self, model: str, reason: str) -> None:
        """Stop every replica of the model (and ask for none: the scaler starts over once a
        request starts it again)."""
        self.reconcile.drop_replicas(model)
        names = self.reconcile.instances(model) or [model]
        await asyncio.gather(*(self.registry.stop(n, reason) for n in names))

    async def model_status(self, name: str) -> dict[str, Any]:
        return await self._status_of(self._resolve(name))

    async def status(self, within: float = VIEW_WAIT) -> list[dict[str, Any]]:
        """Every model's status; `within`: how long each model actor may take to answer
        before it is shown `unreachable` (/health asks for less than its own deadline)."""
        return await views.statuses(by_priority(self.config), self.viewed, within)

    async def model_logs(self, name: str, lines: int = 100) -> list[str]:
        """The last lines of the model's llama-server log: from its actor while it has one,
        else from the file on the node it last ran on (a failed start's reason is there)."""
        model = self._resolve(name)
        handle = self.reconcile.any_instance(model)  # its first replica (a roll renames them)
        if handle is not None:
            return await call(handle.logs.remote(lines), VIEW_WAIT)
        try:
            here = ray.get_runtime_context().get_node_id()  # the head: a one-host cluster's
            ref = log_lines_on(self.registry.last_node.get(model, here), model, lines)
            return await call(ref, VIEW_WAIT)
        except ray.exceptions.RayError as error:  # that node is gone, and its files with it
            raise Unavailable(
                f"model '{model}' last ran on a node that is gone ({type(error).__name__});"
                " its log was there",
                retry_after=None,
            ) from None

    async def queue_status(self, name: str | None = None) -> list[dict[str, Any]]:
        handles = self.registry.handles
        names = self.reconcile.instances(self._resolve(name)) if name else sorted(handles)
        return await views.queue_status(handles, names or [self._resolve(name or "")])

    async def clear_queue(self, name: str) -> dict[str, Any]:
        model = self._resolve(name)
        handles = [self.registry.handles[n] for n in self.reconcile.instances(model)]
        counts = await asyncio.gather(*(call(h.clear_queue.remote(), VIEW_WAIT) for h in handles))
        return {"model": model, "cleared": sum(counts)}

    async def explain(self, name: str) -> dict[str, Any]:
        """The scheduler's last decision about a model and why (placed where, waiting for
        what, failed because), with where it runs now."""
        return await views.explain(self._resolve(name), self.viewed)

    # ------------------------------------------------------------------ groups
    # `only`: the models the caller's API key may use (None: every model). Bulk operations
    # touch, and report, only those; a group none of whose members it may see does not exist.
    async def start_group(self, group: str, only: list[str] | None = None) -> dict[str, Any]:
        members = among(group_members(self.config.models, group), only)
        if not members:
            raise NotFound(f"no model is in resource group '{group}'; groups: {self._groups(only)}")
        return {"group": group, "results": await self.reconcile.start_in_order(members)}

    async def stop_group(self, group: str, only: list[str] | None = None) -> dict[str, Any]:
        to_stop, kept = group_stop_plan(self.config.models, group)
        to_stop, kept = among(to_stop, only), among(kept, only)
        if not to_stop and not kept:
            raise NotFound(f"no model is in resource group '{group}'; groups: {self._groups(only)}")
        await asyncio.gather(*(self._stop_model(n, f"group '{group}' stopped") for n in to_stop))
        return {"group": group, "stopped": to_stop, "kept_preloaded": kept}

    async def start_all(self, only: list[str] | None = None) -> dict[str, Any]:
        names = among(by_priority(self.config), only)
        return {"results": await self.reconcile.start_in_order(names)}

    async def stop_all(self, only: list[str] | None = None) -> dict[str, Any]:
        names = among([n for n, m in self.config.models.items() if not m.preload], only)
        await asyncio.gather(*(self._stop_model(n, "stop-all") for n in names))
        return {"stopped": sorted(names), "kept_preloaded": among(preloaded(self.config), only)}

    async def groups_status(self, only: list[str] | None = None) -> dict[str, Any]:
        statuses = {s["name"]: s for s in await self.status()}
        return views.groups_view(self.config, statuses, self._groups(only), only)

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> ModelsConfig:
        return self.configuration.config

    async def reload_config(self) -> dict[str, Any]:
        """Re-read models.yaml and auth.yaml; apply the difference. A bad file changes nothing."""
        return await self.configuration.reload_config()

    async def reload_model(self, name: str) -> dict[str, Any]:
        """Re-read models.yaml and apply only what changed for one model."""
        return await self.configuration.reload_model(name)

    def validate_config(self) -> dict[str, Any]:
        """Validate the files on disk without applying them."""
        return self.configuration.validate_config()

    def get_auth(self) -> tuple[int, AuthConfig]:
        return self.configuration.auth_version, self.configuration.auth

    def config_files(self) -> dict[str, Any]:
        """The config files as they are on disk, key material in auth.yaml redacted."""
        return self.configuration.config_files()

    def backup_diff(self, backup_id: str) -> dict[str, Any]:
        """What restoring a backup would change, without changing anything."""
        return self.configuration.backup_diff(backup_id)

    def get_config(self) -> ModelsConfig:
        return self.config

    def config_paths(self) -> dict[str, str | None]:
        return self.configuration.config_paths()

    # ------------------------------------------------------------------ backups
    def backup(self, description: str = "") -> dict[str, Any]:
        """Copy the config files into backups/<id>/ with a description; keep the last 20."""
        return self.configuration.backup(description)

    def list_backups(self) -> list[dict[str, Any]]:
        return self.configuration.list_backups()

    async def restore(self, backup_id: str) -> dict[str, Any]:
        """Put a backup's files in place (both validated first, modes kept) and apply them."""
        return await self.configuration.restore(backup_id)

    # ------------------------------------------------------------------ events and cluster
    def job_result(self, request_id: str) -> dict[str, Any]:
        """A finished async result kept after its model stopped, or status unknown."""
        return self.registry.job_result(request_id)

    async def find_result(self, request_id: str) -> dict[str, Any]:
        """An async request's state, wherever it is: kept here, or with a running model."""
        return await self.registry.find_result(request_id)

    async def models_list(self) -> list[dict[str, Any]]:
        """/v1/models: every configured model with its state, priority, group and what it can
        be asked to do."""
        statuses = await self.status()
        found = await asyncio.gather(
            *(self.facts.fill_in_middle(s["name"]) for s in statuses), return_exceptions=True
        )
        # A header that cannot be read costs that model its infill capability, nothing more.
        fim = [None if isinstance(f, BaseException) else f for f in found]
        return views.models_view(self.config, self.configuration.registered_at, statuses, fim)

    def report_metrics(self, replica_id: str, snapshot: dict[str, Any]) -> None:
        """Ingress replicas push their cumulative request counters here every few seconds."""
        self.replica_metrics[replica_id] = (time.time(), snapshot)

    async def metrics_data(self) -> dict[str, Any]:
        return {
            # Less than a scrape's timeout (10 s by default) even with a host frozen.
            "statuses": await self.status(within=METRICS_WAIT),
            "replicas": [snapshot for _, snapshot in self.replica_metrics.values()],
            "load_seconds": {m: h.to_dict() for m, h in self.load_seconds.items()},
            "evictions": dict(self.registry.evictions),
        }

    def record_event(self, event: dict[str, Any]) -> None:
        """Model actors push their events here."""
        self.facts.record_ready(event)
        if event.get("kind") == "ready" and "load_seconds" in event:
            histogram = self.load_seconds.setdefault(event["model"], Histogram(LOAD_BUCKETS))
            histogram.observe(event["load_seconds"])
        if event.get("kind") == "failed" and event.get("model") in self.registry.handles:
            self.background.keep(asyncio.create_task(self.registry.drop_failed(event["model"])))
        if event.get("kind") in ("ready", "failed"):
            self.spares.loaded(self.registry.nodes_of.get(event.get("model", "")))
        self._event(event.get("kind", "event"), **{k: v for k, v in event.items() if k != "kind"})

    def events_since(self, seq: int = -1, limit: int = 500) -> list[dict[str, Any]]:
        return self.feed.since(seq, limit)

    async def cluster(self) -> dict[str, Any]:
        return {"nodes": await self.facts.nodes_view(await self.status())}

    async def shutdown(self) -> None:
        """Stop every model and kill its actor (what `proxifier serve` does on Ctrl-C)."""
        self.upkeep.cancel()
        self.reconcile.stop()
        await self.registry.shutdown()

    def ping(self) -> str:
        return "pong"

    def serve_app(self, name: str) -> None:
        """An ingress replica of Serve application `name` uses this controller (said at its start
        and at each of its health checks)."""
        self.serve_watcher.serve_app(name)

    def pid(self) -> int:
        """The controller's process id: it changes when Ray restarts the controller."""
        return os.getpid()

    # ------------------------------------------------------------------ helpers
    def _resolve(self, name: str) -> str:
        model = self.config.resolve_name(name)
        if model is None:
            raise ModelNotFound(not_found_message(self.config, name))
        return model

    def _groups(self, only: list[str] | None = None) -> list[str]:
        return views.groups_of(self.config, only)

    async def _status_of(self, name: str, within: float = VIEW_WAIT) -> dict[str, Any]:
        return await views.guarded_status(name, self.viewed, within)

    def _event(self, kind: str, **details: Any) -> None:
        self.feed.add(kind, **details)


ControllerRemote = ray.remote(Controller)


def create_controller(models_path: str | Path, auth_path: str | Path | None = None) -> Any:
    """The detached, named controller (restarted by Ray if it dies; it then adopts models)."""
    # On the head node (it holds the config files); it adopts the models when Ray restarts it.
    return ControllerRemote.options(
        **cluster_singleton_options(CONTROLLER_NAME), max_concurrency=4096
    ).remote(str(models_path), str(auth_path) if auth_path else None)


def get_controller() -> Any:
    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
