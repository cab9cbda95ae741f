"""One Ray actor per model (DESIGN §3-§5, §12): the facade whose remote methods the controller
and the ingress call; each delegates to the parts that live in this actor's process.

The parts: `Instance` (the llama-server and its state machine), `Admission` (slots, queue,
leases), `Jobs` (respond-async requests); events and stats beside them. The facade wires them
together and is called by none of them. Tokens never pass through here: a lease hands the
ingress llama-server's URL and per-instance key, and the ingress talks to it over HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from actors.model.admission import Admission
from actors.model.event_log import EventLog
from actors.model.instance import Instance, SlotHooks
from actors.model.jobs import Jobs
from actors.model.stats import busy_reason, stats
from actors.process import log_tail
from proxifier.config import ModelConfig, Settings
from proxifier.lifecycle import ModelState

NAMESPACE = "proxifier"


def actor_name(model: str, generation: str = "") -> str:
    """`proxifier:model:<name>@<generation>`: a fresh instance of a model can be created while
    the one it replaces still stops or drains (its name would otherwise still be taken)."""
    return f"proxifier:model:{model}@{generation}" if generation else f"proxifier:model:{model}"


def model_of(name: str) -> str | None:
    """The model an actor name belongs to (the inverse of `actor_name`), or None."""
    prefix = actor_name("")
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    model, separator, _generation = rest.rpartition("@")
    return (model if separator else rest) or None


def cluster_singleton_options(name: str) -> dict[str, Any]:
    """Options of the one-per-cluster actors (controller, rate limiter): named, detached,
    restarted by Ray when they die, and on the head node, which outlives GPU hosts."""
    return {
        "name": name,
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "num_cpus": 0,
        "resources": {"node:__internal_head__": 0.001},
        "max_restarts": -1,
    }


class ModelActor:
    """Ray actor (created by `create_model_actor`); every public method is a remote call."""

    def __init__(
        self,
        name: str,
        model: ModelConfig,
        settings: Settings,
        base_dir: str,
        events_to: str | None = None,
        calibrate: bool = False,
        timeline: dict[str, float] | None = None,
        generation: str = "",
    ) -> None:
        self.name = name
        self.generation = generation  # this actor's, of the model's instances (its Ray name)
        self.events = EventLog(name, events_to, NAMESPACE)
        # When this start was asked for and placed (wall clock, from the controller), then
        # when this actor came up: the first `ready` event reports each phase of the start.
        started = {**(timeline or {}), "actor": time.time()}
        # The instance tells admission when slots open or close; admission exists by then.
        hooks = SlotHooks(
            opened=lambda instance, now: self.admission.open(instance, now),
            closed=lambda: self.admission.close(),
            turn_away=lambda error: self.admission.turn_away(error),
        )
        self.instance = Instance(
            name, model, settings, Path(base_dir), calibrate, started, self.events.record, hooks
        )
        self.jobs = Jobs(
            name, settings, self.acquire, self.release, self.instance.llama.http, self._where
        )
        self.admission = Admission(
            name, model, settings, self.instance, self.events.record, self.jobs.sweep
        )

    # ------------------------------------------------------------------ lifecycle (public)
    async def start(self, force: bool = False) -> dict[str, Any]:
        """Start llama-server if it is not running (single-flight); return stats when ready.

        A failed model refuses until its cooldown ends, unless `force` (an admin start).
        """
        self.admission.ensure_upkeep()
        await self.instance.start(force)
        return self._stats()

    async def launch(self, force: bool = False) -> str:
        """Start llama-server like `start`, but answer as soon as its process runs, its file
        downloads, or the start ended, not when it has loaded: the controller starts models in
        priority order this way while their loads overlap. `force` (an admin start) skips a
        failure's cooldown. Returns the state."""
        self.admission.ensure_upkeep()
        return await self.instance.launch(force)

    async def endpoint(self) -> dict[str, Any]:
        """Where llama-server answers and its key, once ready (started when stopped), for a
        raw passthrough that takes no slot (`/upstream/{model}/...`: its /slots, /props, web
        UI). It counts as use: the idle clock starts again."""
        await self.start()
        self.admission.slots.touch(time.time())
        return {"url": self.instance.llama.url, "api_key": self.instance.llama.api_key}

    async def stop(
        self, reason: str = "stopped on request", retire: bool = False
    ) -> dict[str, Any]:
        """Stop llama-server (SIGTERM, SIGKILL after stop_grace); waiting requests are answered.
        `retire`: this actor is done for (the controller stops it for good): requests that wait
        or race the stop get ModelRetired, a retryable answer, and never restart llama-server
        here.

        The stop runs as its own task under the lifecycle lock, so a caller that gives up
        (cancellation) never leaves it half done.
        """
        await self.instance.stop(reason, retire)
        return self._stats()

    async def request_stop(self, reason: str) -> dict[str, Any]:
        """The stop handshake for idleness and eviction: refused while anything is in flight.

        Once accepted, the actor is retired: acquires that race the stop get ModelRetired (a
        retryable answer) and the caller asks the controller for a fresh actor.
        """
        answer = await self.retire(reason)
        if answer["accepted"]:
            await self.stop(reason)
        return answer

    async def retire(self, reason: str) -> dict[str, Any]:
        """The first half of `request_stop`, answered before anything stops: refused while
        anything is in flight; once accepted, every acquire gets ModelRetired (retryable), so
        the controller can drop this actor from its registry before it stops it."""
        refusal = self._busy_reason() or self.instance.changing()
        if refusal is not None:
            return {"accepted": False, "reason": refusal}
        self.instance.retired = True
        return {"accepted": True, "reason": reason}

    async def drain(self, reason: str, timeout: float) -> dict[str, Any]:
        """Take no new requests, let those in flight or queued finish (up to `timeout` s), stop."""
        self.instance.retired = True
        deadline = time.monotonic() + timeout
        while self._busy_reason() is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await self.stop(reason)

    async def reload(self, model: ModelConfig, settings: Settings) -> dict[str, Any]:
        """Apply a new config. Fields that change the process restart it; waiting requests
        stay queued across the restart and are served by the new instance."""
        restarted = await self.instance.locked(self._apply_reload, model, settings)
        if restarted is not None:
            await asyncio.wait({restarted})
        self.events.record("reloaded", restarted=restarted is not None)
        return self._stats()

    async def _apply_reload(
        self, model: ModelConfig, settings: Settings
    ) -> asyncio.Task[None] | None:
        """Take the new config; restart the process if it must. Returns the new start task."""
        restart = self.instance.configure(model, settings)
        self.admission.configure(model, settings)
        self.jobs.settings = settings
        if not restart or not self.instance.running():
            if restart:
                self.admission.slots.slots = model.parallel
            return None
        await self.instance.halt()
        self.admission.slots.slots = model.parallel
        self.instance.stopped_for_reload()
        return self.instance.ensure_starting()  # waiters stay queued for the new instance

    # ------------------------------------------------------------------ requests (public)
    async def acquire(
        self,
        request_id: str,
        deadline: float | None = None,
        arrived: float | None = None,
        holder: str | None = None,
    ) -> dict[str, Any]:
        """A lease `{lease_id, url, api_key, ...}` for one request: at once when a slot is free,
        else after waiting in the FIFO (which starts the model when it is stopped).
        `arrived` (wall clock) is when the request reached the product, for honest wait times.
        `holder`: who renews the lease (`renew`); it is reclaimed `lease_ttl` s after the last
        renewal. Without one it lasts until released (or `max_lease_time`)."""
        answer = self.admission.enqueue(request_id, deadline, arrived, holder)
        if "lease" in answer:
            return answer["lease"]
        return await self.admission.wait(request_id)

    async def enqueue(
        self,
        request_id: str,
        deadline: float | None = None,
        arrived: float | None = None,
        released: Sequence[tuple[str, int]] = (),
        holder: str | None = None,
    ) -> dict[str, Any]:
        """The first half of acquire: `{"lease": ...}` at once, or `{"queued": {position,
        model_state}}` and the caller then calls `wait_lease` (streams send keep-alives between).
        `released`: (lease id, requests served) the caller gives back first, sparing it a call;
        the slots they free go to the oldest waiters before this request joins the queue.
        `holder` as for `acquire`."""
        self.admission.give_back(released)
        return self.admission.enqueue(request_id, deadline, arrived, holder)

    async def wait_lease(self, request_id: str) -> dict[str, Any]:
        """The second half of acquire: the lease once granted, or why not."""
        return await self.admission.wait(request_id)

    async def enqueue_or_submit(
        self,
        request_id: str,
        path: str,
        body: dict[str, Any],
        deadline: float | None = None,
        arrived: float | None = None,
        released: Sequence[tuple[str, int]] = (),
        holder: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """For `Prefer: respond-async`: a lease when a slot is free now, else an async job
        whose result only `owner` (an API key's name) may read.
        `released` as for `enqueue`: given back first, so they count as free."""
        self.admission.give_back(released)
        if self.instance.state == ModelState.READY and self.admission.free_now():
            return self.admission.enqueue(request_id, deadline, arrived, holder)
        # What the request would hear on its first poll, it hears now: no 202 for a request
        # that cannot wait (a full queue, a model cooling down after a failure).
        self.instance.refuse_if_closed()
        if len(self.admission.slots.waiters) >= self.admission.slots.max_queue:
            raise self.admission.queue_full()
        return {"queued": await self.submit(request_id, path, body, deadline, owner)}

    async def shed(self, count: int) -> int:
        """The controller saw free slots on other replicas of the model: up to `count` of the
        oldest waiting requests leave this queue, and their ingress routes them again."""
        return self.admission.shed(count, keep=set(self.jobs.jobs))

    async def queue_position(self, request_id: str) -> dict[str, Any]:
        return {
            "position": self.admission.slots.position(request_id),
            "model_state": str(self.instance.state),
        }

    async def release(self, lease_id: str, served: int = 1) -> None:
        """Give a slot back after `served` requests ran on it; the oldest waiter gets it."""
        self.admission.release(lease_id, served)

    async def release_many(self, released: Sequence[tuple[str, int]]) -> None:
        self.admission.give_back(released)

    async def renew(self, holder: str, lease_ids: Sequence[str], in_line: int = 0) -> list[str]:
        """An ingress replica still uses these leases (it calls every lease_ttl/6 s while it
        holds any). Returns those this actor no longer counts as the holder's.
        `in_line`: its requests waiting for a slot one of its own requests frees (they never
        reach this queue unless that wait runs long), shown in the queue status."""
        self.admission.ensure_upkeep()
        return self.admission.renew(holder, lease_ids, in_line)

    async def abandon(self, request_id: str) -> None:
        """The caller of a queued request went away (whether or not it ever came to wait for
        it): its place leaves the queue, or the slot granted to it goes to the next waiter."""
        self.admission.abandon(request_id)

    async def cancel(self, request_id: str) -> bool:
        """Take a waiting request out of the queue (its client went away)."""
        return self.admission.cancel(request_id)

    async def position(self, request_id: str) -> int | None:
        return self.admission.slots.position(request_id)

    async def queue_status(self) -> dict[str, Any]:
        return self.admission.queue_status()

    async def clear_queue(self, reason: str = "the queue was cleared by an admin") -> int:
        """Answer every waiting request with QueueCleared; returns how many there were."""
        return self.admission.clear_queue(reason)

    # ------------------------------------------------------------------ async jobs (public)
    async def submit(
        self,
        request_id: str,
        path: str,
        body: dict[str, Any],
        deadline: float | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """Queue a request the actor itself sends to llama-server when ready (respond-async)."""
        self.admission.ensure_upkeep()
        self.instance.refuse_if_retired()
        return await self.jobs.submit(request_id, path, body, deadline, owner)

    async def result(self, request_id: str) -> dict[str, Any]:
        """pending (with position), running, done (status and body), or unknown."""
        return self.jobs.result(request_id)

    async def take_results(self) -> dict[str, dict[str, Any]]:
        """Hand over finished async results (the controller keeps them once this actor goes)."""
        return self.jobs.take_results()

    def _where(self, request_id: str) -> dict[str, Any]:
        return {
            "position": self.admission.slots.position(request_id) or 0,
            "model_state": str(self.instance.state),
        }

    # ------------------------------------------------------------------ observation (public)
    async def stats(self) -> dict[str, Any]:
        return self._stats()

    async def logs(self, lines: int = 100) -> list[str]:
        return log_tail(self.instance.llama.log.path, lines)

    async def events_since(self, seq: int = -1) -> list[dict[str, Any]]:
        return self.events.since(seq)

    def ping(self) -> str:
        return "pong"

    def __repr__(self) -> str:
        # What the Ray dashboard shows for this actor, and what its log lines start with.
        return f"ModelActor({self.name}: {self.instance.state})"

    def _stats(self) -> dict[str, Any]:
        return {
            **stats(self.name, self.instance, self.admission.slots),
            "generation": self.generation,
        }

    def _busy_reason(self) -> str | None:
        return busy_reason(self.admission.slots, self.jobs.unfinished())


ModelActorRemote = ray.remote(ModelActor)


def create_model_actor(
    name: str,
    model: ModelConfig,
    settings: Settings,
    base_dir: str | Path,
    events_to: str | None = None,
    generation: str = "",
    calibrate: bool = False,
    timeline: dict[str, float] | None = None,
    **options: Any,
) -> ray.actor.ActorHandle:
    """Create the named actor for a model (num_cpus 0 unless the options say otherwise)."""
    defaults: dict[str, Any] = {
        "name": actor_name(name, generation),
        "namespace": NAMESPACE,
        "num_cpus": 0,
        "max_concurrency": 4096,
    }
    return ModelActorRemote.options(**{**defaults, **options}).remote(
        name, model, settings, str(base_dir), events_to, calibrate, timeline, generation
    )
