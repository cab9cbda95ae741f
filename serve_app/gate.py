"""The gate of the inference path: read and check the body and the caller, resolve the model
name, check the key's access and the route row's refusals, set the deadline; it answers with
one immutable `Inbound`. It may not start a model, take a slot, or send anything upstream.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from proxifier.auth import ADMIN, Caller
from proxifier.body_cost import over_limits
from proxifier.capabilities import refusal
from proxifier.endpoints import RAW_POSTS, Endpoint, model_named, stateless_refusal
from proxifier.errors import Forbidden, InvalidRequest, PayloadTooLarge
from serve_app.backend import Cluster
from serve_app.route import Snapshot
from serve_app.security import caller_of


@dataclass(frozen=True, slots=True)
class Inbound:
    """One inference request as the gate let it in: nothing about it changes after."""

    model: str
    endpoint: Endpoint
    raw: bytes  # the body, sent upstream as it came
    payload: dict[str, Any]
    caller: Caller | None
    request_id: str
    arrived: float  # monotonic, for the queue-wait metric
    arrived_at: float  # wall clock, for the actor's honest wait times
    deadline: float  # wall clock: when it must have been answered (queue_timeout)
    stream: bool  # an SSE answer was asked for
    respond_async: bool  # a place in the queue is answered 202 (Prefer: respond-async, or config)
    keepalive: float  # seconds between SSE comments while a stream waits
    instances: Snapshot  # the model's instances this replica knew, for serve_app.route


async def gate(
    cluster: Cluster,
    request: Request,
    endpoint: Endpoint,
    model: str | None,
    arrived: float,
    arrived_at: float,
) -> Inbound:
    """Let one inference request on `endpoint` in, or raise why not; `model`: already
    resolved (a passthrough)."""
    config = await cluster.config()
    raw = await read_body(request, config.settings.max_body_size)
    payload = parse_request(raw)
    settings = config.settings
    too_costly = over_limits(payload, settings.max_json_keys, settings.max_json_items)
    if too_costly is not None:  # before a model is found, let alone a slot taken
        raise too_costly
    caller = caller_of(request.scope)
    if model is None:
        model = model_named(endpoint, payload, request.query_params.get("model"))
    problem = stateless_refusal(endpoint, payload)
    if problem is not None:
        raise problem
    model, instances = await cluster.find(model, caller)
    model_config = config.models[model]
    problem = refusal(endpoint, model, model_config)
    if problem is not None:  # before anything starts the model for it
        raise problem
    timeout = model_config.queue_timeout or settings.queue.queue_timeout
    wants_async = "respond-async" in request.headers.get("prefer", "").lower()
    return Inbound(
        model=model,
        endpoint=endpoint,
        raw=raw,
        payload=payload,
        caller=caller,
        request_id=f"req_{uuid.uuid4().hex}",
        arrived=arrived,
        arrived_at=arrived_at,
        deadline=arrived_at + timeout,
        stream=endpoint.streams and payload.get("stream") is True,
        respond_async=wants_async or settings.queue.respond_async,
        keepalive=settings.queue.keepalive_interval,
        instances=instances,
    )


async def upstream_model(cluster: Cluster, request: Request, name: str) -> str:
    """The model a passthrough (`/upstream/{model}/...`) names, if the caller may use it."""
    model, _ = await cluster.find(name, caller_of(request.scope))
    return model


async def raw_gate(
    cluster: Cluster, request: Request, model: str, path: str
) -> tuple[bytes, float]:
    """A raw passthrough to llama-server's `path` (it takes no slot): its body, and how long
    starting the model may take. A POST that changes the model for every user needs the
    admin permission."""
    caller = caller_of(request.scope)
    if request.method == "POST" and path not in RAW_POSTS and not _is_admin(caller):
        raise Forbidden(
            f"a raw POST to llama-server's {path} changes model '{model}' for every user "
            "(slots, adapters, settings): it needs the admin permission"
        )
    config = await cluster.config()
    settings = config.settings
    timeout = config.models[model].queue_timeout or settings.queue.queue_timeout
    body = await read_body(request, settings.max_body_size)
    return body, timeout


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(raw: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except RecursionError:
        raise InvalidRequest("Invalid JSON body: nested too deeply") from None
    except ValueError as exc:  # bad JSON, bad UTF-8, an integer past Python's digit limit
        raise InvalidRequest(f"Invalid JSON body: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object")
    return payload


def _is_admin(caller: Caller | None) -> bool:
    """Admin, or no keys at all (auth off: the one local user)."""
    return caller is None or ADMIN in caller.permissions
