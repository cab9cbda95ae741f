"""The OpenAI API through the product, with the official openai client and the real llama-server."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import wait_for
from tests.serve.conftest import Deployment


def slow_stream(deployment: Deployment, max_tokens: int) -> Any:
    """A streamed chat on the fake that produces one token every 0.3 s."""
    return httpx.stream(
        "POST",
        f"{deployment.url}/v1/chat/completions",
        json={
            "model": "slowstream",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens,
            "stream": True,
        },
        timeout=60,
    )


@pytest.fixture
def client(deployment: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="real", messages=[{"role": "user", "content": "hello"}], max_tokens=6
    )
    assert reply.object == "chat.completion"
    assert reply.model == "real"  # llama-server answers with the configured name
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens == 6


def test_streamed_chat_completion(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="real",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_completion_and_embeddings(client: openai.OpenAI) -> None:
    text = client.completions.create(model="real", prompt="hello", max_tokens=3)
    assert text.object == "text_completion" and text.usage.completion_tokens == 3
    vectors = client.embeddings.create(model="real", input=["hello", "world"])
    assert [d.index for d in vectors.data] == [0, 1] and len(vectors.data[0].embedding) == 64
    assert vectors.usage.prompt_tokens > 0


def test_models_lists_every_configured_model_with_state(client: openai.OpenAI) -> None:
    first = {m.id: m for m in client.models.list()}
    assert {"chat", "real", "qwen-32b", "model-name"} <= set(first)
    chat = first["chat"].model_dump()
    assert (chat["state"], chat["priority"], chat["resource_group"]) == ("ready", 9, "production")
    again = {m.id: m.created for m in client.models.list()}
    assert again == {name: model.created for name, model in first.items()}  # stable


def test_aliases_resolve_and_unknown_models_are_404(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.model == "chat"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["message"] == (
        "The model 'gpt-5' does not exist. Available models: broken, chat, crashy, hf, hf-missing, "
        "hf-tagged, loading, model-name, nofim, qwen-32b, real, rerank, seed-embed, seed-rerank, "
        "sleepy, slowstream, stalls, tight"
    )


def test_each_sse_event_reaches_the_client_as_it_is_produced(deployment: Deployment) -> None:
    # The fake produces a token every 0.3 s; buffering would deliver them together.
    arrivals = []
    with slow_stream(deployment, max_tokens=4) as response:
        assert response.status_code == 200
        lines = []
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("data: {") and '"content": "' in line:
                arrivals.append(time.monotonic())
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    assert len(arrivals) == 4
    assert arrivals[-1] - arrivals[0] >= 3 * 0.3 * 0.9  # a lower bound: it cannot be faster


def test_a_client_gone_before_a_plain_answer_releases_the_slot(deployment: Deployment) -> None:
    # Not streamed: llama-server sends nothing until the whole answer is ready, so the client
    # leaves while the product still waits for the response headers.
    body = {"model": "slowstream", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{deployment.url}/v1/chat/completions",
            json={**body, "max_tokens": 50},
            timeout=httpx.Timeout(60, read=1.5),
        )
    # Well before max_lease_time (an hour) would reclaim it.
    wait_for(lambda: deployment.status("slowstream")["in_flight"] == 0, timeout=20)


def test_a_client_disconnect_releases_the_slot(deployment: Deployment) -> None:
    with slow_stream(deployment, max_tokens=50) as response:
        lines = response.iter_lines()  # kept open: leaving the loop early would close it
        while not next(lines).startswith("data: {"):
            pass
        assert deployment.status("slowstream")["in_flight"] == 1
    # Closed after one event of fifty: the upstream request ends and the lease comes back.
    wait_for(lambda: deployment.status("slowstream")["in_flight"] == 0, timeout=20)


def test_streams_and_plain_answers_mixed_on_the_real_server_all_succeed(
    deployment: Deployment,
) -> None:
    """llama-server closes its connection after each stream: the ingress must never send the
    next request down such a closed pooled connection and fail it (a retry on a fresh one)."""
    failures: list[str] = []

    def worker(index: int) -> None:
        with deployment.client() as http:
            for turn in range(12):
                body = {
                    "model": "real",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "stream": (index + turn) % 2 == 0,
                }
                reply = http.post("/v1/chat/completions", json=body)
                if reply.status_code != 200 or '"error"' in reply.text:
                    failures.append(f"{reply.status_code} {reply.text[:200]}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
