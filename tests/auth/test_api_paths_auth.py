"""The new API paths behind the same gate as chat: every one needs the `models` permission and
keeps to a key's allow-list; `/v1/messages*` refusals are Anthropic-shaped; the passthrough
sends the model's own key, never the client's."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from proxifier.endpoints import ENDPOINTS
from tests.auth.conftest import KEYS, Secured

READ = {"Authorization": f"Bearer {KEYS['read']}"}
MODELS = {"Authorization": f"Bearer {KEYS['models']}"}
CHAT_ONLY = {"Authorization": "Bearer k-chat-only"}  # permission "models", models: ["chat"]
HI = [{"role": "user", "content": "hi"}]

# One harmless body per path (the fake answers each); the model named in the body.
BODIES = {
    "/v1/chat/completions": {"messages": HI, "max_tokens": 2},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/responses": {"input": "hi", "max_output_tokens": 2},
    "/v1/responses/input_tokens": {"input": "hi"},
    "/v1/messages": {"messages": HI, "max_tokens": 2},
    "/v1/messages/count_tokens": {"messages": HI},
    "/infill": {"input_prefix": "a", "input_suffix": "b", "n_predict": 2},
    "/completion": {"prompt": "hi", "n_predict": 2},
    "/tokenize": {"content": "hi"},
    "/detokenize": {"tokens": [107, 108]},
    "/apply-template": {"messages": HI},
    "/chat/completions": {"messages": HI, "max_tokens": 2},
    "/chat/completions/input_tokens": {"messages": HI},
    "/v1/chat/completions/input_tokens": {"messages": HI},
    "/completions": {"prompt": "hi", "max_tokens": 2},
    "/responses": {"input": "hi", "max_output_tokens": 2},
    "/responses/input_tokens": {"input": "hi"},
}
# Neither fake model is started for these: the allowed key gets the 400 that says so.
NOT_STARTED_FOR = {
    "/v1/embeddings",
    "/embeddings",
    "/embedding",
    "/v1/rerank",
    "/v1/reranking",
    "/rerank",
    "/reranking",
}
PATHS = [endpoint.path for endpoint in ENDPOINTS]


def post(secured: Secured, path: str, model: str, headers: dict[str, str]) -> httpx.Response:
    body = {"model": model, **BODIES.get(path, {"input": "x", "query": "q", "documents": ["a"]})}
    return httpx.post(f"{secured.url}{path}", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("path", PATHS)
def test_every_inference_path_needs_models_and_keeps_to_the_allow_list(
    secured: Secured, path: str
) -> None:
    assert post(secured, path, "chat", READ).status_code == 403
    refused = post(secured, path, "other", CHAT_ONLY)
    assert refused.status_code == 404, refused.text  # as if it did not exist
    assert "The model 'other' does not exist. Available models: chat" in refused.text
    allowed = post(secured, path, "chat", CHAT_ONLY)
    assert allowed.status_code == (400 if path in NOT_STARTED_FOR else 200), allowed.text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/upstream/chat/slots"),
        ("GET", "/upstream/chat/props"),
        ("POST", "/upstream/chat/tokenize"),
        ("GET", "/v1/responses/resp_1"),
    ],
)
def test_the_passthrough_and_stored_responses_need_models(
    secured: Secured, method: str, path: str
) -> None:
    answer = httpx.request(
        method, f"{secured.url}{path}", json={"content": "x"}, headers=READ, timeout=60
    )
    assert answer.status_code == 403
    assert httpx.request(method, f"{secured.url}{path}", timeout=60).status_code == 401


def test_the_passthrough_keeps_to_the_allow_list(secured: Secured) -> None:
    with httpx.Client(base_url=secured.url, timeout=60) as client:
        assert client.get("/upstream/other/slots", headers=CHAT_ONLY).status_code == 404
        assert client.get("/upstream/other", headers=CHAT_ONLY).status_code == 404
        assert client.get("/upstream/chat/slots", headers=CHAT_ONLY).status_code == 200


def test_the_passthrough_sends_the_models_key_never_the_clients(secured: Secured) -> None:
    headers = {**MODELS, "x-api-key": KEYS["models"], "Cookie": "session=1", "X-Trace": "t-1"}
    seen = httpx.get(f"{secured.url}/upstream/chat/fake/headers", headers=headers, timeout=60)
    assert seen.status_code == 200, seen.text
    sent = seen.json()
    # The fake accepts only its instance key: the 200 above already says it was sent.
    assert sent["authorization"].startswith("Bearer ")
    assert KEYS["models"] not in sent["authorization"]
    assert "x-api-key" not in sent and "cookie" not in sent
    assert sent["x-trace"] == "t-1"  # other headers pass


def test_the_passthrough_relays_no_origin_and_no_cors_headers(secured: Secured) -> None:
    # llama-server echoes any Origin in Access-Control-Allow-Origin; relayed, it would let
    # any web page read a model's answers.
    headers = {**MODELS, "Origin": "https://evil.example"}
    seen = httpx.get(f"{secured.url}/upstream/chat/fake/headers", headers=headers, timeout=60)
    assert seen.status_code == 200 and "origin" not in seen.json()
    direct = httpx.get(f"{secured.url}/upstream/chat/props", headers=headers, timeout=60)
    assert direct.status_code == 200 and "access-control-allow-origin" not in direct.headers


def test_a_raw_post_that_changes_the_model_for_everyone_needs_admin(secured: Secured) -> None:
    erase = f"{secured.url}/upstream/chat/slots/0?action=erase"
    refused = httpx.post(erase, json={}, headers=MODELS, timeout=60)
    assert refused.status_code == 403 and "needs the admin permission" in refused.text
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    assert httpx.post(erase, json={}, headers=admin, timeout=60).status_code != 403
    control = f"{secured.url}/upstream/chat/v1/chat/completions/control"
    assert httpx.post(control, json={}, headers=MODELS, timeout=60).status_code != 403


def anthropic_client(secured: Secured, key: str | None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=secured.url, api_key=key, max_retries=0)


def test_anthropic_clients_authenticate_with_x_api_key(secured: Secured) -> None:
    # The anthropic SDK sends its key as x-api-key.
    reply = anthropic_client(secured, KEYS["models"]).messages.create(
        model="chat", max_tokens=2, messages=HI
    )
    assert reply.type == "message"


@pytest.mark.parametrize(
    ("key", "error", "status", "kind"),
    [
        ("not-a-key", anthropic.AuthenticationError, 401, "authentication_error"),
        (KEYS["read"], anthropic.PermissionDeniedError, 403, "permission_error"),
        ("k-chat-only", anthropic.NotFoundError, 404, "not_found_error"),
    ],
)
def test_refusals_on_messages_are_anthropic_shaped(
    secured: Secured, key: str, error: type[anthropic.APIStatusError], status: int, kind: str
) -> None:
    model = "nope" if status == 404 else "chat"
    with pytest.raises(error) as caught:
        anthropic_client(secured, key).messages.create(model=model, max_tokens=2, messages=HI)
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == kind and body["error"]["message"]


def test_a_missing_key_on_messages_is_an_anthropic_401(secured: Secured) -> None:
    answer = httpx.post(
        f"{secured.url}/v1/messages/count_tokens",
        json={"model": "chat", "messages": HI},
        timeout=60,
    )
    assert answer.status_code == 401
    assert answer.json()["type"] == "error"
    assert answer.json()["error"]["type"] == "authentication_error"


def test_the_rate_limit_on_messages_is_an_anthropic_429(secured: Secured) -> None:
    client = anthropic_client(secured, "k-claude")  # class "claude": 2 requests a minute
    for _ in range(2):
        client.messages.count_tokens(model="chat", messages=HI)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.count_tokens(model="chat", messages=HI)
    assert caught.value.response.headers["retry-after"]
    body = caught.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "rate_limit_error"
