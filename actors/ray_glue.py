"""The Ray calls the controller, the model actors and the ingress all make: awaiting an actor's
answer with its typed error intact, fire-and-forget calls whose failures are still observed, and
the cluster's nodes as plain data for the scheduler. No product state and no serve_app: only
the Ray calls themselves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import ray

from proxifier.errors import ActorGone, ControlPlaneAway, ProxifierError, Unavailable
from proxifier.placement import NodeView

T = TypeVar("T")
GCS_DEADLINE = 5.0  # seconds a read of the cluster's state may take before the GCS counts as away
# Ray's GCS reads block their thread while the GCS is down (for as long as Ray retries): they
# run here, never on an actor's event loop, and a few stuck ones starve nothing else.
_GCS_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gcs-read")


async def call(ref: Any, within: float | None = None) -> Any:
    """Await an actor's answer, re-raising its typed error as itself: Ray cannot wrap a
    RayTaskError a second time, and the caller should see QueueFull, not a wrapper. A
    ValueError (a bad argument) comes back as itself too; an actor that died is ActorGone
    (503, retryable), never an unexplained 500; one that does not answer `within` seconds
    (its host frozen or cut off, which Ray notices only later) is Unavailable (503)."""
    try:
        if within is None:
            return await ref
        try:
            return await asyncio.wait_for(ref, within)
        except TimeoutError as error:
            if isinstance(error, ray.exceptions.RayTaskError):
                raise  # the actor's own TimeoutError: its answer, handled below
            raise Unavailable(
                f"the actor serving this did not answer within {within:g} s", retry_after=5
            ) from None
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ProxifierError | ValueError):
            raise error.cause from None
        raise
    except ray.exceptions.RayActorError as error:
        raise ActorGone(
            f"the actor serving this request went away: {error}", retry_after=1
        ) from None


class Background:
    """Tasks and calls nobody awaits, kept referenced (so they are not collected mid-flight)
    and observed (so a failure is not reported as never retrieved)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def keep(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def fire(self, ref: Any) -> None:
        """Send an actor call without waiting for its answer."""

        async def observe() -> None:
            with contextlib.suppress(Exception):
                await ref

        self.keep(asyncio.get_running_loop().create_task(observe()))


def cluster_nodes() -> list[NodeView]:
    """Every node Ray knows: totals, free amounts, labels (Ray's own `ray.io/` ones left out)."""
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
                manager_port=int(node.get("NodeManagerPort") or 0),
            )
        )
    return views


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


async def from_gcs(
    read: Callable[[], T],
    deadline: float = GCS_DEADLINE,
    late: Callable[[T], object] | None = None,
) -> T:
    """`read()` (a blocking call to Ray's GCS) off the event loop, within `deadline`; else
    ControlPlaneAway. The thread it ran on may stay blocked until Ray gives up; what it
    returns after the deadline goes to `late` (an actor created too late is killed there)."""
    loop = asyncio.get_running_loop()
    running = loop.run_in_executor(_GCS_THREADS, read)
    answered = False
    try:
        result = await asyncio.wait_for(asyncio.shield(running), deadline)
        answered = True
        return result
    except TimeoutError:
        raise ControlPlaneAway(
            f"Ray's control plane (the GCS on the head node) did not answer within {deadline:g} s;"
            " models already running still serve, starts and cluster views wait for it",
            retry_after=5,
        ) from None
    finally:
        if not answered and late is not None:  # timed out, or its caller cancelled
            running.add_done_callback(
                lambda done: (
                    late(done.result())
                    if not done.cancelled() and done.exception() is None
                    else None
                )
            )


def kill_quietly(handle: Any) -> None:
    with contextlib.suppress(Exception):
        ray.kill(handle)


async def nodes_now() -> list[NodeView]:
    return await from_gcs(cluster_nodes)


async def gpus_now() -> float:
    return await from_gcs(cluster_gpus)


async def serve_applications(wait: float = 10.0) -> dict[str, str] | None:
    """Serve's applications on this cluster and their statuses (RUNNING, DEPLOYING, DELETING,
    ...), or None when Serve does not run here at all. Raises when Serve exists but does not
    answer within `wait` (it may be restarting): not knowing is not "gone"."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = await asyncio.to_thread(
            ray.get_actor, SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE
        )
    except ValueError:  # no such actor: Serve was shut down (or never started)
        return None
    details = await asyncio.wait_for(controller.get_serve_instance_details.remote(), wait)
    return {name: app.get("status", "") for name, app in details.get("applications", {}).items()}
