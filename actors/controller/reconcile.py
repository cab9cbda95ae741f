"""The reconcile pass: the models wanted and their waiters; one pass at a time, facts ->
`proxifier.scheduler.decide` -> apply (evict, place pinned to a node, wait, fail); a reload's
actions. It decides nothing itself (the scheduler and planners do) and writes the registry only
through its methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.controller.events import CONTROLLER_NAME
from actors.controller.facts import Facts, observed
from actors.controller.registry import Registry
from actors.model import create_model_actor
from actors.ray_glue import Background, call, from_gcs, kill_quietly, nodes_now
from proxifier.config import ModelsConfig
from proxifier.config_diff import ModelsDiff
from proxifier.errors import (
    ControlPlaneAway,
    ModelFailed,
    ModelNotFound,
    ProxifierError,
    QueueTimeout,
    Unavailable,
)
from proxifier.placement import actor_options, cpu_fallback_warning
from proxifier.planning import ReloadPlan
from proxifier.replicas import free_names, instances_of, model_of, policy_of
from proxifier.scheduler import (
    Evict,
    Fail,
    Failure,
    Limits,
    Place,
    Policy,
    Replica,
    Resident,
    Scale,
    Trend,
    Wait,
    counted,
    decide,
    desired_replicas,
    in_force,
    surplus,
    to_drain,
    to_move,
)

ROLL_BESIDE = "rolling, one replica at a time: a new one starts beside, then an old one drains"
ROLL_IN_PLACE = "rolling, one replica at a time: an old one drains and stops, then one starts"
MOVE_PAUSE = 2.0  # seconds between two moves of a model's waiting requests (they land first)
RECONCILE_TICK = 1.0  # seconds between passes while a model waits (nothing else woke one)
CREATE_DEADLINE = 10.0  # seconds a model actor's creation (its name registered) may take


@dataclass
class Wanted:
    """A model that must run: the requests (or admin calls) waiting for its actor."""

    future: asyncio.Future[Any]
    since: float  # its oldest waiting request: demand order among equal priorities
    waiters: int = 0
    keep: bool = False  # stays wanted with nobody waiting (boot, admin start, preload)
    reason: str = "waiting for the scheduler's next pass"


def not_found_message(config: ModelsConfig, name: str) -> str:
    return ModelNotFound.named(name, config.models).message


def cooling_down(failures: dict[str, Failure], cooldown: float, alive: frozenset[str]) -> set[str]:
    """The models a recent failure still refuses (`proxifier.scheduler.in_force`)."""
    now = time.time()
    return {n for n, failure in failures.items() if in_force(failure, now, cooldown, alive)}


ALIVE_FRESH = 1.0  # seconds one read of the alive nodes serves failure checks (a flood of
# requests for a model that cannot be placed costs one GCS read a second, not one each)


async def start_in_turn(handles: list[Any]) -> None:
    """Start llama-server on each actor placed in one pass, in the pass's order (priority):
    each once the one before it exists, so higher priorities start first; loads overlap."""
    for handle in handles:
        with contextlib.suppress(ray.exceptions.RayError):
            await handle.launch.remote()


class Reconciler:
    """The wanted models, and the loop that places them (DESIGN §3)."""

    def __init__(
        self,
        config: Callable[[], ModelsConfig],
        registry: Registry,
        facts: Facts,
        event: Callable[..., Any],
        wake: asyncio.Event,
        background: Background,
        took_spare: Callable[[str], None],
    ) -> None:
        self._config = config
        self.registry = registry
        self.facts = facts
        self._event = event
        self._wake = wake
        self.background = background
        self._took_spare = took_spare  # a new actor likely took its node's spare worker
        self.wants: dict[str, Wanted] = {}  # instances that must run and have no actor yet
        # Replicas (DESIGN §13): what the scaler remembers per model, its last answer, and
        # counts set at runtime (`proxifier scale`), kept until the model's config changes.
        self.trends: dict[str, Trend] = {}
        self.scales: dict[str, Scale] = {}
        self.fixed: dict[str, int] = {}
        self._moved_at: dict[str, float] = {}  # model -> when waiting requests last moved
        # Models whose replicas a reload replaces one by one -> whether another reload came
        # meanwhile (the replicas replaced before it run the config before it: roll again).
        self.rolling: dict[str, bool] = {}
        self._alive: tuple[float, frozenset[str]] | None = None  # (when read, alive node ids)
        self._reconciler: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ waiting for a model
    async def ensure_actor(self, name: str, deadline: float | None = None) -> Any:
        """The model's actor, once the scheduler has placed it. Until `deadline` (wall clock)
        the caller waits while the model waits for room; then it is told what the model waits
        for. A model no node could ever hold fails at once (and for `cooldown` after)."""
        handle = self.any_instance(name)
        if handle is not None:
            return handle
        failure = self.registry.placement_failures.get(name)
        cooldown = self._config().settings.cooldown
        if failure is not None:
            alive = await self.alive_nodes() if failure.nodes is not None else frozenset()
            if in_force(failure, time.time(), cooldown, alive):
                raise ModelFailed(failure.reason, retry_after=cooldown)
            # A node it could not count on has joined: it may fit now, so try at once.
            # (Requests that arrive together all get here after the await: one removes it.)
            if failure.nodes is not None and self.registry.placement_failures.get(name) is failure:
                del self.registry.placement_failures[name]
        wanted = self.want(name)
        wanted.waiters += 1
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.time())
            return await asyncio.wait_for(asyncio.shield(wanted.future), remaining)
        except TimeoutError:
            raise QueueTimeout(
                f"model '{name}' could not be placed in time: {wanted.reason}",
                retry_after=self._config().settings.queue.queue_timeout,
            ) from None
        finally:
            wanted.waiters -= 1
            if wanted.waiters == 0 and not wanted.keep and self.wants.get(name) is wanted:
                del self.wants[name]  # nobody waits for it any more

    def instances(self, model: str) -> list[str]:
        """The registered instances of a model, by replica number."""
        return instances_of(model, self.registry.handles, self._config().models)

    def any_instance(self, model: str) -> Any:
        """A registered instance of the model (its first replica if it runs), or None."""
        names = self.instances(model)
        return self.registry.handles[names[0]] if names else None

    def drop_replicas(self, model: str) -> None:
        """Ask for no more replicas of the model (it is being stopped): its unplaced replica
        wants go, a roll under way ends; a request's want of the model itself stays."""
        self.rolling.pop(model, None)
        models = self._config().models
        for name in [n for n in self.wants if n != model and model_of(n, models) == model]:
            self._drain(name)
        self.trends.pop(model, None)

    def policy(self, model: str) -> Policy:
        return policy_of(self._config().models[model], self.fixed.get(model))

    def scalable(self) -> list[str]:
        """The models that run and may have more than one replica: the scaler's to watch."""
        models = self._config().models
        running = {model_of(n, models) for n in self.registry.handles}
        return sorted(m for m in running if m is not None and self.policy(m).max_replicas > 1)

    async def alive_nodes(self) -> frozenset[str]:
        """The ids of the nodes a model could be placed on now: alive to Ray (read at most
        once per ALIVE_FRESH seconds) and reachable from here."""
        return await self.ray_alive_nodes() - frozenset(self.registry.unreached)

    async def ray_alive_nodes(self) -> frozenset[str]:
        now = time.monotonic()
        if self._alive is None or now - self._alive[0] > ALIVE_FRESH:
            nodes = await nodes_now()
            self._alive = (now, frozenset(view.node_id for view in nodes if view.alive))
        return self._alive[1]

    def want(self, name: str, keep: bool = False) -> Wanted:
        """Ask the scheduler to place `name` (it must run); `keep`: until placed or failed,
        even with no request waiting (boot, admin starts, preload)."""
        wanted = self.wants.get(name)
        if wanted is None or wanted.future.done():
            wanted = Wanted(asyncio.get_running_loop().create_future(), time.time())
            wanted.future.add_done_callback(observed)
            self.wants[name] = wanted
        wanted.keep = wanted.keep or keep
        self.ensure_running()
        self._wake.set()
        return wanted

    async def await_placed(self, names: list[str]) -> list[dict[str, Any]]:
        """Ask for every one of `names` at once (the scheduler orders them by priority) and
        report, within placement_timeout, which were placed and why the others were not."""
        wanted = {name: self.want(name, keep=True) for name in names}
        timeout = self._config().settings.placement_timeout
        pending = [w.future for w in wanted.values() if not w.future.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)  # waits; never cancels them
        results = []
        for name, entry in wanted.items():
            if name in self.registry.handles:
                results.append({"model": name, "placed": True})
            elif entry.future.done() and entry.future.exception() is not None:
                error = entry.future.exception()
                message = error.message if isinstance(error, ProxifierError) else str(error)
                results.append({"model": name, "placed": False, "error": message})
            else:
                results.append({"model": name, "placed": False, "error": entry.reason})
        return results

    async def start_in_order(self, names: list[str]) -> list[dict[str, Any]]:
        """Place every model (the scheduler goes by priority) and start each placed one."""
        for name in names:
            self.registry.placement_failures.pop(name, None)  # an explicit start skips a cooldown
        results = await self.await_placed(names)
        handles = self.registry.handles
        placed = [handles[r["model"]] for r in results if r["model"] in handles]
        self.background.keep(asyncio.create_task(start_in_turn(placed)))
        return results

    def stop(self) -> None:
        """The server shuts down: no more passes, and every waiter is told so."""
        if self._reconciler is not None:
            self._reconciler.cancel()
        for entry in self.wants.values():
            if not entry.future.done():
                entry.future.set_exception(Unavailable("the server is shutting down"))
        self.wants.clear()

    # ------------------------------------------------------------------ the pass
    def ensure_running(self) -> None:
        if self._reconciler is None or self._reconciler.done():
            self._reconciler = asyncio.create_task(self._reconcile_forever())

    async def _reconcile_forever(self) -> None:
        """One pass at a time: on every change (a model wanted, stopped, evicted, lost; a
        reload) and every second while something waits (nodes join, models go idle)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RECONCILE_TICK)
            self._wake.clear()
            if not self.wants and not self.scalable():
                continue
            try:
                await self._reconcile_once()
            except ControlPlaneAway as away:
                # Nothing can be placed while the GCS is away: the requests waiting hear so
                # now (503, retry), rather than at their queue_timeout.
                for name, entry in list(self.wants.items()):
                    if entry.waiters == 0 and entry.keep:
                        continue  # a boot's or preload's want: it waits for the GCS
                    del self.wants[name]
                    if not entry.future.done():
                        entry.future.set_exception(away)
            except Exception as error:  # a bad pass must not end the loop
                self._event("scheduler_error", error=repr(error))

    async def _reconcile_once(self) -> None:
        registry = self.registry
        models = self._config().models
        for name in [n for n in self.wants if model_of(n, models) is None]:
            message = not_found_message(self._config(), name)
            self.wants.pop(name).future.set_exception(ModelNotFound(message))
        for name in [n for n in self.wants if n in registry.handles]:
            self.wants.pop(name).future.set_result(registry.handles[name])
        known: list[Resident] | None = None
        scalable = self.scalable()
        if scalable:
            known = await self.facts.residents()
            self._scale(scalable, known)
        failures = registry.placement_failures
        by_nodes = any(f.nodes is not None for f in failures.values())
        alive = await self.alive_nodes() if by_nodes else frozenset()
        cooling = cooling_down(failures, self._config().settings.cooldown, alive)
        for name in cooling & set(self.wants):
            self.wants[name].reason = "cooling down after a failure: " + failures[name].reason
        if not set(self.wants) - cooling:
            return
        # The scaler's residents serve the placements too: its wants add no resident.
        gpus, residents, nodes = await self.facts.gather(known)
        residents = self._marked(residents)
        sized = any(node.gpu_memory > 0 for node in nodes)
        # A snapshot: the awaits below let requests add wants, or drop theirs, meanwhile.
        wants = [
            await self.facts.want_for(name, gpus, entry.since, sized=sized)
            for name, entry in list(self.wants.items())
            if name not in cooling and model_of(name, self._config().models) is not None
        ]
        settings = self._config().settings
        limits = Limits(settings.max_running_models, settings.min_residency, settings.placement)
        actions = decide(nodes, residents, wants, limits, time.time())
        blocked: set[str] = set()  # an eviction was refused: its model waits for the next pass
        placed: list[Any] = []
        for action in actions:
            if isinstance(action, Evict):
                if action.for_model in blocked:
                    continue
                registry.explain(
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
                    registry.explain(action.model, "waiting", action.reason)
            elif isinstance(action, Fail):
                entry = self.wants.pop(action.model, None)
                # Decided on these nodes: a node that joins later voids it (failures.py).
                on = frozenset(node.node_id for node in nodes if node.alive)
                registry.placement_failures[action.model] = Failure(time.time(), action.reason, on)
                registry.explain(action.model, "failed", action.reason)
                self._event("failed", model=action.model, reason=action.reason)
                if entry is not None:
                    entry.future.set_exception(
                        ModelFailed(action.reason, retry_after=self._config().settings.cooldown)
                    )

        if placed:
            self.background.keep(asyncio.create_task(start_in_turn(placed)))

    def _replicas(self, model: str, residents: list[Resident]) -> list[Replica]:
        """A model's replicas as the scaler sees them: its instances, and the replicas it
        asked for that are not placed yet (as starting: on their way)."""
        models = self._config().models
        found = [
            # A registered instance that says "stopped" has not launched yet: on its way.
            Replica(
                r.name,
                "starting" if r.state == "stopped" else r.state,
                r.in_flight,
                r.queued,
                r.ready_since,
            )
            for r in residents
            if model_of(r.name, models) == model
        ]
        known = {r.name for r in found}
        found += [
            Replica(name, "starting", 0, 0, None)
            for name in self.wants
            if name not in known and model_of(name, models) == model
        ]
        return found

    def _scale(self, models: list[str], residents: list[Resident]) -> None:
        """The scaler's step (DESIGN §13): each running model's count from its replicas'
        load; one more asks the scheduler for a replica (a scale-out want), one less drains
        the replica `to_drain` names (no new request, finish, stop)."""
        now = time.time()
        for model in models:
            replicas = self._replicas(model, residents)
            scale = desired_replicas(
                self.policy(model), replicas, 0, self.trends.get(model, Trend()), now
            )
            self.trends[model], self.scales[model] = scale.trend, scale
            self._move_waiting(model, replicas)
            if model in self.rolling:
                continue  # a reload replaces its replicas one by one: the count is the roll's
            current = len(counted(replicas))
            if current == 0:
                continue  # none serving: the next request places one (on demand, as ever)
            if scale.desired > current:
                taken = [*self.registry.handles, *self.wants, *self.registry.retiring]
                for name in free_names(model, taken, scale.desired - current):
                    self.want(name, keep=True)
                self._event("scaled_out", model=model, replicas=scale.desired, reason=scale.reason)
            elif scale.desired < current:
                for name in to_drain(replicas, current - scale.desired):
                    self._drain(name)
                self._event("scaled_in", model=model, replicas=scale.desired, reason=scale.reason)

    def _move_waiting(self, model: str, replicas: list[Replica]) -> None:
        """Requests waiting behind a full replica while another has free slots (a replica just
        ready, or one a routing guess left idle) leave that queue; their ingress routes them
        again, to the room."""
        now = time.monotonic()
        if now - self._moved_at.get(model, -MOVE_PAUSE) < MOVE_PAUSE:
            return  # the last ones moved may not have landed yet: their room looks free
        slots = self._config().models[model].parallel
        moves = to_move(replicas, slots)
        if moves:
            self._moved_at[model] = now
        for name, count in moves.items():
            handle = self.registry.handles.get(name)
            if handle is not None:
                self.background.fire(handle.shed.remote(count))

    def _drain(self, name: str) -> asyncio.Task[None] | None:
        """Scale in one replica: an unplaced one is simply no longer asked for; a running one
        leaves the registry (no new request reaches it) and drains, then stops (the task
        returned)."""
        entry = self.wants.pop(name, None)
        if entry is not None and not entry.future.done():
            entry.future.set_exception(Unavailable(f"replica '{name}' is no longer needed"))
        handle = self.registry.handles.get(name)
        if handle is not None:
            timeout = self._config().settings.upstream_timeout
            self.registry.unregister(name, handle)
            return self.background.keep(
                asyncio.create_task(self.registry.scale_in(name, handle, timeout))
            )
        return None

    def _marked(self, residents: list[Resident]) -> list[Resident]:
        """The residents with their surplus replicas marked: above what each model keeps,
        the first victims of its priority and above."""
        models = self._config().models
        extra: set[str] = set()
        for model in {model_of(r.name, models) for r in residents} - {None}:
            assert model is not None
            extra |= surplus(self.policy(model), self._replicas(model, residents))
        # (A preloaded model keeps its floor; a surplus replica of it is a victim like any.)
        return [
            replace(r, surplus=True, preload=False) if r.name in extra else r for r in residents
        ]

    async def _create(
        self, name: str, node_id: str, gpus: float, num_gpus: float | None = None
    ) -> Any:
        """Create the model's actor on the node the scheduler chose, register it, and hand it
        to everyone waiting (`start_in_turn` starts llama-server)."""
        handle, options = await self._new_instance(name, node_id, gpus, num_gpus)
        self.registry.register(name, handle, options, node_id)
        self.registry.explain(name, "placed", f"placed on node {node_id}")
        entry = self.wants.pop(name, None)
        if entry is not None:
            entry.future.set_result(handle)
        return handle

    async def _new_instance(
        self, name: str, node_id: str, gpus: float, num_gpus: float | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """A new actor for the model's current config, pinned to `node_id` (Ray never second-
        guesses the scheduler), under a name of its own generation."""
        model = self._config().models[model_of(name, self._config().models) or name]
        warning = cpu_fallback_warning(name, model, gpus)
        if warning:
            self._event("warning", model=name, message=warning)
        options = actor_options(model, gpus)
        if num_gpus is not None:  # placed by GPU memory: its share of one GPU, or whole GPUs
            options["num_gpus"] = num_gpus
        pinned = {k: v for k, v in options.items() if k != "label_selector"}
        key = (await self.facts.memory_of(name))["calibration_key"]
        calibrate = self.facts.calibrate(name, key)
        wanted = self.wants.get(name)
        timeline = {"placed": time.time()}
        if wanted is not None:
            timeline["wanted"] = wanted.since
        config = self._config()
        # A named actor registers its name with the GCS before `.remote()` returns: off the
        # event loop, within a deadline (the GCS may be away), and killed if it comes late.
        handle = await from_gcs(
            lambda: create_model_actor(
                name,
                model,
                config.settings,
                config.base_dir,
                events_to=CONTROLLER_NAME,
                calibrate=calibrate,
                timeline=timeline,
                generation=uuid.uuid4().hex[:8],
                lifetime="detached",
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                **pinned,
            ),
            CREATE_DEADLINE,
            late=kill_quietly,
        )
        self._event("placed", model=name, node_id=node_id, options=options)
        # This actor likely took the node's spare worker. The next one starts once this
        # model has loaded: a worker's start-up would take CPU from the load.
        self._took_spare(node_id)
        return handle, options

    async def _evict(self, victim: str, for_model: str, reason: str) -> bool:
        """Ask the victim to stop (it refuses when busy); on yes, free its resources."""
        handle = self.registry.handles.get(victim)
        if handle is None:
            return False
        if not await self.registry.stop_if_idle(victim, handle, f"evicted for '{for_model}'"):
            return False
        self.registry.count_eviction(reason)
        self._event("evicted", model=victim, for_model=for_model, reason=reason)
        return True

    # ------------------------------------------------------------------ reload
    async def apply(self, diff: ModelsDiff, plan: ReloadPlan, new: ModelsConfig) -> dict[str, Any]:
        """A reload's actions, once `new` is the config in force."""
        registry = self.registry
        # A model placed by GPU memory whose new settings need another share (a longer
        # context, another cache type, another file) needs a new actor, not just a restart.
        sizes = self.facts.sizes(await nodes_now()) if plan.restart else {}
        for name in [n for n in plan.restart if await self.facts.share_changed(n, sizes)]:
            plan.restart.remove(name)
            plan.recreate.append(name)
        for name, fields in {**diff.live, **diff.restart}.items():
            if {"replicas", "autoscaling"} & set(fields):
                self.fixed.pop(name, None)  # the file's count replaces one set at runtime
        for name in diff.removed:
            self.fixed.pop(name, None)
        models = new.models
        # Several replicas: replaced one at a time, never below count - 1 (DESIGN §13).
        replacing: dict[str, str] = {}
        for name in [*plan.restart, *plan.recreate]:
            if name in self.rolling:  # its roll goes on, and then rolls again for this one
                self.rolling[name] = True
                replacing[name] = "rolling (after the roll under way)"
            elif len(instances_of(name, registry.handles, models)) > 1:
                self.rolling[name] = False  # before the await: a second reload sees it
                beside = (await self._fits_beside(name, over_limit=False))[0] is not None
                replacing[name] = ROLL_BESIDE if beside else ROLL_IN_PLACE
                self.background.keep(asyncio.create_task(self._roll(name, beside)))
        plan.restart[:] = [n for n in plan.restart if n not in replacing]
        plan.recreate[:] = [n for n in plan.recreate if n not in replacing]
        for name in plan.drain:
            for instance in instances_of(name, registry.handles, [name]):
                handle = registry.handles[instance]
                registry.unregister(instance, handle)  # no new request reaches it
                self.background.keep(asyncio.create_task(registry.retire(instance, handle)))
        for name in plan.recreate:
            # Its other replicas drain; the scaler places them again with the new config.
            for instance in instances_of(name, registry.handles, models):
                if instance != name:
                    self._drain(instance)
        for name in plan.recreate:
            if name in registry.handles:
                replacing[name] = await self._replace(name)
            else:  # only other replicas ran, and they drain: a fresh first one
                self.want(name, keep=True)
                replacing[name] = "stop, then start"
        changed = plan.restart + plan.live
        reloads = [
            registry.handles[instance].reload.remote(new.models[name], new.settings)
            for name in changed
            for instance in instances_of(name, registry.handles, models)
        ]
        if diff.settings:  # settings defaults reach every running model
            for instance, handle in registry.handles.items():
                of = model_of(instance, models)
                if of is not None and of not in changed and of not in self.rolling:
                    reloads.append(handle.reload.remote(models[of], new.settings))
        await asyncio.gather(*reloads, return_exceptions=True)
        started = await self.start_in_order(plan.start)
        self._event("config_reloaded", changes=diff.summary(), replacing=replacing)
        return {"changes": diff.summary(), "started": started, "replacing": replacing}

    async def _fits_beside(self, name: str, over_limit: bool = True) -> tuple[Place | None, float]:
        """Where one more instance of the model fits beside those running now, in free
        capacity only; None: nowhere. `over_limit`: it may pass max_running_models by one
        (a blue/green replacement, placed here directly; a roll's successor is placed by the
        pass, under the limit). And the GPUs the facts saw, for its creation."""
        gpus, residents, nodes = await self.facts.gather()
        settings = self._config().settings
        limit = settings.max_running_models + over_limit if settings.max_running_models else 0
        sized = any(node.gpu_memory > 0 for node in nodes)
        beside = await self.facts.want_for(name, gpus, 0.0, as_name=f"{name}@next", sized=sized)
        limits = Limits(limit, settings.min_residency, settings.placement)
        actions = decide(nodes, residents, [beside], limits, 0.0)
        place = actions[0] if len(actions) == 1 else None
        return (place if isinstance(place, Place) else None), gpus

    async def _roll(self, model: str, beside: bool) -> None:
        """Replace a model's replicas with instances of the config now in force, one at a
        time, the first replica last. Where one more copy fits in free capacity, a new
        replica starts beside the old ones and takes requests once ready, then one old
        replica drains (no new request, finish, stop); else one old replica drains first and
        its successor then starts in its place (`beside`: which, for the first pass). A
        successor that fails to start ends the roll (it goes, the old replicas left keep
        serving); so does a stop of the model. A reload during the roll rolls again after."""
        try:
            while True:
                self._event("rolling", model=model, how=ROLL_BESIDE if beside else ROLL_IN_PLACE)
                if not await self._roll_once(model, beside) or not self.rolling.get(model):
                    return
                self.rolling[model] = False  # another reload came meanwhile: once more
                beside = (await self._fits_beside(model, over_limit=False))[0] is not None
        except Exception as error:  # a roll must not die unheard
            self._event("reload_failed", model=model, reason=repr(error))
        finally:
            self.rolling.pop(model, None)
            self._wake.set()

    async def _roll_once(self, model: str, beside: bool) -> bool:
        """One pass over the replicas (`_roll`); False: it ended early."""
        for old in reversed(self.instances(model)):
            handle = self.registry.handles.get(old)
            if handle is None:
                continue  # lost or drained meanwhile
            if model not in self.rolling:
                return False  # stopped meanwhile
            if not beside:
                await self._drained(old, handle)
            taken = [*self.registry.handles, *self.wants, *self.registry.retiring]
            successor = free_names(model, taken, 1)[0]
            try:
                await self._started(successor)
            except (ProxifierError, ray.exceptions.RayError, TimeoutError) as error:
                message = error.message if isinstance(error, ProxifierError) else repr(error)
                self._event("reload_failed", model=model, replica=successor, reason=message)
                self._drain(successor)  # not wanted any more, placed or not
                return False
            if beside:
                await self._drained(old, handle)
            self._event("replica_replaced", model=model, replica=old, by=successor)
        return True

    async def _drained(self, name: str, handle: Any) -> None:
        """One replica out (`_drain`), awaited; one whose actor does not answer in time (its
        host cut off) is killed."""
        draining = self._drain(name)
        if draining is None:
            return
        try:
            timeout = self._config().settings.upstream_timeout + 30
            await asyncio.wait_for(asyncio.shield(draining), timeout)
        except TimeoutError:
            draining.cancel()
            self.registry.forget(name, handle)

    async def _started(self, name: str) -> None:
        """Place a replica (as a scale-out: it takes free room or a lower priority's) and
        wait until its llama-server is ready."""
        wanted = self.want(name, keep=True)
        timeout = self._config().settings.placement_timeout
        handle = await asyncio.wait_for(asyncio.shield(wanted.future), timeout)
        await call(handle.start.remote())

    async def _replace(self, name: str) -> str:
        """A placement field of a running model changed: it needs a new actor. Where the new
        instance fits beside the old one, it starts first and takes over once it is ready,
        the old one then finishing what it has (blue/green); else the old one leaves the
        registry and drains while the scheduler places the new one (its queue is served).
        Returns which of the two it does."""
        registry = self.registry
        old = registry.handles[name]
        place, gpus = await self._fits_beside(name)
        if place is not None:
            node_id = place.node_id
            new, options = await self._new_instance(name, node_id, gpus, place.gpus)
            registry.pending[name] = (new, options, node_id)
            self.background.keep(asyncio.create_task(registry.take_over(name, old, new)))
            return "blue/green"
        registry.unregister(name, old)  # requests from now on wait for the new instance
        self.background.keep(asyncio.create_task(registry.retire(name, old)))
        self.want(name, keep=True)
        return "stop, then start"
