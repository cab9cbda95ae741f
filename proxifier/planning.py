"""The controller's decisions as pure functions: start order, groups, eviction, idle stops, and
what a reload does. Plain data in, plain data out; `actors/controller/` carries them out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from proxifier.config import ModelConfig, ModelsConfig
from proxifier.config_diff import PLACEMENT_FIELDS, ModelsDiff


@dataclass(frozen=True)
class RunningModel:
    """What the controller knows of one model whose actor exists (it holds cluster resources)."""

    name: str
    priority: int
    preload: bool
    state: str
    busy: bool
    last_active: float  # last request's end, else when it became ready; for LRU
    idle_for: float
    idle_timeout: float
    demand: Mapping[str, float] = field(default_factory=dict)
    model: str = ""  # the model it is a replica of ("": its name is the model's)


def by_priority(names: list[str], models: Mapping[str, ModelConfig]) -> list[str]:
    """Highest priority first; ties by name, so the order never depends on dict order."""
    return sorted(names, key=lambda name: (-models[name].priority, name))


def startup_order(models: Mapping[str, ModelConfig]) -> list[str]:
    """Models to start at boot: auto_start or preload, in descending priority."""
    return by_priority([n for n, m in models.items() if m.auto_start or m.preload], models)


def group_members(models: Mapping[str, ModelConfig], group: str) -> list[str]:
    return by_priority([n for n, m in models.items() if m.resource_group == group], models)


def group_stop_plan(models: Mapping[str, ModelConfig], group: str) -> tuple[list[str], list[str]]:
    """(members to stop, preloaded members that stay running)."""
    members = group_members(models, group)
    return [n for n in members if not models[n].preload], [n for n in members if models[n].preload]


def idle_stops(running: list[RunningModel]) -> list[str]:
    """Ready models idle longer than their idle_timeout; never busy, starting or preloaded ones."""
    idle = [
        model
        for model in running
        if model.state == "ready"
        and not model.busy
        and not model.preload
        and model.idle_timeout > 0
        and model.idle_for > model.idle_timeout
    ]
    # A model stops as a whole: its replicas only once every one of them is idle long enough
    # (one stopped while another still serves would only be started again by the scaler).
    idle_names = {m.name for m in idle}
    kept = {m.model or m.name for m in running if m.name not in idle_names}
    idle = [m for m in idle if (m.model or m.name) not in kept]
    idle.sort(key=lambda m: (-m.idle_for, m.name))
    return [model.name for model in idle]


@dataclass(frozen=True)
class ReloadPlan:
    """What applying a new models.yaml does to the running system."""

    register: list[str] = field(default_factory=list)  # new models, now known
    start: list[str] = field(default_factory=list)  # to start, in priority order
    drain: list[str] = field(default_factory=list)  # removed and running: drain, then stop
    restart: list[str] = field(default_factory=list)  # running; new process, same actor
    recreate: list[str] = field(default_factory=list)  # running; placement changed: new actor
    live: list[str] = field(default_factory=list)  # running; new settings, nothing restarts

    @property
    def touches(self) -> set[str]:
        return set(self.drain) | set(self.restart) | set(self.recreate) | set(self.live)


def reload_plan(diff: ModelsDiff, new: ModelsConfig, running: set[str]) -> ReloadPlan:
    """Turn a config diff into actions. Models that are not running only get the new config."""
    models = new.models
    start = [name for name in diff.added if models[name].auto_start or models[name].preload]
    # A model that just became preloaded must be kept running from now on.
    start += [
        name
        for name, fields in diff.live.items()
        if "preload" in fields and models[name].preload and name not in running
    ]
    restart, recreate = [], []
    for name, fields in diff.restart.items():
        if name not in running:
            continue
        (recreate if PLACEMENT_FIELDS & set(fields) else restart).append(name)
    changed = restart + recreate
    live = [name for name in diff.live if name in running and name not in changed]
    return ReloadPlan(
        register=list(diff.added),
        start=by_priority(start, models),
        drain=[name for name in diff.removed if name in running],
        restart=by_priority(restart, models),
        recreate=by_priority(recreate, models),
        live=sorted(live),
    )
