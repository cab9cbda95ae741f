"""A request waiting in a model actor's queue whose client goes away (serve_app.admit): its place
goes back to the actor, and a lease granted to it anyway goes back through its own request, at
whatever moment the cancel lands; never left for the actor to reclaim lease_ttl later."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from actors.model.admission import Admission as ActorAdmission
from proxifier.config import ModelConfig, ModelsConfig, Settings
from proxifier.errors import QueueTimeout, Rerouted, Unavailable
from proxifier.lifecycle import ModelState
from serve_app.admit import Admission, Requeue
from serve_app.backend import DEADLINE_GRACE
from serve_app.call import Call, Owned
from serve_app.replica_slots import RayBackend
from serve_app.route import ReplicaView

pytestmark = pytest.mark.asyncio


class Method:
    """One method of a fake model actor handle: `.remote(...)` records its arguments and
    answers with `answer(...)` (a future stands in for an ObjectRef: both are awaitable)."""

    def __init__(self, answer: Any) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answer = answer

    def remote(self, *args: Any, **_: Any) -> Any:
        self.calls.append(args)
        return self.answer(*args)


class ModelActor:
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.grant: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.wait_lease = Method(lambda _rid: self.grant)
        self.abandon = Method(lambda _rid: _done(loop))
        self.gave_back = asyncio.Event()  # a release reached the actor
        self.release_many = Method(lambda _released: (self.gave_back.set(), _done(loop))[1])

    def released(self) -> list[str]:
        return [lease_id for (group,) in self.release_many.calls for lease_id, _ in group]


def _done(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    future: asyncio.Future[None] = loop.create_future()
    future.set_result(None)
    return future


def waiting_request(
    actor: ModelActor, deadline: float | None = None
) -> tuple[Admission, Call, Owned]:
    """A request the actor has queued (its answer to `enqueue` said so), to be answered by
    `deadline` (wall clock; by default in 30 s)."""
    backend = RayBackend(controller=object())
    backend._handles["m"] = actor
    owned = Owned()
    admission = Admission(backend, relay=None, inbound=None, owned=owned)  # type: ignore[arg-type]
    call = Call("m", "/v1/chat/completions", b"{}", "req_1", 0.0, owned=owned)  # type: ignore[arg-type]
    call.deadline = time.time() + 30 if deadline is None else deadline
    admission._queued(call, actor)
    call.queued = True
    return admission, call, owned


async def client_leaves(task: asyncio.Task[Any], owned: Owned) -> None:
    """The client hangs up: the request's task is cancelled, and LeaseGuard closes its ledger."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    owned.close()


@pytest.mark.parametrize("waited", [False, True], ids=["before-the-wait-ran", "while-waiting"])
async def test_a_request_cancelled_in_the_queue_gives_back_its_place(waited: bool) -> None:
    actor = ModelActor()
    admission, call, owned = waiting_request(actor)
    task = asyncio.ensure_future(admission.wait_granted(call, {"position": 1}))
    await asyncio.sleep(0)  # it asks for its lease; the task that takes the answer is not run yet
    if waited:
        for _ in range(3):
            await asyncio.sleep(0)
    await client_leaves(task, owned)
    # The actor hears it: the place leaves its queue (or the slot granted meanwhile comes back).
    assert actor.abandon.calls == [("req_1",)]


@pytest.mark.parametrize("waited", [False, True], ids=["before-the-wait-ran", "while-waiting"])
async def test_a_lease_granted_after_the_client_left_goes_straight_back(waited: bool) -> None:
    actor = ModelActor()
    admission, call, owned = waiting_request(actor)
    task = asyncio.ensure_future(admission.wait_granted(call, {"position": 1}))
    await asyncio.sleep(0)
    if waited:
        for _ in range(3):
            await asyncio.sleep(0)
    await client_leaves(task, owned)
    # The actor granted the slot before it heard of the abandon: the answer still arrives,
    # and the slot goes back at once with no request served on it.
    actor.grant.set_result({"lease_id": "lease_1", "request_id": "req_1"})
    await asyncio.wait_for(actor.gave_back.wait(), 5)
    assert actor.released() == ["lease_1"]
    assert owned.leases == {}


