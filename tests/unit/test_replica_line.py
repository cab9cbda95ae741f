"""A replica's own line (serve_app.backend): a request that would only queue at the model actor
waits for a slot one of its replica's requests frees, which is handed over with no actor call;
whatever goes wrong sends it to the actor, and no slot is lost on the way."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from serve_app.call import Owned
from serve_app.replica_slots import RayBackend

pytestmark = pytest.mark.asyncio


class Releases:
    """A model actor's `release_many`, recording what comes back to it."""

    def __init__(self, sent: list[tuple[str, int]]) -> None:
        self.sent = sent

    def remote(self, released: list[tuple[str, int]]) -> list[tuple[str, int]]:
        self.sent.extend(released)
        return released


class Handle:
    def __init__(self) -> None:
        self.released: list[tuple[str, int]] = []
        self.release_many = Releases(self.released)


def backend_with(handle: Handle) -> RayBackend:
    backend = RayBackend(controller=object())
    backend._handles["m"] = handle
    backend.fire = lambda ref: None  # type: ignore[method-assign]
    return backend


def running(backend: RayBackend, lease_id: str, saturated: bool = True) -> dict[str, Any]:
    """A request of this replica got `lease_id` from the actor, which queued the one before."""
    backend.using("m", lease_id)
    backend.answered("m", queued=saturated)
    return {"lease_id": lease_id}


def finish(backend: RayBackend, handle: Handle, lease: dict[str, Any], **kw: Any) -> None:
    options: dict[str, Any] = {"granted_at": time.monotonic(), "served": 1, "clean": True}
    options.update(kw)
    backend.finish("m", handle, lease, from_queue=False, **options)


async def waiting(backend: RayBackend, deadline: float = 60.0) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(backend.wait_in_line("m", time.time() + deadline))
    await asyncio.sleep(0)  # it takes its place
    return task


@pytest.fixture
def handle() -> Handle:
    return Handle()


async def test_a_finished_slot_goes_to_the_oldest_in_line_with_no_actor_call(
    handle: Handle,
) -> None:
    backend = backend_with(handle)
    lease = running(backend, "a")
    first, second = await waiting(backend), await waiting(backend)
    finish(backend, handle, lease, served=3)
    got = await first
    assert got.lease is lease and got.served == 3 and got.handle is handle
    assert not second.done() and handle.released == []
    finish(backend, handle, got.lease, served=4)
    assert (await second).served == 4
    assert handle.released == []


async def test_no_line_when_a_slot_may_be_free_at_the_actor(handle: Handle) -> None:
    backend = backend_with(handle)
    running(backend, "a", saturated=False)
    assert await backend.wait_in_line("m", time.time() + 60) is None
    assert await backend_with(handle).wait_in_line("m", time.time() + 60) is None  # none ours


async def test_an_old_lease_goes_back_and_the_oldest_in_line_asks_the_actor(
    handle: Handle,
) -> None:
    backend = backend_with(handle)
    lease, other = running(backend, "a"), running(backend, "b")
    first, second = await waiting(backend), await waiting(backend)
    finish(backend, handle, lease, granted_at=time.monotonic() - 5, served=7)
    assert handle.released == [("a", 7)]
    assert await first is None  # asks the actor, where the slot now is
    assert not second.done()  # "b" still runs and will hand over
    finish(backend, handle, other)
    assert (await second).lease is other


async def test_when_none_of_ours_runs_the_whole_line_asks_the_actor(handle: Handle) -> None:
    backend = backend_with(handle)
    lease = running(backend, "a")
    line = [await waiting(backend) for _ in range(3)]
    finish(backend, handle, lease, clean=False)  # an unclean end is never handed over
    assert handle.released == [("a", 1)]
    assert [await task for task in line] == [None, None, None]


async def test_a_request_that_leaves_the_line_passes_its_handed_slot_on(handle: Handle) -> None:
    backend = backend_with(handle)
    lease = running(backend, "a")
    gone, next_one = await waiting(backend), await waiting(backend)
    finish(backend, handle, lease, served=2)  # handed to `gone`...
    gone.cancel()  # ...whose client left before it could run
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert (await next_one).lease is lease and handle.released == []


async def test_the_line_wait_ends_at_the_requests_deadline(handle: Handle) -> None:
    backend = backend_with(handle)
    running(backend, "a")
    assert await backend.wait_in_line("m", time.time() + 0.01) is None  # the actor says why


async def test_a_slot_granted_at_once_sends_the_next_in_line_to_ask_too(handle: Handle) -> None:
    backend = backend_with(handle)
    running(backend, "a")
    first, second = await waiting(backend), await waiting(backend)
    backend.answered("m", queued=False)  # another request found a free slot at the actor
    assert await first is None  # so may this one
    assert not second.done()  # one at a time: the next wakes if this one is granted too


async def test_a_lease_of_an_instance_on_its_way_out_is_not_handed_on(handle: Handle) -> None:
    backend = backend_with(handle)
    lease = running(backend, "a")
    line = await waiting(backend)
    backend._handles["m"] = Handle()  # the model moved to a new instance
    finish(backend, handle, lease)
    assert handle.released == [("a", 1)]  # back to the old instance
    assert await line is None  # and the request asks the current one


class Renewals:
    """A model actor's `renew`, recording (lease ids, line length) as the replica tells it."""

    def __init__(self) -> None:
        self.heard: list[tuple[list[str], int]] = []

    def remote(self, holder: str, lease_ids: list[str], in_line: int) -> Any:
        self.heard.append((list(lease_ids), in_line))
        done: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        done.set_result([])
        return done


async def test_a_line_that_empties_is_told_even_with_no_slot_to_renew() -> None:
    handle = Handle()
    handle.renew = Renewals()  # type: ignore[attr-defined]
    backend = backend_with(handle)
    lease = running(backend, "l1")
    owned = Owned()  # the running request's ledger (open_request, without its renewer)
    owned.add("l1", handle, lambda: None)
    backend._owners.add(owned)
    waiter = await waiting(backend)
    await backend.renew_once()
    assert handle.renew.heard[-1] == (["l1"], 1)  # type: ignore[attr-defined]
    backend._owners.discard(owned)
    finish(backend, handle, lease)  # handed to the one in the line, which then ends too
    assert (await waiter) is not None
    backend._held.clear()
    await backend.renew_once()
    assert handle.renew.heard[-1] == ([], 0)  # type: ignore[attr-defined]
    await backend.renew_once()
    assert len(handle.renew.heard) == 2  # nothing new to tell: no call
