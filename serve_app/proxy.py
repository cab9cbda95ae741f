"""The inference path: read and check the body, get a lease (waiting in the model's queue if need
be), then stream bytes from llama-server to the client as they come (DESIGN §3 steps 3-5, §5).

Bytes pass through untouched: SSE framing and `[DONE]` stay intact, and headers are computed
for what is actually sent (never the upstream Content-Length of a re-encoded body).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ray
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from proxifier.errors import InvalidRequest, ProxifierError
from serve_app.backend import RayBackend
from serve_app.http_errors import PayloadTooLarge, UpstreamFailed, UpstreamTimeout, sse_error
from serve_app.metrics import ReplicaMetrics

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
QUICK_ANSWER = 1.0  # seconds a queued stream waits before it commits to a 200 and keep-alives


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"Invalid JSON body: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter")
    return payload


class Proxy:
    """Forwards inference requests; one per replica, with one pooled HTTP client."""

    def __init__(self, backend: RayBackend, metrics: ReplicaMetrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    async def handle(self, request: Request, path: str) -> Response:
        arrived, arrived_at = time.monotonic(), time.time()
        self.metrics.start_flushing(self.backend.controller)
        config = await self.backend.config()
        raw = await read_body(request, config.settings.max_body_size)
        payload = parse_request(raw)
        model = await self.backend.resolve(payload["model"])
        settings, model_config = config.settings, config.models[model]
        timeout = model_config.queue_timeout or settings.queue.queue_timeout
        deadline = arrived_at + timeout
        request_id = f"req_{uuid.uuid4().hex}"
        stream = payload.get("stream") is True
        wants_async = "respond-async" in request.headers.get("prefer", "").lower()
        try:
            if wants_async or settings.queue.respond_async:
                handle, answer = await self.backend.on_model(
                    model,
                    deadline,
                    lambda h: h.enqueue_or_submit.remote(
                        request_id, path, payload, deadline, arrived_at
                    ),
                )
                if "queued" in answer:
                    return self.accepted(model, answer["queued"])
            else:
                handle, answer = await self.backend.on_model(
                    model, deadline, lambda h: h.enqueue.remote(request_id, deadline, arrived_at)
                )
                if "queued" in answer and stream:
                    # A quick answer (a lease, or a failure) still gets a plain HTTP status;
                    # only a longer wait becomes a stream of keep-alive comments.
                    ref = handle.wait_lease.remote(request_id)
                    waiting = asyncio.ensure_future(self.backend.call(ref))
                    try:
                        done, _ = await asyncio.wait({waiting}, timeout=QUICK_ANSWER)
                    except asyncio.CancelledError:
                        waiting.cancel()
                        ray.cancel(ref)
                        raise
                    if done:
                        answer = {"lease": waiting.result()}
                    else:
                        return StreamingResponse(
                            self.queued_stream(
                                model,
                                handle,
                                request_id,
                                answer["queued"],
                                waiting,
                                ref,
                                raw,
                                path,
                                arrived,
                                settings.queue.keepalive_interval,
                            ),
                            media_type="text/event-stream",
                            headers=STREAM_HEADERS,
                        )
                elif "queued" in answer:
                    answer = {"lease": await self.wait_lease(handle, request_id)}
        except ProxifierError as error:
            self.metrics.answered(model, error.status)
            raise
        lease = answer["lease"]
        self.metrics.waited(model, time.monotonic() - arrived)
        return await self.forward(model, handle, lease, path, raw, stream)

    def accepted(self, model: str, queued: dict[str, Any]) -> JSONResponse:
        self.metrics.answered(model, 202)
        body = {
            "message": "Request queued",
            "request_id": queued["request_id"],
            "position": queued["position"],
            "model_state": queued["model_state"],
        }
        return JSONResponse(body, 202, headers={"Location": f"/v1/queue/{queued['request_id']}"})

    async def wait_lease(self, handle: Any, request_id: str) -> dict[str, Any]:
        """Wait in the queue; a client that goes away takes its place (or slot) back."""
        ref = handle.wait_lease.remote(request_id)
        try:
            return await self.backend.call(ref)
        except asyncio.CancelledError:
            ray.cancel(ref)  # the actor gives the place back (or the slot, if just granted)
            raise

    async def queued_stream(
        self,
        model: str,
        handle: Any,
        request_id: str,
        queued: dict[str, Any],
        waiting: asyncio.Future[Any],
        ref: Any,
        raw: bytes,
        path: str,
        arrived: float,
        keepalive: float,
    ) -> AsyncIterator[bytes]:
        """A streaming request that must wait: SSE comments until the lease, then the tokens."""
        yield _comment(queued["position"], queued["model_state"])
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=keepalive)
                if done:
                    break
                with contextlib.suppress(Exception):
                    where = await handle.queue_position.remote(request_id)
                    yield _comment(where["position"], where["model_state"])
            lease = waiting.result()
        except ProxifierError as error:
            self.metrics.answered(model, error.status)
            yield sse_error(error)
            return
        except (asyncio.CancelledError, GeneratorExit):
            waiting.cancel()
            ray.cancel(ref)
            raise
        self.metrics.waited(model, time.monotonic() - arrived)
        try:
            upstream = await self._open(model, handle, lease, path, raw)
        except ProxifierError as error:
            self.metrics.answered(model, error.status)
            yield sse_error(error)
            return
        if upstream.status_code != 200:
            body = await upstream.aread()
            await upstream.aclose()
            self._release(handle, lease)
            self.metrics.answered(model, upstream.status_code)
            yield sse_error(_upstream_body(body, upstream.status_code))
            return
        async for chunk in self.relay(model, handle, lease, upstream):
            yield chunk

    async def forward(
        self, model: str, handle: Any, lease: dict[str, Any], path: str, raw: bytes, stream: bool
    ) -> Response:
        upstream = await self._open(model, handle, lease, path, raw)
        if stream and upstream.status_code == 200:
            return StreamingResponse(
                self.relay(model, handle, lease, upstream),
                media_type="text/event-stream",
                headers=STREAM_HEADERS,
            )
        try:
            content = await upstream.aread()
        except httpx.TimeoutException:
            self.metrics.answered(model, 504)
            raise UpstreamTimeout(f"model '{model}' did not answer in time") from None
        except httpx.HTTPError as exc:
            self.metrics.answered(model, 502)
            raise UpstreamFailed(f"model '{model}' failed while answering: {exc}") from None
        finally:
            await upstream.aclose()
            self._release(handle, lease)
        self.metrics.answered(model, upstream.status_code)
        return Response(
            content,
            upstream.status_code,
            media_type=upstream.headers.get("content-type", "application/json"),
        )

    async def relay(
        self, model: str, handle: Any, lease: dict[str, Any], upstream: httpx.Response
    ) -> AsyncIterator[bytes]:
        """Each upstream chunk to the client as it arrives; a disconnect ends the upstream
        request (closing its connection stops llama-server's generation) and frees the slot."""
        status = 200
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            status = 502
            yield sse_error(
                UpstreamFailed(f"model '{model}' failed in the middle of the stream: {exc}")
            )
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away
            raise
        finally:
            await upstream.aclose()
            self._release(handle, lease)
            self.metrics.answered(model, status)

    async def _open(
        self, model: str, handle: Any, lease: dict[str, Any], path: str, raw: bytes
    ) -> httpx.Response:
        config = await self.backend.config()
        request = self.client.build_request(
            "POST",
            f"{lease['url']}{path}",
            content=raw,
            headers={
                "Authorization": f"Bearer {lease['api_key']}",
                "Content-Type": "application/json",
            },
            timeout=httpx.Timeout(config.settings.upstream_timeout, connect=5.0),
        )
        try:
            try:
                return await self.client.send(request, stream=True)
            except httpx.RemoteProtocolError:
                # llama-server closes a keep-alive connection after 100 requests; a pooled
                # connection can be closed as we reuse it. A new one is tried once; a server
                # that is really gone refuses it and the client gets 502.
                return await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            self._release(handle, lease)
            self.metrics.answered(model, 504)
            raise UpstreamTimeout(f"model '{model}' did not answer in time") from None
        except httpx.HTTPError as exc:
            self._release(handle, lease)
            self.metrics.answered(model, 502)
            raise UpstreamFailed(f"model '{model}' refused the request: {exc}") from None

    def _release(self, handle: Any, lease: dict[str, Any]) -> None:
        self.backend.fire(handle.release.remote(lease["lease_id"]))


def _comment(position: int | None, state: str) -> bytes:
    return f": queued position={position or 0} state={state}\n\n".encode()


def _upstream_body(body: bytes, status: int) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        parsed = json.loads(body)
        if isinstance(parsed, dict) and "error" in parsed:
            return parsed
    return {
        "error": {
            "message": body.decode(errors="replace")[:500] or f"upstream status {status}",
            "type": "upstream_error",
            "code": "upstream_failed",
        }
    }