class Instance:
    """What the actor's admission reads of its instance: ready, at a fixed address."""

    state = ModelState.READY
    llama = SimpleNamespace(url="http://127.0.0.1:1", api_key="k")

    def ensure_starting(self) -> object:
        return None

    def refuse_if_closed(self) -> None:
        return None


async def test_a_slot_granted_then_abandoned_is_given_back_once_by_the_actor() -> None:
    """The actor's side of the same race: the slot came to a waiter whose caller then
    abandoned it before collecting it. The abandon frees the slot, and the waiter's call says
    it was abandoned rather than handing out the lease as well (the caller would give it back a
    second time, a release of a lease the actor no longer knows)."""
    actor = ActorAdmission(
        "m", ModelConfig(parallel=1), Settings(), Instance(), lambda *a, **k: None, lambda _: None
    )
    actor.open(1, time.time())
    first = actor.enqueue("req_1", None, holder="replica")["lease"]
    assert "queued" in actor.enqueue("req_2", None, holder="replica")
    collecting = asyncio.ensure_future(actor.wait("req_2"))
    await asyncio.sleep(0)
    actor.release(first["lease_id"])  # the slot goes to req_2 ...
    actor.abandon("req_2")  # ... whose caller has gone
    with pytest.raises(Unavailable, match="abandoned"):
        await collecting
    assert actor.slots.leases == {} and actor.slots.free_slots() == 1
    for task in (actor._background, actor._reaper):
        assert task is not None
        task.cancel()


async def test_a_wait_the_actor_never_ends_ends_at_the_requests_deadline() -> None:
    """The actor's own queue_timeout cannot fire on a frozen host: the ingress ends the wait
    itself (DEADLINE_GRACE after the deadline) with a queue_timeout, and gives the place back."""
    actor = ModelActor()  # its wait_lease never answers
    admission, call, owned = waiting_request(actor, deadline=time.time() - DEADLINE_GRACE)
    with pytest.raises(QueueTimeout) as timed_out:
        await asyncio.wait_for(admission.wait_granted(call, {"position": 1}), 5)
    assert "did not answer the queued request by its deadline" in timed_out.value.message
    assert actor.abandon.calls == [("req_1",)]  # its place goes back, should the actor wake
    assert not owned.places


class Controller:
    """What `Cluster.unreachable` asks: the controller confirms the instance is lost."""

    def __init__(self) -> None:
        self.instance_unreachable = Method(
            lambda _m, key, _u: _answer({"confirmed": True, "dropped": [key]})
        )


def _answer(value: Any) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def test_a_wait_on_an_instance_confirmed_unreachable_moves_to_a_fresh_one() -> None:
    """Its model actor will never answer (its host cut off): once the controller confirms a
    report, the request waiting in its queue asks again (Requeue) at once, rather than at its
    deadline or when Ray declares the host dead."""
    actor = ModelActor()
    admission, call, _ = waiting_request(actor)
    controller = Controller()
    admission.slots._controller = controller
    admission.slots._config = ModelsConfig()
    admission.slots._fetched = time.monotonic()
    task = asyncio.ensure_future(admission.wait_granted(call, {"position": 1}))
    await asyncio.sleep(0)
    assert await admission.slots.unreachable("m", actor, "http://10.0.0.7:8080")
    with pytest.raises(Requeue):
        await asyncio.wait_for(task, 5)
    assert controller.instance_unreachable.calls[0][0] == "m"
    assert "m" not in admission.slots._handles  # the next ask goes to the controller


