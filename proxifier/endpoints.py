"""The inference paths the proxifier forwards to llama-server: one table, read by the ingress
(which routes, finds the model and shapes errors from it) and by the permission table in
`proxifier.auth`; what a model was started for is `proxifier.capabilities`'. Pure: no I/O.

Every path here goes the same way as chat: auth, rate limit, queue, lease, respond-async and
metrics. Each is forwarded to llama-server under the same path, bytes untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxifier.errors import InvalidRequest


class Shape(StrEnum):
    """The error body a path's clients parse."""

    OPENAI = "openai"  # {"error": {"message", "type", "code"}}
    ANTHROPIC = "anthropic"  # {"type": "error", "error": {"type", "message"}}


class Can(StrEnum):
    """What a model can be asked to do; `GET /v1/models` lists it per model."""

    CHAT = "chat"  # chat, text completion, responses, messages
    EMBEDDINGS = "embeddings"
    RERANK = "rerank"
    INFILL = "infill"  # fill-in-the-middle code completion: a model with FIM tokens


@dataclass(frozen=True)
class Endpoint:
    path: str
    needs: Can | None  # None: any model answers it (tokenizer paths)
    streams: bool  # `"stream": true` in the body makes it an SSE stream
    # llama-server's own paths have no `model` field in their body: `?model=` names it too.
    model_in_query: bool = False
    errors: Shape = Shape.OPENAI
    example: str = ""  # the body of a one-line example, for the README's table


_CHAT = Endpoint(
    "/v1/chat/completions",
    Can.CHAT,
    True,
    example='{"model":"M","messages":[{"role":"user","content":"Hi"}]}',
)
_COUNT = Endpoint(
    "/v1/chat/completions/input_tokens",
    None,
    False,
    example='{"model":"M","messages":[{"role":"user","content":"Hi"}]}',
)
_TEXT = Endpoint("/v1/completions", Can.CHAT, True, example='{"model":"M","prompt":"Once"}')
_RESPONSES = Endpoint("/v1/responses", Can.CHAT, True, example='{"model":"M","input":"Hi"}')
_RESPONSES_COUNT = Endpoint(
    "/v1/responses/input_tokens", None, False, example='{"model":"M","input":"Hi"}'
)
_EMBEDDINGS = Endpoint(
    "/v1/embeddings", Can.EMBEDDINGS, False, example='{"model":"M","input":"text"}'
)

ENDPOINTS: tuple[Endpoint, ...] = (
    _CHAT,
    _TEXT,
    _EMBEDDINGS,
    _RESPONSES,
    _RESPONSES_COUNT,
    Endpoint(
        "/v1/messages",
        Can.CHAT,
        True,
        errors=Shape.ANTHROPIC,
        example='{"model":"M","max_tokens":64,"messages":[{"role":"user","content":"Hi"}]}',
    ),
    Endpoint(
        "/v1/messages/count_tokens",
        None,
        False,
        errors=Shape.ANTHROPIC,
        example='{"model":"M","messages":[{"role":"user","content":"Hi"}]}',
    ),
    *(
        Endpoint(
            path,
            Can.RERANK,
            False,
            model_in_query=True,
            example='{"model":"M","query":"q","documents":["a","b"]}',
        )
        for path in ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking")
    ),
    Endpoint(
        "/infill",
        Can.INFILL,
        True,
        model_in_query=True,
        example='{"model":"M","input_prefix":"def f(","input_suffix":"):"}',
    ),
    Endpoint(
        "/completion",
        Can.CHAT,
        True,
        model_in_query=True,
        example='{"model":"M","prompt":"Once","n_predict":16}',
    ),
    # llama-server's own names for the OpenAI paths: queued like them (a passthrough of one
    # under /upstream/{model}/ too), the model named in the body or ?model=.
    *(
        Endpoint(alias, twin.needs, twin.streams, model_in_query=True, example=twin.example)
        for alias, twin in (
            ("/chat/completions", _CHAT),
            ("/chat/completions/input_tokens", _COUNT),
            ("/v1/chat/completions/input_tokens", _COUNT),
            ("/completions", _TEXT),
            ("/responses", _RESPONSES),
            ("/responses/input_tokens", _RESPONSES_COUNT),
            ("/embeddings", _EMBEDDINGS),
            ("/embedding", _EMBEDDINGS),
        )
    ),
    Endpoint("/tokenize", None, False, model_in_query=True, example='{"content":"Hello"}'),
    Endpoint("/detokenize", None, False, model_in_query=True, example='{"tokens":[1,2]}'),
    Endpoint(
        "/apply-template",
        None,
        False,
        model_in_query=True,
        example='{"messages":[{"role":"user","content":"Hi"}]}',
    ),
)
BY_PATH: dict[str, Endpoint] = {endpoint.path: endpoint for endpoint in ENDPOINTS}
PATTERN = "|".join(re.escape(endpoint.path) for endpoint in ENDPOINTS)

# The config field that starts a model for a capability, for the 400 that says what to set.
STORED_RESPONSES = (
    "llama-server's Responses API is stateless: it stores no responses, so none can be "
    "retrieved, continued, cancelled or deleted; send the earlier turns in 'input'"
)
UPSTREAM_PREFIX = re.compile(r"/upstream/[^/]+(?=/)")
# Raw POSTs to llama-server (no slot taken) that any key with `models` may send: stopping its
# own generation from the web UI. Others (slot save/erase, LoRA scales, /props) change the
# model for every user: admin only.
RAW_POSTS = frozenset({"/v1/chat/completions/control"})


def curl_example(endpoint: Endpoint, base: str = "127.0.0.1:8000") -> str:
    """A one-line example for the README (which a test checks against this table)."""
    if '"model"' in endpoint.example:
        return f"curl --json '{endpoint.example}' {base}{endpoint.path}"
    return f"curl --json '{endpoint.example}' '{base}{endpoint.path}?model=M'"


def error_shape(path: str) -> Shape:
    """The error body clients of this path expect (a passthrough of it: the same)."""
    endpoint = BY_PATH.get(UPSTREAM_PREFIX.sub("", path, count=1))
    return endpoint.errors if endpoint is not None else Shape.OPENAI


def model_named(endpoint: Endpoint, payload: dict[str, Any], query: str | None) -> str:
    """The model a request names: its JSON `model` field, or (llama-server's own paths)
    `?model=`; a 400 that says how to name one when it names none, or two different ones."""
    named = payload.get("model")
    if named is not None and (not isinstance(named, str) or not named):
        raise InvalidRequest("'model' must be a non-empty string naming a configured model")
    if not endpoint.model_in_query:
        if named is None:
            raise InvalidRequest("you must provide a model parameter")
        return named
    if named is not None and query and query != named:
        raise InvalidRequest(
            f"the request names two models: '{named}' in the body and '{query}' in ?model="
        )
    if named is None and not query:
        raise InvalidRequest(
            f'{endpoint.path} needs a model: add "model": "<name>" to the JSON body, '
            f"or ?model=<name> to the URL"
        )
    return named or str(query)


def stateless_refusal(endpoint: Endpoint, payload: dict[str, Any]) -> InvalidRequest | None:
    """A Responses request that continues a stored response cannot be served: say so before
    a model is started for it."""
    if endpoint.path == "/v1/responses" and payload.get("previous_response_id") is not None:
        return InvalidRequest(f"'previous_response_id' is not supported: {STORED_RESPONSES}")
    return None
