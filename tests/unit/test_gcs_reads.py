"""Reads of Ray's GCS (actors/ray_glue.from_gcs): off the event loop, within a deadline, and a
GCS that does not answer is a 503 that says the control plane is away, never a hang."""

from __future__ import annotations

import asyncio
import threading

import pytest

from actors.ray_glue import from_gcs
from proxifier.errors import ControlPlaneAway

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
