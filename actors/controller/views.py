"""The controller's read-only views: a model's status and the scheduler's explanation, the
groups and /v1/models listings. Plain functions over the parts they are given; they change
nothing and call only down (registry, facts, the wanted models).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.controller.facts import READ_WAIT, Facts
from actors.controller.reconcile import Wanted
from actors.controller.registry import VIEW_WAIT, Registry
from proxifier.capabilities import capabilities
from proxifier.config import ModelConfig, ModelsConfig
from proxifier.planning import group_members
from proxifier.replicas import instances_of
from proxifier.scheduler import Scale


@dataclass(frozen=True)
class Viewed:
    """The parts a model's status reads."""

    config: Callable[[], ModelsConfig]
    registry: Registry
    facts: Facts
    wants: dict[str, Wanted]
    scales: dict[str, Scale] = field(default_factory=dict)  # the scaler's last word per model


def among(names: list[str], only: list[str] | None) -> list[str]:
    """`names` (in their order) that are in `only`; all of them when `only` is None."""
    return names if only is None else [n for n in names if n in only]


def by_priority(config: ModelsConfig) -> list[str]:
    return sorted(config.models, key=lambda n: (-config.models[n].priority, n))


def groups_of(config: ModelsConfig, only: list[str] | None = None) -> list[str]:
    names = among(list(config.models), only)
    return sorted({config.models[n].resource_group for n in names})


def groups_view(
    config: ModelsConfig,
    statuses: dict[str, dict[str, Any]],
    groups: list[str],
    only: list[str] | None,
) -> dict[str, Any]:
    view: dict[str, Any] = {}
    for group in groups:
        members = among(group_members(config.models, group), only)
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


