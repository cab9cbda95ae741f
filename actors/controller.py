"""The controller: one detached actor per cluster that owns the configuration and the registry of
model actors (DESIGN §3). It places models by priority, evicts for higher priorities, stops idle
models, keeps preloaded ones running, starts and stops groups, hot-reloads the config files,
keeps config backups, and collects the event feed.

Every decision comes from `proxifier.planning` / `proxifier.placement`; this actor gathers the
facts (model stats, cluster resources) and carries the decisions out. It never holds one lock
across model starts: each model has its own single-flight placement task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
import yaml

from actors.model_actor import (
    NAMESPACE,
    actor_name,
    cluster_singleton_options,
    create_model_actor,
)
from proxifier.backups import backups_to_prune, new_backup_id, valid_backup_id
from proxifier.config import (
    AUTH_DISABLED,
    AuthConfig,
    ConfigError,
    ModelsConfig,
    effective,
    load_auth_config,
    load_models_config,
    parse_yaml_text,
    validate_auth,
    validate_models,
)
from proxifier.config_diff import ModelsDiff, diff_models
from proxifier.errors import (
    InvalidRequest,
    ModelFailed,
    ModelNotFound,
    NotFound,
    ProxifierError,
    QueueTimeout,
    Refused,
)
from proxifier.metrics import LOAD_BUCKETS, Histogram
from proxifier.placement import (
    NodeView,
    actor_options,
    cpu_fallback_warning,
    demand,
    unplaceable_message,
)
from proxifier.planning import (
    RunningModel,
    at_capacity,
    eviction_candidates,
    group_members,
    group_stop_plan,
    idle_stops,
    reload_plan,
    startup_order,
)

CONTROLLER_NAME = "proxifier:controller"
AUTH_POLL_INTERVAL = 1.0  # seconds between looks at auth.yaml's modification time
MODEL_PREFIX = actor_name("")


class Controller:
    """Ray actor (created by `create_controller`); every public method is a remote call."""

    def __init__(self, models_path: str, auth_path: str | None = None) -> None:
        self.models_path = Path(models_path).resolve()
        self.explicit_auth_path = Path(auth_path).resolve() if auth_path else None
        # A config that does not load fails the actor's creation: `proxifier serve` validates
        # first, and a reload never replaces a good config with a bad one.
        self.config = load_models_config(self.models_path)
        self.auth = self._load_auth(self.config)
        self.auth_version = 0
        self.handles: dict[str, Any] = {}
        self.options: dict[str, dict[str, Any]] = {}
        self.placement_failures: dict[str, tuple[float, str]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)
        self._seq = 0
        self._placing: dict[str, asyncio.Task[Any]] = {}
        self._capacity_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._upkeep: asyncio.Task[None] | None = None
        self._orphans: list[tuple[str, Any]] = []
        # Finished async (respond-async) results of model actors that were stopped since.
        self.results: dict[str, dict[str, Any]] = {}
        # When each model first appeared: /v1/models' stable `created`.
        now = int(time.time())
        self.registered_at: dict[str, int] = dict.fromkeys(self.config.models, now)
        self.replica_metrics: dict[str, tuple[float, dict[str, Any]]] = {}
        self.load_seconds: dict[str, Histogram] = {}
        self.evictions: dict[str, int] = {}
        self._adopt()

    # ------------------------------------------------------------------ boot and adoption
    def _adopt(self) -> None:
        """Take over model actors that outlived a previous controller: no second llama-server."""
        # The namespace of a detached actor is its creator's, not the one its name lives in.
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if entry["namespace"] != NAMESPACE or not name.startswith(MODEL_PREFIX):
                continue
            model = name[len(MODEL_PREFIX) :]
            with contextlib.suppress(ValueError):
                handle = ray.get_actor(name, namespace=NAMESPACE)
                if model in self.config.models:
                    self.handles[model] = handle
                    self.options[model] = actor_options(
                        self.config.models[model], self._cluster_gpus()
                    )
                    self._event("adopted", model=model)
                else:
                    self._orphans.append((model, handle))  # retired once the loop runs

    async def boot(self) -> list[dict[str, Any]]:
        """Start auto_start and preload models, highest priority first, each placed before the
        next is created; their loads overlap. Safe to call again (running models are kept)."""
        self._ensure_upkeep()
        results = []
        for name in startup_order(self.config.models):
            try:
                handle = await self._ensure_actor(name, self.config.models[name].priority)
                self._fire(handle.start.remote())
                results.append({"model": name, "placed": True})
            except ProxifierError as error:
                results.append({"model": name, "placed": False, "error": error.message})
        return results

    # ------------------------------------------------------------------ models
    async def get_model(self, name: str, deadline: float | None = None) -> Any:
        """The actor handle for a model name or alias, placing (and so starting) it if needed."""
        self._ensure_upkeep()
        model = self._resolve(name)
        return await self._ensure_actor(model, self.config.models[model].priority, deadline)

    def resolve(self, name: str) -> str:
        return self._resolve(name)

    async def start_model(self, name: str) -> dict[str, Any]:
        """An admin start: place the model, start it (skipping a failure cooldown), wait."""
        model = self._resolve(name)
        handle = await self._ensure_actor(model, self.config.models[model].priority)
        return await _call(handle.start.remote(force=True))

    async def stop_model(self, name: str, force: bool = False) -> dict[str, Any]:
        """An admin stop. A preloaded model only stops with `force`."""
        model = self._resolve(name)
        if self.config.models[model].preload and not force:
            raise Refused(
                f"model '{model}' is preloaded and stays running; stop it with force=true "
                "(or set preload: false)"
            )
        await self._stop(model, "stopped by an admin")
        return {"model": model, "state": "stopped"}

    async def model_status(self, name: str) -> dict[str, Any]:
        return await self._status_of(self._resolve(name))

    async def status(self) -> list[dict[str, Any]]:
        names = sorted(self.config.models, key=lambda n: (-self.config.models[n].priority, n))
        return list(await asyncio.gather(*(self._status_of(n) for n in names)))

    async def model_logs(self, name: str, lines: int = 100) -> list[str]:
        model = self._resolve(name)
        handle = self.handles.get(model)
        return [] if handle is None else await _call(handle.logs.remote(lines))

    async def queue_status(self, name: str | None = None) -> list[dict[str, Any]]:
        names = [self._resolve(name)] if name else sorted(self.handles)
        statuses = []
        for model in names:
            handle = self.handles.get(model)
            if handle is None:
                statuses.append({"model": model, "state": "stopped", "depth": 0, "waiting": []})
            else:
                with contextlib.suppress(ray.exceptions.RayActorError):
                    statuses.append(await handle.queue_status.remote())
        return statuses

    async def clear_queue(self, name: str) -> dict[str, Any]:
        model = self._resolve(name)
        handle = self.handles.get(model)
        cleared = 0 if handle is None else await _call(handle.clear_queue.remote())
        return {"model": model, "cleared": cleared}

    # ------------------------------------------------------------------ groups
    async def start_group(self, group: str) -> dict[str, Any]:
        members = group_members(self.config.models, group)
        if not members:
            raise NotFound(f"no model is in resource group '{group}'; groups: {self._groups()}")
        return {"group": group, "results": await self._start_in_order(members)}

    async def stop_group(self, group: str) -> dict[str, Any]:
        to_stop, kept = group_stop_plan(self.config.models, group)
        if not to_stop and not kept:
            raise NotFound(f"no model is in resource group '{group}'; groups: {self._groups()}")
        await asyncio.gather(*(self._stop(n, f"group '{group}' stopped") for n in to_stop))
        return {"group": group, "stopped": to_stop, "kept_preloaded": kept}

    async def start_all(self) -> dict[str, Any]:
        names = sorted(self.config.models, key=lambda n: (-self.config.models[n].priority, n))
        return {"results": await self._start_in_order(names)}

    async def stop_all(self) -> dict[str, Any]:
        names = [n for n, m in self.config.models.items() if not m.preload]
        await asyncio.gather(*(self._stop(n, "stop-all") for n in names))
        return {"stopped": sorted(names), "kept_preloaded": self._preloaded()}

    async def groups_status(self) -> dict[str, Any]:
        statuses = {s["name"]: s for s in await self.status()}
        groups: dict[str, Any] = {}
        for group in self._groups():
            members = group_members(self.config.models, group)
            entries = [
                {
                    "name": n,
                    "state": statuses[n]["state"],
                    "priority": self.config.models[n].priority,
                    "preload": self.config.models[n].preload,
                }
                for n in members
            ]
            running = sum(1 for e in entries if e["state"] in ("ready", "starting", "restarting"))
            groups[group] = {"members": entries, "running": running, "total": len(entries)}
        return groups

    # ------------------------------------------------------------------ configuration
    async def reload_config(self) -> dict[str, Any]:
        """Re-read models.yaml and auth.yaml; apply the difference. A bad file changes nothing."""
        try:
            new = load_models_config(self.models_path)
            auth = self._load_auth(new)
        except ConfigError as error:
            self._event("config_rejected", errors=[str(i) for i in error.issues])
            raise
        result = await self._apply(new)
        if auth != self.auth:
            self.auth = auth
            self.auth_version += 1
            result["auth_reloaded"] = True
        return result

    async def reload_model(self, name: str) -> dict[str, Any]:
        """Re-read models.yaml and apply only what changed for one model."""
        new = load_models_config(self.models_path)
        model = self.config.resolve_name(name) or new.resolve_name(name)
        if model is None:
            raise ModelNotFound(self._not_found_message(name))
        models = dict(self.config.models)
        if model in new.models:
            models[model] = new.models[model]
        else:
            models.pop(model)
        partial = self.config.model_copy(update={"models": models})
        return await self._apply(partial)

    def validate_config(self) -> dict[str, Any]:
        """Validate the files on disk without applying them."""
        errors: list[str] = []
        try:
            new = load_models_config(self.models_path)
        except ConfigError as error:
            return {"valid": False, "errors": [str(i) for i in error.issues]}
        try:
            self._load_auth(new)
        except ConfigError as error:
            errors = [str(i) for i in error.issues]
        diff = diff_models(self.config, new)
        return {"valid": not errors, "errors": errors, "changes": diff.summary()}

    def get_auth(self) -> tuple[int, AuthConfig]:
        return self.auth_version, self.auth

    def config_files(self) -> dict[str, Any]:
        """The config files as they are on disk, key material in auth.yaml redacted."""
        auth_path = self._auth_path(self.config)
        auth_text = None
        if auth_path is not None and auth_path.exists():
            auth_text = redact_keys(auth_path.read_text())
        return {
            "models_path": str(self.models_path),
            "models_yaml": self.models_path.read_text(),
            "auth_path": str(auth_path) if auth_path else None,
            "auth_yaml": auth_text,
        }

    def backup_diff(self, backup_id: str) -> dict[str, Any]:
        """What restoring a backup would change, without changing anything."""
        folder = self._backup_folder(backup_id)
        restored = validate_models(
            parse_yaml_text((folder / "models.yaml").read_text(), f"backup {backup_id}"),
            file=f"backup {backup_id}/models.yaml",
            base_dir=self.models_path.parent,
        )
        return {"id": backup_id, "changes": diff_models(self.config, restored).summary()}

    def get_config(self) -> ModelsConfig:
        return self.config

    def config_paths(self) -> dict[str, str | None]:
        auth = self._auth_path(self.config)
        return {"models": str(self.models_path), "auth": str(auth) if auth else None}

    # ------------------------------------------------------------------ backups
    def backup(self, description: str = "") -> dict[str, Any]:
        """Copy the config files into backups/<id>/ with a description; keep the last 20."""
        root = self._backup_root()
        root.mkdir(parents=True, exist_ok=True)
        backup_id = new_backup_id(datetime.now(UTC), (p.name for p in root.iterdir()))
        folder = root / backup_id
        folder.mkdir()
        files = {"models.yaml": self.models_path}
        auth = self._auth_path(self.config)
        if auth is not None and auth.exists():
            files["auth.yaml"] = auth
        for stored, source in files.items():
            shutil.copy2(source, folder / stored)
        meta = {
            "id": backup_id,
            "description": description,
            "created_at": datetime.now(UTC).isoformat(),
            "files": sorted(files),
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
        for old in backups_to_prune(p.name for p in root.iterdir() if valid_backup_id(p.name)):
            shutil.rmtree(root / old, ignore_errors=True)
        self._event("config_backup", id=backup_id, description=description)
        return meta

    def list_backups(self) -> list[dict[str, Any]]:
        root = self._backup_root()
        if not root.exists():
            return []
        metas = []
        for folder in root.iterdir():
            meta = folder / "meta.json"
            if valid_backup_id(folder.name) and meta.exists():
                metas.append(json.loads(meta.read_text()))
        return sorted(metas, key=lambda m: m["id"], reverse=True)

    def _backup_folder(self, backup_id: str) -> Path:
        if not valid_backup_id(backup_id):
            raise InvalidRequest(f"{backup_id!r} is not a backup id")
        folder = self._backup_root() / backup_id
        if not (folder / "models.yaml").exists():
            raise NotFound(f"no backup '{backup_id}'")
        return folder

    async def restore(self, backup_id: str) -> dict[str, Any]:
        """Validate a backup, back up the current files, write the backup's atomically, apply."""
        folder = self._backup_folder(backup_id)
        models_text = (folder / "models.yaml").read_text()
        base = self.models_path.parent
        restored = validate_models(
            parse_yaml_text(models_text, f"backup {backup_id}/models.yaml"),
            file=f"backup {backup_id}/models.yaml",
            base_dir=base,
        )
        auth_text = None
        if (folder / "auth.yaml").exists():
            auth_text = (folder / "auth.yaml").read_text()
            validate_auth(parse_yaml_text(auth_text, "auth"), file=f"backup {backup_id}/auth.yaml")
        before = self.backup(f"before restoring {backup_id}")
        _write_atomically(self.models_path, models_text)
        auth_path = self._auth_path(restored)
        if auth_text is not None and auth_path is not None:
            _write_atomically(auth_path, auth_text)
        result = await self.reload_config()
        self._event("config_restored", id=backup_id, previous=before["id"])
        return {"restored": backup_id, "backup_of_previous": before["id"], **result}

    # ------------------------------------------------------------------ events and cluster
    def job_result(self, request_id: str) -> dict[str, Any]:
        """A finished async result kept after its model stopped, or status unknown."""
        return self.results.get(request_id) or {"status": "unknown", "request_id": request_id}

    async def find_result(self, request_id: str) -> dict[str, Any]:
        """An async request's state, wherever it is: kept here, or with a running model."""
        if request_id in self.results:
            return self.results[request_id]
        names = list(self.handles)
        answers = await asyncio.gather(
            *(self.handles[n].result.remote(request_id) for n in names), return_exceptions=True
        )
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, dict) and answer["status"] != "unknown":
                return {**answer, "model": name}
        return {"status": "unknown", "request_id": request_id}

    async def models_list(self) -> list[dict[str, Any]]:
        """/v1/models: every configured model with its state, priority and group."""
        return [
            {
                "id": status["name"],
                "object": "model",
                "created": self.registered_at.get(status["name"], 0),
                "owned_by": "proxifier",
                "state": status["state"],
                "priority": status["priority"],
                "resource_group": status["resource_group"],
                "aliases": status["aliases"],
            }
            for status in await self.status()
        ]

    def report_metrics(self, replica_id: str, snapshot: dict[str, Any]) -> None:
        """Ingress replicas push their cumulative request counters here every few seconds."""
        self.replica_metrics[replica_id] = (time.time(), snapshot)

    async def metrics_data(self) -> dict[str, Any]:
        return {
            "statuses": await self.status(),
            "replicas": [snapshot for _, snapshot in self.replica_metrics.values()],
            "load_seconds": {m: h.to_dict() for m, h in self.load_seconds.items()},
            "evictions": dict(self.evictions),
        }

    def record_event(self, event: dict[str, Any]) -> None:
        """Model actors push their events here."""
        if event.get("kind") == "ready" and "load_seconds" in event:
            histogram = self.load_seconds.setdefault(event["model"], Histogram(LOAD_BUCKETS))
            histogram.observe(event["load_seconds"])
        self._event(event.get("kind", "event"), **{k: v for k, v in event.items() if k != "kind"})

    def events_since(self, seq: int = -1, limit: int = 500) -> list[dict[str, Any]]:
        return [e for e in self.events if e["seq"] > seq][-limit:]

    async def cluster(self) -> dict[str, Any]:
        statuses = await self.status()
        where: dict[str, list[str]] = {}
        for status in statuses:
            if status.get("node_id"):
                where.setdefault(status["node_id"], []).append(status["name"])
        nodes = [
            {
                "node_id": node.node_id,
                "address": node.address,
                "alive": node.alive,
                "resources": dict(node.total),
                "free": dict(node.available),
                "labels": dict(node.labels),
                "models": sorted(where.get(node.node_id, [])),
            }
            for node in _nodes()
        ]
        return {"nodes": nodes}

    async def shutdown(self) -> None:
        """Stop every model and kill its actor (what `proxifier serve` does on Ctrl-C)."""
        if self._upkeep is not None:
            self._upkeep.cancel()
        await asyncio.gather(*(self._stop(n, "shutdown") for n in list(self.handles)))

    def ping(self) -> str:
        return "pong"

    def pid(self) -> int:
        """The controller's process id: it changes when Ray restarts the controller."""
        return os.getpid()

    # ------------------------------------------------------------------ placement
    async def _ensure_actor(self, name: str, priority: int, deadline: float | None = None) -> Any:
        handle = self.handles.get(name)
        if handle is not None:
            return handle
        failure = self.placement_failures.get(name)
        if failure is not None and time.time() - failure[0] < self.config.settings.cooldown:
            raise ModelFailed(failure[1], retry_after=self.config.settings.cooldown)
        task = self._placing.get(name)
        if task is None or task.done():
            task = asyncio.create_task(self._place(name, priority, deadline))
            self._placing[name] = task
        return await asyncio.shield(task)

    async def _place(self, name: str, priority: int, deadline: float | None) -> Any:
        settings = self.config.settings
        model = self.config.models[name]
        await self._wait_for_capacity(name, priority, deadline)
        gpus = self._cluster_gpus()
        warning = cpu_fallback_warning(name, model, gpus)
        if warning:
            self._event("warning", model=name, message=warning)
        options = actor_options(model, gpus)
        handle = create_model_actor(
            name,
            model,
            settings,
            self.config.base_dir,
            events_to=CONTROLLER_NAME,
            lifetime="detached",
            **options,
        )
        placed = await _placed(handle, settings.placement_timeout)
        tried: set[str] = set()
        while not placed:
            candidates = [
                c
                for c in eviction_candidates(await self._running(), priority, demand(options))
                if c not in tried
            ]
            if not candidates:
                break
            tried.add(candidates[0])
            if await self._evict(candidates[0], name, "priority"):
                placed = await _placed(handle, settings.placement_timeout)
        if not placed:
            ray.kill(handle)
            message = unplaceable_message(name, options, _nodes())
            self.placement_failures[name] = (time.time(), message)
            self._event("failed", model=name, reason=message)
            raise ModelFailed(message, retry_after=settings.cooldown)
        self.placement_failures.pop(name, None)
        self.handles[name] = handle
        self.options[name] = options
        self._event("placed", model=name, options=options)
        return handle

    async def _wait_for_capacity(self, name: str, priority: int, deadline: float | None) -> None:
        """max_running_models: evict by the same rule, else wait for a model to stop."""
        limit = self.config.settings.max_running_models
        if limit <= 0:
            return
        deadline = deadline or time.time() + self.config.settings.queue.queue_timeout
        tried: set[str] = set()
        while True:
            running = await self._running()
            if not at_capacity(running, limit):
                return
            candidates = [c for c in eviction_candidates(running, priority) if c not in tried]
            if candidates:
                tried.add(candidates[0])
                await self._evict(candidates[0], name, "capacity")
                continue
            remaining = deadline - time.time()
            if remaining <= 0:
                raise QueueTimeout(
                    f"model '{name}' waited for a free place: {limit} models are running "
                    "(max_running_models) and none can be stopped for it",
                    retry_after=self.config.settings.queue.queue_timeout,
                )
            self._capacity_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._capacity_freed.wait(), timeout=min(remaining, 1.0))
            tried.clear()

    async def _evict(self, victim: str, for_model: str, reason: str) -> bool:
        """Ask the victim to stop (it refuses when busy); on yes, free its resources."""
        handle = self.handles.get(victim)
        if handle is None:
            return False
        try:
            answer = await handle.request_stop.remote(f"evicted for '{for_model}'")
        except ray.exceptions.RayActorError:
            answer = {"accepted": True}
        if not answer["accepted"]:
            return False
        await self._dispose(victim, handle)
        self.evictions[reason] = self.evictions.get(reason, 0) + 1
        self._event("evicted", model=victim, for_model=for_model, reason=reason)
        return True

    async def _stop(self, name: str, reason: str) -> None:
        handle = self.handles.get(name)
        if handle is None:
            return
        with contextlib.suppress(ray.exceptions.RayActorError):
            await handle.stop.remote(reason)
        await self._dispose(name, handle)

    async def _retire(self, name: str, handle: Any, timeout: float = 60.0) -> None:
        """Drain a model that left the config (or moves to a new actor), then kill it."""
        with contextlib.suppress(ray.exceptions.RayActorError):
            await handle.drain.remote("removed from the configuration", timeout)
        await self._dispose(name, handle)
        self._event("removed", model=name)

    async def _dispose(self, name: str, handle: Any) -> None:
        """Keep the actor's finished async results, then kill it and forget it."""
        with contextlib.suppress(ray.exceptions.RayActorError):
            self.results.update(await handle.take_results.remote())
        self._forget(name, handle)

    def _forget(self, name: str, handle: Any) -> None:
        if self.handles.get(name) is handle:
            del self.handles[name]
            self.options.pop(name, None)
        ray.kill(handle)
        self._capacity_freed.set()

    async def _running(self) -> list[RunningModel]:
        """Facts for the planners about every model whose actor exists."""
        names = list(self.handles)
        stats = await asyncio.gather(
            *(self.handles[n].stats.remote() for n in names), return_exceptions=True
        )
        running = []
        for name, stat in zip(names, stats, strict=True):
            model = self.config.models.get(name)
            if isinstance(stat, BaseException) or model is None:
                continue
            values = effective(model, self.config.settings)
            running.append(
                RunningModel(
                    name=name,
                    priority=model.priority,
                    preload=model.preload,
                    state=stat["state"],
                    busy=stat["busy"],
                    last_active=stat["last_used"] or stat["ready_at"] or 0.0,
                    idle_for=stat["idle_for"],
                    idle_timeout=values["idle_timeout"],
                    demand=demand(self.options.get(name, {})),
                )
            )
        return running

    # ------------------------------------------------------------------ reload
    async def _apply(self, new: ModelsConfig) -> dict[str, Any]:
        diff: ModelsDiff = diff_models(self.config, new)
        plan = reload_plan(diff, new, set(self.handles))
        self.config = new
        for name in plan.register:
            self.registered_at.setdefault(name, int(time.time()))
        for name in plan.drain + plan.recreate:
            handle = self.handles.pop(name)
            self.options.pop(name, None)
            self._keep(asyncio.create_task(self._retire(name, handle)))
        reloads = [
            self.handles[name].reload.remote(new.models[name], new.settings)
            for name in plan.restart + plan.live
        ]
        if diff.settings:  # settings defaults reach every running model
            reloads += [
                self.handles[n].reload.remote(new.models[n], new.settings)
                for n in self.handles
                if n not in plan.restart + plan.live
            ]
        await asyncio.gather(*reloads, return_exceptions=True)
        started = await self._start_in_order(plan.start + plan.recreate)
        self._event("config_reloaded", changes=diff.summary())
        return {"changes": diff.summary(), "started": started}

    async def _start_in_order(self, names: list[str]) -> list[dict[str, Any]]:
        results = []
        for name in names:
            try:
                handle = await self._ensure_actor(name, self.config.models[name].priority)
                self._fire(handle.start.remote(force=True))
                results.append({"model": name, "placed": True})
            except ProxifierError as error:
                results.append({"model": name, "placed": False, "error": error.message})
        return results

    # ------------------------------------------------------------------ upkeep
    def _ensure_upkeep(self) -> None:
        if self._upkeep is None or self._upkeep.done():
            self._upkeep = asyncio.create_task(self._upkeep_loop())
            self._keep(asyncio.create_task(self._watch_auth_file()))
        while self._orphans:
            self._keep(asyncio.create_task(self._retire(*self._orphans.pop())))

    async def _watch_auth_file(self) -> None:
        """auth.yaml takes effect when it changes on disk (keys added or removed, no restart);
        a bad edit is rejected and the keys in force stay."""
        path = self._auth_path(self.config)
        seen = _mtime(path)
        while True:
            await asyncio.sleep(AUTH_POLL_INTERVAL)
            path = self._auth_path(self.config)
            current = _mtime(path)
            if current == seen:
                continue
            seen = current
            try:
                auth = self._load_auth(self.config)
            except ConfigError as error:
                self._event(
                    "config_rejected", file=str(path), errors=[str(i) for i in error.issues]
                )
                continue
            if auth != self.auth:
                self.auth, self.auth_version = auth, self.auth_version + 1
                self._event("auth_reloaded", keys=len(auth.api_keys), enabled=auth.enabled)

    async def _upkeep_loop(self) -> None:
        """Every cleanup_interval: stop idle models; bring preloaded ones back."""
        while True:
            await asyncio.sleep(self.config.settings.cleanup_interval)
            with contextlib.suppress(Exception):
                await self._upkeep_once()

    async def _upkeep_once(self) -> None:
        await self._replace_lost()
        running = await self._running()
        for name in idle_stops(running):
            handle = self.handles.get(name)
            if handle is None:
                continue
            idle = next(r.idle_for for r in running if r.name == name)
            answer = await handle.request_stop.remote(f"idle for {idle:.0f}s")
            if answer["accepted"]:
                await self._dispose(name, handle)
                self.evictions["idle"] = self.evictions.get("idle", 0) + 1
        ttl = self.config.settings.result_ttl
        for request_id, result in list(self.results.items()):
            if time.time() - (result.get("done_at") or 0) > ttl:
                del self.results[request_id]
        by_name = {r.name: r for r in running}
        for name in self._preloaded():
            state = by_name[name].state if name in by_name else "stopped"
            if state in ("stopped", "failed"):
                with contextlib.suppress(ProxifierError, ray.exceptions.RayActorError):
                    handle = await self._ensure_actor(name, self.config.models[name].priority)
                    await handle.start.remote()

    async def _replace_lost(self) -> None:
        """Model actors that died with their node: forget them, and place the ones that should
        be running (preload, auto_start) again where they fit, else mark them failed."""
        names = list(self.handles)
        answers = await asyncio.gather(
            *(asyncio.wait_for(self.handles[n].ping.remote(), 10) for n in names),
            return_exceptions=True,
        )
        for name, answer in zip(names, answers, strict=True):
            if not isinstance(answer, ray.exceptions.RayActorError):
                continue
            self._forget(name, self.handles[name])
            self._event("lost", model=name, reason=f"its actor died: {answer}")
            model = self.config.models.get(name)
            if model is not None and (model.preload or model.auto_start):
                with contextlib.suppress(ProxifierError):
                    handle = await self._ensure_actor(name, model.priority)
                    self._fire(handle.start.remote())

    # ------------------------------------------------------------------ helpers
    async def _status_of(self, name: str) -> dict[str, Any]:
        model = self.config.models[name]
        entry: dict[str, Any] = {
            "name": name,
            "priority": model.priority,
            "resource_group": model.resource_group,
            "preload": model.preload,
            "auto_start": model.auto_start,
            "aliases": list(model.aliases),
            "state": "stopped",
        }
        handle = self.handles.get(name)
        if handle is not None:
            try:
                entry.update(await handle.stats.remote())
            except ray.exceptions.RayActorError as error:
                entry.update(state="failed", last_error=f"model actor died: {error}")
        elif name in self.placement_failures:
            entry.update(state="failed", last_error=self.placement_failures[name][1])
        return entry

    def _resolve(self, name: str) -> str:
        model = self.config.resolve_name(name)
        if model is None:
            raise ModelNotFound(self._not_found_message(name))
        return model

    def _not_found_message(self, name: str) -> str:
        available = ", ".join(sorted(self.config.models)) or "none"
        return f"The model '{name}' does not exist. Available models: {available}"

    def _groups(self) -> list[str]:
        return sorted({m.resource_group for m in self.config.models.values()})

    def _preloaded(self) -> list[str]:
        return sorted(n for n, m in self.config.models.items() if m.preload)

    def _auth_path(self, config: ModelsConfig) -> Path | None:
        return self.explicit_auth_path or config.auth_path()

    def _load_auth(self, config: ModelsConfig) -> AuthConfig:
        path = self._auth_path(config)
        return AUTH_DISABLED if path is None else load_auth_config(path)

    def _backup_root(self) -> Path:
        return self.models_path.parent / "backups"

    def _cluster_gpus(self) -> float:
        return float(ray.cluster_resources().get("GPU", 0))

    def _event(self, kind: str, **details: Any) -> None:
        self._seq += 1
        details.pop("seq", None)
        details.setdefault("time", time.time())
        self.events.append({"seq": self._seq, "kind": kind, **details})

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fire(self, ref: Any) -> None:
        """Wait for a call in the background so a failure is observed, not reported as lost."""

        async def observe() -> None:
            with contextlib.suppress(Exception):
                await ref

        self._keep(asyncio.create_task(observe()))


