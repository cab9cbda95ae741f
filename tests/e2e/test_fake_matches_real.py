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


# ---------------------------------------------------------------- the other APIs
MESSAGES = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
RESPONSES = {"input": "hello", "max_output_tokens": 4, "temperature": 0}
OTHER_REQUIRED = {
    "/v1/responses": {".id:string", ".object:string", ".status:string", ".output[].type:string"},
    "/v1/messages": {".id:string", ".type:string", ".content[].text:string", ".usage:object"},
    "/v1/messages/count_tokens": {".input_tokens:number"},
    "/v1/responses/input_tokens": {".input_tokens:number"},
    "/completion": {".content:string", ".stop:bool", ".tokens_predicted:number"},
    "/infill": {".content:string", ".stop:bool"},
    "/tokenize": {".tokens:array", ".tokens[]:number"},
    "/detokenize": {".content:string"},
    "/apply-template": {".prompt:string"},
}
OTHER_BODIES = {
    "/v1/responses": RESPONSES,
    "/v1/messages": MESSAGES,
    "/v1/messages/count_tokens": {"messages": MESSAGES["messages"]},
    "/v1/responses/input_tokens": {"input": "hello"},
    "/completion": {"prompt": "hello", "n_predict": 4, "temperature": 0},
    "/infill": {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 4},
    "/tokenize": {"content": "hello"},
    "/detokenize": {"tokens": [107, 104, 111]},
    "/apply-template": {"messages": MESSAGES["messages"]},
}


@pytest.mark.parametrize("path", list(OTHER_BODIES))
def test_other_api_shapes_agree(servers, path: str) -> None:
    real, fake = both(servers, "POST", path, json=OTHER_BODIES[path])
    assert (real.status_code, fake.status_code) == (200, 200), (real.text, fake.text)
    real_shape, fake_shape = shape(real.json()), shape(fake.json())
    assert fake_shape - real_shape == set(), "the fake says something the real server does not"
    assert OTHER_REQUIRED[path] <= fake_shape


def typed_events(server: ServerProcess, path: str, body: dict) -> list[tuple[str, dict]]:
    with httpx.stream(
        "POST", f"{server.url}{path}", json=body, headers=server.headers, timeout=30
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    pairs = list(zip(names, data, strict=True))
    assert all(d["type"] == n for n, d in pairs), "each event's name is its data's type"
    return pairs


@pytest.mark.parametrize(
    ("path", "body", "delta"),
    [
        ("/v1/responses", RESPONSES, "response.output_text.delta"),
        ("/v1/messages", MESSAGES, "content_block_delta"),
    ],
)
def test_typed_event_streams_agree(servers, path: str, body: dict, delta: str) -> None:
    real, fake = servers
    request = {**body, "stream": True}
    real_events, fake_events = typed_events(real, path, request), typed_events(fake, path, request)
    # The same events in the same order, however many tokens each produced.
    assert [n for n, _ in real_events if n != delta] == [n for n, _ in fake_events if n != delta]
    assert any(n == delta for n, _ in fake_events)
    for name in {n for n, _ in fake_events}:
        real_of = [shape(d) for n, d in real_events if n == name]
        fake_of = [shape(d) for n, d in fake_events if n == name]
        if real_of:
            assert set().union(*fake_of) - set().union(*real_of) == set(), name


def test_rerank_agrees(
    real_server: str, fake_server: Path, tiny_model: Path, tmp_path: Path
) -> None:
    body = {"query": "hello", "documents": ["hello world", "ray", "token"]}
    with (
        running_server(real_server, tiny_model, tmp_path, "--reranking") as real,
        running_server(fake_server, tiny_model, tmp_path, "--reranking") as fake,
        running_server(fake_server, tiny_model, tmp_path) as fake_off,
        running_server(real_server, tiny_model, tmp_path) as real_off,
    ):
        answers = [
            httpx.post(f"{s.url}/v1/rerank", json=body, headers=s.headers, timeout=30)
            for s in (real, fake)
        ]
        off = [
            httpx.post(f"{s.url}/v1/rerank", json=body, headers=s.headers, timeout=30)
            for s in (real_off, fake_off)
        ]
    assert [a.status_code for a in answers] == [200, 200]
    assert shape(answers[1].json()) - shape(answers[0].json()) == set()
    for answer in answers:
        scores = [r["relevance_score"] for r in answer.json()["results"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert [a.status_code for a in off] == [501, 501]
    assert off[0].json() == off[1].json()
