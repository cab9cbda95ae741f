"""One model's llama-server, one instance after another: its Hub download, key file, start,
readiness, crash watch and restart, stop; the state machine's transitions and its log.

It knows nothing of queues or leases: it tells admission through `SlotHooks` when slots open
(ready) or close (gone), and it never calls the actor facade.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from actors.model.llama_process import LlamaProcess
from actors.process import terminate
from actors.ray_glue import Background
from proxifier.config import (
    ModelConfig,
    Settings,
    effective,
    model_file_for,
    model_start_problem_for,
)
from proxifier.config_diff import PLACEMENT_FIELDS, RESTART_FIELDS
from proxifier.errors import ModelFailed, ModelRetired, ProxifierError, Unavailable
from proxifier.lifecycle import ModelState, RestartBudget, check_transition, start_phases
from proxifier.llama import LlamaServerNotFound, find_llama_server
from proxifier.model_files import HfSource, cached_file, hf_source, hub_message, model_cache

# Fields whose change needs a new llama-server process (placement changes need a new actor,
# which is the controller's business).
PROCESS_FIELDS = RESTART_FIELDS - PLACEMENT_FIELDS


@dataclass(frozen=True)
class SlotHooks:
    """What the instance tells admission: slots open for instance N (ready), slots close (it
    is gone: returns how many leases that voided), every waiter is turned away with an error
    (made afresh for each; returns how many)."""

    opened: Callable[[int, float], None]
    closed: Callable[[], int]
    turn_away: Callable[[Callable[[], ProxifierError]], int]


class Instance:
    """The state machine of one model's llama-server (STOPPED, STARTING, READY, ...): it starts,
    watches, restarts and stops the process that `llama` holds."""

    def __init__(
        self,
        name: str,
        model: ModelConfig,
        settings: Settings,
        base_dir: Path,
        calibrate: bool,
        timeline: dict[str, float],
        event: Callable[..., None],
        slots: SlotHooks,
    ) -> None:
        self.name, self.model, self.settings = name, model, settings
        self.base_dir = base_dir
        self.timeline = timeline
        self._started_once = False
        self._event = event
        self._slots = slots
        self.llama = LlamaProcess(name, calibrate)
        self.state = ModelState.STOPPED
        self.budget = RestartBudget(settings.max_restarts, settings.restart_window)
        self.last_error: str | None = None
        self.failed_until = 0.0
        self.restarts = 0
        self.retired = False
        self.stop_reason: str | None = None
        self._start_task: asyncio.Task[None] | None = None
        # The current start is under way: its process runs, or its model file is downloading.
        self._spawned = asyncio.Event()
        # Stops and reloads take this lock; starts triggered by requests do not need it.
        self._lock = asyncio.Lock()
        self._hung: str | None = None  # why the liveness probe killed the running llama-server
        self._tasks = Background()  # fire-and-forget tasks, kept referenced

    # ------------------------------------------------------------------ asked by the facade
    async def start(self, force: bool) -> None:
        """Start llama-server if it is not running (single-flight); return once ready, or raise.

        A failed model refuses until its cooldown ends, unless `force` (an admin start).
        """
        self.refuse_if_retired()
        async with self._lock:  # waits out a stop or reload in progress; not held while loading
            if self.state == ModelState.READY:
                return
            if self.state == ModelState.FAILED and not force:
                self.raise_if_cooling_down()
            task = self.ensure_starting()
        await asyncio.wait({task})
        if self.state == ModelState.READY:
            return
        if self.state in (ModelState.STOPPED, ModelState.STOPPING) or self.retired:
            raise Unavailable(f"model '{self.name}' was stopped while starting", retry_after=1)
        raise ModelFailed(
            f"model '{self.name}' failed to start: {self.last_error}",
            retry_after=self.settings.cooldown or None,
        )

    async def launch(self, force: bool) -> str:
        """`start`, answered as soon as the process runs, the file downloads or the start ended."""
        async with self._lock:
            if self.retired or self.state == ModelState.READY:
                return str(self.state)
            cooling = self.state == ModelState.FAILED and self.failed_until > time.time()
            if cooling and not force:
                return str(self.state)
            task = self.ensure_starting()
        spawned = asyncio.ensure_future(self._spawned.wait())
        await asyncio.wait({task, spawned}, return_when=asyncio.FIRST_COMPLETED)
        spawned.cancel()
        return str(self.state)

    async def stop(self, reason: str, retire: bool) -> None:
        self.retired = self.retired or retire
        await self.locked(self._stop_instance, reason)

    def changing(self) -> str | None:
        """Why no stop may be accepted now, as far as the process goes, or None."""
        if self._lock.locked():
            return "a stop or reload is in progress"
        if self.state in (ModelState.STARTING, ModelState.RESTARTING):
            return str(self.state)
        return None

    def configure(self, model: ModelConfig, settings: Settings) -> bool:
        """Take a new config; whether the process must restart for it."""
        before, after = effective(self.model, self.settings), effective(model, settings)
        restart = any(before[f] != after[f] for f in PROCESS_FIELDS)
        self.model, self.settings = model, settings
        self.budget.max_restarts = settings.max_restarts
        self.budget.window = settings.restart_window
        return restart

    def running(self) -> bool:
        return self.state in (ModelState.READY, ModelState.STARTING, ModelState.RESTARTING)

    def stopped_for_reload(self) -> None:
        self._set_state(ModelState.STOPPED)
        self._event("stopped", reason="reloaded with a new configuration")

    async def locked(self, operation: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run a lifecycle change (stop, reload) under the lifecycle lock."""
        return await _run_locked(self._lock, self._tasks, operation, *args)

    # ------------------------------------------------------------------ asked by admission
    def ensure_starting(self) -> asyncio.Task[None]:
        if self._start_task is None or self._start_task.done():
            # The state changes now, so whoever triggered the start already sees "starting".
            self._set_state(ModelState.STARTING)
            self._spawned.clear()
            self._start_task = asyncio.create_task(self._start_instance())
        return self._start_task

    def refuse_if_retired(self) -> None:
        if self.retired:
            raise ModelRetired(f"model '{self.name}' is stopping", retry_after=1)

    def refuse_if_closed(self) -> None:
        """A request this actor takes no more: it is retiring, or failed and cooling down."""
        self.refuse_if_retired()
        if self.state == ModelState.FAILED:
            self.raise_if_cooling_down()

    def raise_if_cooling_down(self) -> None:
        remaining = self.failed_until - time.time()
        if remaining > 0:
            raise ModelFailed(
                f"model '{self.name}' failed: {self.last_error}", retry_after=remaining
            )

    # ------------------------------------------------------------------ start, watch, stop
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
            process = await self.llama.spawn(self.model, binary, model_file)
            instance, url = self.llama.number, self.llama.url
            self._spawned.set()
            self._event("starting", pid=process.pid, url=url)
            timeout = self.model.startup_timeout or self.settings.startup_timeout
            failure = await self.llama.wait_ready(process, url, timeout)
        except asyncio.CancelledError:
            if process is not None:
                await terminate(process, self.settings.stop_grace)
            raise
        except Exception as exc:  # anything unexpected fails the start, never wedges it
            if process is not None:
                await terminate(process, self.settings.stop_grace)
                self.llama.process = None
            self._fail(f"could not start llama-server: {exc!r}")
            return
        if failure is not None:
            await terminate(process, self.settings.stop_grace)
            self.llama.process = None
            self._fail(failure)
            return
        self.llama.key.forget()  # llama-server read it when it started
        now = time.time()
        self.llama.ready_at = now
        self._set_state(ModelState.READY)
        details: dict[str, Any] = {}
        if self.llama.calibrate:
            measured = await self.llama.measure(process.pid)
            if measured is not None:
                details["memory"] = measured
        started_at = self.llama.started_at
        self._event(
            "ready",
            pid=process.pid,
            load_seconds=now - (started_at or now),
            phases=start_phases(self.timeline, started_at or now, now),
            **details,
        )
        self._slots.opened(instance, now)
        self._tasks.keep(asyncio.create_task(self._watch(process, instance)))
        self._tasks.keep(asyncio.create_task(self._probe(process, instance, url)))

    async def _download(self, source: HfSource) -> Path | None:
        """The model's file from Hugging Face, fetched once per node into its cache; None
        (the model failed, with the Hub's reason) when it cannot be had."""
        cache = model_cache(self.settings.model_cache)
        found = await asyncio.to_thread(cached_file, source, cache)
        if found is not None:
            return found
        began = time.time()
        self.timeline["download"] = began
        self._event("downloading", file=source.label, cache=str(cache))
        self._spawned.set()  # a download may take minutes: the next model need not wait
        try:
            path = await self.llama.fetch(source, cache, self.model.env)
        except Exception as exc:  # the Hub's errors, the network's, a full disk
            self._fail(f"could not fetch {source.label} from Hugging Face: {hub_message(exc)}")
            return None
        self.timeline["downloaded"] = time.time()
        size = path.stat().st_size
        self._event("downloaded", file=source.label, bytes=size, seconds=time.time() - began)
        return path

    async def _probe(self, process: asyncio.subprocess.Process, instance: int, url: str) -> None:
        """Notice a hung llama-server (stopped, wedged, its host's CPU starved): one that
        misses `liveness_failures` health answers in a row is killed, and `_watch` restarts it
        as a crash. Its process never exits on its own, so nothing else would."""
        missed = 0
        while instance == self.llama.number and self.state == ModelState.READY:
            settings = self.settings  # read each round: a config reload may change them
            await asyncio.sleep(settings.liveness_interval)
            if instance != self.llama.number or self.state != ModelState.READY:
                return
            try:
                answer = await self.llama.http().get(
                    f"{url}/health", timeout=settings.liveness_timeout
                )
                missed = 0 if answer.status_code == 200 else missed + 1
            except httpx.HTTPError:
                missed += 1
            if missed >= settings.liveness_failures:
                self._hung = (
                    f"llama-server did not answer /health {missed} times in a row "
                    f"({settings.liveness_timeout:g} s each, every {settings.liveness_interval:g} "
                    "s): hung, so it was killed"
                )
                self._event("hung", pid=process.pid, missed=missed)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                return

    async def _watch(self, process: asyncio.subprocess.Process, instance: int) -> None:
        """Notice a crash the moment it happens, not on the next request."""
        code = await process.wait()
        if instance != self.llama.number or self.state != ModelState.READY:
            return  # a deliberate stop or restart
        self.llama.process = None
        tail = "\n".join(self.llama.log.tail(20))
        hung, self._hung = self._hung, None
        ended = hung or f"llama-server exited with code {code} while serving"
        self.last_error = f"{ended}; last lines:\n{tail}"
        self._set_state(ModelState.RESTARTING)
        voided = self._slots.closed()
        delay = self.budget.on_crash(time.time())
        self._event("crashed", code=code, in_flight=voided, restart_in=delay)
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

    async def halt(self) -> int | None:
        """Cancel a start in progress, void the leases, end the process. State: STOPPING."""
        # First the state, so a caller woken by the cancelled start already sees "stopping".
        if self.state != ModelState.STOPPING:
            self._set_state(ModelState.STOPPING)
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            await asyncio.gather(self._start_task, return_exceptions=True)
        self._slots.closed()
        code = None
        if self.llama.process is not None:
            code = await terminate(self.llama.process, self.settings.stop_grace)
            self.llama.process = None
        self.llama.key.forget()
        return code

    async def _stop_instance(self, reason: str) -> None:
        if self.state == ModelState.STOPPED and self.llama.process is None:
            return
        code = await self.halt()
        error_type = ModelRetired if self.retired else Unavailable
        self._slots.turn_away(
            lambda: error_type(
                f"model '{self.name}' was stopped ({reason}) while the request waited",
                retry_after=1,
            )
        )
        self._set_state(ModelState.STOPPED)
        self.stop_reason = reason
        self._event("stopped", reason=reason, code=code)

    def _fail(self, message: str) -> None:
        self.llama.key.forget()
        self.last_error = message
        self.failed_until = time.time() + self.settings.cooldown
        self._set_state(ModelState.FAILED)
        self._slots.closed()
        error = ModelFailed(
            f"model '{self.name}' failed: {message}", retry_after=self.settings.cooldown or None
        )
        self._slots.turn_away(lambda: error)
        self._event("failed", reason=message)

    def _set_state(self, new: ModelState) -> None:
        self.state = check_transition(self.state, new)


async def _run_locked(
    lock: asyncio.Lock, tasks: Background, operation: Callable[..., Awaitable[Any]], *args: Any
) -> Any:
    """`operation` as its own task under `lock`, so a caller that gives up (cancellation)
    never leaves it half done."""

    async def run() -> Any:
        async with lock:
            return await operation(*args)

    task = asyncio.create_task(run())
    tasks.keep(task)
    await asyncio.wait({task})
    return task.result()
