"""Through the deployed product: a replica hands a finished request's slot to its next request
without asking the model actor, never ahead of a request that waits in the queue, and a held
slot that outlived its llama-server costs the client nothing."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import deployed
from tests.helpers import wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
HOLD = 5.0  # long, so that what a test does next surely happens while a slot is held


@pytest.fixture(scope="module")
def url(proxifier_home: Path, fake_server: Path, tiny_model: Path, tmp_path: Path) -> Iterator[str]:
    fake = {"model_path": str(tiny_model), "llama_server": str(fake_server), "num_gpus": 0}
    config = {
        "settings": {"queue": {"lease_hold": HOLD}},
        "models": {
            "chat": {**fake, "parallel": 2, "preload": True},
            "single": {**fake, "parallel": 1, "env": {"FAKE_LLAMA_TOKEN_DELAY": "0.3"}},
        },
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    with deployed(proxifier_home, path, ready="chat") as (base, _controller):
        yield base


@pytest.fixture(scope="module")
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reuse")


def status(url: str, model: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/models/{model}/status", timeout=30).json()


def chat(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": model, **CHAT}, timeout=60)


def test_back_to_back_requests_share_one_lease(url: str) -> None:
    before = status(url, "chat")
    for _ in range(10):
        assert chat(url, "chat").status_code == 200
    after = status(url, "chat")
    # The slot is still held for a next request, then given back with the count it served.
    assert after["in_flight"] == 1
    wait_for(lambda: status(url, "chat")["in_flight"] == 0, timeout=3 * HOLD)
    after = status(url, "chat")
    assert after["requests_served"] - before["requests_served"] == 10
    assert after["leases_granted"] - before["leases_granted"] == 1


def test_a_held_slot_never_jumps_the_queue(url: str) -> None:
    """A runs; B queues; A ends and C comes right after: B must get the slot, not C."""
    assert chat(url, "single").status_code == 200  # started and warm
    wait_for(lambda: status(url, "single")["in_flight"] == 0, timeout=3 * HOLD)
    finished: dict[str, float] = {}

    def send(name: str) -> None:
        assert chat(url, "single").status_code == 200
        finished[name] = time.monotonic()

    first = threading.Thread(target=send, args=("A",))
    first.start()
    wait_for(lambda: status(url, "single")["in_flight"] == 1)
    second = threading.Thread(target=send, args=("B",))
    second.start()
    wait_for(lambda: status(url, "single")["queue_depth"] == 1)
    first.join()
    send("C")
    second.join()
    assert finished["B"] < finished["C"]


def test_a_held_slot_whose_llama_server_died_is_not_the_clients_problem(url: str) -> None:
    assert chat(url, "chat").status_code == 200
    before = status(url, "chat")
    assert before["in_flight"] == 1  # held by the replica
    os.kill(before["pid"], signal.SIGKILL)
    wait_for(lambda: status(url, "chat")["restarts"] == before["restarts"] + 1, timeout=30)
    # The replica still holds the old lease; using it fails before any byte reaches the
    # client, so the request goes through the queue to the restarted llama-server instead.
    reply = chat(url, "chat")
    assert reply.status_code == 200, reply.text
    assert status(url, "chat")["pid"] != before["pid"]


def test_respond_async_takes_a_held_slot_instead_of_queueing(url: str) -> None:
    assert chat(url, "single").status_code == 200  # its slot is now held by the replica
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "single", **CHAT},
        headers={"Prefer": "respond-async"},
        timeout=60,
    )
    # A free slot (held by this very replica) means "proxied at once", not 202.
    assert reply.status_code == 200 and reply.json()["object"] == "chat.completion"


def test_requests_behind_a_full_model_take_their_replicas_slots_in_turn(url: str) -> None:
    """A runs on the only slot; B queues at the model actor (the model is full); C, D, E come
    next and wait in the replica's own line (the queue status counts them). Each finished
    request hands its slot on, B first: the actor granted two leases for five requests."""
    assert chat(url, "single").status_code == 200  # started and warm
    wait_for(lambda: status(url, "single")["in_flight"] == 0, timeout=3 * HOLD)
    before = status(url, "single")
    finished: dict[str, float] = {}

    def send(name: str, max_tokens: int) -> None:
        body = {"model": "single", **CHAT, "max_tokens": max_tokens}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        finished[name] = time.monotonic()

    def queue() -> dict[str, Any]:
        return httpx.get(f"{url}/admin/queue/single/status", timeout=30).json()

    threads = [threading.Thread(target=send, args=("A", 8))]  # 2.4 s: the others come meanwhile
    threads[0].start()
    wait_for(lambda: status(url, "single")["in_flight"] == 1)
    threads.append(threading.Thread(target=send, args=("B", 1)))
    threads[1].start()
    wait_for(lambda: status(url, "single")["queue_depth"] == 1)
    for name in "CDE":
        threads.append(threading.Thread(target=send, args=(name, 1)))
        threads[-1].start()
    wait_for(lambda: queue()["waiting_in_replicas"] == 3)  # told with the next lease renewal
    assert queue()["depth"] == 1  # only B is in the actor's queue
    for thread in threads:
        thread.join()
    assert len(finished) == 5
    assert finished["A"] < finished["B"] < min(finished["C"], finished["D"], finished["E"])
    wait_for(lambda: status(url, "single")["in_flight"] == 0, timeout=3 * HOLD)
    after = status(url, "single")
    assert after["leases_granted"] - before["leases_granted"] == 2
    assert after["requests_served"] - before["requests_served"] == 5
