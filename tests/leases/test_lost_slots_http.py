"""Through the deployed product (two ingress replicas): no slot is lost. Clients that hang up at
any moment give their slots back, and the slots of an ingress replica that is SIGKILLed mid-stream
come back within seconds (the model actor reclaims what nobody renews)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import deployed
from tests.helpers import wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
LEASE_TTL = 2.0


@pytest.fixture(scope="module")
def url(
    proxifier_home: Path, fake_fields: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    config = {
        "settings": {"lease_ttl": LEASE_TTL, "queue": {"keepalive_interval": 0.5}},
        "models": {
            "chat": {**fake_fields, "parallel": 2, "preload": True},
            "burst": {**fake_fields, "parallel": 4, "env": {"FAKE_LLAMA_TOKEN_DELAY": "0.02"}},
            # One slot; a request that cannot get it within 20 s is answered 503.
            "solo": {
                **fake_fields,
                "parallel": 1,
                "queue_timeout": 20,
                "env": {"FAKE_LLAMA_TOKEN_DELAY": "0.2"},
            },
        },
    }
    path = tmp_path_factory.mktemp("leases") / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    with deployed(proxifier_home, path, replicas=2, ready="chat") as (base, _controller):
        yield base


def queue(url: str, model: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/queue/{model}/status", timeout=30).json()


async def hang_up_at_random(url: str, model: str, clients: int, rounds: int) -> int:
    """`clients` requests at once, each abandoned by its client at a random moment (queued,
    being granted, waiting for the first byte, mid-body), for `rounds` rounds, like wrk's
    connections cut when it stops. Returns how many were cut."""
    rng = random.Random(11)
    cut = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one(stream: bool) -> None:
            body = {"model": model, **CHAT, "stream": stream}
            if stream:
                async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                    async for _ in answer.aiter_raw():
                        pass
            else:
                await client.post("/v1/chat/completions", json=body)

        for _ in range(rounds):
            calls = [
                asyncio.wait_for(one(stream=i % 2 == 0), timeout=rng.uniform(0.005, 0.4))
                for i in range(clients)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            cut += sum(isinstance(r, TimeoutError) for r in results)
    return cut


def test_clients_that_hang_up_at_any_moment_give_every_slot_back(url: str) -> None:
    httpx.post(f"{url}/admin/models/burst/start", timeout=60).raise_for_status()
    cut = asyncio.run(hang_up_at_random(url, "burst", clients=32, rounds=6))
    assert cut > 32, "the burst should have cut many requests"
    # Every slot comes back: at once through the request that held it, or at the latest
    # when its renewals stop (lease_ttl). Before the fix some stayed taken for max_lease_time.
    wait_for(lambda: (q := queue(url, "burst"))["in_flight"] == 0 and q["depth"] == 0, timeout=30)
    answers = [
        httpx.post(f"{url}/v1/chat/completions", json={"model": "burst", **CHAT}, timeout=60)
        for _ in range(4)
    ]
    assert [a.status_code for a in answers] == [200] * 4
    # ... and through its own request, never by the actor reclaiming one nobody renewed: a
    # slot lost by the ingress comes back only that way (so in_flight above reached 0 after it).
    events = httpx.get(f"{url}/admin/events", timeout=30).json()["events"]
    reclaimed = [e for e in events if e["kind"] == "leases_reclaimed" and e.get("model") == "burst"]
    assert reclaimed == [], json.dumps(reclaimed)


def test_a_replica_killed_mid_stream_gives_its_slot_back_within_seconds(url: str) -> None:
    body = {"model": "solo", **CHAT, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as stream:
        chunks = stream.iter_raw()
        assert b"data:" in next(chunks)  # the stream is under way: the only slot is taken
        leases = queue(url, "solo")["leases"]
        assert len(leases) == 1 and leases[0]["holder"], leases
        replica_pid = int(leases[0]["holder"].split(":")[1])
        os.kill(replica_pid, signal.SIGKILL)  # the replica holding it dies mid-stream
        with pytest.raises(httpx.HTTPError):
            for _ in chunks:
                pass
    # The other replica (or a restarted one) answers; the dead one's slot comes back when its
    # renewals stop. Without that, the slot stays taken and this waits 20 s for a 503.
    answer = _answered(url, {"model": "solo", **CHAT})
    assert answer.status_code == 200, answer.text
    assert queue(url, "solo")["in_flight"] == 0


def _answered(url: str, body: dict[str, Any]) -> httpx.Response:
    """A request through Serve's HTTP front while it notices the dead replica: the front's own
    refusals (not our OpenAI-shaped errors) are retried."""
    for _ in range(10):
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        ours = answer.headers.get("content-type", "").startswith("application/json")
        if answer.status_code < 500 or ours:
            return answer
    return answer
