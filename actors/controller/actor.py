"""The controller: one detached actor per cluster that owns the configuration and the registry of
model actors (DESIGN §3). It is the scheduler's reconcile loop: one pass at a time, on every
change, it gathers the facts (nodes, the models whose actors exist, the models wanted), asks
`proxifier.scheduler.decide` and applies the answer (evict, place pinned to a node, tell waiting
requests why they wait, fail). Besides that it stops idle models, keeps preloaded ones running,
starts and stops groups and applies config reloads (`proxifier.planning` decides those).

The files themselves (backups, restore, the accepted copy) live in `actors.config_files`, the
event feed in `actors.events`, the Ray plumbing in `actors.ray_glue`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.config_files import ConfigFiles
from actors.events import EventFeed
from actors.gpu_probe import node_gpus
from actors.model import (
    NAMESPACE,
    cluster_singleton_options,
    create_model_actor,
    model_of,
)
from actors.ray_glue import Background, call, cluster_gpus, cluster_nodes, serve_applications
from actors.warm_workers import prestart
from proxifier.config import (
    AuthConfig,
    ConfigError,
    ModelsConfig,
    effective,
    parse_yaml_text,
    validate_auth,
)
from proxifier.config_diff import ModelsDiff, diff_models
from proxifier.endpoints import capabilities
from proxifier.errors import (
    ModelFailed,
    ModelNotFound,
    NotFound,
    ProxifierError,
    QueueTimeout,
    Refused,
    Unavailable,
)
from proxifier.gguf_facts import GgufError, GgufFacts, read_facts
from proxifier.gpu_inventory import declared_gpu_memory
from proxifier.gpu_memory import PROCESS_OVERHEAD, calibration_key, estimate
from proxifier.lifecycle import serve_apps_gone
from proxifier.metrics import LOAD_BUCKETS, Histogram
from proxifier.placement import NodeView, actor_options, cpu_fallback_warning, demand
from proxifier.planning import (
    RunningModel,
    group_members,
    group_stop_plan,
    idle_stops,
    reload_plan,
    startup_order,
)
from proxifier.scheduler import (
    Evict,
    Fail,
    Limits,
    Node,
    Place,
    Resident,
    Wait,
    Want,
    decide,
    gpu_fraction,
)

CONTROLLER_NAME = "proxifier:controller"
AUTH_POLL_INTERVAL = 1.0  # seconds between looks at auth.yaml's modification time
RECONCILE_TICK = 1.0  # seconds between passes while a model waits (nothing else woke one)
READ_WAIT = 0.5  # seconds a status or listing waits for a model file's first header read
PROBE_RETRY = 300.0  # seconds before a node whose GPU size is unknown is probed again
STATS_WAIT = 2.0  # seconds a pass waits for a model's facts before it counts it as starting


SERVE_WATCH_INTERVAL = 2.0  # seconds between looks at whether the Serve application still exists
SPARE_AFTER = 30.0  # seconds after a model actor took a node's spare worker, a new one starts
SPARE_DELAY = 5.0  # ... or this long after that model became ready (or failed), if sooner


@dataclass
class Wanted:
    """A model that must run: the requests (or admin calls) waiting for its actor."""

    future: asyncio.Future[Any]
    since: float  # its oldest waiting request: demand order among equal priorities
    waiters: int = 0
    keep: bool = False  # stays wanted with nobody waiting (boot, admin start, preload)
    reason: str = "waiting for the scheduler's next pass"


def _among(names: list[str], only: list[str] | None) -> list[str]:
    """`names` (in their order) that are in `only`; all of them when `only` is None."""
    return names if only is None else [n for n in names if n in only]


def _observed(future: asyncio.Future[Any]) -> None:
    """A want that failed while nobody waited: its exception is not an unhandled error."""
    if not future.cancelled():
        future.exception()


def _node_facts(
    views: list[NodeView], residents: list[Resident], gpu_sizes: dict[str, float] | None = None
) -> list[Node]:
    """Nodes for the scheduler. A node's free amounts are the smaller of what Ray reports and
    its totals less what our models there hold: an actor just created may not show in Ray's
    numbers yet, and counting it placed is what keeps concurrent starts from overrunning.
    `gpu_sizes`: bytes per GPU of each node (declared by label, else detected)."""
    held: dict[str, dict[str, float]] = {}
    for resident in residents:
        on_node = held.setdefault(resident.node_id, {})
        for key, amount in resident.holds.items():
            on_node[key] = on_node.get(key, 0.0) + amount
    nodes = []
    for view in views:
        ours = held.get(view.node_id, {})
        free = {
            key: min(view.available.get(key, 0.0), total - ours.get(key, 0.0))
            for key, total in view.total.items()
        }
        size = (gpu_sizes or {}).get(view.node_id, 0.0)
        nodes.append(
            Node(view.node_id, view.address, view.total, free, view.labels, view.alive, size)
        )
    return nodes


MEASURED_KEY = "proxifier:gpu-memory-measured"


def _load_measured() -> dict[str, dict[str, Any]]:
    """Calibrations kept in Ray's key-value store: they outlive a controller restart."""
    from ray.experimental import internal_kv

    if not ray.is_initialized() or not internal_kv._internal_kv_initialized():
        return {}
    raw = internal_kv._internal_kv_get(MEASURED_KEY)
    return json.loads(raw) if raw else {}


def _save_measured(measured: dict[str, dict[str, Any]]) -> None:
    from ray.experimental import internal_kv

    if ray.is_initialized() and internal_kv._internal_kv_initialized():
        internal_kv._internal_kv_put(MEASURED_KEY, json.dumps(measured), overwrite=True)


def _gpu_shares(gpu_ids: list[Any], num_gpus: float) -> dict[int, float]:
    """The fraction of each GPU an actor holds, from the ids Ray gave it."""
    ids = []
    for gpu in gpu_ids:
        with contextlib.suppress(ValueError, TypeError):
            ids.append(int(gpu))
    if not ids or num_gpus <= 0:
        return {}
    return dict.fromkeys(ids, min(1.0, num_gpus / len(ids)))


