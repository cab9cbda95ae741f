"""The fake llama-server answers the same requests with the same shapes as the real one.

A shape is the set of JSON paths with their value types. Everything the fake says, the real
server says too (with the same type), and the fields clients rely on are in both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, running_server

# Greedy sampling: the real server's chunking depends on the sampled bytes, so fix them.
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
TEXT = {"prompt": "hello", "max_tokens": 4, "temperature": 0}


def shape(value: object, path: str = "") -> set[str]:
    if isinstance(value, dict):
        paths = {f"{path}:object"}
        for key, item in value.items():
            paths |= shape(item, f"{path}.{key}")
        return paths
    if isinstance(value, list):
        paths = {f"{path}:array"}
        for item in value:
            paths |= shape(item, f"{path}[]")
        return paths
    kind = {bool: "bool", int: "number", float: "number", str: "string", type(None): "null"}[
        type(value)
    ]
    return {f"{path}:{kind}"}


@pytest.fixture(scope="module")
def servers(
    real_server: str, fake_server: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    tmp = tmp_path_factory.mktemp("shapes")
    with (
        running_server(real_server, tiny_model, tmp, "--embeddings") as real,
        running_server(fake_server, tiny_model, tmp, "--embeddings") as fake,
    ):
        yield real, fake


def both(
    servers: tuple[ServerProcess, ServerProcess], method: str, path: str, **kwargs: object
) -> tuple[httpx.Response, httpx.Response]:
    real, fake = servers
    return tuple(  # type: ignore[return-value]
        httpx.request(method, f"{s.url}{path}", headers=s.headers, timeout=30, **kwargs)  # type: ignore[arg-type]
        for s in (real, fake)
    )


def events(server: ServerProcess, path: str, body: dict) -> list[str]:
    with httpx.stream(
        "POST", f"{server.url}{path}", json=body, headers=server.headers, timeout=30
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


REQUIRED = {
    "chat": {
        ".id:string",
        ".object:string",
        ".created:number",
        ".model:string",
        ".choices[].index:number",
        ".choices[].finish_reason:string",
        ".choices[].message.role:string",
        ".choices[].message.content:string",
        ".usage.prompt_tokens:number",
        ".usage.completion_tokens:number",
        ".usage.total_tokens:number",
    },
    "text": {
        ".id:string",
        ".object:string",
        ".choices[].text:string",
        ".choices[].finish_reason:string",
        ".usage.total_tokens:number",
    },
    "embeddings": {
        ".object:string",
        ".data[].embedding[]:number",
        ".data[].index:number",
        ".data[].object:string",
        ".usage.prompt_tokens:number",
    },
    "models": {
        ".object:string",
        ".data[].id:string",
        ".data[].object:string",
        ".data[].created:number",
        ".data[].owned_by:string",
    },
}


@pytest.mark.parametrize(
    ("kind", "method", "path", "body"),
    [
        ("chat", "POST", "/v1/chat/completions", CHAT),
        ("text", "POST", "/v1/completions", TEXT),
        ("embeddings", "POST", "/v1/embeddings", {"input": ["hello", "world"]}),
        ("models", "GET", "/v1/models", None),
    ],
)
def test_json_shapes_agree(servers, kind: str, method: str, path: str, body: dict | None) -> None:
    real, fake = both(servers, method, path, json=body)
    assert (real.status_code, fake.status_code) == (200, 200)
    real_shape, fake_shape = shape(real.json()), shape(fake.json())
    assert fake_shape - real_shape == set(), "the fake says something the real server does not"
    assert REQUIRED[kind] <= fake_shape


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/chat/completions", CHAT), ("/v1/completions", TEXT)],
)
def test_stream_shapes_agree(servers, path: str, body: dict) -> None:
    real, fake = servers
    request = {**body, "stream": True}
    real_events, fake_events = events(real, path, request), events(fake, path, request)
    assert real_events[-1] == fake_events[-1] == "[DONE]"
    real_chunks = [json.loads(e) for e in real_events[:-1]]
    fake_chunks = [json.loads(e) for e in fake_events[:-1]]
    assert {c["object"] for c in real_chunks} == {c["object"] for c in fake_chunks}
    union = set().union
    assert union(*map(shape, fake_chunks)) - union(*map(shape, real_chunks)) == set()
    # The last chunk before [DONE] carries the finish reason in both.
    assert real_chunks[-1]["choices"][0]["finish_reason"] is not None
    assert fake_chunks[-1]["choices"][0]["finish_reason"] is not None


def test_stream_with_usage_agrees(servers) -> None:
    real, fake = servers
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    for server in (real, fake):
        chunks = [json.loads(e) for e in events(server, "/v1/chat/completions", request)[:-1]]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_health_agrees(servers) -> None:
    real, fake = both(servers, "GET", "/health")
    assert real.status_code == fake.status_code == 200
    assert real.json() == fake.json() == {"status": "ok"}


def test_props_agree(servers) -> None:
    real, fake = both(servers, "GET", "/props")
    for response in (real, fake):
        props = response.json()
        assert props["total_slots"] == 2
        assert props["default_generation_settings"]["n_ctx"] >= 1
        assert props["model_path"].endswith("tiny.gguf")


@pytest.mark.parametrize(
    ("headers", "content", "status"),
    [
        ({"Authorization": "Bearer wrong"}, json.dumps(CHAT), 401),
        (None, "{not json", 400),
        (None, json.dumps({"max_tokens": 1}), 400),
    ],
)
def test_error_shapes_agree(servers, headers: dict | None, content: str, status: int) -> None:
    real, fake = servers
    responses = [
        httpx.post(
            f"{s.url}/v1/chat/completions",
            content=content,
            headers=headers or s.headers,
            timeout=30,
        )
        for s in (real, fake)
    ]
    assert [r.status_code for r in responses] == [status, status]
    shapes = [shape(r.json()) for r in responses]
    assert shapes[0] == shapes[1]
    real_type, fake_type = (r.json()["error"]["type"] for r in responses)
    assert real_type == fake_type


def test_embeddings_off_agrees(
    real_server: str, fake_server: Path, tiny_model: Path, tmp_path: Path
) -> None:
    with (
        running_server(real_server, tiny_model, tmp_path) as real,
        running_server(fake_server, tiny_model, tmp_path) as fake,
    ):
        answers = [
            httpx.post(f"{s.url}/v1/embeddings", json={"input": "x"}, headers=s.headers)
            for s in (real, fake)
        ]
    assert [a.status_code for a in answers] == [501, 501]
    assert answers[0].json() == answers[1].json()


def test_unknown_path_is_404_in_both(servers) -> None:
    real, fake = both(servers, "GET", "/v1/nope")
    assert real.status_code == fake.status_code == 404
