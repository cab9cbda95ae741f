"""The model actor's whole lifecycle with the real llama-server and the tiny model."""

from __future__ import annotations

import openai
import ray

from tests.conftest import MakeActor
from tests.helpers import wait_gone


def test_real_llama_server_lifecycle(make_actor: MakeActor, real_server: str) -> None:
    actor = make_actor(llama_server=real_server, parallel=2, context_length=512)
    lease = ray.get(actor.acquire.remote("real-1"), timeout=120)
    stats = ray.get(actor.stats.remote())
    assert stats["state"] == "ready" and stats["rss_bytes"] > 0
    client = openai.OpenAI(base_url=f"{lease['url']}/v1", api_key=lease["api_key"], max_retries=0)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert reply.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            temperature=0,
            stream=True,
        )
    )
    assert len(chunks) >= 3
    ray.get(actor.release.remote(lease["lease_id"]))
    assert ray.get(actor.stats.remote())["requests_served"] == 1
    pid = stats["pid"]
    stopped = ray.get(actor.stop.remote("test"), timeout=60)
    assert stopped["state"] == "stopped"
    assert wait_gone(pid)
    # And it starts again on demand.
    again = ray.get(actor.acquire.remote("real-2"), timeout=120)
    assert again["instance"] == 2
    ray.get(actor.release.remote(again["lease_id"]))
