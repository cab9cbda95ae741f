"""RayBackend against a real model actor: slots a replica holds go back when it shuts down."""

from __future__ import annotations

import time

import pytest

from serve_app.replica_slots import RayBackend
from tests.conftest import MakeActor


@pytest.mark.asyncio
async def test_held_slots_go_back_when_the_replica_shuts_down(make_actor: MakeActor) -> None:
    actor = make_actor(parallel=2)
    backend = RayBackend(controller=object())
    for name in ("a", "b"):
        lease = await actor.acquire.remote(name)
        backend.finish(
            "m", actor, lease, granted_at=time.monotonic(), served=1, from_queue=False, clean=True
        )
    assert (await actor.stats.remote())["in_flight"] == 2  # both held for a next request
    await backend.give_back_all()  # what the app's lifespan does on shutdown
    stats = await actor.stats.remote()
    assert (stats["in_flight"], stats["requests_served"]) == (0, 2)
