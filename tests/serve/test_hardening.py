"""Hostile or unlucky requests: bodies that break a JSON parser, async requests that cannot wait,
and requests whose model is stopped or whose actor dies while they wait (issue 12)."""

from __future__ import annotations

import socket
import threading
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import ray

from tests.helpers import wait_for
from tests.serve.conftest import Deployment

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
NESTED = b'{"model": "chat", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
HUGE_INT = b'{"model": "chat", "max_tokens": ' + b"9" * 5000 + b"}"


@pytest.mark.parametrize("body", [NESTED, HUGE_INT], ids=["nested", "huge-int"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/admin/config/backup"])
def test_bodies_that_break_a_json_parser_get_400_not_500(
    deployment: Deployment, body: bytes, path: str
) -> None:
    headers = {"Content-Type": "application/json"}
    answer = httpx.post(f"{deployment.url}{path}", content=body, headers=headers, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"


def queued(deployment: Deployment, model: str) -> int:
    return httpx.get(f"{deployment.url}/admin/queue/{model}/status", timeout=30).json()["depth"]


def test_respond_async_on_a_full_queue_is_refused_at_once(deployment: Deployment) -> None:
    # "tight" loads for 60 s and queues one request at most.
    httpx.post(f"{deployment.url}/admin/models/tight/stop", timeout=60)
    body, prefer = {"model": "tight", **CHAT}, {"Prefer": "respond-async"}
    with deployment.client() as client:
        first = client.post("/v1/chat/completions", json=body, headers=prefer)
        assert first.status_code == 202
        second = client.post("/v1/chat/completions", json=body, headers=prefer)
    assert second.status_code == 503, second.text
    assert second.json()["error"]["code"] == "queue_full"
    assert int(second.headers["retry-after"]) > 0
    # Leave it as other tests expect it: stopped (it would be ready 60 s from now).
    httpx.post(f"{deployment.url}/admin/models/tight/stop", timeout=60)


def test_respond_async_on_a_model_cooling_down_is_refused_at_once(deployment: Deployment) -> None:
    with deployment.client() as client:
        failed = client.post("/v1/chat/completions", json={"model": "broken", **CHAT})
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "model_failed"
        again = client.post(
            "/v1/chat/completions",
            json={"model": "broken", **CHAT},
            headers={"Prefer": "respond-async"},
        )
    assert again.status_code == 503, again.text
    assert again.json()["error"]["code"] == "model_failed"
    assert int(again.headers["retry-after"]) > 0


def waiting_in_queue(deployment: Deployment, model: str, count: int, stream: bool) -> Any:
    """`count` requests that wait in the queue of `model` (stopped first; it loads for 3 s and
    serves one at a time). Returns a function that waits for their answers."""
    httpx.post(f"{deployment.url}/admin/models/{model}/stop", timeout=60)
    answers: list[tuple[int, str]] = []

    def ask() -> None:
        body = {"model": model, **CHAT, "stream": stream}
        with httpx.stream(
            "POST", f"{deployment.url}/v1/chat/completions", json=body, timeout=120
        ) as reply:
            answers.append((reply.status_code, reply.read().decode()))

    threads = [threading.Thread(target=ask) for _ in range(count)]
    for thread in threads:
        thread.start()
    wait_for(lambda: queued(deployment, model) == count, timeout=30)

    def answered() -> list[tuple[int, str]]:
        for thread in threads:
            thread.join()
        return answers

    return answered


def test_requests_waiting_for_a_model_an_admin_stops_get_a_fresh_instance(
    deployment: Deployment,
) -> None:
    answered = waiting_in_queue(deployment, "loading", 3, stream=False)
    stopped = httpx.post(f"{deployment.url}/admin/models/loading/stop", timeout=60)
    assert stopped.status_code == 200
    assert [status for status, _ in answered()] == [200] * 3


def test_requests_waiting_on_a_model_actor_that_dies_are_answered(
    deployment: Deployment,
) -> None:
    answered = waiting_in_queue(deployment, "loading", 2, stream=True)
    actors = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("proxifier:model:loading@")
    ]
    assert len(actors) == 1
    ray.kill(ray.get_actor(actors[0], namespace="proxifier"))  # its node is lost, say
    # The streams had begun (keep-alive comments) and go on with a fresh instance's tokens.
    answers = answered()
    assert all(status == 200 and "data: [DONE]" in text for status, text in answers), answers


def test_with_auth_off_a_web_page_cannot_drive_the_server(deployment: Deployment) -> None:
    url = deployment.url
    httpx.post(f"{url}/admin/models/model-name/start", timeout=60).raise_for_status()
    # A cross-site <form> posts text/plain; fetch() from another page sends its Origin; a
    # rebound DNS name reaches 127.0.0.1 with the attacker's Host.
    form = httpx.post(
        f"{url}/admin/stop-all", content=b"x=1", headers={"Content-Type": "text/plain"}
    )
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type"
    page = httpx.post(f"{url}/admin/stop-all", headers={"Origin": "https://attacker.example"})
    assert page.status_code == 403 and page.json()["error"]["code"] == "origin_not_allowed"
    rebound = httpx.get(f"{url}/admin/models/status", headers={"Host": "attacker.example"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert deployment.status("model-name")["state"] == "ready"  # nothing was stopped
    # The dashboard's own requests (same origin, JSON) still work.
    own = httpx.post(
        f"{url}/admin/models/model-name/stop", headers={"Origin": url}, json={}, timeout=60
    )
    assert own.status_code == 200


def test_a_body_that_trickles_in_gets_408(deployment: Deployment) -> None:
    where = urlsplit(deployment.url)
    with socket.create_connection((where.hostname, where.port), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"model": '
        )
        reply = _http_answer(sock)  # the rest of the body never comes (body_timeout is 3 s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"body_timeout" in reply


def _http_answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer: its head, then as many body bytes as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