def _gpu_view(
    node: NodeView, size: float | None, statuses: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each GPU of a node: its memory, what each model there holds of it and expects to need,
    and what is free (by Ray's fractions)."""
    count = int(node.total.get("GPU", 0.0) + 1e-6)
    gpus: list[dict[str, Any]] = [
        {"index": i, "memory": size, "used_fraction": 0.0, "models": []} for i in range(count)
    ]
    for status in statuses:
        memory = status.get("gpu_memory") or {}
        shares = _gpu_shares(status.get("gpu_ids") or [], memory.get("num_gpus") or 0.0)
        for index, share in shares.items():
            if index < count:
                gpu = gpus[index]
                gpu["used_fraction"] = round(gpu["used_fraction"] + share, 4)
                gpu["models"].append(
                    {
                        "name": status["name"],
                        "share": share,
                        "holds": share * size if size else None,
                        "expected": memory.get("need"),
                        "measured": memory.get("measured"),
                    }
                )
    for gpu in gpus:
        gpu["free"] = max(0.0, 1 - gpu["used_fraction"]) * size if size else None
    return gpus


class Controller:
    """Ray actor (created by `create_controller`); every public method is a remote call."""

    async def __init__(self, models_path: str, auth_path: str | None = None) -> None:
        # async: Ray runs it on the actor's event loop, so the loops start here, also when
        # Ray restarts a controller that died (DESIGN §11).
        self.models_path = Path(models_path).resolve()
        self.files = ConfigFiles(self.models_path, Path(auth_path).resolve() if auth_path else None)
        self.feed = EventFeed()
        self.background = Background()
        self.spares: dict[str, float] = {}  # node id -> when a spare worker was last asked for
        self.spent: dict[str, float] = {}  # node id -> when a model actor likely took its spare
        # A restarted controller goes on with the configuration it last accepted, not with
        # whatever is on disk now (an edit not reloaded yet, or a bad file). A first start
        # reads the files; one that does not load fails the actor's creation (`proxifier serve`
        # validates first).
        finished = self.files.finish_restore()  # one a crash interrupted, before reading
        if finished is not None:
            self._event("config_restored", id=finished, completed_after_restart=True)
        self.config, self.auth = self._accepted_or_files(read_files=finished is not None)
        self.auth_version = 0
        self.handles: dict[str, Any] = {}
        self.options: dict[str, dict[str, Any]] = {}
        self.placement_failures: dict[str, tuple[float, str]] = {}
        self.wants: dict[str, Wanted] = {}  # models that must run and have no actor yet
        self.retiring: dict[str, Any] = {}  # instances out of the registry, still stopping
        # model -> (actor, options, node id): new instances that take over once ready (reload)
        self.pending: dict[str, tuple[Any, dict[str, Any], str]] = {}
        self.nodes_of: dict[str, str] = {}  # model -> node id it was placed on
        self.decisions: dict[str, dict[str, Any]] = {}  # the scheduler's last word per model
        self._wake = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self._upkeep: asyncio.Task[None] | None = None
        # Serve applications whose ingress replicas use this controller: when they are all
        # deleted, the models stop and the controller goes (serve deploy/shutdown, KubeRay).
        self.serve_apps: set[str] = set()
        self._serve_watch: asyncio.Task[None] | None = None
        self._orphans: list[tuple[str, Any]] = []
        # Finished async (respond-async) results of model actors that were stopped since.
        self.results: dict[str, dict[str, Any]] = {}
        # When each model first appeared: /v1/models' stable `created`.
        now = int(time.time())
        self.registered_at: dict[str, int] = dict.fromkeys(self.config.models, now)
        self.replica_metrics: dict[str, tuple[float, dict[str, Any]]] = {}
        self.load_seconds: dict[str, Histogram] = {}
        self.evictions: dict[str, int] = {}
        # GPU memory (DESIGN §10): each node's GPU size as detected (a label overrides it),
        # and what models really used, by file and memory flags (calibration).
        self.gpu_sizes: dict[str, float] = {}
        self._probed: dict[str, float] = {}  # node -> when its GPUs were last probed
        self.measured: dict[str, dict[str, Any]] = _load_measured()
        self.calibrating: dict[str, str] = {}  # model -> the key its instance measures
        # (model file, size, mtime) -> its header, read once in a thread
        self._reading: dict[tuple[str, int, int], asyncio.Future[GgufFacts]] = {}
        for name in self.config.models:  # read now, so a first status finds them
            path = self.config.model_file(name)
            if path is not None and path.is_file():
                self.background.keep(asyncio.ensure_future(self._warm(path)))
        self._adopt()
        self._ensure_upkeep()
        self._ensure_reconciler()

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

    # ------------------------------------------------------------------ boot and adoption
    def _adopt(self) -> None:
        """Take over model actors that outlived a previous controller: no second llama-server."""
        # The namespace of a detached actor is its creator's, not the one its name lives in.
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            model = model_of(name)
            if entry["namespace"] != NAMESPACE or model is None:
                continue
            with contextlib.suppress(ValueError):
                handle = ray.get_actor(name, namespace=NAMESPACE)
                if model in self.config.models and model not in self.handles:
                    self.handles[model] = handle
                    self.options[model] = actor_options(self.config.models[model], cluster_gpus())
                    self._event("adopted", model=model)
                else:
                    self._orphans.append((model, handle))  # retired once the loop runs

    async def boot(self) -> list[dict[str, Any]]:
        """Start auto_start and preload models, highest priority first, each placed before the
        next is created; their loads overlap. Safe to call again (running models are kept)."""
        self._ensure_upkeep()
        # No spare worker yet: the boot's own workers are starting (a spare comes 5 s after
        # a model loaded, or with the first upkeep).
        return await self._start_in_order(startup_order(self.config.models))

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
        handle = self.handles.get(model)
        if moved is not None and handle is not None and handle._actor_id.hex() == moved:
            await self._check_moved(model, handle)
        return await self._ensure_actor(model, deadline)

    async def _check_moved(self, name: str, handle: Any) -> None:
        try:
            stats = await asyncio.wait_for(handle.stats.remote(), STATS_WAIT)
        except ray.exceptions.RayActorError as error:
            if self.handles.get(name) is handle:
                self._forget(name, handle)
                self._event("lost", model=name, reason=f"its actor died: {error}")
            return
        except TimeoutError:
            return  # alive but slow: keep it
        if stats["retired"]:
            self._unregister(name, handle)  # its stop is under way; requests need a new one

    def resolve(self, name: str) -> str:
        return self._resolve(name)

    async def start_model(self, name: str, wait: bool = True) -> dict[str, Any]:
        """An admin start: place the model, start it (skipping a failure cooldown), and wait
        until it is ready; without `wait`, only until its start is under way."""
        model = self._resolve(name)
        deadline = time.time() + self.config.settings.placement_timeout
        self.placement_failures.pop(model, None)  # an admin start skips a failure's cooldown
        handle = await self._ensure_actor(model, deadline)
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
        return [] if handle is None else await call(handle.logs.remote(lines))

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
        cleared = 0 if handle is None else await call(handle.clear_queue.remote())
        return {"model": model, "cleared": cleared}

    # ------------------------------------------------------------------ groups
    # `only`: the models the caller's API key may use (None: every model). Bulk operations
    # touch, and report, only those; a group none of whose members it may see does not exist.
    async def start_group(self, group: str, only: list[str] | None = None) -> dict[str, Any]:
        members = _among(group_members(self.config.models, group), only)
        if not members:
            raise NotFound(f"no model is in resource group '{group}'; groups: {self._groups(only)}")
        return {"group": group, "results": await self._start_in_order(members)}

    async def stop_group(self, group: str, only: list[str] | None = None) -> dict[str, Any]:
        to_stop, kept = group_stop_plan(self.config.models, group)
        to_stop, kept = _among(to_stop, only), _among(kept, only)
        if not to_stop and not kept:
            raise NotFound(f"no model is in resource group '{group}'; groups: {self._groups(only)}")
        await asyncio.gather(*(self._stop(n, f"group '{group}' stopped") for n in to_stop))
        return {"group": group, "stopped": to_stop, "kept_preloaded": kept}

    async def start_all(self, only: list[str] | None = None) -> dict[str, Any]:
        names = sorted(self.config.models, key=lambda n: (-self.config.models[n].priority, n))
        return {"results": await self._start_in_order(_among(names, only))}

    async def stop_all(self, only: list[str] | None = None) -> dict[str, Any]:
        names = _among([n for n, m in self.config.models.items() if not m.preload], only)
        await asyncio.gather(*(self._stop(n, "stop-all") for n in names))
        return {"stopped": sorted(names), "kept_preloaded": _among(self._preloaded(), only)}

    async def groups_status(self, only: list[str] | None = None) -> dict[str, Any]:
        statuses = {s["name"]: s for s in await self.status()}
        groups: dict[str, Any] = {}
        for group in self._groups(only):
            members = _among(group_members(self.config.models, group), only)
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
        return self.results.get(request_id) or {"status": "unknown", "request_id": request_id}

    async def find_result(self, request_id: str) -> dict[str, Any]:
        """An async request's state, wherever it is: kept here, or with a running model."""
        if request_id in self.results:
            return self.results[request_id]
        actors = [*self.handles.items(), *self.retiring.items()]
        answers = await asyncio.gather(
            *(handle.result.remote(request_id) for _, handle in actors), return_exceptions=True
        )
        for (name, _), answer in zip(actors, answers, strict=True):
            if isinstance(answer, dict) and answer["status"] != "unknown":
                return {**answer, "model": name}
        if request_id in self.results:  # taken from an actor that stopped meanwhile
            return self.results[request_id]
        return {"status": "unknown", "request_id": request_id}

    async def models_list(self) -> list[dict[str, Any]]:
        """/v1/models: every configured model with its state, priority, group and what it can
        be asked to do."""
        statuses = await self.status()
        fim = await asyncio.gather(*(self._fill_in_middle(s["name"]) for s in statuses))
        models = self.config.models  # read once: a reload may land between the awaits above
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
                "capabilities": [str(c) for c in capabilities(models[status["name"]], infill)]
                if status["name"] in models
                else [],
            }
            for status, infill in zip(statuses, fim, strict=True)
        ]

    async def _fill_in_middle(self, name: str) -> bool | None:
        """Whether the model's GGUF has FIM tokens; None when its file is not readable here
        (on another node, or not there yet). Each file's header is read once."""
        path = self.config.model_file(name) if name in self.config.models else None
        if path is None or not path.is_file():
            return None
        try:
            facts = await self._header(path, READ_WAIT)
        except GgufError:
            return None
        return None if facts is None else facts.fill_in_middle

    async def _warm(self, path: Path) -> None:
        with contextlib.suppress(Exception):  # a bad file says so where it is used
            await self._header(path)

    async def _header(self, path: Path, wait: float | None = None) -> GgufFacts | None:
        """A model file's header facts, read once in a thread (a large vocabulary takes a
        second or two). With `wait`, None if the first read takes longer: it goes on, and a
        later call finds it done, so a status or a listing never waits long for it."""
        try:
            stat = path.stat()
        except OSError as error:
            raise GgufError(f"{path}: cannot read: {error.strerror or error}") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)  # a replaced file is read again
        reading = self._reading.get(key)
        if reading is None or (reading.done() and reading.exception() is not None):
            reading = asyncio.ensure_future(asyncio.to_thread(read_facts, path))
            reading.add_done_callback(_observed)
            self._reading[key] = reading
        if wait is None:
            return await asyncio.shield(reading)
        try:
            return await asyncio.wait_for(asyncio.shield(reading), wait)
        except TimeoutError:
            return None

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
        if event.get("kind") == "ready" and isinstance(event.get("memory"), dict):
            key = self.calibrating.pop(event.get("model", ""), None)
            if key is not None:
                self.measured[key] = {**event["memory"], "at": time.time()}
                _save_measured(self.measured)
        if event.get("kind") == "ready" and "load_seconds" in event:
            histogram = self.load_seconds.setdefault(event["model"], Histogram(LOAD_BUCKETS))
            histogram.observe(event["load_seconds"])
        if event.get("kind") == "failed" and event.get("model") in self.handles:
            self.background.keep(asyncio.create_task(self._drop_failed(event["model"])))
        node_id = self.nodes_of.get(event.get("model", ""))
        if event.get("kind") in ("ready", "failed") and node_id in self.spent:
            # Its load is over; its first requests come now: the next spare's start-up
            # (a second of CPU) waits a little longer.
            asyncio.get_running_loop().call_later(SPARE_DELAY, self._replace_spare, node_id)
        self._event(event.get("kind", "event"), **{k: v for k, v in event.items() if k != "kind"})

    def events_since(self, seq: int = -1, limit: int = 500) -> list[dict[str, Any]]:
        return self.feed.since(seq, limit)

    async def cluster(self) -> dict[str, Any]:
        statuses = await self.status()
        where: dict[str, list[dict[str, Any]]] = {}
        for status in statuses:
            if status.get("node_id"):
                where.setdefault(status["node_id"], []).append(status)
        views = cluster_nodes()
        sizes = self._gpu_sizes(views)
        nodes = [
            {
                "node_id": node.node_id,
                "address": node.address,
                "alive": node.alive,
                "resources": dict(node.total),
                "free": dict(node.available),
                "labels": dict(node.labels),
                "models": sorted(s["name"] for s in where.get(node.node_id, [])),
                "gpus": _gpu_view(node, sizes.get(node.node_id), where.get(node.node_id, [])),
            }
            for node in views
        ]
        return {"nodes": nodes}

    async def shutdown(self) -> None:
        """Stop every model and kill its actor (what `proxifier serve` does on Ctrl-C)."""
        for task in (self._upkeep, self._reconciler):
            if task is not None:
                task.cancel()
        for entry in self.wants.values():
            if not entry.future.done():
                entry.future.set_exception(Unavailable("the server is shutting down"))
        self.wants.clear()
        pending = [(f"{n}@next", entry[0]) for n, entry in self.pending.items()]
        self.pending.clear()
        await asyncio.gather(
            *(self._stop(n, "shutdown") for n in list(self.handles)),
            *(self._end(n, h, "shutdown") for n, h in [*self.retiring.items(), *pending]),
        )

    async def _end(self, name: str, handle: Any, reason: str) -> None:
        """Stop an instance no request reaches any more (retiring, or a replacement not
        needed) and kill its actor."""
        with contextlib.suppress(ray.exceptions.RayError):
            await handle.stop.remote(reason, retire=True)
        self._forget(name, handle)

    def ping(self) -> str:
        return "pong"

    def serve_app(self, name: str) -> None:
        """An ingress replica of Serve application `name` uses this controller (said at its start
        and at each of its health checks)."""
        if name not in self.serve_apps:
            self._event("serve_app_watched", application=name)
        self.serve_apps.add(name)
        if self._serve_watch is None or self._serve_watch.done():
            self._serve_watch = asyncio.ensure_future(self._watch_serve())
            self._serve_watch.add_done_callback(_observed)

    async def _watch_serve(self) -> None:
        """Stop every model and end this controller once the Serve applications it serves
        are gone: nothing else would stop llama-server after `serve shutdown`. Gone is what
        Serve itself says (seen twice in a row), never a silence: a Serve that does not
        answer may be restarting."""
        gone_in_a_row = 0
        while gone_in_a_row < 2:
            await asyncio.sleep(SERVE_WATCH_INTERVAL)
            try:
                statuses = await serve_applications()
            except Exception:  # Serve restarting or busy: not known to be gone
                continue
            gone = serve_apps_gone(self.serve_apps, statuses)
            gone_in_a_row = gone_in_a_row + 1 if gone else 0
        self._event("serve_app_deleted", applications=sorted(self.serve_apps))
        await self.shutdown()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def pid(self) -> int:
        """The controller's process id: it changes when Ray restarts the controller."""
        return os.getpid()

    # ------------------------------------------------------------------ placement
    async def _ensure_actor(self, name: str, deadline: float | None = None) -> Any:
        """The model's actor, once the scheduler has placed it. Until `deadline` (wall clock)
        the caller waits while the model waits for room; then it is told what the model waits
        for. A model no node could ever hold fails at once (and for `cooldown` after)."""
        handle = self.handles.get(name)
        if handle is not None:
            return handle
        failure = self.placement_failures.get(name)
        if failure is not None and time.time() - failure[0] < self.config.settings.cooldown:
            raise ModelFailed(failure[1], retry_after=self.config.settings.cooldown)
        wanted = self._want(name)
        wanted.waiters += 1
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.time())
            return await asyncio.wait_for(asyncio.shield(wanted.future), remaining)
        except TimeoutError:
            raise QueueTimeout(
                f"model '{name}' could not be placed in time: {wanted.reason}",
                retry_after=self.config.settings.queue.queue_timeout,
            ) from None
        finally:
            wanted.waiters -= 1
            if wanted.waiters == 0 and not wanted.keep and self.wants.get(name) is wanted:
                del self.wants[name]  # nobody waits for it any more

    def _want(self, name: str, keep: bool = False) -> Wanted:
        """Ask the scheduler to place `name` (it must run); `keep`: until placed or failed,
        even with no request waiting (boot, admin starts, preload)."""
        wanted = self.wants.get(name)
        if wanted is None or wanted.future.done():
            wanted = Wanted(asyncio.get_running_loop().create_future(), time.time())
            wanted.future.add_done_callback(_observed)
            self.wants[name] = wanted
        wanted.keep = wanted.keep or keep
        self._ensure_reconciler()
        self._wake.set()
        return wanted

    async def _await_placed(self, names: list[str]) -> list[dict[str, Any]]:
        """Ask for every one of `names` at once (the scheduler orders them by priority) and
        report, within placement_timeout, which were placed and why the others were not."""
        wanted = {name: self._want(name, keep=True) for name in names}
        timeout = self.config.settings.placement_timeout
        pending = [w.future for w in wanted.values() if not w.future.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)  # waits; never cancels them
        results = []
        for name, entry in wanted.items():
            if name in self.handles:
                results.append({"model": name, "placed": True})
            elif entry.future.done() and entry.future.exception() is not None:
                error = entry.future.exception()
                message = error.message if isinstance(error, ProxifierError) else str(error)
                results.append({"model": name, "placed": False, "error": message})
            else:
                results.append({"model": name, "placed": False, "error": entry.reason})
        return results

    def _ensure_reconciler(self) -> None:
        if self._reconciler is None or self._reconciler.done():
            self._reconciler = asyncio.create_task(self._reconcile_forever())

    async def _reconcile_forever(self) -> None:
        """One pass at a time: on every change (a model wanted, stopped, evicted, lost; a
        reload) and every second while something waits (nodes join, models go idle)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RECONCILE_TICK)
            self._wake.clear()
            if not self.wants:
                continue
            try:
                await self._reconcile_once()
            except Exception as error:  # a bad pass must not end the loop
                self._event("scheduler_error", error=repr(error))

    async def _reconcile_once(self) -> None:
        for name in [n for n in self.wants if n not in self.config.models]:
            self.wants.pop(name).future.set_exception(ModelNotFound(self._not_found_message(name)))
        for name in [n for n in self.wants if n in self.handles]:
            self.wants.pop(name).future.set_result(self.handles[name])
        cooling = self._cooling_down()
        for name in cooling & set(self.wants):
            self.wants[name].reason = (
                "cooling down after a failure: " + self.placement_failures[name][1]
            )
        if not set(self.wants) - cooling:
            return
        gpus, residents, nodes = await self._facts()
        sized = any(node.gpu_memory > 0 for node in nodes)
        # A snapshot: the awaits below let requests add wants, or drop theirs, meanwhile.
        wants = [
            await self._want_for(name, gpus, entry.since, sized=sized)
            for name, entry in list(self.wants.items())
            if name not in cooling and name in self.config.models
        ]
        settings = self.config.settings
        limits = Limits(settings.max_running_models, settings.min_residency, settings.placement)
        actions = decide(nodes, residents, wants, limits, time.time())
        blocked: set[str] = set()  # an eviction was refused: its model waits for the next pass
        placed: list[Any] = []
        for action in actions:
            if isinstance(action, Evict):
                if action.for_model in blocked:
                    continue
                self._explain(
                    action.for_model,
                    "evicting",
                    f"stopping '{action.victim}' ({action.reason}) to make room",
                )
                if not await self._evict(action.victim, action.for_model, action.reason):
                    blocked.add(action.for_model)
            elif isinstance(action, Place):
                if action.model not in blocked and action.model in self.wants:
                    placed.append(
                        await self._create(action.model, action.node_id, gpus, action.gpus)
                    )
            elif isinstance(action, Wait):
                if action.model in self.wants:
                    self.wants[action.model].reason = action.reason
                    self._explain(action.model, "waiting", action.reason)
            elif isinstance(action, Fail):
                entry = self.wants.pop(action.model, None)
                self.placement_failures[action.model] = (time.time(), action.reason)
                self._explain(action.model, "failed", action.reason)
                self._event("failed", model=action.model, reason=action.reason)
                if entry is not None:
                    entry.future.set_exception(
                        ModelFailed(action.reason, retry_after=self.config.settings.cooldown)
                    )

        if placed:
            self.background.keep(asyncio.create_task(self._start_in_turn(placed)))

    async def _start_in_turn(self, handles: list[Any]) -> None:
        """Start llama-server on each actor placed in one pass, in the pass's order (priority):
        each once the one before it exists, so higher priorities start first; loads overlap."""
        for handle in handles:
            with contextlib.suppress(ray.exceptions.RayError):
                await handle.launch.remote()

    async def _create(
        self, name: str, node_id: str, gpus: float, num_gpus: float | None = None
    ) -> Any:
        """Create the model's actor on the node the scheduler chose, register it, and hand it
        to everyone waiting (`_start_in_turn` starts llama-server)."""
        handle, options = await self._new_instance(name, node_id, gpus, num_gpus)
        self._register(name, handle, options, node_id)
        self._explain(name, "placed", f"placed on node {node_id}")
        entry = self.wants.pop(name, None)
        if entry is not None:
            entry.future.set_result(handle)
        return handle

    async def _new_instance(
        self, name: str, node_id: str, gpus: float, num_gpus: float | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """A new actor for the model's current config, pinned to `node_id` (Ray never second-
        guesses the scheduler), under a name of its own generation."""
        model = self.config.models[name]
        warning = cpu_fallback_warning(name, model, gpus)
        if warning:
            self._event("warning", model=name, message=warning)
        options = actor_options(model, gpus)
        if num_gpus is not None:  # placed by GPU memory: its share of one GPU, or whole GPUs
            options["num_gpus"] = num_gpus
        pinned = {k: v for k, v in options.items() if k != "label_selector"}
        key = (await self._memory_of(name))["calibration_key"]
        calibrate = key is not None and key not in self.measured
        if calibrate:
            self.calibrating[name] = key
        wanted = self.wants.get(name)
        timeline = {"placed": time.time()}
        if wanted is not None:
            timeline["wanted"] = wanted.since
        handle = create_model_actor(
            name,
            model,
            self.config.settings,
            self.config.base_dir,
            events_to=CONTROLLER_NAME,
            calibrate=calibrate,
            timeline=timeline,
            generation=uuid.uuid4().hex[:8],
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            **pinned,
        )
        self._event("placed", model=name, node_id=node_id, options=options)
        # This actor likely took the node's spare worker. The next one starts once this
        # model has loaded: a worker's start-up would take CPU from the load.
        self.spent.setdefault(node_id, time.monotonic())
        return handle, options

    def _spare_on(self, node_id: str) -> None:
        """A spare Ray worker on the node, so the next model actor there starts in
        milliseconds instead of a worker's start-up (actors/warm_workers.py)."""
        self.spent.pop(node_id, None)
        self.spares[node_id] = time.monotonic()
        self.background.keep(asyncio.create_task(asyncio.to_thread(prestart, node_id)))

    def _replace_spare(self, node_id: str) -> None:
        if node_id in self.spent:  # not replaced meanwhile (by upkeep)
            self._spare_on(node_id)

    async def _keep_spares(self) -> None:
        """Each alive node gets one spare worker, and one a model actor took is replaced once
        that model loaded (or SPARE_AFTER s). Only then: an unused spare stays (for the
        raylet's keep-alive, then as long as its node has idle room), and asking again would
        pile up idle processes."""
        nodes = await asyncio.to_thread(cluster_nodes)
        alive = {view.node_id for view in nodes if view.alive}
        for table in (self.spares, self.spent):
            for node_id in [n for n in table if n not in alive]:
                del table[node_id]
        now = time.monotonic()
        for node_id in alive:
            if node_id not in self.spares or now - self.spent.get(node_id, math.inf) > SPARE_AFTER:
                self._spare_on(node_id)

    def _discard_pending(self, name: str, handle: Any) -> None:
        entry = self.pending.get(name)
        if entry is not None and entry[0] is handle:
            del self.pending[name]

    def _register(self, name: str, handle: Any, options: dict[str, Any], node_id: str) -> None:
        self.handles[name] = handle
        self.options[name] = options
        self.nodes_of[name] = node_id
        self.placement_failures.pop(name, None)

    async def _replace(self, name: str) -> str:
        """A placement field of a running model changed: it needs a new actor. Where the new
        instance fits beside the old one, it starts first and takes over once it is ready,
        the old one then finishing what it has (blue/green); else the old one leaves the
        registry and drains while the scheduler places the new one (its queue is served).
        Returns which of the two it does."""
        old = self.handles[name]
        gpus, residents, nodes = await self._facts()
        settings = self.config.settings
        limit = settings.max_running_models + 1 if settings.max_running_models else 0
        sized = any(node.gpu_memory > 0 for node in nodes)
        beside = await self._want_for(name, gpus, 0.0, as_name=f"{name}@next", sized=sized)
        limits = Limits(limit, settings.min_residency, settings.placement)
        actions = decide(nodes, residents, [beside], limits, 0.0)
        if len(actions) == 1 and isinstance(actions[0], Place):
            node_id = actions[0].node_id
            new, options = await self._new_instance(name, node_id, gpus, actions[0].gpus)
            self.pending[name] = (new, options, node_id)
            self.background.keep(asyncio.create_task(self._take_over(name, old, new)))
            return "blue/green"
        self._unregister(name, old)  # requests from now on wait for the new instance
        self.background.keep(asyncio.create_task(self._retire(name, old)))
        self._want(name, keep=True)
        return "stop, then start"

    async def _take_over(self, name: str, old: Any, new: Any) -> None:
        try:
            await call(new.start.remote(force=True))  # until its llama-server is ready
        except (ProxifierError, ray.exceptions.RayError) as error:
            # The new config does not start; it is the one in force, so the model fails.
            self._discard_pending(name, new)
            await self._end(f"{name}@next", new, "failed to start after a reload")
            message = error.message if isinstance(error, ProxifierError) else str(error)
            self.placement_failures[name] = (time.time(), message)
            if self.handles.get(name) is old:
                self._unregister(name, old)
                await self._retire(name, old)
            return
        entry = self.pending.get(name)
        if entry is None or entry[0] is not new or self.handles.get(name) is not old:
            # Overtaken by a stop or another reload meanwhile: this instance is not needed.
            self._discard_pending(name, new)
            await self._end(f"{name}@next", new, "replaced before it took over")
            return
        _, options, node_id = self.pending.pop(name)
        self._unregister(name, old)
        self._register(name, new, options, node_id)
        self._event("replaced", model=name, node_id=node_id)
        self._explain(name, "placed", f"placed on node {node_id} (replaced after a reload)")
        await self._retire(name, old)

    async def _drop_failed(self, name: str) -> None:
        """A failed model holds nothing (DESIGN §3): its reason and cooldown stay here, its
        actor (and the GPU it reserved) goes. The next request after the cooldown, or an
        admin start, places it afresh."""
        handle = self.handles.get(name)
        if handle is None:
            return
        try:
            stats = await handle.stats.remote()
        except ray.exceptions.RayActorError:
            return  # gone already: _replace_lost deals with it
        if stats["state"] != "failed" or self.handles.get(name) is not handle:
            return
        reason = f"model '{name}' failed: {stats['last_error']}"
        self.placement_failures[name] = (time.time(), reason)
        self._explain(name, "failed", reason)
        self._unregister(name, handle)
        await self._dispose(name, handle)

    async def _facts(self) -> tuple[float, list[Resident], list[Node]]:
        """What a decision starts from: the cluster's GPUs, the models whose actors exist, and
        the nodes with what is free on them."""
        residents = await self._residents()
        views = cluster_nodes()
        return cluster_gpus(), residents, _node_facts(views, residents, self._gpu_sizes(views))

    def _gpu_sizes(self, views: list[NodeView]) -> dict[str, float]:
        """Bytes per GPU of each GPU node: its `gpu-memory-gb` label, else what a probe found
        there (one probe per node, in the background: until it answers, the node's size is
        unknown and models that need memory go elsewhere or take whole GPUs)."""
        sizes: dict[str, float] = {}
        now = time.monotonic()
        for view in views:
            if not view.alive or view.total.get("GPU", 0.0) <= 0:
                continue
            declared = declared_gpu_memory(view.labels)
            if declared is not None:
                sizes[view.node_id] = declared
            elif view.node_id in self.gpu_sizes:
                sizes[view.node_id] = self.gpu_sizes[view.node_id]
            elif now - self._probed.get(view.node_id, -math.inf) > PROBE_RETRY:
                # Asked again now and then: a driver may come up, a probe may have timed out.
                self._probed[view.node_id] = now
                self.background.keep(asyncio.create_task(self._probe(view.node_id)))
        return sizes

    async def _probe(self, node_id: str) -> None:
        try:
            gpus = await asyncio.wait_for(node_gpus(node_id), 60)
        except Exception as error:  # a node that went away, no driver: its size stays unknown
            self._event("gpu_probe_failed", node_id=node_id, error=str(error))
            return
        if gpus:
            self.gpu_sizes[node_id] = float(min(g.memory for g in gpus))
            self._event("gpus_found", node_id=node_id, gpus=[g.__dict__ for g in gpus])
            self._wake.set()

    async def _want_for(
        self,
        name: str,
        gpus: float,
        since: float,
        as_name: str | None = None,
        sized: bool = False,
    ) -> Want:
        """Model `name` as demand for the scheduler (under `as_name`, for a second instance).
        A model that offloads to a GPU without an explicit `num_gpus` is placed by the GPU
        memory it needs when some node's GPU size is known (`sized`), else on a whole GPU."""
        model = self.config.models[name]
        needs = demand(actor_options(model, gpus))
        memory = 0.0
        if sized and model.num_gpus is None and needs.get("GPU", 0.0) > 0:
            need = (await self._memory_of(name))["need"]
            if need:
                memory = float(need)
                needs.pop("GPU")
        return Want(as_name or name, needs, dict(model.labels), model.priority, since, memory)

    async def _share_changed(self, name: str, sizes: dict[str, float]) -> bool:
        """Whether a running model placed by GPU memory would ask another share now.
        `sizes`: each node's GPU size (`_gpu_sizes`)."""
        options = self.options.get(name) or {}
        held = options.get("num_gpus") or 0.0
        model = self.config.models[name]
        size = sizes.get(self.nodes_of.get(name, ""))
        if model.num_gpus is not None or not held or not size:
            return model.num_gpus is not None and held != model.num_gpus
        need = (await self._memory_of(name))["need"]
        return bool(need) and gpu_fraction(float(need), size) != held

    async def _memory_of(self, name: str, wait: float | None = None) -> dict[str, Any]:
        """The model's GPU memory: configured (`gpu_memory`), measured on an earlier load of
        this file with these flags, estimated from its GGUF header (read where the controller
        runs); `need` is the first of them there is. `wait`: as for `_header` (a status does
        not wait for a first read; a placement does)."""
        model = self.config.models[name]
        found: dict[str, Any] = {
            "configured": model.gpu_memory,
            "measured": None,
            "estimated": None,
            "calibration_key": None,
        }
        path = self.config.model_file(name)
        if path is not None and path.is_file():
            try:
                facts = await self._header(path, wait)
                if facts is None:
                    found["need"] = found["configured"]
                    found["reading"] = True  # its header is being read: ask again
                    return found
                need = estimate(facts, model)
                found["estimated"] = need.total
                found["estimate"] = {
                    "weights": need.weights,
                    "kv_cache": need.kv_cache,
                    "compute": need.compute,
                    "overhead": need.overhead,
                    "layers_on_gpu": f"{need.offloaded}/{need.layers}",
                }
                key = found["calibration_key"] = calibration_key(facts, model)
                measured = self.measured.get(key)
                if measured is not None and measured.get("process"):
                    found["measured"] = measured["process"]  # the GPU's own count
                elif measured is not None and measured["gpu"] > 0:
                    found["measured"] = measured["gpu"] + PROCESS_OVERHEAD
            except (GgufError, ValueError) as error:  # EstimateError is a ValueError
                found["error"] = str(error)
        found["need"] = found["configured"] or found["measured"] or found["estimated"]
        return found

    async def _residents(self) -> list[Resident]:
        """Facts about every model whose actor exists. One that does not answer in time (its
        actor is still being created) counts as starting: it holds its place, is never a victim."""
        names = list(self.handles)
        stats = await asyncio.gather(
            *(asyncio.wait_for(self.handles[n].stats.remote(), STATS_WAIT) for n in names),
            return_exceptions=True,
        )
        now = time.time()
        residents = [
            # A new instance taking over after a reload holds its resources and is never a
            # victim (it is counted as a preloaded, starting model).
            Resident(f"{name}@next", node, demand(options), 10, True, "starting", 0, 0, now, None)
            for name, (_, options, node) in self.pending.items()
        ]
        for name, stat in zip(names, stats, strict=True):
            model = self.config.models.get(name)
            holds = demand(self.options.get(name, {}))
            priority, preload = (model.priority, model.preload) if model else (10, True)
            if isinstance(stat, BaseException):
                node = self.nodes_of.get(name, "")
                residents.append(
                    Resident(name, node, holds, priority, preload, "starting", 0, 0, now, None)
                )
                continue
            node = self.nodes_of.get(name) or stat.get("node_id") or ""
            residents.append(
                Resident(
                    name=name,
                    node_id=node,
                    holds=holds,
                    priority=priority,
                    preload=preload,
                    state=stat["state"],
                    in_flight=stat["in_flight"],
                    queued=stat["queue_depth"],
                    last_used=stat["last_used"] or stat["ready_at"] or stat["started_at"] or 0.0,
                    ready_since=stat["ready_at"],
                    gpus=_gpu_shares(stat.get("gpu_ids") or [], holds.get("GPU", 0.0)),
                )
            )
        return residents

    def _cooling_down(self) -> set[str]:
        cooldown = self.config.settings.cooldown
        now = time.time()
        return {n for n, (at, _) in self.placement_failures.items() if now - at < cooldown}

    def _explain(self, model: str, decision: str, reason: str) -> None:
        self.decisions[model] = {
            "model": model,
            "decision": decision,
            "reason": reason,
            "time": time.time(),
        }

    async def explain(self, name: str) -> dict[str, Any]:
        """The scheduler's last decision about a model and why (placed where, waiting for
        what, failed because), with where it runs now."""
        model = self._resolve(name)
        status = await self._status_of(model)
        last = self.decisions.get(model)
        return {
            "model": model,
            "state": status["state"],
            "node_id": status.get("node_id") or self.nodes_of.get(model),
            "waiting": model in self.wants,
            "last_decision": last,
        }

    async def _evict(self, victim: str, for_model: str, reason: str) -> bool:
        """Ask the victim to stop (it refuses when busy); on yes, free its resources."""
        handle = self.handles.get(victim)
        if handle is None:
            return False
        if not await self._stop_if_idle(victim, handle, f"evicted for '{for_model}'"):
            return False
        self.evictions[reason] = self.evictions.get(reason, 0) + 1
        self._event("evicted", model=victim, for_model=for_model, reason=reason)
        return True

    async def _stop_if_idle(self, name: str, handle: Any, reason: str) -> bool:
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
        self._unregister(name, handle)  # (a request that saw it retired may have done so)
        with contextlib.suppress(ray.exceptions.RayActorError):
            await handle.stop.remote(reason)
        await self._dispose(name, handle)
        return True

    async def _stop(self, name: str, reason: str) -> None:
        handle = self.handles.get(name)
        if handle is None:
            return
        self._unregister(name, handle)
        with contextlib.suppress(ray.exceptions.RayActorError):
            await handle.stop.remote(reason, retire=True)
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
        self._unregister(name, handle)
        if self.retiring.get(name) is handle:
            del self.retiring[name]
        ray.kill(handle)
        self._wake.set()  # its resources are free: waiting models may fit now

    def _unregister(self, name: str, handle: Any) -> None:
        """Out of the registry: no new request reaches this instance (it may still be
        stopping or draining, shown as "stopping" until its actor is gone)."""
        if self.handles.get(name) is handle:
            del self.handles[name]
            self.options.pop(name, None)
            self.nodes_of.pop(name, None)
            self.retiring[name] = handle

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
        # A model placed by GPU memory whose new settings need another share (a longer
        # context, another cache type, another file) needs a new actor, not just a restart.
        sizes = self._gpu_sizes(cluster_nodes()) if plan.restart else {}
        for name in [n for n in plan.restart if await self._share_changed(n, sizes)]:
            plan.restart.remove(name)
            plan.recreate.append(name)
        for name in plan.register:
            self.registered_at.setdefault(name, int(time.time()))
        for name in plan.drain:
            handle = self.handles[name]
            self._unregister(name, handle)  # no new request reaches it
            self.background.keep(asyncio.create_task(self._retire(name, handle)))
        replacing = {name: await self._replace(name) for name in plan.recreate}
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
        started = await self._start_in_order(plan.start)
        self._event("config_reloaded", changes=diff.summary(), replacing=replacing)
        return {"changes": diff.summary(), "started": started, "replacing": replacing}

    async def _start_in_order(self, names: list[str]) -> list[dict[str, Any]]:
        """Place every model (the scheduler goes by priority) and start each placed one."""
        for name in names:
            self.placement_failures.pop(name, None)  # an explicit start skips a cooldown
        results = await self._await_placed(names)
        handles = [self.handles[r["model"]] for r in results if r["model"] in self.handles]
        self.background.keep(asyncio.create_task(self._start_in_turn(handles)))
        return results

    # ------------------------------------------------------------------ upkeep
    def _ensure_upkeep(self) -> None:
        if self._upkeep is None or self._upkeep.done():
            self._upkeep = asyncio.create_task(self._upkeep_loop())
            self.background.keep(asyncio.create_task(self._watch_auth_file()))
        while self._orphans:
            self.background.keep(asyncio.create_task(self._retire(*self._orphans.pop())))

    async def _watch_auth_file(self) -> None:
        """auth.yaml takes effect when it changes on disk (keys added or removed, no restart);
        a bad edit is rejected and the keys in force stay."""
        seen = self.files.auth_stamp(self.config)
        while True:
            await asyncio.sleep(AUTH_POLL_INTERVAL)
            path = self.files.auth_path(self.config)
            current = self.files.auth_stamp(self.config)
            if current == seen:
                continue
            seen = current
            try:
                auth = self.files.load_auth(self.config)
            except ConfigError as error:
                self._event(
                    "config_rejected", file=str(path), errors=[str(i) for i in error.issues]
                )
                continue
            if auth != self.auth:
                self.auth, self.auth_version = auth, self.auth_version + 1
                self._event("auth_reloaded", keys=len(auth.api_keys), enabled=auth.enabled)
                self._accept(self.config)

    async def _upkeep_loop(self) -> None:
        """Every cleanup_interval: stop idle models; bring preloaded ones back."""
        while True:
            await asyncio.sleep(self.config.settings.cleanup_interval)
            with contextlib.suppress(Exception):
                await self._upkeep_once()

    async def _upkeep_once(self) -> None:
        await self._replace_lost()
        try:
            await self._keep_spares()
        except Exception as error:  # a spare is only speed: the rest of the pass goes on
            self._event("warning", message=f"spare workers: {error!r}")
        running = await self._running()
        for name in idle_stops(running):
            handle = self.handles.get(name)
            if handle is None:
                continue
            idle = next(r.idle_for for r in running if r.name == name)
            if await self._stop_if_idle(name, handle, f"idle for {idle:.0f}s"):
                self.evictions["idle"] = self.evictions.get("idle", 0) + 1
        ttl = self.config.settings.result_ttl
        for request_id, result in list(self.results.items()):
            if time.time() - (result.get("done_at") or 0) > ttl:
                del self.results[request_id]
        by_name = {r.name: r for r in running}
        for name in self._preloaded():
            state = by_name[name].state if name in by_name else "stopped"
            if name not in self.handles:
                self._want(name, keep=True)  # placed (and started) by the next pass
            elif state in ("stopped", "failed"):
                self.background.fire(self.handles[name].start.remote())

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
                self._want(name, keep=True)  # placed again where it fits, or failed with why

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
        elif name in self.retiring:
            entry.update(state="stopping")  # out of the registry; its actor still stops
        if name in self.pending:
            entry["replacing"] = True  # a new instance loads and takes over when ready
        if name in self.wants:
            entry["waiting_for"] = self.wants[name].reason  # not placed yet: why
        if name in self.config.models:  # a reload may have removed it meanwhile
            memory = await self._memory_of(name, READ_WAIT)
            memory.pop("calibration_key", None)
            options = self.options.get(name)
            if options is not None and handle is not None:
                memory["num_gpus"] = options.get("num_gpus", 0)
            entry["gpu_memory"] = memory
        return entry

    def _resolve(self, name: str) -> str:
        model = self.config.resolve_name(name)
        if model is None:
            raise ModelNotFound(self._not_found_message(name))
        return model

    def _not_found_message(self, name: str) -> str:
        available = ", ".join(sorted(self.config.models)) or "none"
        return f"The model '{name}' does not exist. Available models: {available}"

    def _groups(self, only: list[str] | None = None) -> list[str]:
        names = _among(list(self.config.models), only)
        return sorted({self.config.models[n].resource_group for n in names})

    def _preloaded(self) -> list[str]:
        return sorted(n for n, m in self.config.models.items() if m.preload)

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
