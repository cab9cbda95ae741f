"""The controller's actor facade: one detached actor per cluster (DESIGN §3) whose remote methods
the ingress, the CLI and the tests call; each delegates to a part. It owns the configuration in
force and the auth keys; it places nothing and holds no model state itself (DESIGN §12).

The parts: `registry` (model -> instance), `reconcile` (facts -> scheduler -> apply), `facts`
(nodes, GPUs, GGUF, calibration), `upkeep` (idle stops, preload, spares), `watchers` (auth file,
Serve applications), `config_files` (the files, backups, the accepted copy), `events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import ray

from actors.controller.config_files import ConfigFiles
from actors.controller.events import CONTROLLER_NAME, EventFeed
from actors.controller.facts import Facts
from actors.controller.reconcile import Reconciler, not_found_message
from actors.controller.registry import Registry
from actors.controller.upkeep import Spares, Upkeep, preloaded
from actors.controller.watchers import ServeWatcher, watch_auth_file
from actors.model import NAMESPACE, cluster_singleton_options
from actors.ray_glue import Background, call
from proxifier.config import (
    AuthConfig,
    ConfigError,
    ModelsConfig,
    parse_yaml_text,
    validate_auth,
)
from proxifier.config_diff import diff_models
from proxifier.endpoints import capabilities
from proxifier.errors import ModelNotFound, NotFound, Refused
from proxifier.metrics import LOAD_BUCKETS, Histogram
from proxifier.planning import group_members, group_stop_plan, reload_plan, startup_order

__all__ = ["CONTROLLER_NAME", "Controller", "create_controller", "get_controller"]


def _among(names: list[str], only: list[str] | None) -> list[str]:
    """`names` (in their order) that are in `only`; all of them when `only` is None."""
    return names if only is None else [n for n in names if n in only]


def _by_priority(config: ModelsConfig) -> list[str]:
    return sorted(config.models, key=lambda n: (-config.models[n].priority, n))


def _groups_view(
    config: ModelsConfig,
    statuses: dict[str, dict[str, Any]],
    groups: list[str],
    only: list[str] | None,
) -> dict[str, Any]:
    view: dict[str, Any] = {}
    for group in groups:
        members = _among(group_members(config.models, group), only)
        entries = [
            {
                "name": n,
                "state": statuses[n]["state"],
                "priority": config.models[n].priority,
                "preload": config.models[n].preload,
            }
            for n in members
        ]
        running = sum(1 for e in entries if e["state"] in ("ready", "starting", "restarting"))
        view[group] = {"members": entries, "running": running, "total": len(entries)}
    return view


def _models_view(
    config: ModelsConfig,
    registered_at: dict[str, int],
    statuses: list[dict[str, Any]],
    fim: list[bool | None],
) -> list[dict[str, Any]]:
    models = config.models  # read once: a reload may land between the caller's awaits
    return [
        {
            "id": status["name"],
            "object": "model",
            "created": registered_at.get(status["name"], 0),
            "owned_by": "proxifier",
            "state": status["state"],
            "priority": status["priority"],
            "resource_group": status["resource_group"],
            "aliases": status["aliases"],
            "capabilities": [str(c) for c in capabilities(models[status["name"]], infill)]
            if status["name"] in models
            else [],
        }
        for status, infill in zip(statuses, fim, strict=True)
    ]


class Controller:
    """Ray actor (created by `create_controller`); every public method is a remote call."""

    async def __init__(self, models_path: str, auth_path: str | None = None) -> None:
        # async: Ray runs it on the actor's event loop, so the loops start here, also when
        # Ray restarts a controller that died (DESIGN §11).
        self.models_path = Path(models_path).resolve()
        self.files = ConfigFiles(self.models_path, Path(auth_path).resolve() if auth_path else None)
        self.feed = EventFeed()
        self.background = Background()
        self.spares = Spares(self.background)
        # A restarted controller goes on with the configuration it last accepted, not with
        # whatever is on disk now (an edit not reloaded yet, or a bad file). A first start
        # reads the files; one that does not load fails the actor's creation (`proxifier serve`
        # validates first).
        finished = self.files.finish_restore()  # one a crash interrupted, before reading
        if finished is not None:
            self._event("config_restored", id=finished, completed_after_restart=True)
        self.config, self.auth = self._accepted_or_files(read_files=finished is not None)
        self.auth_version = 0
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
        self.upkeep = Upkeep(
            lambda: self.config,
            self.registry,
            self.facts,
            self.spares,
            self.reconcile.want,
            self._event,
            self.background,
        )
        self.serve_watcher = ServeWatcher(self.shutdown, self._event)
        # When each model first appeared: /v1/models' stable `created`.
        now = int(time.time())
        self.registered_at: dict[str, int] = dict.fromkeys(self.config.models, now)
        self.replica_metrics: dict[str, tuple[float, dict[str, Any]]] = {}
        self.load_seconds: dict[str, Histogram] = {}
        for name in self.config.models:  # read now, so a first status finds them
            path = self.config.model_file(name)
            if path is not None and path.is_file():
                self.background.keep(asyncio.ensure_future(self.facts.warm(path)))
        self.registry.adopt(self.config)
        self._ensure_upkeep()
        self.reconcile.ensure_running()

    # ------------------------------------------------------------------ the accepted config
    def _accepted_or_files(self, read_files: bool = False) -> tuple[ModelsConfig, AuthConfig]:
        restarted = ray.is_initialized() and (
            ray.get_runtime_context().was_current_actor_reconstructed
        )
        stored = self.files.accepted() if restarted and not read_files else None
        if stored is None:
            config = self.files.load_models()
            auth = self.files.load_auth(config)
            self._accept(config)
            return config, auth
        config = self.files.models_from_text(stored["models"], str(self.models_path))
        try:
            auth = self.files.load_auth(config)  # auth.yaml applies as it changes on disk
        except ConfigError as error:
            if stored.get("auth") is None:
                raise
            auth = validate_auth(parse_yaml_text(stored["auth"], "auth"), file="accepted auth")
            self._event("config_rejected", file="auth.yaml", errors=[str(i) for i in error.issues])
        self._event("config_restored_after_restart", models_path=str(self.models_path))
        return config, auth

    def _accept(self, config: ModelsConfig) -> None:
        with contextlib.suppress(Exception):  # no store (no Ray): a restart reads the files
            self.files.accept(config)

    def _set_auth(self, auth: AuthConfig) -> None:
        self.auth, self.auth_version = auth, self.auth_version + 1

    def _ensure_upkeep(self) -> None:
        if self.upkeep.ensure():
            self.background.keep(
                asyncio.create_task(
                    watch_auth_file(
                        self.files,
                        lambda: self.config,
                        lambda: self.auth,
                        self._set_auth,
                        self._accept,
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
        handle = self.registry.handles.get(model)
        if moved is not None and handle is not None and handle._actor_id.hex() == moved:
            await self.registry.check_moved(model, handle)
        return await self.reconcile.ensure_actor(model, deadline)

    def resolve(self, name: str) -> str:
        return self._resolve(name)

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
        await self.registry.stop(model, "stopped by an admin")
        return {"model": model, "state": "stopped"}

    async def model_status(self, name: str) -> dict[str, Any]:
        return await self.reconcile.status_of(self._resolve(name))

    async def status(self) -> list[dict[str, Any]]:
        names = _by_priority(self.config)
        return list(await asyncio.gather(*(self.reconcile.status_of(n) for n in names)))

    async def model_logs(self, name: str, lines: int = 100) -> list[str]:
        handle = self.registry.handles.get(self._resolve(name))
        return [] if handle is None else await call(handle.logs.remote(lines))

    async def queue_status(self, name: str | None = None) -> list[dict[str, Any]]:
        handles = self.registry.handles
        names = [self._resolve(name)] if name else sorted(handles)
        statuses = []
        for model in names:
            handle = handles.get(model)
            if handle is None:
                statuses.append({"model": model, "state": "stopped", "depth": 0, "waiting": []})
            else:
                with contextlib.suppress(ray.exceptions.RayActorError):
                    statuses.append(await handle.queue_status.remote())
        return statuses

    async def clear_queue(self, name: str) -> dict[str, Any]:
        model = self._resolve(name)
        handle = self.registry.handles.get(model)
        cleared = 0 if handle is None else await call(handle.clear_queue.remote())
        return {"model": model, "cleared": cleared}

    async def explain(self, name: str) -> dict[str, Any]:
        """The scheduler's last decision about a model and why (placed where, waiting for
        what, failed because), with where it runs now."""
        return await self.reconcile.explain(self._resolve(name))

    # ------------------------------------------------------------------ groups
    # `only`: the models the caller's API key may use (None: every model). Bulk operations
    # touch, and report, only those; a group none of whose members it may see does not exist.
    async def start_group(self, group: str, only: list[str] | None = None) -> dict[str, Any]:
        members = _among(group_members(self.config.models, group), only)
        if not members:
            raise NotFound(f"no model is in resource group '{group}'; groups: {self._groups(only)}")
        return {"group": group, "results": await self.reconcile.start_in_order(members)}

    async def stop_group(self, group: str, only: list[str] | None = None) -> dict[str, Any]:
        to_stop, kept = group_stop_plan(self.config.models, group)
        to_stop, kept = _among(to_stop, only), _among(kept, only)
        if not to_stop and not kept:
            raise NotFound(f"no model is in resource group '{group}'; groups: {self._groups(only)}")
        await asyncio.gather(*(self.registry.stop(n, f"group '{group}' stopped") for n in to_stop))
        return {"group": group, "stopped": to_stop, "kept_preloaded": kept}

    async def start_all(self, only: list[str] | None = None) -> dict[str, Any]:
        names = _among(_by_priority(self.config), only)
        return {"results": await self.reconcile.start_in_order(names)}

    async def stop_all(self, only: list[str] | None = None) -> dict[str, Any]:
        names = _among([n for n, m in self.config.models.items() if not m.preload], only)
        await asyncio.gather(*(self.registry.stop(n, "stop-all") for n in names))
        return {"stopped": sorted(names), "kept_preloaded": _among(preloaded(self.config), only)}

    async def groups_status(self, only: list[str] | None = None) -> dict[str, Any]:
        statuses = {s["name"]: s for s in await self.status()}
        return _groups_view(self.config, statuses, self._groups(only), only)

    # ------------------------------------------------------------------ configuration
    async def reload_config(self) -> dict[str, Any]:
        """Re-read models.yaml and auth.yaml; apply the difference. A bad file changes nothing."""
        try:
            new = self.files.load_models()
            auth = self.files.load_auth(new)
        except ConfigError as error:
            self._event("config_rejected", errors=[str(i) for i in error.issues])
            raise
        result = await self._apply(new)
        if auth != self.auth:
            self.auth = auth
            self.auth_version += 1
            result["auth_reloaded"] = True
        self._accept(new)
        return result

    async def reload_model(self, name: str) -> dict[str, Any]:
        """Re-read models.yaml and apply only what changed for one model."""
        new = self.files.load_models()
        model = self.config.resolve_name(name) or new.resolve_name(name)
        if model is None:
            raise ModelNotFound(not_found_message(self.config, name))
        models = dict(self.config.models)
        if model in new.models:
            models[model] = new.models[model]
        else:
            models.pop(model)
        partial = self.config.model_copy(update={"models": models})
        return await self._apply(partial)

    async def _apply(self, new: ModelsConfig) -> dict[str, Any]:
        diff = diff_models(self.config, new)
        plan = reload_plan(diff, new, set(self.registry.handles))
        self.config = new
        for name in plan.register:
            self.registered_at.setdefault(name, int(time.time()))
        return await self.reconcile.apply(diff, plan, new)

    def validate_config(self) -> dict[str, Any]:
        """Validate the files on disk without applying them."""
        errors: list[str] = []
        try:
            new = self.files.load_models()
        except ConfigError as error:
            return {"valid": False, "errors": [str(i) for i in error.issues]}
        try:
            self.files.load_auth(new)
        except ConfigError as error:
            errors = [str(i) for i in error.issues]
        diff = diff_models(self.config, new)
        return {"valid": not errors, "errors": errors, "changes": diff.summary()}

    def get_auth(self) -> tuple[int, AuthConfig]:
        return self.auth_version, self.auth

    def config_files(self) -> dict[str, Any]:
        """The config files as they are on disk, key material in auth.yaml redacted."""
        return self.files.shown(self.config)

    def backup_diff(self, backup_id: str) -> dict[str, Any]:
        """What restoring a backup would change, without changing anything."""
        restored = self.files.backup_models(backup_id)
        return {"id": backup_id, "changes": diff_models(self.config, restored).summary()}

    def get_config(self) -> ModelsConfig:
        return self.config

    def config_paths(self) -> dict[str, str | None]:
        auth = self.files.auth_path(self.config)
        return {"models": str(self.models_path), "auth": str(auth) if auth else None}

    # ------------------------------------------------------------------ backups
    def backup(self, description: str = "") -> dict[str, Any]:
        """Copy the config files into backups/<id>/ with a description; keep the last 20."""
        meta = self.files.backup(self.config, description)
        self._event("config_backup", id=meta["id"], description=description)
        return meta

    def list_backups(self) -> list[dict[str, Any]]:
        return self.files.list_backups()

    async def restore(self, backup_id: str) -> dict[str, Any]:
        """Put a backup's files in place (both validated first, modes kept) and apply them."""
        before = self.files.restore(backup_id, self.config)
        self._event("config_backup", id=before["id"], description=before["description"])
        result = await self.reload_config()
        self._event("config_restored", id=backup_id, previous=before["id"])
        return {"restored": backup_id, "backup_of_previous": before["id"], **result}

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
        fim = await asyncio.gather(*(self.facts.fill_in_middle(s["name"]) for s in statuses))
        return _models_view(self.config, self.registered_at, statuses, fim)

    def report_metrics(self, replica_id: str, snapshot: dict[str, Any]) -> None:
        """Ingress replicas push their cumulative request counters here every few seconds."""
        self.replica_metrics[replica_id] = (time.time(), snapshot)

    async def metrics_data(self) -> dict[str, Any]:
        return {
            "statuses": await self.status(),
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
        return {"nodes": self.facts.nodes_view(await self.status())}

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
        names = _among(list(self.config.models), only)
        return sorted({self.config.models[n].resource_group for n in names})

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
