"""DESIGN §5: waiting requests, 202 + polling, SSE keep-alives, full, expired and cleared queues."""

from __future__ import annotations

import threading
import time

import httpx

from tests.helpers import wait_for
from tests.serve.conftest import Deployment

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def stop(deployment: Deployment, model: str) -> None:
    httpx.post(f"{deployment.url}/admin/models/{model}/stop", timeout=60)


def test_respond_async_gives_202_then_the_result(deployment: Deployment) -> None:
    stop(deployment, "loading")
    with deployment.client() as client:
        accepted = client.post(
            "/v1/chat/completions",
            json={"model": "loading", **CHAT},
            headers={"Prefer": "respond-async"},
        )
        assert accepted.status_code == 202
        body = accepted.json()
        assert body["message"] == "Request queued"
        assert body["position"] == 1 and body["model_state"] == "starting"
        assert accepted.headers["location"] == f"/v1/queue/{body['request_id']}"
        polled = client.get(accepted.headers["location"])
        assert polled.status_code == 202 and polled.json()["request_id"] == body["request_id"]
        wait_for(lambda: client.get(accepted.headers["location"]).status_code == 200, timeout=30)
        done = client.get(accepted.headers["location"]).json()
        assert done["object"] == "chat.completion" and done["model"] == "loading"
        assert client.get("/v1/queue/req_unknown").status_code == 404


def test_respond_async_on_a_ready_model_answers_at_once(deployment: Deployment) -> None:
    with deployment.client() as client:
        reply = client.post(
            "/v1/chat/completions",
            json={"model": "chat", **CHAT},
            headers={"Prefer": "respond-async"},
        )
    assert reply.status_code == 200 and reply.json()["object"] == "chat.completion"


def test_a_waiting_stream_gets_keepalive_comments_then_its_tokens(deployment: Deployment) -> None:
    stop(deployment, "loading")
    with httpx.stream(
        "POST",
        f"{deployment.url}/v1/chat/completions",
        json={"model": "loading", **CHAT, "stream": True},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    assert comments[0] == ": queued position=1 state=starting"
    assert len(comments) >= 3  # every 0.5 s during the 3 s load
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and len(data) >= 4
    assert lines.index(data[0]) > lines.index(comments[-1])  # tokens only after the wait


def test_a_quick_failure_of_a_waiting_stream_is_a_plain_503(deployment: Deployment) -> None:
    with deployment.client() as client:
        answer = client.post(
            "/v1/chat/completions", json={"model": "broken", **CHAT, "stream": True}
        )
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/json"
    assert "error: corrupt model (fake)" in answer.json()["error"]["message"]
    assert answer.json()["error"]["code"] == "model_failed"


def test_a_full_queue_is_503_with_retry_after(deployment: Deployment) -> None:
    stop(deployment, "tight")  # it loads for 60 s from the request below: it will not be ready
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=deployment.url, timeout=60) as client:
        waiting = threading.Thread(
            target=lambda: answers.append(
                client.post("/v1/chat/completions", json={"model": "tight", **CHAT})
            )
        )
        waiting.start()
        wait_for(lambda: deployment.status("tight").get("queue_depth") == 1)
        refused = client.post("/v1/chat/completions", json={"model": "tight", **CHAT})
        waiting.join()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "10"
    assert refused.json()["error"]["message"] == "Service temporarily unavailable - queue is full"
    # The one that waited hears, after its queue_timeout (10 s), how long it waited and why.
    (expired,) = answers
    assert expired.status_code == 503 and expired.headers["retry-after"] == "10"
    message = expired.json()["error"]["message"]
    assert message.startswith("Request waited 10.") or message.startswith("Request waited 9.9")
    assert "in the queue of model 'tight' (model state: starting) and timed out" in message
    assert expired.json()["error"]["code"] == "queue_timeout"


def test_clearing_a_queue_answers_each_waiter(deployment: Deployment) -> None:
    stop(deployment, "tight")
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=deployment.url, timeout=60) as client:
        waiting = threading.Thread(
            target=lambda: answers.append(
                client.post(
                    "/v1/chat/completions",
                    json={"model": "tight", **CHAT},
                )
            )
        )
        waiting.start()
        wait_for(lambda: deployment.status("tight").get("queue_depth") == 1)
        cleared = client.post("/admin/queue/tight/clear")
        waiting.join()
    assert cleared.json() == {"model": "tight", "cleared": 1}
    (answer,) = answers
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "queue_cleared"
    assert "the queue was cleared by an admin" in answer.json()["error"]["message"]


def test_a_burst_while_loading_is_served_in_full(deployment: Deployment) -> None:
    stop(deployment, "loading")
    results: list[int] = []

    def one() -> None:
        with httpx.Client(base_url=deployment.url, timeout=60) as client:
            results.append(
                client.post("/v1/chat/completions", json={"model": "loading", **CHAT}).status_code
            )

    threads = [threading.Thread(target=one) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 8
    assert time.monotonic() - started >= 2.5  # they really waited for the 3 s load
