"""The facts a decision starts from: nodes and what is free on them, GPU sizes (declared or
probed), GGUF headers, calibration (what models really used), the residents and running models.
It reads the registry and never writes it; it decides nothing (that is `proxifier.scheduler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from actors.controller.registry import STATS_WAIT, VIEW_WAIT, Registry
from actors.gpu_probe import node_gpus
from actors.ray_glue import Background, gpus_now, nodes_now
from proxifier.config import ModelsConfig, effective
from proxifier.gguf_facts import GgufError, GgufFacts, read_facts
from proxifier.gpu_inventory import declared_gpu_memory
from proxifier.gpu_memory import PROCESS_OVERHEAD, calibration_key, estimate
from proxifier.placement import NodeView, actor_options, demand
from proxifier.planning import RunningModel
from proxifier.reachability import seen_as_away
from proxifier.replicas import model_of
from proxifier.scheduler import Node, Resident, Want, gpu_fraction

READ_WAIT = 0.5  # seconds a status or listing waits for a model file's first header read
PROBE_RETRY = 300.0  # seconds before a node whose GPU size is unknown is probed again
MEASURED_KEY = "proxifier:gpu-memory-measured"


def observed(future: asyncio.Future[Any]) -> None:
    """A want that failed while nobody waited: its exception is not an unhandled error."""
    if not future.cancelled():
        future.exception()


def node_facts(
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


def load_measured() -> dict[str, dict[str, Any]]:
    """Calibrations kept in Ray's key-value store: they outlive a controller restart."""
    from ray.experimental import internal_kv

    if not ray.is_initialized() or not internal_kv._internal_kv_initialized():
        return {}
    raw = internal_kv._internal_kv_get(MEASURED_KEY)
    return json.loads(raw) if raw else {}


def save_measured(measured: dict[str, dict[str, Any]]) -> None:
    from ray.experimental import internal_kv

    if ray.is_initialized() and internal_kv._internal_kv_initialized():
        internal_kv._internal_kv_put(MEASURED_KEY, json.dumps(measured), overwrite=True)


def gpu_shares(gpu_ids: list[Any], num_gpus: float) -> dict[int, float]:
    """The fraction of each GPU an actor holds, from the ids Ray gave it."""
    ids = []
    for gpu in gpu_ids:
        with contextlib.suppress(ValueError, TypeError):
            ids.append(int(gpu))
    if not ids or num_gpus <= 0:
        return {}
    return dict.fromkeys(ids, min(1.0, num_gpus / len(ids)))


