"""The real llama-server on the tiny model answers the official openai client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.helpers import ServerProcess, running_server


@pytest.fixture(scope="module")
def chat_server(
    real_server: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with running_server(real_server, tiny_model, tmp_path_factory.mktemp("real")) as server:
        yield server


@pytest.fixture(scope="module")
def client(chat_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{chat_server.url}/v1", api_key=chat_server.api_key, max_retries=0
    )


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in {"length", "stop"}
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_completion(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        temperature=0,  # greedy: the same tokens, so the same chunking, every run
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2, "tokens arrive as separate chunks"
    finished = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finished in (["length"], ["stop"])
    usage = chunks[-1].usage
    # A byte token can end mid-character and arrive as an empty delta, so content <= tokens.
    assert usage is not None and len(content) <= usage.completion_tokens <= 8


def test_text_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny", prompt="hello", max_tokens=4)
    assert reply.object == "text_completion"
    assert isinstance(reply.choices[0].text, str)


def test_wrong_key_is_refused(chat_server: ServerProcess) -> None:
    stranger = openai.OpenAI(base_url=f"{chat_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_embeddings(real_server: str, tiny_model: Path, tmp_path: Path) -> None:
    with running_server(real_server, tiny_model, tmp_path, "--embeddings") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
        result = client.embeddings.create(model="tiny", input=["hello", "world"])
        assert [item.index for item in result.data] == [0, 1]
        assert len(result.data[0].embedding) == 64
        assert result.data[0].embedding != result.data[1].embedding