async def _call(ref: Any) -> Any:
    """Await a model actor's answer, re-raising its typed error as itself: Ray cannot wrap a
    RayTaskError a second time, and the caller should see QueueFull, not a wrapper."""
    try:
        return await ref
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ProxifierError):
            raise error.cause from None
        raise


async def _placed(handle: Any, timeout: float) -> bool:
    """Whether Ray placed (and started) the actor within `timeout` seconds."""
    try:
        await asyncio.wait_for(handle.ping.remote(), timeout=timeout)
        return True
    except TimeoutError:
        return False
    except ray.exceptions.RayActorError as error:
        raise ModelFailed(f"the model's actor could not be created: {error}") from None


def _nodes() -> list[NodeView]:
    try:
        from ray._private.state import state  # no public per-node view without the dashboard

        free = state.available_resources_per_node()
    except Exception:
        free = {}
    views = []
    for node in ray.nodes():
        total = {k: float(v) for k, v in node.get("Resources", {}).items()}
        views.append(
            NodeView(
                node_id=node["NodeID"],
                address=node.get("NodeManagerAddress", "?"),
                alive=bool(node.get("Alive")),
                total=total,
                available={k: float(v) for k, v in free.get(node["NodeID"], total).items()},
                labels={
                    k: v
                    for k, v in (node.get("Labels") or {}).items()
                    if not k.startswith("ray.io/")
                },
            )
        )
    return views


def _mtime(path: Path | None) -> float | None:
    try:
        return None if path is None else path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def redact_keys(text: str) -> str:
    """auth.yaml for display: every `key:` and `key_sha256:` value replaced, in whatever YAML
    style it is written (block or flow, quoted or not); comments and layout stay."""
    data = yaml.safe_load(text) or {}
    entries = data.get("api_keys") if isinstance(data, dict) else None
    secrets = sorted(
        {
            str(value)
            for entry in (entries or {}).values()
            if isinstance(entry, dict)
            for field, value in entry.items()
            if field in ("key", "key_sha256") and value
        },
        key=len,
        reverse=True,
    )
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return text


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


ControllerRemote = ray.remote(Controller)


def create_controller(models_path: str | Path, auth_path: str | Path | None = None) -> Any:
    """The detached, named controller (restarted by Ray if it dies; it then adopts models)."""
    # On the head node (it holds the config files); it adopts the models when Ray restarts it.
    return ControllerRemote.options(
        **cluster_singleton_options(CONTROLLER_NAME), max_concurrency=4096
    ).remote(str(models_path), str(auth_path) if auth_path else None)


def get_controller() -> Any:
    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
