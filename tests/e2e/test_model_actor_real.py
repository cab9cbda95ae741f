"""The model actor's whole lifecycle with the real llama-server and the tiny model."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import ray

from proxifier.config import ModelConfig
from proxifier.gguf_facts import read_facts
from proxifier.gpu_memory import estimate
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


def test_a_calibrating_start_measures_what_llama_server_allocated(
    make_actor: MakeActor, real_server: str, tiny_model: Path
) -> None:
    """At -lv 4 the real llama-server's load log lists each buffer; the actor reports them,
    and the estimate from the GGUF header agrees with what it allocated."""
    fields = {"llama_server": real_server, "parallel": 2, "context_length": 1024}
    actor = make_actor(options={"calibrate": True}, **fields)
    ray.get(actor.start.remote(), timeout=120)
    measured = ray.get(actor.stats.remote())["memory_measured"]
    assert measured is not None and measured["gpu"] == 0  # no GPU here: all of it on the CPU
    cpu = measured["buffers"]["CPU"]
    facts = read_facts(tiny_model)
    need = estimate(facts, ModelConfig(model_path=str(tiny_model), **fields))
    assert cpu["kv"] == need.kv_cache == 1024 * 2 * (64 + 64) * 2  # -c 1024, 2 layers, f16
    # Its model buffer holds every weight (all on the CPU): the estimate's GPU part (blocks
    # and output) plus the input layer, to llama.cpp's alignment.
    assert cpu["model"] == pytest.approx(need.weights + facts.input_bytes, rel=0.01)
    assert 0 < cpu["compute"] < 4 * need.compute
    # Without calibrate the log stays at llama-server's default verbosity: nothing measured.
    quiet = make_actor(**fields)
    ray.get(quiet.start.remote(), timeout=120)
    assert ray.get(quiet.stats.remote())["memory_measured"] is None
