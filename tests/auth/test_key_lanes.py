"""A key's `models:` allow-list governs every model route, not just inference (a model outside it
is the 404 of an unknown one); an async result belongs to the key that queued it; listings and
404s show a key only the models it may use."""

from __future__ import annotations

import httpx
import pytest

from tests.auth.conftest import Secured
from tests.helpers import wait_for

CHAT_ONLY = {"Authorization": "Bearer k-chat-only"}  # permission "models", models: ["chat"]
MODELS = {"Authorization": "Bearer k-models"}  # permission "models", every model
ADMIN = {"Authorization": "Bearer k-admin"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

OTHER_ROUTES = [
    ("POST", "/admin/models/other/start"),
    ("POST", "/admin/models/other/stop"),
    ("POST", "/admin/models/other/reload"),
    ("GET", "/admin/models/other/status"),
    ("GET", "/admin/models/other/logs"),
    ("GET", "/admin/queue/other/status"),
    ("POST", "/admin/queue/other/clear"),
    ("GET", "/v1/models/other"),
]


@pytest.mark.parametrize(("method", "path"), OTHER_ROUTES)
def test_a_model_outside_the_allow_list_is_the_unknown_models_404_on_every_model_route(
    secured: Secured, method: str, path: str
) -> None:
    answer = httpx.request(method, f"{secured.url}{path}", headers=CHAT_ONLY, timeout=60)
    assert answer.status_code == 404, answer.text
    message = answer.json()["error"]["message"]
    assert message == "The model 'other' does not exist. Available models: chat"
    unknown = httpx.request(
        method, f"{secured.url}{path.replace('other', 'nope')}", headers=CHAT_ONLY, timeout=60
    )
    assert unknown.status_code == 404  # the same answer as for a name that does not exist
    assert unknown.json()["error"]["message"] == message.replace("'other'", "'nope'")
    mine = path.replace("other", "chat")
    if method == "GET":  # the same route on its own model is open to it
        assert httpx.get(f"{secured.url}{mine}", headers=CHAT_ONLY, timeout=60).status_code == 200


def test_an_unknown_model_404_lists_only_the_keys_models(secured: Secured) -> None:
    body = {**CHAT, "model": "nope"}
    answer = httpx.post(f"{secured.url}/v1/chat/completions", json=body, headers=CHAT_ONLY)
    assert answer.status_code == 404
    assert answer.json()["error"]["message"].endswith("Available models: chat")
    everyone = httpx.post(f"{secured.url}/v1/chat/completions", json=body, headers=ADMIN)
    assert everyone.json()["error"]["message"].endswith("Available models: chat, other")


def test_listings_and_bulk_operations_keep_to_the_keys_models(secured: Secured) -> None:
    with httpx.Client(base_url=secured.url, timeout=60) as client:
        assert client.post("/admin/models/other/start", headers=ADMIN).status_code == 200
        statuses = client.get("/admin/models/status", headers=CHAT_ONLY).json()["models"]
        assert [s["name"] for s in statuses] == ["chat"]
        groups = client.get("/admin/groups/status", headers=CHAT_ONLY).json()["groups"]
        assert [m["name"] for m in groups["default"]["members"]] == ["chat"]
        queues = client.get("/admin/queue/status", headers=CHAT_ONLY).json()["queues"]
        assert {q["model"] for q in queues} <= {"chat"}
        # Stopping the group (and everything) with this key leaves "other" running.
        stopped = client.post("/admin/groups/default/stop", headers=CHAT_ONLY).json()
        assert stopped == {"group": "default", "stopped": [], "kept_preloaded": ["chat"]}
        assert client.post("/admin/stop-all", headers=CHAT_ONLY).json()["stopped"] == []
        other = client.get("/admin/models/other/status", headers=ADMIN).json()
        assert other["state"] == "ready"


def test_an_async_result_belongs_to_the_key_that_queued_it(secured: Secured) -> None:
    with httpx.Client(base_url=secured.url, timeout=60) as client:
        client.post("/admin/models/other/stop", headers=ADMIN).raise_for_status()
        accepted = client.post(
            "/v1/chat/completions",
            json={**CHAT, "model": "other"},
            headers={**MODELS, "Prefer": "respond-async"},
        )
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["location"]
        wait_for(lambda: client.get(location, headers=MODELS).status_code == 200, timeout=60)
        assert client.get(location, headers=MODELS).json()["object"] == "chat.completion"
        theirs = client.get(location, headers=CHAT_ONLY)
        assert theirs.status_code == 404 and "No queued request" in theirs.text
        assert client.get(location, headers=ADMIN).status_code == 200
