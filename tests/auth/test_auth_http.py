"""API keys, permissions and rate limits over HTTP, with two ingress replicas."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.auth.conftest import KEYS, Secured, auth_config
from tests.helpers import wait_for

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# One harmless request per route class.
ROUTES = {
    "inference": ("POST", "/v1/chat/completions", CHAT),
    "list models": ("GET", "/v1/models", None),
    "model actions": ("POST", "/admin/queue/chat/clear", None),
    "status": ("GET", "/admin/models/status", None),
    "cluster": ("GET", "/admin/cluster", None),
    "config": ("GET", "/admin/config/validate", None),
    "public metrics": ("GET", "/metrics", None),
}
# Which permission opens which route class (admin opens all; /metrics is public).
OPENS = {
    "inference": {"models"},
    "list models": {"models", "read"},
    "model actions": {"models"},
    "status": {"models", "read"},
    "cluster": {"read"},
    "config": {"config"},
}
CREDENTIALS = {
    **{f"valid {p}": {"Authorization": f"Bearer {k}"} for p, k in KEYS.items()},
    "expired": {"Authorization": "Bearer your-secure-admin-key"},
    "unknown": {"Authorization": "Bearer not-a-key"},
    "missing": {},
    "malformed": {"Authorization": "Basic a2V5"},
    "x-api-key": {"x-api-key": KEYS["models"]},
}


def expected(credential: str, route: str) -> int:
    if route == "public metrics":
        return 200
    if credential == "x-api-key":
        credential = "valid models"
    if not credential.startswith("valid"):
        return 401
    permission = credential.removeprefix("valid ")
    return 200 if permission == "admin" or permission in OPENS[route] else 403


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("credential", list(CREDENTIALS))
def test_permission_matrix(secured: Secured, credential: str, route: str) -> None:
    method, path, body = ROUTES[route]
    response = httpx.request(
        method, f"{secured.url}{path}", json=body, headers=CREDENTIALS[credential], timeout=60
    )
    assert response.status_code == expected(credential, route), response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code"}
        assert "not-a-key" not in response.text and "your-secure" not in response.text


def test_the_seed_example_keys(secured: Secured) -> None:
    with httpx.Client(base_url=secured.url, timeout=60) as client:
        expired = client.get("/admin/models/status", headers=bearer("your-secure-admin-key"))
        assert expired.status_code == 401
        assert expired.json()["error"]["message"] == (
            "API key 'admin-key' expired at 2024-12-31T23:59:59Z"
        )
        readonly = bearer("readonly-monitoring-key")
        assert client.post("/v1/chat/completions", json=CHAT, headers=readonly).status_code == 403
        assert client.get("/admin/models/status", headers=readonly).status_code == 200
        team = bearer("team-development-key")
        reply = client.post("/v1/chat/completions", json=CHAT, headers=team)
        # The client's key never reaches llama-server, which only accepts its instance key.
        assert reply.status_code == 200 and reply.json()["object"] == "chat.completion"
        assert reply.headers["x-ratelimit-limit"] == "100"  # team-key -> class "default"


def test_a_key_sent_twice_is_refused_whichever_comes_last(secured: Secured) -> None:
    team, stranger = "Bearer team-development-key", "Bearer not-a-key"
    for pair in ([team, stranger], [stranger, team]):
        headers = [("Authorization", value) for value in pair]
        answer = httpx.get(f"{secured.url}/v1/models", headers=headers, timeout=60)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "invalid_authorization_header"
    one = httpx.get(f"{secured.url}/v1/models", headers={"Authorization": team}, timeout=60)
    assert one.status_code == 200


def test_a_model_allow_list(secured: Secured) -> None:
    headers = bearer("k-chat-only")
    with httpx.Client(base_url=secured.url, timeout=60, headers=headers) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        other = client.post("/v1/chat/completions", json={**CHAT, "model": "other"})
        unknown = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        assert other.status_code == unknown.status_code == 404  # no hint that "other" exists
        assert other.json()["error"]["message"] == (
            "The model 'other' does not exist. Available models: chat"
        )
        assert unknown.json()["error"]["message"] == (
            "The model 'nope' does not exist. Available models: chat"
        )
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["chat"]
        assert client.get("/v1/models/other").status_code == 404


def test_public_metrics_name_no_model_and_no_key_unless_a_reader_asks(secured: Secured) -> None:
    with httpx.Client(base_url=secured.url, timeout=60) as client:
        served = client.post("/v1/chat/completions", json=CHAT, headers=bearer(KEYS["models"]))
        assert served.status_code == 200
        # Ingress replicas push their counters every few seconds: once a reader sees this
        # request counted, every later scrape has it.
        served_line = 'proxifier_requests_total{model="chat",status="200"}'
        wait_for(
            lambda: served_line in client.get("/metrics", headers=bearer(KEYS["read"])).text,
            timeout=30,
        )
        anonymous = client.get("/metrics")
        models_key = client.get("/metrics", headers=bearer(KEYS["models"]))  # may not read
        reader = client.get("/metrics", headers=bearer(KEYS["read"]))
        # A reader's key last of two counts as none, as on every other path.
        twice = [("Authorization", f"Bearer {KEYS[k]}") for k in ("models", "read")]
        repeated = client.get("/metrics", headers=twice)
    for nameless in (anonymous, models_key, repeated):
        assert nameless.status_code == 200
        assert 'model="chat"' not in nameless.text and 'model="other"' not in nameless.text
        assert 'proxifier_requests_total{model="",status="200"}' in nameless.text  # summed
        assert 'proxifier_model_state{model="",state="ready"}' in nameless.text
    assert reader.status_code == 200
    assert served_line in reader.text


def test_rate_limit_is_exact_across_replicas(secured: Secured) -> None:
    headers = bearer("k-burst")  # class "burst": 5 per minute
    answers = [
        httpx.get(f"{secured.url}/admin/cluster", headers=headers, timeout=30) for _ in range(6)
    ]
    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["4", "3", "2", "1", "0", "0"]
    assert all(a.headers["x-ratelimit-limit"] == "5" for a in answers)
    refused = answers[-1]
    retry = int(refused.headers["retry-after"])
    assert 50 <= retry <= 60  # the first of the five leaves the window in about a minute
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_keys_added_and_removed_by_editing_auth_yaml(secured: Secured) -> None:
    headers = bearer("k-new")
    url = f"{secured.url}/admin/models/status"
    assert httpx.get(url, headers=headers).status_code == 401
    secured.write_auth(auth_config({"new-key": {"key": "k-new", "permissions": ["read"]}}))
    wait_for(lambda: httpx.get(url, headers=headers).status_code == 200, timeout=30)
    secured.write_auth(auth_config())
    wait_for(lambda: httpx.get(url, headers=headers).status_code == 401, timeout=30)


def test_a_bad_auth_yaml_keeps_the_keys_in_force(secured: Secured) -> None:
    secured.auth_path.write_text("api_keys:\n  broken: {key: x, permissions: [wizard]}\n")
    events = f"{secured.url}/admin/events"
    admin = bearer(KEYS["admin"])
    wait_for(
        lambda: any(
            e["kind"] == "config_rejected"
            for e in httpx.get(events, headers=admin).json()["events"]
        ),
        timeout=30,
    )
    assert httpx.get(f"{secured.url}/admin/models/status", headers=admin).status_code == 200
    secured.write_auth(auth_config())


def test_cors_preflight_is_answered_before_auth(secured: Secured) -> None:
    preflight = httpx.options(
        f"{secured.url}/v1/chat/completions",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "access-control-allow-credentials" not in preflight.headers
    stranger = httpx.options(
        f"{secured.url}/v1/chat/completions",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert stranger.status_code == 400
    assert "access-control-allow-origin" not in stranger.headers
    simple = httpx.get(
        f"{secured.url}/admin/models/status",
        headers={"Origin": "https://app.example.com", **bearer(KEYS["read"])},
    )
    assert simple.headers["access-control-allow-origin"] == "https://app.example.com"


def test_key_material_never_reaches_the_logs(secured: Secured) -> None:
    httpx.get(f"{secured.url}/admin/models/status", headers=bearer("k-secret-probe-123"))
    httpx.get(f"{secured.url}/admin/models/status", headers=bearer(KEYS["read"]))
    logs = Path("/tmp/ray/session_latest/logs")
    leaked = [
        path.name
        for path in logs.rglob("*")
        if path.is_file() and b"k-secret-probe-123" in path.read_bytes()
    ]
    assert leaked == []


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_an_open_dashboard_still_needs_a_key_for_actions(secured: Secured) -> None:
    closed = httpx.get(f"{secured.url}/admin/models/status")
    assert closed.status_code == 401
    page = httpx.get(f"{secured.url}/dashboard")  # the page itself is always served
    assert page.status_code == 200 and "LLM Proxifier" in page.text
    with httpx.stream("GET", f"{secured.url}/dashboard/stream", timeout=30) as stream:
        assert stream.status_code == 401
    secured.write_auth({**auth_config(), "dashboard_auth_required": False})
    try:

        def stream_is_open() -> bool:
            with httpx.stream("GET", f"{secured.url}/dashboard/stream", timeout=30) as stream:
                if stream.status_code != 200:
                    return False
                # The caller's permissions come first, then the models' stats.
                events = (line for line in stream.iter_lines() if line.startswith("event: "))
                return [next(events), next(events)] == ["event: caller", "event: stats"]

        wait_for(stream_is_open, timeout=30)
        start = httpx.post(f"{secured.url}/admin/models/chat/start")
        assert start.status_code == 401
    finally:
        secured.write_auth(auth_config())
