"""The routing table of inference paths: how each finds its model, what a model must have been
started for, which error shape its clients parse, and the permission every path needs."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from proxifier.auth import Caller, authorize, required_permissions
from proxifier.capabilities import capabilities, refusal, unsupported
from proxifier.config import ModelConfig
from proxifier.endpoints import (
    BY_PATH,
    ENDPOINTS,
    Can,
    Shape,
    error_shape,
    model_named,
    stateless_refusal,
)
from proxifier.errors import InvalidRequest, QueueFull
from proxifier.gguf_facts import GgufError, read_facts


def caller(name: str, permissions: list[str]) -> Caller:
    return Caller(name, frozenset(permissions), None, None, None)


LLAMA_SERVER_PATHS = {  # what the real llama-server answers (its server.cpp routes)
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/responses/input_tokens",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/rerank",
    "/v1/reranking",
    "/rerank",
    "/reranking",
    "/infill",
    "/completion",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    # llama-server's own names for the OpenAI paths
    "/chat/completions",
    "/chat/completions/input_tokens",
    "/v1/chat/completions/input_tokens",
    "/completions",
    "/responses",
    "/responses/input_tokens",
    "/embeddings",
    "/embedding",
}


def test_the_table_routes_every_path_the_issue_names() -> None:
    assert {e.path for e in ENDPOINTS} == LLAMA_SERVER_PATHS
    assert len(ENDPOINTS) == len(BY_PATH), "one row per path"


def test_an_openai_path_takes_its_model_from_the_body_only() -> None:
    chat = BY_PATH["/v1/chat/completions"]
    assert model_named(chat, {"model": "m"}, None) == "m"
    with pytest.raises(InvalidRequest, match="you must provide a model parameter"):
        model_named(chat, {}, "m")  # ?model= is not how OpenAI clients name one


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize", "/infill", "/completion"])
def test_a_llama_server_path_takes_its_model_from_the_body_or_the_query(path: str) -> None:
    endpoint = BY_PATH[path]
    assert model_named(endpoint, {"model": "a"}, None) == "a"
    assert model_named(endpoint, {}, "b") == "b"
    assert model_named(endpoint, {"model": "a"}, "a") == "a"
    with pytest.raises(InvalidRequest) as missing:
        model_named(endpoint, {"content": "hi"}, None)
    assert str(missing.value) == (
        f'{path} needs a model: add "model": "<name>" to the JSON body, or ?model=<name> to the URL'
    )
    with pytest.raises(InvalidRequest, match="two models: 'a' in the body and 'b' in"):
        model_named(endpoint, {"model": "a"}, "b")


@pytest.mark.parametrize("bad", [3, "", None, ["m"]])
def test_a_model_field_that_is_not_a_name_is_400(bad: object) -> None:
    chat = BY_PATH["/v1/chat/completions"]
    with pytest.raises(InvalidRequest):
        model_named(chat, {"model": bad}, None)


def test_a_path_the_model_was_not_started_for_names_the_field_to_set() -> None:
    plain = ModelConfig()
    problem = refusal(BY_PATH["/v1/rerank"], "chat", plain)
    assert problem is not None and problem.status == 400
    assert str(problem) == (
        "model 'chat' was not started for rerank: set 'reranking: true' for it in models.yaml "
        "(or use a model that has it) to call /v1/rerank"
    )
    embeddings = refusal(BY_PATH["/v1/embeddings"], "chat", plain)
    assert embeddings is not None and "set 'embeddings: true'" in str(embeddings)
    assert refusal(BY_PATH["/v1/rerank"], "r", ModelConfig(reranking=True)) is None
    assert refusal(BY_PATH["/v1/embeddings"], "e", ModelConfig(embeddings=True)) is None
    # Only llama-server knows whether the file has FIM tokens: its 501 becomes the 400.
    assert refusal(BY_PATH["/infill"], "chat", plain) is None
    for path in ("/v1/chat/completions", "/tokenize", "/v1/messages/count_tokens"):
        assert refusal(BY_PATH[path], "chat", plain) is None


def test_llama_servers_501_becomes_a_400_that_says_what_to_do() -> None:
    infill = unsupported(BY_PATH["/infill"], "chat", "prefix token is missing")
    assert infill.status == 400
    assert "cannot fill in the middle: its GGUF file has no FIM" in str(infill)
    assert "(llama-server: prefix token is missing)" in str(infill)
    rerank = unsupported(BY_PATH["/rerank"], "chat", "Start it with `--reranking`")
    assert "set 'reranking: true' for it in models.yaml" in str(rerank)


def test_a_stored_response_cannot_be_continued() -> None:
    responses = BY_PATH["/v1/responses"]
    problem = stateless_refusal(responses, {"previous_response_id": "resp_1"})
    assert problem is not None and problem.status == 400
    assert "'previous_response_id' is not supported" in str(problem)
    assert stateless_refusal(responses, {"input": "hi"}) is None
    assert stateless_refusal(responses, {"previous_response_id": None}) is None


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/v1/messages", Shape.ANTHROPIC),
        ("/v1/messages/count_tokens", Shape.ANTHROPIC),
        ("/upstream/claude-local/v1/messages", Shape.ANTHROPIC),
        ("/v1/chat/completions", Shape.OPENAI),
        ("/v1/responses", Shape.OPENAI),
        ("/v1/messagesX", Shape.OPENAI),
        ("/admin/models/status", Shape.OPENAI),
        ("/upstream/m/slots", Shape.OPENAI),
    ],
)
def test_error_shape_by_path(path: str, shape: Shape) -> None:
    assert error_shape(path) is shape


def test_an_anthropic_error_body() -> None:
    full = QueueFull("queue is full", retry_after=3)
    assert full.body(anthropic=True) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "queue is full", "code": "queue_full"},
    }
    assert full.body() == {
        "error": {"message": "queue is full", "type": "service_unavailable", "code": "queue_full"}
    }
    assert InvalidRequest("x").body(anthropic=True)["error"]["type"] == "invalid_request_error"


def test_capabilities_say_what_a_model_is_for() -> None:
    assert capabilities(ModelConfig()) == [Can.CHAT]
    assert capabilities(ModelConfig(), fill_in_middle=True) == [Can.CHAT, Can.INFILL]
    assert capabilities(ModelConfig(embeddings=True)) == [Can.EMBEDDINGS]
    assert capabilities(ModelConfig(reranking=True), fill_in_middle=True) == [Can.RERANK]


@pytest.mark.parametrize("path", sorted(LLAMA_SERVER_PATHS))
def test_every_inference_path_needs_the_models_permission(path: str) -> None:
    assert required_permissions("POST", path) == frozenset({"models"})
    assert authorize(caller("r", ["read"]), "POST", path) is not None
    assert authorize(caller("m", ["models"]), "POST", path) is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/upstream/chat/slots"),
        ("GET", "/upstream/chat/"),
        ("POST", "/upstream/chat/v1/chat/completions"),
        ("GET", "/v1/responses/resp_1"),
        ("DELETE", "/v1/responses/resp_1"),
    ],
)
def test_the_passthrough_and_stored_responses_need_the_models_permission(
    method: str, path: str
) -> None:
    assert required_permissions(method, path) == frozenset({"models"})
    assert authorize(caller("r", ["read"]), method, path) is not None


def write_gguf(path: Path, tokens: list[str], keys: dict[str, int] | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(tokens)
    for key, value in (keys or {}).items():
        writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_fim_tokens_are_found_by_metadata_or_by_their_text(tmp_path: Path) -> None:
    plain = write_gguf(tmp_path / "plain.gguf", ["<s>", "a", "b"])
    assert read_facts(plain).fill_in_middle is False
    assert read_facts(plain).architecture == "llama"
    by_text = write_gguf(
        tmp_path / "qwen.gguf", ["<s>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    )
    assert read_facts(by_text).fill_in_middle is True
    keys = {
        "tokenizer.ggml.fim_pre_token_id": 1,
        "tokenizer.ggml.fim_suf_token_id": 2,
        "tokenizer.ggml.fim_mid_token_id": 0,
    }
    by_keys = write_gguf(tmp_path / "keys.gguf", ["x", "y", "z"], keys)
    assert read_facts(by_keys).fill_in_middle is True
    half = write_gguf(tmp_path / "half.gguf", ["<s>", "<|fim_prefix|>", "<|fim_suffix|>"])
    assert read_facts(half).fill_in_middle is False


def test_the_tiny_model_can_fill_in_the_middle(tiny_model: Path) -> None:
    assert read_facts(tiny_model).fill_in_middle is True


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(GgufError, match=r"notes.txt: not a GGUF model file"):
        read_facts(text)
    with pytest.raises(GgufError, match=r"missing.gguf: cannot read"):
        read_facts(tmp_path / "missing.gguf")
