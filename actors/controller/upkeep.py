"""Upkeep: every cleanup_interval, stop idle models, bring preloaded ones back, replace model
actors lost with their node, expire kept results; a spare Ray worker per node. It asks the
registry and the facade's callbacks (`want`); it never places a model itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import ray

from actors.controller.facts import Facts
from actors.controller.registry import Registry
from actors.ray_glue import Background, nodes_now
from actors.warm_workers import prestart
from proxifier.config import ModelsConfig
from proxifier.planning import idle_stops
from proxifier.replicas import instances_of, model_of

SPARE_AFTER = 30.0  # seconds after a model actor took a node's spare worker, a new one starts
SPARE_DELAY = 5.0  # ... or this long after that model became ready (or failed), if sooner


class Spares:
    """A spare Ray worker on each alive node (actors/warm_workers.py)."""

    def __init__(self, background: Background) -> None:
        self.background = background
        self.spares: dict[str, float] = {}  # node id -> when a spare worker was last asked for
        self.spent: dict[str, float] = {}  # node id -> when a model actor likely took its spare

    def taken(self, node_id: str) -> None:
        """A model actor was just created there: it likely took the node's spare worker."""
        self.spent.setdefault(node_id, time.monotonic())

    def loaded(self, node_id: str | None) -> None:
        """A model on the node is ready (or failed)."""
        if node_id in self.spent:
            # Its load is over; its first requests come now: the next spare's start-up
            # (a second of CPU) waits a little longer.
            asyncio.get_running_loop().call_later(SPARE_DELAY, self._replace, node_id)

    def _spare_on(self, node_id: str) -> None:
        """A spare Ray worker on the node, so the next model actor there starts in
        milliseconds instead of a worker's start-up (actors/warm_workers.py)."""
        self.spent.pop(node_id, None)
        self.spares[node_id] = time.monotonic()
        self.background.keep(asyncio.create_task(asyncio.to_thread(prestart, node_id)))

    def _replace(self, node_id: str) -> None:
        if node_id in self.spent:  # not replaced meanwhile (by upkeep)
            self._spare_on(node_id)

    async def keep(self) -> None:
        """Each alive node gets one spare worker, and one a model actor took is replaced once
        that model loaded (or SPARE_AFTER s). Only then: an unused spare stays (for the
        raylet's keep-alive, then as long as its node has idle room), and asking again would
        pile up idle processes."""
        nodes = await nodes_now()
        alive = {view.node_id for view in nodes if view.alive}
        for table in (self.spares, self.spent):
            for node_id in [n for n in table if n not in alive]:
                del table[node_id]
        now = time.monotonic()
        for node_id in alive:
            if node_id not in self.spares or now - self.spent.get(node_id, math.inf) > SPARE_AFTER:
                self._spare_on(node_id)


class Upkeep:
    """The upkeep loop (started with the controller, again by `boot` or a request if it ended)."""

    def __init__(
        self,
        config: Callable[[], ModelsConfig],
        registry: Registry,
        facts: Facts,
        spares: Spares,
        want: Callable[..., Any],
        event: Callable[..., Any],
        background: Background,
    ) -> None:
        self._config = config
        self.registry = registry
        self.facts = facts
        self.spares = spares
        self._want = want  # (model, keep=True): the reconcile pass places it
        self._event = event
        self.background = background
        self._upkeep: asyncio.Task[None] | None = None

    def ensure(self) -> bool:
        """Start the loop unless it runs; whether it was started now."""
        if self._upkeep is None or self._upkeep.done():
            self._upkeep = asyncio.create_task(self._upkeep_loop())
            return True
        return False

    def cancel(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()

    async def _upkeep_loop(self) -> None:
        """Every cleanup_interval: stop idle models; bring preloaded ones back."""
        while True:
            await asyncio.sleep(self._config().settings.cleanup_interval)
            with contextlib.suppress(Exception):
                await self._upkeep_once()

    async def _upkeep_once(self) -> None:
        registry = self.registry
        await self._replace_lost()
        try:
            await self.spares.keep()
        except Exception as error:  # a spare is only speed: the rest of the pass goes on
            self._event("warning", message=f"spare workers: {error!r}")
        running = await self.facts.running()
        for name in idle_stops(running):
            handle = registry.handles.get(name)
            if handle is None:
                continue
            idle = next(r.idle_for for r in running if r.name == name)
            if await registry.stop_if_idle(name, handle, f"idle for {idle:.0f}s"):
                registry.count_eviction("idle")
        registry.expire_results(self._config().settings.result_ttl)
        by_name = {r.name: r for r in running}
        models = self._config().models
        for name in preloaded(self._config()):
            state = by_name[name].state if name in by_name else "stopped"
            if not instances_of(name, registry.handles, models):
                self._want(name, keep=True)  # placed (and started) by the next pass
            elif state in ("stopped", "failed"):
                self.background.fire(registry.handles[name].start.remote())

    async def _replace_lost(self) -> None:
        """Model actors that died with their node: forget them, and place the ones that should
        be running (preload, auto_start) again where they fit, else mark them failed."""
        handles = self.registry.handles
        names = list(handles)
        answers = await asyncio.gather(
            *(asyncio.wait_for(handles[n].ping.remote(), 10) for n in names),
            return_exceptions=True,
        )
        for name, answer in zip(names, answers, strict=True):
            if not isinstance(answer, ray.exceptions.RayActorError):
                continue
            models = self._config().models
            of = model_of(name, models)
            self.registry.lost(name, handles[name], of, answer)
            if of is not None and of != name:
                continue  # the scaler restores the count
            model = models.get(name)
            if model is not None and (model.preload or model.auto_start):
                self._want(name, keep=True)  # placed again where it fits, or failed with why


def preloaded(config: ModelsConfig) -> list[str]:
    return sorted(n for n, m in config.models.items() if m.preload)