async def test_the_oldest_waiters_leave_a_queue_the_controller_sheds() -> None:
    """Another replica has free slots (DESIGN §13): the oldest waiting requests leave this
    queue with Rerouted, the actor's own async jobs stay, and the rest keep their order."""
    actor = ActorAdmission(
        "m", ModelConfig(parallel=1), Settings(), Instance(), lambda *a, **k: None, lambda _: None
    )
    actor.open(1, time.time())
    actor.enqueue("req_0", None, holder="replica")  # holds the one slot
    for rid in ("job_1", "req_2", "req_3", "req_4"):
        assert "queued" in actor.enqueue(rid, None, holder="replica")
    waits = {rid: asyncio.ensure_future(actor.wait(rid)) for rid in ("req_2", "req_3", "req_4")}
    await asyncio.sleep(0)
    assert actor.shed(2, keep={"job_1"}) == 2
    for rid in ("req_2", "req_3"):
        with pytest.raises(Rerouted):
            await waits[rid]
    assert list(actor.slots.waiters) == ["job_1", "req_4"] and not waits["req_4"].done()
    waits["req_4"].cancel()
    for task in (actor._background, actor._reaper):
        assert task is not None
        task.cancel()


class Routed:
    """A controller that names the model's replicas for the router: one ready, with room."""

    def __init__(self, handle: Any) -> None:
        self.replicas = Method(
            lambda _m: _answer(
                [{"name": "m#2", "handle": handle, "state": "ready", "in_use": 0, "queued": 0,
                  "slots": 1}]
            )
        )  # fmt: skip


async def test_a_request_sent_on_is_routed_again_over_a_fresh_look() -> None:
    """The replica it waited at sent it on: the request leaves that queue (nothing to give
    back there), asks the controller for the replicas' load now, and goes to the one with room,
    not back to the full one its stale snapshot named."""
    full, free = ModelActor(), ModelActor()
    admission, call, owned = waiting_request(full)
    admission.slots._controller = Routed(free)
    admission.slots._replicas["m"] = (
        time.monotonic(), (ReplicaView(full, "m", in_use=1, parallel=1),)
    )  # fmt: skip
    task = asyncio.ensure_future(admission.wait_granted(call, {"position": 1}))
    await asyncio.sleep(0)
    full.grant.set_exception(Rerouted("sent on"))
    with pytest.raises(Requeue) as requeue:
        await asyncio.wait_for(task, 5)
    assert requeue.value.rerouted and admission.choice is free
    assert full.abandon.calls == [] and not owned.places


async def test_a_host_cut_off_signals_every_instance_dropped_there() -> None:
    """A report about one model's instance drops every instance on its host: each one's lost
    signal is set (requests in flight there, on a pooled connection with no connect deadline,
    start over), stays set for a send that reaches it later, and their cached handles go."""
    reported, neighbour, elsewhere = ModelActor(), ModelActor(), ModelActor()
    backend = RayBackend(controller=object())
    backend._handles.update({"a": reported, "b": neighbour, "c": elsewhere})
    backend._config, backend._fetched = ModelsConfig(), time.monotonic()
    in_flight = backend.lost_signal(neighbour)  # a send to it is waiting for its answer
    dropped = [id(reported), id(neighbour)]
    backend._controller = SimpleNamespace(
        instance_unreachable=Method(lambda *_: _answer({"confirmed": True, "dropped": dropped}))
    )
    assert await backend.unreachable("a", reported, "http://10.0.0.7:8080")
    assert in_flight.done() and backend.lost_signal(neighbour).done()
    assert backend.lost_signal(reported).done() and not backend.lost_signal(elsewhere).done()
    assert set(backend._handles) == {"c"}


async def test_a_confirmed_report_of_a_draining_instance_signals_nothing() -> None:
    """The instance left the registry for another reason (a drain): the request asks again,
    but what is in flight there finishes."""
    draining = ModelActor()
    backend = RayBackend(controller=object())
    backend._handles["a"] = draining
    backend._config, backend._fetched = ModelsConfig(), time.monotonic()
    in_flight = backend.lost_signal(draining)
    backend._controller = SimpleNamespace(
        instance_unreachable=Method(lambda *_: _answer({"confirmed": True, "dropped": []}))
    )
    assert await backend.unreachable("a", draining, None)
    assert not in_flight.done() and "a" not in backend._handles
