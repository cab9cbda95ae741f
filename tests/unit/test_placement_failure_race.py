"""Requests that arrive together for a model whose placement failed, once a node has joined:
each sees the failure void after the same await, and one of them removes it (a second removal
was a KeyError, a 500, for the other requests)."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.controller.reconcile import Reconciler
from actors.controller.registry import Registry
from actors.ray_glue import Background
from proxifier.config import ModelsConfig
from proxifier.errors import QueueTimeout
from proxifier.scheduler import Failure

pytestmark = pytest.mark.asyncio


async def test_requests_together_after_a_node_joined_all_wait_for_the_placement() -> None:
    background = Background()
    registry = Registry(lambda *a, **k: None, lambda: None, background)
    config = ModelsConfig.model_validate({"models": {"m": {"model_path": "/m.gguf"}}})
    reconciler = Reconciler(
        lambda: config, registry, None, lambda *a, **k: None, asyncio.Event(), background,
        lambda _: None,
    )  # type: ignore[arg-type]  # fmt: skip
    reconciler.ensure_running = lambda: None  # type: ignore[method-assign]  # no placing here

    async def a_node_joined() -> frozenset[str]:
        await asyncio.sleep(0)  # the GCS read: every request gets here before any goes on
        return frozenset({"old", "new"})

    reconciler.ray_alive_nodes = a_node_joined  # type: ignore[method-assign]
    registry.placement_failures["m"] = Failure(time.time(), "no node fits", frozenset({"old"}))
    soon = time.time() + 0.05
    answers = await asyncio.gather(
        *(reconciler.ensure_actor("m", soon) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(a, QueueTimeout) for a in answers), answers  # waited, no KeyError
    assert "m" not in registry.placement_failures