def gpu_view(
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
        shares = gpu_shares(status.get("gpu_ids") or [], memory.get("num_gpus") or 0.0)
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


class Facts:
    """GPU memory (DESIGN §10): each node's GPU size as detected (a label overrides it), what
    models really used, by file and memory flags (calibration), and each file's header."""

    def __init__(
        self,
        config: Callable[[], ModelsConfig],
        registry: Registry,
        event: Callable[..., Any],
        wake: Callable[[], None],
        background: Background,
    ) -> None:
        self._config = config
        self.registry = registry
        self._event = event
        self._wake = wake  # a node's GPU size became known: waiting models may fit now
        self.background = background
        self.gpu_sizes: dict[str, float] = {}
        self._probed: dict[str, float] = {}  # node -> when its GPUs were last probed
        self.measured: dict[str, dict[str, Any]] = load_measured()
        self.calibrating: dict[str, str] = {}  # model -> the key its instance measures
        # (model file, size, mtime) -> its header, read once in a thread
        self._reading: dict[tuple[str, int, int], asyncio.Future[GgufFacts]] = {}

    # ------------------------------------------------------------------ GGUF headers
    async def fill_in_middle(self, name: str) -> bool | None:
        """Whether the model's GGUF has FIM tokens; None when its file is not readable here
        (on another node, or not there yet). Each file's header is read once."""
        config = self._config()
        path = config.model_file(name) if name in config.models else None
        if path is None or not path.is_file():
            return None
        try:
            facts = await self.header(path, READ_WAIT)
        except GgufError:
            return None
        return None if facts is None else facts.fill_in_middle

    async def warm(self, path: Path) -> None:
        with contextlib.suppress(Exception):  # a bad file says so where it is used
            await self.header(path)

    async def header(self, path: Path, wait: float | None = None) -> GgufFacts | None:
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
            reading.add_done_callback(observed)
            self._reading[key] = reading
        if wait is None:
            return await asyncio.shield(reading)
        try:
            return await asyncio.wait_for(asyncio.shield(reading), wait)
        except TimeoutError:
            return None

    # ------------------------------------------------------------------ calibration
    def calibrate(self, name: str, key: str | None) -> bool:
        """Whether a new instance of `name` measures its memory (its combination is not yet)."""
        calibrate = key is not None and key not in self.measured
        if calibrate:
            self.calibrating[name] = key
        return calibrate

    def record_ready(self, event: dict[str, Any]) -> None:
        """A model's ready event: what its instance measured, kept for later loads."""
        if event.get("kind") == "ready" and isinstance(event.get("memory"), dict):
            key = self.calibrating.pop(event.get("model", ""), None)
            if key is not None:
                self.measured[key] = {**event["memory"], "at": time.time()}
                save_measured(self.measured)

    # ------------------------------------------------------------------ nodes and GPUs
    async def gather(
        self, residents: list[Resident] | None = None
    ) -> tuple[float, list[Resident], list[Node]]:
        """What a decision starts from: the cluster's GPUs, the models whose actors exist
        (`residents`, when this pass read them already), and the nodes with what is free."""
        if residents is None:
            residents = await self.residents()
        views = seen_as_away(await nodes_now(), self.registry.unreached)
        return await gpus_now(), residents, node_facts(views, residents, self.sizes(views))

    def sizes(self, views: list[NodeView]) -> dict[str, float]:
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
            self._wake()

    async def nodes_view(self, statuses: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every node with its resources, its models and its GPUs (`cluster`)."""
        where: dict[str, list[dict[str, Any]]] = {}
        for status in statuses:
            if status.get("node_id"):
                where.setdefault(status["node_id"], []).append(status)
        views = await nodes_now()
        sizes = self.sizes(views)
        return [
            {
                "node_id": node.node_id,
                "address": node.address,
                "alive": node.alive,
                "unreachable": (
                    self.registry.unreached[node.node_id].reason
                    if node.node_id in self.registry.unreached
                    else None
                ),
                "resources": dict(node.total),
                "free": dict(node.available),
                "labels": dict(node.labels),
                "models": sorted(s["name"] for s in where.get(node.node_id, [])),
                "gpus": gpu_view(node, sizes.get(node.node_id), where.get(node.node_id, [])),
            }
            for node in views
        ]

    # ------------------------------------------------------------------ models
    async def want_for(
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
        config = self._config()
        of = model_of(name, config.models) or name
        model = config.models[of]
        needs = demand(actor_options(model, gpus))
        memory = 0.0
        if sized and model.num_gpus is None and needs.get("GPU", 0.0) > 0:
            need = (await self.memory_of(of))["need"]
            if need:
                memory = float(need)
                needs.pop("GPU")
        # One more replica of a model that runs: a scale-out, which stops lower priorities only.
        others = any(n != name and model_of(n, config.models) == of for n in self.registry.handles)
        return Want(
            as_name or name,
            needs,
            dict(model.labels),
            model.priority,
            since,
            memory,
            model=of,
            scale_out=others and as_name is None,
        )

    async def share_changed(self, name: str, sizes: dict[str, float]) -> bool:
        """Whether a running model placed by GPU memory would ask another share now.
        `sizes`: each node's GPU size (`sizes`)."""
        options = self.registry.options.get(name) or {}
        held = options.get("num_gpus") or 0.0
        model = self._config().models[model_of(name, self._config().models) or name]
        size = sizes.get(self.registry.nodes_of.get(name, ""))
        if model.num_gpus is not None or not held or not size:
            return model.num_gpus is not None and held != model.num_gpus
        need = (await self.memory_of(name))["need"]
        return bool(need) and gpu_fraction(float(need), size) != held

    async def memory_of(self, name: str, wait: float | None = None) -> dict[str, Any]:
        """The model's GPU memory: configured (`gpu_memory`), measured on an earlier load of
        this file with these flags, estimated from its GGUF header (read where the controller
        runs); `need` is the first of them there is. `wait`: as for `header` (a status does
        not wait for a first read; a placement does)."""
        config = self._config()
        name = model_of(name, config.models) or name  # a replica needs what its model needs
        model = config.models[name]
        found: dict[str, Any] = {
            "configured": model.gpu_memory,
            "measured": None,
            "estimated": None,
            "calibration_key": None,
        }
        path = config.model_file(name)
        if path is not None and path.is_file():
            try:
                facts = await self.header(path, wait)
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
            except (GgufError, ValueError, OSError) as error:  # EstimateError: a ValueError
                found["error"] = str(error)
        found["need"] = found["configured"] or found["measured"] or found["estimated"]
        return found

    async def residents(self) -> list[Resident]:
        """Facts about every model whose actor exists. One that does not answer in time (its
        actor is still being created) counts as starting: it holds its place, is never a victim."""
        registry = self.registry
        names = list(registry.handles)
        stats = await asyncio.gather(
            *(asyncio.wait_for(registry.handles[n].stats.remote(), STATS_WAIT) for n in names),
            return_exceptions=True,
        )
        config = self._config()
        now = time.time()
        residents = [
            # A new instance taking over after a reload holds its resources and is never a
            # victim (it is counted as a preloaded, starting model).
            Resident(f"{name}@next", node, demand(options), 10, True, "starting", 0, 0, now, None)
            for name, (_, options, node) in registry.pending.items()
        ]
        for name, stat in zip(names, stats, strict=True):
            of = model_of(name, config.models) or name
            model = config.models.get(of)
            holds = demand(registry.options.get(name, {}))
            priority, preload = (model.priority, model.preload) if model else (10, True)
            if isinstance(stat, BaseException):
                node = registry.nodes_of.get(name, "")
                residents.append(
                    Resident(
                        name, node, holds, priority, preload, "starting", 0, 0, now, None, model=of
                    )
                )
                continue
            node = registry.nodes_of.get(name) or stat.get("node_id") or ""
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
                    gpus=gpu_shares(stat.get("gpu_ids") or [], holds.get("GPU", 0.0)),
                    model=of,
                )
            )
        return residents

    async def running(self) -> list[RunningModel]:
        """Facts for the planners about every model whose actor exists."""
        registry = self.registry
        names = list(registry.handles)
        stats = await asyncio.gather(
            *(asyncio.wait_for(registry.handles[n].stats.remote(), VIEW_WAIT) for n in names),
            return_exceptions=True,
        )
        config = self._config()
        running = []
        for name, stat in zip(names, stats, strict=True):
            of = model_of(name, config.models)
            model = config.models.get(of) if of is not None else None
            if isinstance(stat, BaseException) or model is None:
                continue
            values = effective(model, config.settings)
            running.append(
                RunningModel(
                    name=name,
                    model=of or name,
                    priority=model.priority,
                    preload=model.preload,
                    state=stat["state"],
                    busy=stat["busy"],
                    last_active=stat["last_used"] or stat["ready_at"] or 0.0,
                    idle_for=stat["idle_for"],
                    idle_timeout=values["idle_timeout"],
                    demand=demand(registry.options.get(name, {})),
                )
            )
        return running
