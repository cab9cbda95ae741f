"""An ingress replica gives leases back with the next request's enqueue when it can (one actor
call per request instead of two), and alone, soon, when no request comes."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.backend import RELEASE_DELAY, RayBackend
from tests.conftest import MakeActor


async def in_flight(actor: object) -> int:
    return (await actor.stats.remote())["in_flight"]  # type: ignore[attr-defined]


async def until_idle(actor: object) -> None:
    while await in_flight(actor):
        await asyncio.sleep(RELEASE_DELAY)


@pytest.mark.asyncio
async def test_a_deferred_release_rides_with_the_next_enqueue(make_actor: MakeActor) -> None:
    actor = make_actor(parallel=1)
    backend = RayBackend(controller=object())
    held = await actor.acquire.remote("first")
    backend.release("m", actor, held["lease_id"], defer=True)
    # The only slot is free again for the next request only because the release rode along:
    # the event loop has not run, so the timer that would send it alone has not fired.
    answer = await actor.enqueue.remote("second", None, None, backend.take_releases("m", actor))
    assert answer["lease"]["request_id"] == "second"
    assert backend.take_releases("m", actor) == []  # handed over once: the timer is off
    assert (await actor.stats.remote())["requests_served"] == 1


@pytest.mark.asyncio
async def test_a_deferred_release_goes_alone_when_no_request_comes(make_actor: MakeActor) -> None:
    actor = make_actor(parallel=2)
    backend = RayBackend(controller=object())
    leases = [await actor.acquire.remote(f"r{i}") for i in range(2)]
    for lease in leases:
        backend.release("m", actor, lease["lease_id"], defer=True)
    assert await in_flight(actor) == 2
    await asyncio.wait_for(until_idle(actor), timeout=10)
    assert (await actor.stats.remote())["requests_served"] == 2


@pytest.mark.asyncio
async def test_releases_for_another_actor_or_not_deferred_are_sent_at_once(
    make_actor: MakeActor,
) -> None:
    old, new = make_actor(parallel=1), make_actor(parallel=1)
    backend = RayBackend(controller=object())
    held_old = await old.acquire.remote("a")
    held_new = await new.acquire.remote("b")
    backend.release("m", old, held_old["lease_id"], defer=True)
    # The model moved to a new actor: what the old one is owed is sent now, not carried to
    # the new one (which would not know the lease).
    backend.release("m", new, held_new["lease_id"], defer=False)
    assert backend.take_releases("m", old) == []
    assert backend.take_releases("m", new) == []
    await asyncio.wait_for(until_idle(old), timeout=10)
    await asyncio.wait_for(until_idle(new), timeout=10)
    assert [await in_flight(a) for a in (old, new)] == [0, 0]