def models_view(
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


async def queue_status(handles: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    """Each model's queue, asked of every actor at once: one that died counts as stopped, one
    that does not answer within VIEW_WAIT (its host frozen or cut off) as unreachable."""

    async def one(model: str) -> dict[str, Any]:
        empty = {"model": model, "state": "stopped", "depth": 0, "waiting": []}
        handle = handles.get(model)
        if handle is None:
            return empty
        try:
            return await asyncio.wait_for(handle.queue_status.remote(), VIEW_WAIT)
        except ray.exceptions.RayActorError:
            return empty
        except TimeoutError:
            return {**empty, "state": "unreachable"}

    return list(await asyncio.gather(*(one(model) for model in names)))


def _base(name: str, model: ModelConfig) -> dict[str, Any]:
    return {
        "name": name,
        "priority": model.priority,
        "resource_group": model.resource_group,
        "preload": model.preload,
        "auto_start": model.auto_start,
        "aliases": list(model.aliases),
        "state": "stopped",
    }


async def statuses(names: list[str], parts: Viewed, within: float = VIEW_WAIT) -> list[Any]:
    """Every named model's status, each on its own: one whose facts cannot be read (its file,
    its header, its actor's answer) shows `unknown` with the error, and every other entry is
    whole, so no status, listing, health or metrics answer fails for one model."""
    return list(await asyncio.gather(*(guarded_status(n, parts, within) for n in names)))


async def guarded_status(name: str, parts: Viewed, within: float = VIEW_WAIT) -> dict[str, Any]:
    try:
        return await status_of(name, parts, within)
    except Exception as error:  # a bug or a bad fact of this model's: said in its own entry
        model = parts.config().models.get(name) or ModelConfig()
        return {
            **_base(name, model),
            "state": "unknown",
            "last_error": f"its status could not be read: {type(error).__name__}: {error}",
        }


async def instance_status(name: str, parts: Viewed, within: float) -> dict[str, Any]:
    """One instance's part of a status: its actor's stats, or what is known without them."""
    registry, wants = parts.registry, parts.wants
    entry: dict[str, Any] = {"state": "stopped"}
    handle = registry.handles.get(name)
    away = registry.unreached.get(registry.nodes_of.get(name, ""))
    if handle is not None and away is not None and away.whole_host:  # known: no need to wait
        entry.update(state="unreachable", last_error=f"its host is unreachable: {away.reason}")
    elif handle is not None:
        try:
            entry.update(await asyncio.wait_for(handle.stats.remote(), within))
        except ray.exceptions.RayActorError as error:
            entry.update(state="failed", last_error=f"model actor died: {error}")
        except TimeoutError:  # its host frozen or cut off: the view must not wait for Ray
            entry.update(
                state="unreachable",
                last_error=f"its model actor did not answer within {within:g} s",
            )
    elif name in registry.placement_failures:
        entry.update(state="failed", last_error=registry.placement_failures[name].reason)
    elif name in registry.retiring:
        entry.update(state="stopping")  # out of the registry; its actor still stops
    if name in registry.pending:
        entry["replacing"] = True  # a new instance loads and takes over when ready
    if name in wants:
        entry["waiting_for"] = wants[name].reason  # not placed yet: why
    return entry


def _replica(stats: dict[str, Any]) -> dict[str, Any]:
    return {key: stats.get(key) for key in REPLICA_FIELDS} | (
        {"waiting_for": stats["waiting_for"]} if "waiting_for" in stats else {}
    )


REPLICA_FIELDS = (
    *("node_id", "gpu_ids", "host", "port", "state", "slots", "in_flight", "queue_depth"),
    *("ready_at", "generation"),
)


async def status_of(name: str, parts: Viewed, within: float = VIEW_WAIT) -> dict[str, Any]:
    config, registry, facts = parts.config, parts.registry, parts.facts
    models = config().models
    entry = _base(name, models[name])
    registered = instances_of(name, registry.handles, models)
    leaving = [*registry.retiring, *parts.wants]
    others = [n for n in instances_of(name, leaving, models) if n not in registered]
    primary = registered[0] if registered else name
    entry.update(await instance_status(primary, parts, within))
    entry["name"] = name  # the model (its stats name the instance)
    scale = parts.scales.get(name)
    rest = [n for n in [*registered[1:], *others] if n != primary]
    if rest or scale is not None:
        found = await asyncio.gather(*(instance_status(n, parts, within) for n in rest))
        replicas = [{"name": primary, **_replica(entry)}]
        replicas += [{"name": n, **_replica(e)} for n, e in zip(rest, found, strict=True)]
        entry["replicas"] = replicas
        serving = [r for r in replicas if r["name"] in registered]
        entry["in_flight"] = sum(r.get("in_flight") or 0 for r in serving)
        entry["queue_depth"] = sum(r.get("queue_depth") or 0 for r in serving)
        if any(r["state"] == "ready" for r in serving):
            entry["state"] = "ready"  # the model answers while one replica does
        if scale is not None:
            entry["desired"] = {"replicas": scale.desired, "reason": scale.reason}
    if name in config().models:  # a reload may have removed it meanwhile
        memory = await facts.memory_of(name, READ_WAIT)
        memory.pop("calibration_key", None)
        # Configured to run without one (num_gpus: 0, or no layer offloaded): no GPU need.
        current = config().models[name]
        memory["wants_gpu"] = current.num_gpus != 0 and current.gpu_layers != 0
        options = registry.options.get(primary)
        if options is not None and primary in registry.handles:
            memory["num_gpus"] = options.get("num_gpus", 0)
        entry["gpu_memory"] = memory
    return entry


async def explain(model: str, parts: Viewed) -> dict[str, Any]:
    """The scheduler's last decision about a model and why (placed where, waiting for
    what, failed because), with where it runs now."""
    status = await guarded_status(model, parts)
    registry = parts.registry
    last = registry.decisions.get(model)
    return {
        "model": model,
        "state": status["state"],
        "node_id": status.get("node_id") or registry.nodes_of.get(model),
        "waiting": model in parts.wants,
        "last_decision": last,
        # how many replicas and why not more (or fewer): the scaler's last word
        "replicas": status.get("desired"),
    }
