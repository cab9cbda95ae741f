"""The seed's curl commands, the admin API's errors, and every kind of bad input."""

from __future__ import annotations

import json
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_for
from tests.serve.conftest import Deployment

CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

FEATURES = Path(__file__).resolve().parents[2] / "docs" / "FEATURES.md"


def seed_curls() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", FEATURES.read_text(), re.S)
    return [
        line.strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip().startswith("curl")
    ]


def test_the_seed_has_seven_curl_commands() -> None:
    assert len(seed_curls()) == 7


@pytest.mark.parametrize("command", seed_curls())
def test_each_seed_curl_command_answers(deployment: Deployment, command: str) -> None:
    words = shlex.split(command)
    method = words[words.index("-X") + 1] if "-X" in words else "GET"
    url = next(w for w in words if w.startswith("http://"))
    url = url.replace("http://localhost:8000", deployment.url)
    response = httpx.request(method, url, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    path = url.removeprefix(deployment.url)
    if path == "/admin/groups/status":
        assert {"production", "development"} <= set(body["groups"])
        assert body["groups"]["production"]["total"] == 2
    elif path == "/admin/groups/production/start":
        assert [r["model"] for r in body["results"]] == ["chat", "qwen-32b"]
    elif path == "/admin/groups/development/stop":
        assert body == {"group": "development", "stopped": ["model-name"], "kept_preloaded": []}
    elif path == "/admin/models/qwen-32b/reload":
        assert body["changes"] == []
    elif path == "/admin/models/qwen-32b/status":
        assert body["name"] == "qwen-32b" and body["resource_group"] == "production"
    elif path == "/admin/queue/status":
        assert isinstance(body["queues"], list)
    elif path == "/admin/queue/model-name/clear":
        assert body == {"model": "model-name", "cleared": 0}


def test_admin_errors_are_openai_shaped(deployment: Deployment) -> None:
    with deployment.client() as client:
        unknown = client.get("/admin/models/nope/status")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        group = client.post("/admin/groups/nope/start")
        assert group.status_code == 404 and "no model is in resource group" in group.text
        refused = client.post("/admin/models/chat/stop")
        assert refused.status_code == 409
        assert refused.json()["error"] == {
            "message": "model 'chat' is preloaded and stays running; stop it with force=true "
            "(or set preload: false)",
            "type": "invalid_request_error",
            "code": "refused",
        }
        bad_backup = client.post("/admin/config/restore/..%2F..%2Fetc")
        assert bad_backup.status_code in (400, 404)
        assert "error" in bad_backup.json()


def test_logs_cluster_events_validate_backups(deployment: Deployment) -> None:
    with deployment.client() as client:
        logs = client.get("/admin/models/chat/logs", params={"lines": 5}).json()
        assert logs["model"] == "chat" and 0 < len(logs["lines"]) <= 5
        nodes = client.get("/admin/cluster").json()["nodes"]
        assert "chat" in nodes[0]["models"]
        events = client.get("/admin/events").json()["events"]
        assert any(e["kind"] == "ready" and e.get("model") == "chat" for e in events)
        assert client.get("/admin/config/validate").json()["valid"] is True
        made = client.post("/admin/config/backup", json={"description": "from a test"}).json()
        listed = client.get("/admin/config/backups").json()["backups"]
        assert listed[0]["id"] == made["id"] and listed[0]["description"] == "from a test"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("POST", "/v1/chat/completions", {"content": b"{not json"}, 400, "invalid_request"),
        ("POST", "/v1/chat/completions", {"json": {"messages": []}}, 400, "invalid_request"),
        ("POST", "/v1/chat/completions", {"json": ["a list"]}, 400, "invalid_request"),
        ("POST", "/v1/chat/completions", {"content": b"x" * 70_000}, 413, "request_too_large"),
        ("GET", "/v1/chat/completions", {}, 405, "method_not_allowed"),
        ("DELETE", "/v1/models", {}, 405, "method_not_allowed"),
        ("GET", "/v2/everything", {}, 404, "not_found"),
        (
            "POST",
            "/v1/embeddings",
            {"json": {"model": "nope", "input": "x"}},
            404,
            "model_not_found",
        ),
    ],
)
def test_bad_input_gets_a_clear_openai_error(
    deployment: Deployment, method: str, path: str, kwargs: dict, status: int, code: str
) -> None:
    response = httpx.request(method, f"{deployment.url}{path}", timeout=30, **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


def test_a_body_of_many_keys_is_refused_before_a_slot_naming_the_limit(
    deployment: Deployment,
) -> None:
    """Small in bytes (about 2 KB of 64 KiB allowed), costly in keys: a 400 at the gate."""
    body = {"model": "chat", **CHAT_BODY, "junk": {f"k{i}": 0 for i in range(200)}}
    response = httpx.post(f"{deployment.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "more than 100 JSON object keys (settings.max_json_keys)" in error["message"]
    served = httpx.get(f"{deployment.url}/admin/models/chat/status", timeout=30).json()
    again = httpx.post(f"{deployment.url}/v1/chat/completions", json=body, timeout=30)
    assert again.status_code == 400
    after = httpx.get(f"{deployment.url}/admin/models/chat/status", timeout=30).json()
    assert after["leases_granted"] == served["leases_granted"]  # no slot was ever asked for


def test_costly_bodies_never_hold_a_real_llama_servers_slots(deployment: Deployment) -> None:
    """Issue 29's attack on the real llama-server (2 slots): two bodies of many unused keys
    used to fill both for a minute and leave a normal user a 503. They are refused at the
    gate, and the normal request beside them is answered."""
    costly = {"model": "real", **CHAT_BODY, "junk": {f"k{i}": 0 for i in range(5000)}}
    normal = {"model": "real", **CHAT_BODY}
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(3) as pool:
        assert client.post(f"{deployment.url}/v1/chat/completions", json=normal).status_code == 200
        before = client.get(f"{deployment.url}/admin/models/real/status").json()
        sent = [
            pool.submit(client.post, f"{deployment.url}/v1/chat/completions", json=body)
            for body in (costly, costly, normal)
        ]
        answers = [future.result() for future in sent]
        after = client.get(f"{deployment.url}/admin/models/real/status").json()
    assert [a.status_code for a in answers] == [400, 400, 200], [a.text[:200] for a in answers]
    assert after["leases_granted"] == before["leases_granted"] + 1  # the normal one alone


def test_no_model_message(deployment: Deployment) -> None:
    response = httpx.post(f"{deployment.url}/v1/chat/completions", json={"messages": []})
    assert response.json()["error"]["message"] == "you must provide a model parameter"


def test_an_upstream_crash_is_502(deployment: Deployment) -> None:
    response = httpx.post(
        f"{deployment.url}/v1/chat/completions",
        json={"model": "crashy", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_failed"


def test_an_upstream_that_goes_silent_is_504(deployment: Deployment) -> None:
    # "sleepy" waits 5 s per token; upstream_timeout is 2 s.
    response = httpx.post(
        f"{deployment.url}/v1/chat/completions",
        json={"model": "sleepy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        timeout=60,
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_a_stream_that_goes_silent_midway_ends_with_a_timeout_event(
    deployment: Deployment,
) -> None:
    """The first token may take as long as upstream_timeout (the prompt is read first); after
    it, a gap past upstream_idle_timeout ends the stream with an error event, and the slot
    goes back."""
    body = {"model": "stalls", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body["stream"] = True
    events = []
    with httpx.stream(
        "POST", f"{deployment.url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    contents = [e["choices"][0]["delta"].get("content") for e in events if e.get("choices")]
    assert contents[-1], events  # the first token came, 3 s after the request: not cut
    error = events[-1]["error"]
    assert error["code"] == "upstream_timeout", events
    assert "sent nothing for 1 s in the middle of the stream" in error["message"]
    status_url = f"{deployment.url}/admin/models/stalls/status"
    wait_for(lambda: httpx.get(status_url, timeout=30).json()["in_flight"] == 0)


def test_the_clients_request_timeout_header_changes_nothing(deployment: Deployment) -> None:
    # Four tokens 0.3 s apart take about a second; a 0.2 s timeout of the client's must not cut it.
    response = httpx.post(
        f"{deployment.url}/v1/chat/completions",
        json={
            "model": "slowstream",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        },
        headers={"x-request-timeout-seconds": "0.2"},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 4
