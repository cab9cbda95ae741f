"""Every API llama-server speaks, through the product: the official openai client's Responses,
the official anthropic client's Messages, rerank, infill, llama-server's own paths, the raw
passthrough, and the queue contract on them. "real" and "rerank" run the real llama-server on
the tiny model; the others the fake."""

from __future__ import annotations

import threading

import anthropic
import httpx
import openai
import pytest

from tests.helpers import wait_for
from tests.serve.conftest import Deployment

HI = [{"role": "user", "content": "hello"}]


@pytest.fixture
def oai(deployment: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def claude(deployment: Deployment) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=deployment.url, api_key="unused", max_retries=0)


def stop(deployment: Deployment, model: str) -> None:
    httpx.post(f"{deployment.url}/admin/models/{model}/stop", timeout=60).raise_for_status()


# ---------------------------------------------------------------- OpenAI Responses (real)
def test_responses_create(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="real", input="hello", max_output_tokens=5)
    assert response.object == "response" and response.status == "completed"
    assert response.output[0].type == "message"
    assert isinstance(response.output_text, str)
    # The random tiny model may sample its end-of-text token before the limit.
    assert response.usage is not None and 0 < response.usage.output_tokens <= 5


def test_responses_create_streamed_yields_typed_events(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="real", input="hi", max_output_tokens=4, stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") >= 1
    done = next(e for e in events if e.type == "response.output_text.done")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert done.text == deltas
    assert 0 < events[-1].response.usage.output_tokens <= 4


def test_responses_are_stateless_and_say_so_before_starting_a_model(
    deployment: Deployment, oai: openai.OpenAI
) -> None:
    stop(deployment, "qwen-32b")
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model="qwen-32b", input="more", previous_response_id="resp_1")
    assert "'previous_response_id' is not supported" in caught.value.message
    assert deployment.status("qwen-32b")["state"] == "stopped"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.responses.retrieve("resp_1")
    assert "No stored response 'resp_1': llama-server's Responses API is stateless" in str(
        missing.value.message
    )
    with pytest.raises(openai.NotFoundError):
        oai.responses.delete("resp_1")


# ---------------------------------------------------------------- Anthropic Messages (real)
def test_messages_create(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="real", max_tokens=5, messages=HI)
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.stop_reason in {"max_tokens", "end_turn"}
    assert 0 < message.usage.output_tokens <= 5


