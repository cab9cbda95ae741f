"""One Ray actor per model: it owns the model's llama-server process, its state machine, its slots,
its bounded FIFO queue, its leases and its async jobs (DESIGN §3-§5).

Decisions come from `proxifier` (SlotQueue, RestartBudget, the state machine); this actor applies
them: it spawns and stops the process, polls its health, resolves waiting requests' futures and
restarts llama-server after a crash. Tokens never pass through here: a lease hands the ingress
llama-server's URL and per-instance key, and the ingress talks to it over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ray

from actors.gpu_probe import process_gpu_memory
from actors.process import free_port, log_tail, rss_bytes, spawn, terminate, trim_log
from actors.ray_glue import Background
from proxifier.config import (
    ModelConfig,
    Settings,
    effective,
    model_file_for,
    model_start_problem_for,
)
from proxifier.config_diff import PLACEMENT_FIELDS, RESTART_FIELDS
from proxifier.errors import (
    InvalidRequest,
    LeaseError,
    ModelFailed,
    ModelRetired,
    ProxifierError,
    QueueCleared,
    QueueFull,
    QueueTimeout,
    Unavailable,
)
from proxifier.gpu_memory import parse_load_log
from proxifier.lifecycle import (
    ModelState,
    RestartBudget,
    check_transition,
    health_poll_delays,
    start_phases,
)
from proxifier.llama import LlamaServerNotFound, build_argv, find_llama_server, proxifier_home
from proxifier.model_files import (
    HfSource,
    cached_file,
    describe_progress,
    fetch,
    hf_source,
    hub_message,
    model_cache,
)
from proxifier.slots import Lease, Outcome, SlotQueue

logger = logging.getLogger(__name__)

NAMESPACE = "proxifier"
INSTANCE_MARK = "=== proxifier: llama-server instance"


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


@dataclass
class Job:
    """A request queued with `Prefer: respond-async`: the actor runs it and keeps the answer."""

    request_id: str
    path: str
    body: dict[str, Any]
    state: str = "pending"  # pending -> running -> done
    http_status: int | None = None
    response: Any = None
    done_at: float | None = None
    owner: str | None = None  # the API key that queued it: only it may read the result
    task: asyncio.Task[None] | None = field(default=None, repr=False)


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
    ) -> None:
        self.name = name
        # When this start was asked for and placed (wall clock, from the controller), then
        # when this actor came up: the first `ready` event reports each phase of the start.
        self.timeline = {**(timeline or {}), "actor": time.time()}
        self._started_once = False
        # Run llama-server at -lv 4, whose load log lists the memory it allocated per device,
        # and report that (the controller has no measurement for this file and these flags).
        self.calibrate = calibrate
        self.measured: dict[str, Any] | None = None
        self._log_start = 0
        # The named actor (the controller) that gets a copy of every event; looked up by name
        # each time it is missing, so a restarted controller keeps receiving them.
        self.events_to = events_to
        self._sink: Any = None
        self._sink_missing_at = -math.inf
        self.model = model
        self.settings = settings
        self.base_dir = Path(base_dir)
        self.state = ModelState.STOPPED
        self.slots = SlotQueue(model.parallel, self._max_queue())
        self.budget = RestartBudget(settings.max_restarts, settings.restart_window)
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.in_lines: dict[str, tuple[int, float]] = {}  # holder -> (in its line, when told)
        self.jobs: dict[str, Job] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.process: asyncio.subprocess.Process | None = None
        self.instance = 0
        self.host: str | None = None
        self.port: int | None = None
        self.api_key: str | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.last_error: str | None = None
        self.failed_until = 0.0
        self.restarts = 0
        self.retired = False
        self.stop_reason: str | None = None
        self.log_path = proxifier_home() / "logs" / f"{_safe(name)}.log"
        self._start_task: asyncio.Task[None] | None = None
        # The current start is under way: its process runs, or its model file is downloading.
        self._spawned = asyncio.Event()
        self.download: dict[str, Any] | None = None  # file, done, total while fetching
        self._key_dir: Path | None = None
        self._key_file: Path | None = None
        # Stops and reloads take this lock; starts triggered by requests do not need it.
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks = Background()  # fire-and-forget tasks, kept referenced
        self._unclaimed: set[str] = set()

    # ------------------------------------------------------------------ lifecycle (public)
    async def start(self, force: bool = False) -> dict[str, Any]:
        """Start llama-server if it is not running (single-flight); return stats when ready.

        A failed model refuses until its cooldown ends, unless `force` (an admin start).
        """
        self._ensure_background()
        if self.retired:
            raise ModelRetired(f"model '{self.name}' is stopping", retry_after=1)
        async with self._lock:  # waits out a stop or reload in progress; not held while loading
            if self.state == ModelState.READY:
                return self._stats()
            if self.state == ModelState.FAILED and not force:
                self._raise_if_cooling_down()
            task = self._ensure_starting()
        await asyncio.wait({task})
        if self.state == ModelState.READY:
            return self._stats()
        if self.state in (ModelState.STOPPED, ModelState.STOPPING) or self.retired:
            raise Unavailable(f"model '{self.name}' was stopped while starting", retry_after=1)
        raise ModelFailed(
            f"model '{self.name}' failed to start: {self.last_error}",
            retry_after=self.settings.cooldown or None,
        )

    async def endpoint(self) -> dict[str, Any]:
        """Where llama-server answers and its key, once ready (started when stopped), for a
        raw passthrough that takes no slot (`/upstream/{model}/...`: its /slots, /props, web
        UI). It counts as use: the idle clock starts again."""
        await self.start()
        self.slots.touch(time.time())
        return {"url": f"http://{self.host}:{self.port}", "api_key": self.api_key}

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
        self.retired = self.retired or retire
        await self._locked(self._stop_instance, reason)
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
        refusal = self._busy_reason()
        if refusal is None and self._lock.locked():
            refusal = "a stop or reload is in progress"
        if refusal is None and self.state in (ModelState.STARTING, ModelState.RESTARTING):
            refusal = str(self.state)
        if refusal is not None:
            return {"accepted": False, "reason": refusal}
        self.retired = True
        return {"accepted": True, "reason": reason}

    async def drain(self, reason: str, timeout: float) -> dict[str, Any]:
        """Take no new requests, let those in flight or queued finish (up to `timeout` s), stop."""
        self.retired = True
        deadline = time.monotonic() + timeout
        while self._busy_reason() is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await self.stop(reason)

    async def reload(self, model: ModelConfig, settings: Settings) -> dict[str, Any]:
        """Apply a new config. Fields that change the process restart it; waiting requests
        stay queued across the restart and are served by the new instance."""
        restarted = await self._locked(self._apply_reload, model, settings)
        if restarted is not None:
            await asyncio.wait({restarted})
        self._event("reloaded", restarted=restarted is not None)
        return self._stats()

    async def take_results(self) -> dict[str, dict[str, Any]]:
        """Hand over finished async results (the controller keeps them once this actor goes)."""
        done = {rid: self._job_result(job) for rid, job in self.jobs.items() if job.state == "done"}
        for request_id in done:
            del self.jobs[request_id]
        return done

    async def abandon(self, request_id: str) -> None:
        """The caller of a queued request went away (whether or not it ever came to wait for
        it): its place leaves the queue, or the slot granted to it goes to the next waiter."""
        future = self.waiters.get(request_id)
        if future is not None:
            self._abandon(request_id, future)
        else:
            self.slots.cancel(request_id)

    async def cancel(self, request_id: str) -> bool:
        """Take a waiting request out of the queue (its client went away)."""
        waiter = self.slots.cancel(request_id)
        if waiter is None:
            return False
        self._fail_waiter(
            request_id, Unavailable(f"request {request_id!r} was cancelled", retry_after=1)
        )
        return True

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
        answer = self._enqueue(request_id, deadline, arrived, holder)
        if "lease" in answer:
            return answer["lease"]
        return await self._wait(request_id)

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
        self._give_back(released)
        return self._enqueue(request_id, deadline, arrived, holder)

    async def wait_lease(self, request_id: str) -> dict[str, Any]:
        """The second half of acquire: the lease once granted, or why not."""
        return await self._wait(request_id)

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
        self._give_back(released)
        free_now = self.slots.free_slots() > 0 and not self.slots.waiters
        if self.state == ModelState.READY and free_now:
            return self._enqueue(request_id, deadline, arrived, holder)
        # What the request would hear on its first poll, it hears now: no 202 for a request
        # that cannot wait (a full queue, a model cooling down after a failure).
        self._refuse_if_closed()
        if len(self.slots.waiters) >= self.slots.max_queue:
            raise self._queue_full()
        return {"queued": await self.submit(request_id, path, body, deadline, owner)}

    async def queue_position(self, request_id: str) -> dict[str, Any]:
        return {"position": self.slots.position(request_id), "model_state": str(self.state)}

    async def release(self, lease_id: str, served: int = 1) -> None:
        """Give a slot back after `served` requests ran on it; the oldest waiter gets it."""
        self._grant(self.slots.release(lease_id, time.time(), served))

    async def release_many(self, released: Sequence[tuple[str, int]]) -> None:
        self._give_back(released)

    async def renew(self, holder: str, lease_ids: Sequence[str], in_line: int = 0) -> list[str]:
        """An ingress replica still uses these leases (it calls every lease_ttl/6 s while it
        holds any). Returns those this actor no longer counts as the holder's.
        `in_line`: its requests waiting for a slot one of its own requests frees (they never
        reach this queue unless that wait runs long), shown in the queue status."""
        self._ensure_background()
        now = time.time()
        self.in_lines[holder] = (in_line, now)
        return self.slots.renew(holder, lease_ids, now)

    def _waiting_in_replicas(self, now: float) -> int:
        """Requests in replicas' lines, as their last renewals said (older ones are stale)."""
        ttl = self.settings.lease_ttl
        return sum(count for count, at in self.in_lines.values() if now - at <= ttl)

    def _give_back(self, released: Sequence[tuple[str, int]]) -> None:
        """Releases sent in a batch: one this actor does not know (it was restarted since)
        must not fail the others or the request they rode with."""
        for lease_id, served in released:
            try:
                self._grant(self.slots.release(lease_id, time.time(), served))
            except LeaseError as error:
                logger.warning("model %s: %s", self.name, error)

    def _enqueue(
        self,
        request_id: str,
        deadline: float | None,
        arrived: float | None = None,
        holder: str | None = None,
    ) -> dict[str, Any]:
        self._ensure_background()
        now = min(time.time(), arrived or math.inf)
        self._refuse_if_closed()
        deadline = min(deadline or math.inf, now + self._queue_timeout())
        outcome, lease = self.slots.request(request_id, now, deadline, holder)
        if outcome is Outcome.GRANTED:
            assert lease is not None
            return {"lease": self._lease(lease)}
        if outcome is Outcome.FULL:
            raise self._queue_full()
        self.waiters[request_id] = asyncio.get_running_loop().create_future()
        if self.state in (ModelState.STOPPED, ModelState.FAILED):
            self._ensure_starting()
        return {
            "queued": {
                "position": self.slots.position(request_id),
                "model_state": str(self.state),
            }
        }

    async def _wait(self, request_id: str) -> dict[str, Any]:
        future = self.waiters.get(request_id)
        if future is None:
            raise Unavailable(f"request {request_id!r} is not waiting for model '{self.name}'")
        waiter = self.slots.waiters.get(request_id)
        deadline = waiter.deadline if waiter is not None else time.time()
        enqueued = waiter.enqueued_at if waiter is not None else time.time()
        try:
            await asyncio.wait({future}, timeout=max(0.0, deadline - time.time()))
        except asyncio.CancelledError:
            self._abandon(request_id, future)
            raise
        self.waiters.pop(request_id, None)
        if future.done():
            return future.result()
        self.slots.cancel(request_id)
        future.cancel()
        raise QueueTimeout(
            f"Request waited {time.time() - enqueued:.1f}s in the queue of model '{self.name}' "
            f"(model state: {self.state}) and timed out",
            retry_after=self._queue_timeout(),
        )

    async def position(self, request_id: str) -> int | None:
        return self.slots.position(request_id)

    async def queue_status(self) -> dict[str, Any]:
        now = time.time()
        waiting = [
            {"request_id": w.request_id, "position": i + 1, "waited": now - w.enqueued_at}
            for i, w in enumerate(self.slots.waiters.values())
        ]
        return {
            "model": self.name,
            "state": str(self.state),
            "depth": len(waiting),
            "waiting_in_replicas": self._waiting_in_replicas(now),
            "max_queue_size": self.slots.max_queue,
            "queue_timeout": self._queue_timeout(),
            "oldest_wait": self.slots.oldest_wait(now),
            "in_flight": len(self.slots.leases),
            "slots": self.slots.slots,
            "waiting": waiting[:100],
            "leases": [
                {
                    "request_id": lease.request_id,
                    "holder": lease.holder,
                    "held_for": now - lease.granted_at,
                    "renewed_ago": now - self.slots.renewed.get(lease.lease_id, lease.granted_at),
                }
                for lease in list(self.slots.leases.values())[:100]
            ],
        }

    async def clear_queue(self, reason: str = "the queue was cleared by an admin") -> int:
        """Answer every waiting request with QueueCleared; returns how many there were."""
        cleared = self.slots.clear()
        for waiter in cleared:
            self._fail_waiter(
                waiter.request_id,
                QueueCleared(
                    f"Request removed from the queue of model '{self.name}': {reason}",
                    retry_after=1,
                ),
            )
        if cleared:
            self._event("queue_cleared", count=len(cleared), reason=reason)
        return len(cleared)

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
        self._ensure_background()
        if self.retired:
            raise ModelRetired(f"model '{self.name}' is stopping", retry_after=1)
        if request_id in self.jobs:
            raise InvalidRequest(f"request {request_id!r} was already submitted")
        job = Job(request_id, path, {**body, "stream": False}, owner=owner)
        self.jobs[request_id] = job
        job.task = asyncio.create_task(self._run_job(job, deadline))
        await asyncio.sleep(0)  # let the job take its place in the queue
        return {
            "request_id": request_id,
            "position": self.slots.position(request_id) or 0,
            "model_state": str(self.state),
        }

    async def result(self, request_id: str) -> dict[str, Any]:
        """pending (with position), running, done (status and body), or unknown."""
        job = self.jobs.get(request_id)
        if job is None:
            return {"status": "unknown", "request_id": request_id}
        if job.state == "done":
            return self._job_result(job)
        return {
            "status": job.state,
            "request_id": request_id,
            "owner": job.owner,
            "position": self.slots.position(request_id) or 0,
            "model_state": str(self.state),
        }

    # ------------------------------------------------------------------ observation (public)
    async def stats(self) -> dict[str, Any]:
        return self._stats()

    async def logs(self, lines: int = 100) -> list[str]:
        return log_tail(self.log_path, lines)

    async def events_since(self, seq: int = -1) -> list[dict[str, Any]]:
        return [event for event in self.events if event["seq"] > seq]

    def ping(self) -> str:
        return "pong"

    def __repr__(self) -> str:
        # What the Ray dashboard shows for this actor, and what its log lines start with.
        return f"ModelActor({self.name}: {self.state})"

    # ------------------------------------------------------------------ start and stop
    def _ensure_starting(self) -> asyncio.Task[None]:
        if self._start_task is None or self._start_task.done():
            # The state changes now, so whoever triggered the start already sees "starting".
            self._set_state(ModelState.STARTING)
            self._spawned.clear()
            self._start_task = asyncio.create_task(self._start_instance())
        return self._start_task

    async def launch(self, force: bool = False) -> str:
        """Start llama-server like `start`, but answer as soon as its process runs, its file
        downloads, or the start ended, not when it has loaded: the controller starts models in
        priority order this way while their loads overlap. `force` (an admin start) skips a
        failure's cooldown. Returns the state."""
        self._ensure_background()
        async with self._lock:
            if self.retired or self.state == ModelState.READY:
                return str(self.state)
            cooling = self.state == ModelState.FAILED and self.failed_until > time.time()
            if cooling and not force:
                return str(self.state)
            task = self._ensure_starting()
        spawned = asyncio.ensure_future(self._spawned.wait())
        await asyncio.wait({task, spawned}, return_when=asyncio.FIRST_COMPLETED)
        spawned.cancel()
        return str(self.state)

    async def _start_instance(self) -> None:
        if self._started_once:  # a restart: only its own preparation and load count
            self.timeline = {"actor": time.time()}
        self._started_once = True
        if self.state != ModelState.STARTING:
            self._set_state(ModelState.STARTING)
        self.stop_reason = None
        process: asyncio.subprocess.Process | None = None
        try:
            problem = model_start_problem_for(self.name, self.model, self.base_dir)
            binary = ""
            if problem is None:
                try:
                    binary = find_llama_server(
                        self.model.llama_server or self.settings.llama_server
                    )
                except LlamaServerNotFound as exc:
                    problem = str(exc)
            if problem is not None:
                self._fail(problem)
                return
            model_file = model_file_for(self.model, self.base_dir)
            source = hf_source(self.model.hf_repo, self.model.hf_file)
            if source is not None:
                model_file = await self._download(source)
                if model_file is None:
                    return
            self.instance += 1
            instance = self.instance
            host = await asyncio.to_thread(_bind_host)
            port = self.model.port or free_port(host)
            api_key = secrets.token_hex(24)
            argv = build_argv(
                self.model,
                binary=binary,
                model_file=str(model_file),
                host=host,
                port=port,
                api_key_file=str(self._write_key(api_key)),
                alias=self.name,
                log_verbosity=4 if self.calibrate else None,
            )
            env = {**os.environ, **self.model.env}
            trim_log(self.log_path)  # before this instance's mark, which must stay
            with self.log_path.open("a") as log:
                log.write(f"\n{INSTANCE_MARK} {instance} starting at {time.ctime()}\n")
                self._log_start = log.tell()  # where this instance's own lines begin
            process = await spawn(argv, env, self.log_path)
            self.process, self.host, self.port, self.api_key = process, host, port, api_key
            self.started_at = time.time()
            self._spawned.set()
            self._event("starting", pid=process.pid, url=f"http://{host}:{port}")
            failure = await self._wait_ready(process, f"http://{host}:{port}")
        except asyncio.CancelledError:
            if process is not None:
                await terminate(process, self.settings.stop_grace)
            raise
        except Exception as exc:  # anything unexpected fails the start, never wedges it
            if process is not None:
                await terminate(process, self.settings.stop_grace)
                self.process = None
            self._fail(f"could not start llama-server: {exc!r}")
            return
        if failure is not None:
            await terminate(process, self.settings.stop_grace)
            self.process = None
            self._fail(failure)
            return
        self._forget_key()  # llama-server read it when it started
        now = time.time()
        self.ready_at = now
        self._set_state(ModelState.READY)
        details: dict[str, Any] = {}
        if self.calibrate:
            measured = parse_load_log(self._instance_text())
            # A load whose weights on some GPU went unlogged is no measurement.
            if measured is not None and all(
                "model" in kinds for device, kinds in measured.buffers.items() if device != "CPU"
            ):
                self.measured = {
                    "buffers": measured.buffers,
                    "gpu": measured.gpu,
                    "projected": measured.projected,
                    # What the GPU says the process holds, its CUDA context included.
                    "process": await asyncio.to_thread(process_gpu_memory, process.pid),
                }
                details["memory"] = self.measured
        self._event(
            "ready",
            pid=process.pid,
            load_seconds=now - (self.started_at or now),
            phases=start_phases(self.timeline, self.started_at or now, now),
            **details,
        )
        self._grant(self.slots.open(instance, now))
        self._tasks.keep(asyncio.create_task(self._watch(process, instance)))

    async def _download(self, source: HfSource) -> Path | None:
        """The model's file from Hugging Face, fetched once per node into its cache; None
        (the model failed, with the Hub's reason) when it cannot be had."""
        cache = model_cache(self.settings.model_cache)
        found = await asyncio.to_thread(cached_file, source, cache)
        if found is not None:
            return found
        began = time.time()
        self.timeline["download"] = began
        self.download = {"file": source.label, "done": 0, "total": None}
        self._event("downloading", file=source.label, cache=str(cache))
        self._spawned.set()  # a download may take minutes: the next model need not wait

        watching = True  # a cancelled start leaves the thread to finish; it reports no more

        def progress(done: int, total: int | None) -> None:  # called from the download thread
            if watching:
                self.download = {"file": source.label, "done": done, "total": total}

        try:
            path = await asyncio.to_thread(fetch, source, cache, self.model.env, progress)
        except Exception as exc:  # the Hub's errors, the network's, a full disk
            self._fail(f"could not fetch {source.label} from Hugging Face: {hub_message(exc)}")
            return None
        finally:
            watching = False
            self.download = None
        self.timeline["downloaded"] = time.time()
        size = path.stat().st_size
        self._event("downloaded", file=source.label, bytes=size, seconds=time.time() - began)
        return path

    async def _wait_ready(self, process: asyncio.subprocess.Process, url: str) -> str | None:
        """Poll /health until 200 while watching the process; a reason when it never gets there."""
        timeout = self.model.startup_timeout or self.settings.startup_timeout
        give_up = time.monotonic() + timeout
        exited = asyncio.ensure_future(process.wait())
        try:
            for delay in health_poll_delays():
                await asyncio.wait({exited}, timeout=delay)
                if exited.done():
                    return (
                        f"llama-server exited with code {process.returncode} while loading; "
                        "the last lines of its log:\n" + "\n".join(self._instance_log(20))
                    )
                with contextlib.suppress(httpx.TransportError):
                    response = await self._http().get(f"{url}/health", timeout=2.0)
                    if response.status_code == 200:
                        return None
                if time.monotonic() > give_up:
                    return (
                        f"llama-server was not ready after {timeout:g}s (startup_timeout); "
                        "the last lines of its log:\n" + "\n".join(self._instance_log(20))
                    )
        finally:
            exited.cancel()
        raise AssertionError("unreachable")

    async def _watch(self, process: asyncio.subprocess.Process, instance: int) -> None:
        """Notice a crash the moment it happens, not on the next request."""
        code = await process.wait()
        if instance != self.instance or self.state != ModelState.READY:
            return  # a deliberate stop or restart
        self.process = None
        tail = "\n".join(self._instance_log(20))
        self.last_error = f"llama-server exited with code {code} while serving; last lines:\n{tail}"
        self._set_state(ModelState.RESTARTING)
        voided = self.slots.close()
        delay = self.budget.on_crash(time.time())
        self._event("crashed", code=code, in_flight=len(voided), restart_in=delay)
        if delay is None:
            self._fail(
                f"crashed {self.budget.max_restarts + 1} times within "
                f"{self.budget.window:g}s; {self.last_error}"
            )
            return
        self.restarts += 1
        self._start_task = asyncio.create_task(self._restart_after(delay))

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.state == ModelState.RESTARTING:
            await self._start_instance()

    async def _locked(self, operation: Any, *args: Any) -> Any:
        """Run a lifecycle change (stop, reload) as a task under the lifecycle lock."""

        async def run() -> Any:
            async with self._lock:
                return await operation(*args)

        task = asyncio.create_task(run())
        self._tasks.keep(task)
        await asyncio.wait({task})
        return task.result()

    async def _apply_reload(
        self, model: ModelConfig, settings: Settings
    ) -> asyncio.Task[None] | None:
        """Take the new config; restart the process if it must. Returns the new start task."""
        before, after = effective(self.model, self.settings), effective(model, settings)
        restart = any(before[f] != after[f] for f in PROCESS_FIELDS)
        self.model, self.settings = model, settings
        self.slots.max_queue = self._max_queue()
        self.budget.max_restarts = settings.max_restarts
        self.budget.window = settings.restart_window
        running = (ModelState.READY, ModelState.STARTING, ModelState.RESTARTING)
        if not restart or self.state not in running:
            if restart:
                self.slots.slots = model.parallel
            return None
        await self._halt()
        self.slots.slots = model.parallel
        self._set_state(ModelState.STOPPED)
        self._event("stopped", reason="reloaded with a new configuration")
        return self._ensure_starting()  # waiters stay queued for the new instance

    def _write_key(self, key: str) -> Path:
        """The instance key in a file only this user can read (0600, in a 0700 folder of its
        own), for `--api-key-file`; removed once llama-server has loaded, or when it stops."""
        self._forget_key()
        if self._key_dir is None or not self._key_dir.exists():
            self._key_dir = Path(tempfile.mkdtemp(prefix="proxifier-key-"))
        path = self._key_dir / f"{_safe(self.name)}.key"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(key + "\n")
        self._key_file = path
        return path

    def _forget_key(self) -> None:
        if self._key_file is not None:
            self._key_file.unlink(missing_ok=True)
            self._key_file = None

    async def _halt(self) -> int | None:
        """Cancel a start in progress, void the leases, end the process. State: STOPPING."""
        # First the state, so a caller woken by the cancelled start already sees "stopping".
        if self.state != ModelState.STOPPING:
            self._set_state(ModelState.STOPPING)
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            await asyncio.gather(self._start_task, return_exceptions=True)
        self.slots.close()
        code = None
        if self.process is not None:
            code = await terminate(self.process, self.settings.stop_grace)
            self.process = None
        self._forget_key()
        return code

    async def _stop_instance(self, reason: str) -> None:
        if self.state == ModelState.STOPPED and self.process is None:
            return
        code = await self._halt()
        error_type = ModelRetired if self.retired else Unavailable
        for waiter in self.slots.clear():
            self._fail_waiter(
                waiter.request_id,
                error_type(
                    f"model '{self.name}' was stopped ({reason}) while the request waited",
                    retry_after=1,
                ),
            )
        self._set_state(ModelState.STOPPED)
        self.stop_reason = reason
        self._event("stopped", reason=reason, code=code)

    def _fail(self, message: str) -> None:
        self._forget_key()
        self.last_error = message
        self.failed_until = time.time() + self.settings.cooldown
        self._set_state(ModelState.FAILED)
        self.slots.close()
        error = ModelFailed(
            f"model '{self.name}' failed: {message}", retry_after=self.settings.cooldown or None
        )
        for waiter in self.slots.clear():
            self._fail_waiter(waiter.request_id, error)
        self._event("failed", reason=message)

    def _refuse_if_closed(self) -> None:
        """A request this actor takes no more: it is retiring, or failed and cooling down."""
        if self.retired:
            raise ModelRetired(f"model '{self.name}' is stopping", retry_after=1)
        if self.state == ModelState.FAILED:
            self._raise_if_cooling_down()

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            "Service temporarily unavailable - queue is full", retry_after=self._queue_timeout()
        )

    def _raise_if_cooling_down(self) -> None:
        remaining = self.failed_until - time.time()
        if remaining > 0:
            raise ModelFailed(
                f"model '{self.name}' failed: {self.last_error}", retry_after=remaining
            )

    # ------------------------------------------------------------------ waiters and leases
    def _lease(self, lease: Lease) -> dict[str, Any]:
        return {
            "lease_id": lease.lease_id,
            "request_id": lease.request_id,
            "url": f"http://{self.host}:{self.port}",
            "api_key": self.api_key,
            "instance": lease.instance,
            "seq": lease.seq,
            "ticket": lease.ticket,
            "model": self.name,
        }

    def _grant(self, leases: list[Lease]) -> None:
        """Hand granted leases to their waiters; a lease nobody waits for any more goes back."""
        pending = list(leases)
        while pending:
            lease = pending.pop(0)
            future = self.waiters.get(lease.request_id)
            if future is not None and not future.done():
                future.set_result(self._lease(lease))
            else:
                pending += self.slots.release(lease.lease_id, time.time())

    def _fail_waiter(self, request_id: str, error: ProxifierError) -> None:
        # The future stays until its waiter collects it (a caller between enqueue and
        # wait_lease must still hear why); unclaimed ones are swept by _upkeep.
        future = self.waiters.get(request_id)
        if future is not None and not future.done():
            future.set_exception(error)

    def _abandon(self, request_id: str, future: asyncio.Future[dict[str, Any]]) -> None:
        """The caller went away while waiting: free its place, or its slot if it was granted."""
        self.waiters.pop(request_id, None)
        if future.done() and not future.cancelled() and future.exception() is None:
            self._grant(self.slots.release(future.result()["lease_id"], time.time()))
        else:
            self.slots.cancel(request_id)
            future.cancel()

    # ------------------------------------------------------------------ jobs
    async def _run_job(self, job: Job, deadline: float | None) -> None:
        try:
            lease = await self.acquire(job.request_id, deadline)
        except ProxifierError as error:
            self._finish_job(job, error.status, error.body())
            return
        job.state = "running"
        try:
            response = await self._http().post(
                f"{lease['url']}{job.path}",
                json=job.body,
                headers={"Authorization": f"Bearer {lease['api_key']}"},
                timeout=None,
            )
            try:
                payload: Any = response.json()
            except ValueError:
                payload = response.text
            self._finish_job(job, response.status_code, payload)
        except httpx.HTTPError as exc:
            self._finish_job(
                job,
                502,
                {
                    "error": {
                        "message": f"model '{self.name}' failed while answering: {exc}",
                        "type": "upstream_error",
                        "code": "upstream_failed",
                    }
                },
            )
        finally:
            with contextlib.suppress(ProxifierError):
                await self.release(lease["lease_id"])

    def _job_result(self, job: Job) -> dict[str, Any]:
        return {
            "status": "done",
            "request_id": job.request_id,
            "owner": job.owner,
            "http_status": job.http_status,
            "body": job.response,
            "done_at": job.done_at,
        }

    def _finish_job(self, job: Job, status: int, body: Any) -> None:
        job.state, job.http_status, job.response, job.done_at = "done", status, body, time.time()

    # ------------------------------------------------------------------ background upkeep
    def _ensure_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self._upkeep())
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_leases())

    async def _reap_leases(self) -> None:
        """Slots whose holder stopped renewing them (an ingress replica that died, or a request
        whose bookkeeping lost its lease) go back to the queue within seconds, not hours."""
        while True:
            await asyncio.sleep(min(1.0, self.settings.lease_ttl / 4))
            reclaimed, granted = self.slots.reap(
                time.time(), self.settings.max_lease_time, self.settings.lease_ttl
            )
            if reclaimed:
                holders = sorted({str(lease.holder) for lease in reclaimed})
                self._event("leases_reclaimed", count=len(reclaimed), holders=holders)
                logger.warning(
                    "model %s: reclaimed %d slot(s) nobody renewed (holders %s)",
                    self.name,
                    len(reclaimed),
                    ", ".join(holders),
                )
            self._grant(granted)

    async def _upkeep(self) -> None:
        """Sweep expired waiters, drop old job results and answers nobody came for."""
        while True:
            await asyncio.sleep(self.settings.queue.cleanup_interval)
            now = time.time()
            for waiter in self.slots.expire(now):
                self._fail_waiter(
                    waiter.request_id,
                    QueueTimeout(
                        f"Request waited {now - waiter.enqueued_at:.1f}s in the queue of model "
                        f"'{self.name}' (model state: {self.state}) and timed out",
                        retry_after=self._queue_timeout(),
                    ),
                )
            for request_id, job in list(self.jobs.items()):
                if job.done_at is not None and now - job.done_at > self.settings.result_ttl:
                    del self.jobs[request_id]
            self._sweep_unclaimed()

    def _sweep_unclaimed(self) -> None:
        """Answers nobody came for (the caller enqueued, then vanished before wait_lease): after
        a whole sweep interval, drop them, giving a granted slot back."""
        done = {rid for rid, future in self.waiters.items() if future.done()}
        for request_id in done & self._unclaimed:
            future = self.waiters.pop(request_id)
            if not future.cancelled() and future.exception() is None:
                with contextlib.suppress(ProxifierError):
                    self._grant(self.slots.release(future.result()["lease_id"], time.time()))
        self._unclaimed = done - self._unclaimed

    # ------------------------------------------------------------------ helpers
    def _set_state(self, new: ModelState) -> None:
        self.state = check_transition(self.state, new)

    def _event(self, kind: str, **details: Any) -> None:
        seq = self.events[-1]["seq"] + 1 if self.events else 0
        event = {"seq": seq, "time": time.time(), "model": self.name, "kind": kind, **details}
        self.events.append(event)
        if self.events_to is None or not ray.is_initialized():
            return
        now = time.monotonic()
        if self._sink is None and now - self._sink_missing_at < 5.0:
            return  # looked a moment ago and found no controller: do not block the loop again
        try:
            if self._sink is None:
                self._sink = ray.get_actor(self.events_to, namespace=NAMESPACE)
            self._sink.record_event.remote(event)
        except Exception:  # no controller now: the event stays local
            self._sink, self._sink_missing_at = None, now

    def _busy_reason(self) -> str | None:
        """Why the model cannot be stopped for idleness or eviction now, or None."""
        jobs = sum(1 for job in self.jobs.values() if job.state != "done")
        if self.slots.leases or self.slots.waiters or jobs:
            return (
                f"busy: {len(self.slots.leases)} in flight, {len(self.slots.waiters)} waiting"
                + (f", {jobs} async job(s)" if jobs else "")
            )
        return None

    def _max_queue(self) -> int:
        return self.model.max_queue_size or self.settings.queue.max_queue_size

    def _queue_timeout(self) -> float:
        return self.model.queue_timeout or self.settings.queue.queue_timeout

    def _instance_text(self, limit: int = 8 * 1024 * 1024) -> str:
        """Everything this instance wrote so far (its load log: at -lv 4 longer than a tail)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read(limit).decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _instance_log(self, lines: int) -> list[str]:
        """The last lines this instance wrote (not the previous instance's)."""
        tail = log_tail(self.log_path, 400)
        marks = [i for i, line in enumerate(tail) if line.startswith(INSTANCE_MARK)]
        if marks:
            tail = tail[marks[-1] + 1 :]
        return tail[-lines:]

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # Plain HTTP to its own llama-server only: no TLS context to build (20-40 ms,
            # on the path of a cold start).
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0), verify=False)
        return self._client

    def _stats(self) -> dict[str, Any]:
        now = time.time()
        pid = self.process.pid if self.process is not None else None
        running = self.state == ModelState.READY
        context = ray.get_runtime_context() if ray.is_initialized() else None
        return {
            "name": self.name,
            "state": str(self.state),
            "pid": pid,
            "node_id": context.get_node_id() if context else None,
            "host": self.host if pid else None,
            "port": self.port if pid else None,
            "instance": self.instance,
            "started_at": self.started_at if pid else None,
            "ready_at": self.ready_at if running else None,
            "uptime": now - self.ready_at if running and self.ready_at else 0.0,
            "in_flight": len(self.slots.leases),
            "slots": self.slots.slots,
            "queue_depth": len(self.slots.waiters),
            "max_queue_size": self.slots.max_queue,
            "oldest_wait": self.slots.oldest_wait(now),
            "requests_served": self.slots.served,
            "leases_granted": self.slots.granted,
            "last_used": self.slots.last_release,
            "idle_for": self.slots.idle_for(now),
            "busy": self.slots.busy,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "failed_until": self.failed_until if self.state == ModelState.FAILED else None,
            "stop_reason": self.stop_reason,
            "retired": self.retired,
            "memory_measured": self.measured,
            "rss_bytes": rss_bytes(pid),
            "actor_pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else [],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "log_tail": self._instance_log(20),
            "download": self.download,
            "progress": (
                describe_progress(self.download["done"], self.download["total"])
                if self.download
                else None
            ),
        }


# Fields whose change needs a new llama-server process (placement changes need a new actor,
# which is the controller's business).
PROCESS_FIELDS = RESTART_FIELDS - PLACEMENT_FIELDS


def _bind_host() -> str:
    """The node's address as Ray knows it, which every other node (and so every ingress
    replica, wherever it runs, now or after nodes join) reaches it by; only the instance key
    lets anyone in. Loopback only outside Ray."""
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


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
        name, model, settings, str(base_dir), events_to, calibrate, timeline
    )
