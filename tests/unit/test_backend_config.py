"""An ingress replica's copy of the config: a copy up to CONFIG_STALE s old answers at once
while a fresh one is fetched (no request waits for the controller), an older one is refreshed
before it is used (a revoked key lasts at most that long)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from proxifier.config import AUTH_DISABLED
from serve_app.backend import CONFIG_STALE, CONFIG_TTL
from serve_app.replica_slots import RayBackend

pytestmark = pytest.mark.asyncio


class Method:
    def __init__(self, answers: list[asyncio.Future[Any]]) -> None:
        self.answers = answers

    def remote(self) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.answers.append(future)
        return future


class Controller:
    """Answers only when the test says so."""

    def __init__(self) -> None:
        self.configs: list[asyncio.Future[Any]] = []
        self.auths: list[asyncio.Future[Any]] = []
        self.get_config = Method(self.configs)
        self.get_auth = Method(self.auths)

    def answer(self, config: Any) -> None:
        self.configs[-1].set_result(config)
        self.auths[-1].set_result((1, AUTH_DISABLED))


def backend_aged(age: float) -> tuple[RayBackend, Controller]:
    controller = Controller()
    backend = RayBackend(controller=controller)
    backend._config, backend._auth = "old", (0, AUTH_DISABLED)  # type: ignore[assignment]
    backend._fetched = time.monotonic() - age
    return backend, controller


async def test_a_slightly_old_copy_answers_at_once_and_is_refreshed_behind() -> None:
    backend, controller = backend_aged((CONFIG_TTL + CONFIG_STALE) / 2)
    assert await backend.config() == "old"  # the controller has not answered
    await asyncio.sleep(0)  # the refresh asks
    assert await backend.config() == "old" and len(controller.configs) == 1  # one refresh
    controller.answer("new")
    await asyncio.wait_for(backend._refreshing, 5)  # type: ignore[arg-type]
    assert await backend.config() == "new"


async def test_a_copy_past_the_stale_limit_is_refreshed_before_it_is_used() -> None:
    backend, controller = backend_aged(CONFIG_STALE + 1)
    asking = asyncio.ensure_future(backend.config())
    await asyncio.sleep(0)
    assert not asking.done()  # it waits for the controller
    controller.answer("new")
    assert await asyncio.wait_for(asking, 5) == "new"


async def test_a_fresh_copy_asks_nothing() -> None:
    backend, controller = backend_aged(0)
    assert await backend.config() == "old" and controller.configs == []
    assert CONFIG_STALE > CONFIG_TTL