def test_messages_streamed(claude: anthropic.Anthropic) -> None:
    events = list(claude.messages.create(model="real", max_tokens=4, messages=HI, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_delta" in kinds
    with claude.messages.stream(model="real", max_tokens=4, messages=HI) as stream:
        final = stream.get_final_message()
    # The random tiny model may sample its end-of-text token before max_tokens.
    assert 0 < final.usage.output_tokens <= 4 and final.content[0].type == "text"


def test_messages_count_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model="real", messages=HI)
    assert counted.input_tokens > 0


def test_an_unknown_model_on_messages_is_an_anthropic_404(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude.messages.create(model="claude-9", max_tokens=5, messages=HI)
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert body["error"]["message"].startswith("The model 'claude-9' does not exist.")


def test_llama_servers_own_error_on_messages_is_anthropic_shaped(deployment: Deployment) -> None:
    answer = httpx.post(
        f"{deployment.url}/v1/messages", json={"model": "chat", "max_tokens": 3}, timeout=60
    )
    assert answer.status_code == 500  # what the fake (like llama-server) says: no messages
    assert answer.json() == {
        "type": "error",
        "error": {"type": "api_error", "message": "'messages' is required"},
    }


# ---------------------------------------------------------------- rerank, infill, tokens
def test_rerank_on_a_model_started_for_it_returns_scores(deployment: Deployment) -> None:
    body = {"model": "rerank", "query": "hello", "documents": ["hello world", "ray", "token"]}
    answer = httpx.post(f"{deployment.url}/v1/rerank", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 3


def test_rerank_on_a_model_not_started_for_it_is_400_naming_the_field(
    deployment: Deployment,
) -> None:
    stop(deployment, "qwen-32b")
    body = {"query": "q", "documents": ["a"]}
    answer = httpx.post(f"{deployment.url}/rerank?model=qwen-32b", json=body, timeout=60)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == (
        "model 'qwen-32b' was not started for rerank: set 'reranking: true' for it in "
        "models.yaml (or use a model that has it) to call /rerank"
    )
    assert deployment.status("qwen-32b")["state"] == "stopped"  # nothing started for it


def test_rerank_on_the_real_server_not_started_for_it_is_the_400_too(
    deployment: Deployment,
) -> None:
    # "real" runs the real llama-server without --reranking (it would answer 501); the
    # passthrough of an inference path takes the same check.
    body = {"model": "real", "query": "q", "documents": ["a"]}
    for path in ("/v1/rerank", "/upstream/real/v1/reranking"):
        answer = httpx.post(f"{deployment.url}{path}", json=body, timeout=60)
        assert answer.status_code == 400, path
        message = answer.json()["error"]["message"]
        assert message.startswith("model 'real' was not started for rerank: set 'reranking: true'")


def test_embeddings_and_rerank_asked_for_in_additional_args(
    deployment: Deployment, oai: openai.OpenAI
) -> None:
    # "seed-embed": the real llama-server with `additional_args: "--embeddings --pooling
    # mean"`; "seed-rerank": `additional_args: ["--rerank"]`. No field set in either.
    vectors = oai.embeddings.create(model="seed-embed", input=["hello", "world"])
    assert [d.index for d in vectors.data] == [0, 1] and len(vectors.data[0].embedding) == 64
    body = {"model": "seed-rerank", "query": "q", "documents": ["a", "b"]}
    answer = httpx.post(f"{deployment.url}/v1/rerank", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert sorted(r["index"] for r in answer.json()["results"]) == [0, 1]
    listed = {m.id: m.model_dump() for m in oai.models.list()}
    assert listed["seed-embed"]["capabilities"] == ["embeddings"]
    assert listed["seed-rerank"]["capabilities"] == ["rerank"]


def test_infill_on_a_model_with_fim_tokens(deployment: Deployment) -> None:
    body = {"input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n", "n_predict": 4}
    answer = httpx.post(f"{deployment.url}/infill?model=real", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["tokens_predicted"] == 4


def test_infill_on_a_model_without_fim_tokens_is_400(deployment: Deployment) -> None:
    body = {"model": "nofim", "input_prefix": "x", "input_suffix": "y"}
    answer = httpx.post(f"{deployment.url}/infill", json=body, timeout=60)
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert message.startswith("model 'nofim' cannot fill in the middle: its GGUF file has no FIM")


def test_tokenize_round_trips_through_detokenize(deployment: Deployment) -> None:
    with deployment.client() as client:
        tokens = client.post("/tokenize?model=real", json={"content": "hello tiny world, proxy!"})
        assert tokens.status_code == 200, tokens.text
        ids = tokens.json()["tokens"]
        assert ids and all(isinstance(i, int) for i in ids)
        text = client.post("/detokenize", json={"model": "real", "tokens": ids})
    assert text.status_code == 200 and text.json()["content"] == "hello tiny world, proxy!"


def test_a_llama_server_path_without_a_model_says_how_to_name_one(deployment: Deployment) -> None:
    answer = httpx.post(f"{deployment.url}/tokenize", json={"content": "x"}, timeout=60)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == (
        '/tokenize needs a model: add "model": "<name>" to the JSON body, or ?model=<name> to '
        "the URL"
    )


def test_completion_and_apply_template(deployment: Deployment) -> None:
    with deployment.client() as client:
        template = client.post(
            "/apply-template?model=real", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert template.json() == {"prompt": "<|user|>\nhi\n<|assistant|>\n"}
        with client.stream(
            "POST", "/completion?model=real", json={"prompt": "hi", "n_predict": 3, "stream": True}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            data = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert len(data) >= 3 and '"stop":true' in data[-1].replace(" ", "")


def test_models_say_what_each_can_do(deployment: Deployment) -> None:
    listed = httpx.get(f"{deployment.url}/v1/models", timeout=60).json()["data"]
    can = {entry["id"]: entry["capabilities"] for entry in listed}
    assert can["chat"] == ["chat", "infill"]  # the tiny model has FIM tokens
    assert can["real"] == ["embeddings"]
    assert can["rerank"] == ["rerank"]


# ---------------------------------------------------------------- the queue contract
def test_a_waiting_messages_stream_gets_keepalives_then_its_events(
    deployment: Deployment,
) -> None:
    stop(deployment, "loading")
    body = {"model": "loading", "max_tokens": 3, "messages": HI, "stream": True}
    with httpx.stream("POST", f"{deployment.url}/v1/messages", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    assert comments[0] == ": queued position=1 state=starting" and len(comments) >= 3
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert lines.index("event: message_start") > lines.index(comments[-1])


def test_a_full_queue_on_messages_is_an_anthropic_503_with_retry_after(
    deployment: Deployment,
) -> None:
    stop(deployment, "tight")  # it loads for 60 s: the first request waits, the second is refused
    body = {"model": "tight", "max_tokens": 3, "messages": HI}
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=deployment.url, timeout=60) as client:
        waiting = threading.Thread(
            target=lambda: answers.append(client.post("/v1/messages", json=body))
        )
        waiting.start()
        wait_for(lambda: deployment.status("tight").get("queue_depth") == 1)
        refused = client.post("/v1/messages", json=body)
        client.post("/admin/queue/tight/clear")
        waiting.join()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "10"
    assert refused.json() == {
        "type": "error",
        "error": {
            "type": "overloaded_error",
            "message": "Service temporarily unavailable - queue is full",
            "code": "queue_full",
        },
    }
    (cleared,) = answers
    assert cleared.status_code == 503 and cleared.json()["error"]["type"] == "overloaded_error"


def test_respond_async_on_a_new_path(deployment: Deployment) -> None:
    stop(deployment, "loading")
    with deployment.client() as client:
        accepted = client.post(
            "/v1/messages",
            json={"model": "loading", "max_tokens": 3, "messages": HI},
            headers={"Prefer": "respond-async"},
        )
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["location"]
        wait_for(lambda: client.get(location).status_code == 200, timeout=30)
        assert client.get(location).json()["type"] == "message"


# ---------------------------------------------------------------- /upstream/{model}/...
def test_upstream_starts_the_model_and_relays_its_own_paths(deployment: Deployment) -> None:
    stop(deployment, "qwen-32b")
    with deployment.client() as client:
        slots = client.get("/upstream/qwen-32b/slots")
        assert slots.status_code == 200, slots.text
        assert [s["id"] for s in slots.json()] == [0, 1, 2, 3]  # parallel: 4
        assert deployment.status("qwen-32b")["state"] == "ready"
        props = client.get("/upstream/real/props").json()
        # The real llama-server's answer, its model's path cut to the file name.
        assert props["total_slots"] == 2 and props["model_path"] == "tiny.gguf"
        page = client.get("/upstream/chat/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        bare = client.get("/upstream/chat", follow_redirects=False)
        assert bare.status_code == 307 and bare.headers["location"] == "/upstream/chat/"
        assert client.get("/upstream/nope/slots").status_code == 404


def test_an_inference_path_under_upstream_is_that_path_with_the_model_fixed(
    deployment: Deployment,
) -> None:
    answer = httpx.post(
        f"{deployment.url}/upstream/gpt-4o-mini/v1/chat/completions",
        json={"messages": HI, "max_tokens": 2},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "chat"  # the alias resolved; no model in the body needed
