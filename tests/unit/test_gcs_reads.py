"""Reads of Ray's GCS (actors/ray_glue.from_gcs): off the event loop, within a deadline, and a
GCS that does not answer is a 503 that says the control plane is away, never a hang."""

from __future__ import annotations

import asyncio
import threading

import pytest

from actors.ray_glue import call, from_gcs
from proxifier.errors import ControlPlaneAway, Unavailable

pytestmark = pytest.mark.asyncio


async def test_a_read_that_answers_returns_its_value() -> None:
    assert await from_gcs(lambda: {"GPU": 2.0}, deadline=5) == {"GPU": 2.0}


async def test_a_read_the_gcs_never_answers_is_control_plane_away_and_the_loop_runs_on() -> None:
    stuck = threading.Event()
    ticks = 0

    async def loop_alive() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(loop_alive())
    try:
        with pytest.raises(ControlPlaneAway) as away:
            await from_gcs(stuck.wait, deadline=0.3)
    finally:
        stuck.set()  # let the thread go
        beat.cancel()
    assert away.value.status == 503 and away.value.code == "control_plane_unavailable"
    assert "control plane" in away.value.message
    assert ticks > 5  # the event loop was never blocked by the read


async def test_what_a_call_returns_after_its_deadline_goes_to_late() -> None:
    """An actor created after its deadline (its name registered late) is killed, not lost."""
    release = threading.Event()
    late: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def slow_create() -> str:
        release.wait()
        return "handle"

    with pytest.raises(ControlPlaneAway):
        await from_gcs(slow_create, deadline=0.05, late=late.set_result)
    release.set()
    assert await asyncio.wait_for(late, 5) == "handle"


async def test_an_actor_call_that_gets_no_answer_in_time_is_a_503_not_a_hang() -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(Unavailable) as unanswered:
        await call(never, within=0.05)
    assert unanswered.value.status == 503 and "did not answer within 0.05 s" in str(
        unanswered.value
    )
