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
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from proxifier.auth import ADMIN, Caller, may_use_model
from proxifier.endpoints import (
    BY_PATH,
    RAW_POSTS,
    Endpoint,
    Shape,
    model_named,
    refusal,
    stateless_refusal,
    unsupported,
)
from proxifier.errors import (
    ActorGone,
    Forbidden,
    InvalidRequest,
    ModelRetired,
    PayloadTooLarge,
    ProxifierError,
    Unavailable,
    UpstreamFailed,
    UpstreamTimeout,
)
from proxifier.lease_reuse import HeldLease
from serve_app.backend import ATTEMPTS, Owned, RayBackend
from serve_app.http_errors import reshaped, sse_error
from serve_app.metrics import ReplicaMetrics
from serve_app.security import caller_of

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
QUICK_ANSWER = 1.0  # seconds a queued stream waits before it commits to a 200 and keep-alives
LEASES = "proxifier.leases"  # where LeaseGuard leaves a request's Owned in the ASGI scope
# Headers a passthrough does not relay: per connection (RFC 9110 §7.6.1), and the client's
# credentials for the proxifier, which llama-server must never see.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {
    "host",
    "authorization",
    "x-api-key",
    "cookie",
    "origin",
    "referer",
    "content-length",
    "x-request-timeout-seconds",
}


class Relayed(StreamingResponse):
    """An upstream answer relayed as it comes; the upstream response is closed when the
    client is done or gone, also when it left before the first byte (the body generator then
    never runs, so it cannot be the one to close it)."""

    def __init__(self, upstream: aiohttp.ClientResponse, headers: dict[str, str]) -> None:
        super().__init__(upstream.content.iter_any(), upstream.status, headers=headers)
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            done_with(self.upstream)


def done_with(upstream: aiohttp.ClientResponse) -> None:
    """Its connection goes back to the pool when its body was read to the end; otherwise it
    is closed, which also stops llama-server generating for a client that is gone."""
    if upstream.content.at_eof():
        upstream.release()
    else:
        upstream.close()


# Upstream errors, as aiohttp raises them (its timeouts are also TimeoutError).
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)
# How a connection the server had closed (or never accepted) shows when a request is sent.
STALE_CONNECTION = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientConnectionResetError,
)


class LeaseGuard:
    """ASGI middleware: every request owns its slots through one `Owned`, and whatever it
    still holds when the app returns (the answer sent, an error, the client gone at any
    moment) goes back then, whichever path inside forgot it."""

    def __init__(self, app: ASGIApp, backend: RayBackend) -> None:
        self.app, self.backend = app, backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        owned = self.backend.open_request()
        scope[LEASES] = owned
        try:
            await self.app(scope, receive, send)
        finally:
            self.backend.close_request(owned)


class StaleLease(Exception):
    """A lease taken over from an earlier request no longer reaches its llama-server."""


class Requeue(Exception):
    """The model instance a request waited for was retired or went away before granting it a
    slot: the request starts over with the instance the controller has now."""


# A request waiting for a slot hears this when its instance stops or dies: it is not the
# request's failure (DESIGN §4, the stop handshake), so it waits again for a fresh instance.
MOVED = (ModelRetired, ActorGone)


class OwnedStream(StreamingResponse):
    """A streamed answer that owns a slot or a place in a queue. A body generator that never
    started never runs its `finally`, so when the client is gone before the first byte,
    `unstarted` gives back what the stream owns; a started one is closed here, at once."""

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        call: Call,
        unstarted: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers=STREAM_HEADERS)
        self.body, self.call, self.unstarted = body, call, unstarted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.call.streaming:
                await self.body.aclose()  # runs its cleanup now, not when collected
            else:
                await self.unstarted()


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


@dataclass
class Call:
    """One inference request on its way through: where it goes and what it carries."""

    model: str
    endpoint: Endpoint
    raw: bytes
    request_id: str
    arrived: float  # monotonic, for the queue-wait metric
    handle: Any = None  # the model actor that holds its place or slot
    queued: bool = False  # its lease was granted from the queue (others may wait too)
    reused: bool = False  # its lease was taken over from an earlier request of this replica
    granted_at: float | None = None  # monotonic, when its lease was granted
    served: int = 0  # requests the lease served before this one
    streaming: bool = False  # its response body has started (OwnedStream)
    deadline: float = 0.0  # wall clock: when it must have been answered (queue_timeout)
    arrived_at: float = 0.0  # wall clock, for the actor's honest wait times
    owned: Owned = field(default_factory=Owned)  # the slots the request holds (LeaseGuard)

    @property
    def path(self) -> str:
        return self.endpoint.path

    @property
    def shape(self) -> Shape:
        return self.endpoint.errors

    def take_over(self, held: HeldLease) -> Call:
        self.handle, self.granted_at, self.served = held.handle, held.granted_at, held.served
        self.reused = True
        return self


class Proxy:
    """Forwards inference requests; one per replica, with one pooled HTTP client."""

    def __init__(self, backend: RayBackend, metrics: ReplicaMetrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """One pooled HTTP client for every llama-server, made in the replica's event loop.
        aiohttp, not httpx: a quarter of the CPU per request (scripts/bench_proxy.py)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # Idle connections go before llama-server's own 5 s keep-alive ends them.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=600.0),
                # Bytes pass through as llama-server sent them: never decoded here, so no
                # compressed answer is asked for either.
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(
        self, request: Request, endpoint: Endpoint, model: str | None = None
    ) -> Response:
        """One inference request on `endpoint`; `model`: already resolved (a passthrough)."""
        arrived, arrived_at = time.monotonic(), time.time()
        self.metrics.start_flushing(self.backend.controller)
        config = await self.backend.config()
        raw = await read_body(request, config.settings.max_body_size)
        payload = parse_request(raw)
        caller = caller_of(request.scope)
        if model is None:
            named = model_named(endpoint, payload, request.query_params.get("model"))
            model = await self.backend.resolve(named, caller)
            check_model_access(caller, model)
        problem = stateless_refusal(endpoint, payload) or refusal(
            endpoint, model, config.models[model]
        )
        if problem is not None:  # before anything starts the model for it
            raise problem
        settings, model_config = config.settings, config.models[model]
        path = endpoint.path
        timeout = model_config.queue_timeout or settings.queue.queue_timeout
        deadline = arrived_at + timeout
        owned = request.scope.get(LEASES)
        assert isinstance(owned, Owned), "the app must run behind LeaseGuard"
        call = Call(model, endpoint, raw, f"req_{uuid.uuid4().hex}", arrived, owned=owned)
        call.deadline, call.arrived_at = deadline, arrived_at
        stream = endpoint.streams and payload.get("stream") is True
        wants_async = "respond-async" in request.headers.get("prefer", "").lower()
        try:
            # A slot this replica holds from its last request, or one that a request of this
            # replica hands over as it finishes: no actor call at all.
            held = self.backend.take_over(model)
            if held is None and not (wants_async or settings.queue.respond_async):
                held = await self.backend.wait_in_line(model, deadline)
            if held is not None:
                self._own(call.take_over(held), held.handle, held.lease)
                with contextlib.suppress(StaleLease):
                    return await self.forward(call, held.lease, stream)
                call = Call(model, endpoint, raw, call.request_id, arrived, owned=owned)
                call.deadline, call.arrived_at = deadline, arrived_at
            if wants_async or settings.queue.respond_async:
                call.handle, answer = await self.backend.on_model(
                    model,
                    deadline,
                    lambda h: h.enqueue_or_submit.remote(
                        call.request_id,
                        path,
                        payload,
                        deadline,
                        arrived_at,
                        self.backend.take_releases(model, h),
                        holder=self.backend.holder,
                        owner=caller.name if caller is not None else None,
                    ),
                    lambda h, lease: self._own(call, h, lease),
                )
                if "queued" in answer:
                    self.backend.joined_queue(model)  # the actor runs it; we only take note
                    self.backend.left_queue(model)
                    return self.accepted(model, answer["queued"])
                return await self.forward(call, answer["lease"], stream)
            for _ in range(ATTEMPTS):
                answer = await self.enqueue(call)
                if "queued" not in answer:
                    return await self.forward(call, answer["lease"], stream)
                call.queued = True
                with contextlib.suppress(Requeue):
                    if stream:
                        return await self.stream_when_granted(
                            call, answer["queued"], settings.queue.keepalive_interval
                        )
                    return await self.forward(call, await self.wait_lease(call), stream)
            raise Unavailable(
                f"model '{model}' kept stopping while the request waited; try again",
                retry_after=1,
            )
        except ProxifierError as error:
            self.metrics.answered(model, error.status)
            raise

    async def passthrough(self, request: Request, name: str, rest: str) -> Response:
        """`/upstream/{model}/{rest}`: the model's llama-server itself, started on demand.
        An inference path there is that path with the model fixed (queue, slot and all);
        anything else (its /slots, /props, /metrics, web UI) is relayed raw and takes no
        slot. The model's own key is sent; the client's never is."""
        caller = caller_of(request.scope)
        model = await self.backend.resolve(name, caller)
        check_model_access(caller, model)
        path = "/" + rest
        endpoint = BY_PATH.get(path)
        if endpoint is not None and request.method == "POST":
            return await self.handle(request, endpoint, model=model)
        if request.method == "POST" and path not in RAW_POSTS and not _is_admin(caller):
            raise Forbidden(
                f"a raw POST to llama-server's {path} changes model '{model}' for every user "
                "(slots, adapters, settings): it needs the admin permission"
            )
        config = await self.backend.config()
        settings = config.settings
        timeout = config.models[model].queue_timeout or settings.queue.queue_timeout
        body = await read_body(request, settings.max_body_size)
        _, where = await self.backend.on_model(
            model, time.time() + timeout, lambda h: h.endpoint.remote()
        )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED} | {
            "Authorization": f"Bearer {where['api_key']}"
        }
        try:
            upstream = await self.session.request(
                request.method,
                f"{where['url']}{path}",
                params=request.query_params.multi_items(),
                data=body or None,  # no body: no Content-Length or Content-Type either
                headers=headers,
            )
        except TimeoutError:
            raise UpstreamTimeout(f"model '{model}' did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"model '{model}' refused the request: {exc}") from None
        self.metrics.answered(model, upstream.status)
        # llama-server echoes any Origin in Access-Control-Allow-Origin: never relayed, or
        # any web page could read a model's answers through the proxifier.
        kept = {
            k: v
            for k, v in upstream.headers.items()
            if k.lower() not in _HOP_BY_HOP and not k.lower().startswith("access-control-")
        }
        return Relayed(upstream, kept)

    async def enqueue(self, call: Call) -> dict[str, Any]:
        """Ask the model's current instance for a slot: a lease, or a place in its queue."""
        call.handle, answer = await self.backend.on_model(
            call.model,
            call.deadline,
            lambda h: h.enqueue.remote(
                call.request_id,
                call.deadline,
                call.arrived_at,
                self.backend.take_releases(call.model, h),
                holder=self.backend.holder,
            ),
            lambda h, lease: self._own(call, h, lease),
            lambda h: self._queued(call, h),
        )
        self.backend.answered(call.model, queued="queued" in answer)
        return answer

    def _moved(self, call: Call) -> Requeue:
        """The instance the request waited for is gone: forget it, so the next try asks the
        controller (which places a fresh one)."""
        call.owned.left(call.request_id)
        self.backend.forget(call.model, call.handle, moved=True)
        return Requeue()

    async def stream_when_granted(
        self, call: Call, queued: dict[str, Any], keepalive: float
    ) -> Response:
        """A streaming request that must wait. A quick answer (a lease, or a failure) still
        gets a plain HTTP status; only a longer wait becomes a stream of keep-alive comments."""
        ref = call.handle.wait_lease.remote(call.request_id)
        waiting = self.waiting(call, ref)
        try:
            done, _ = await asyncio.wait({waiting}, timeout=QUICK_ANSWER)
        except asyncio.CancelledError:
            self._abandon(call, waiting)
            raise
        if done:
            try:
                lease = waiting.result()
            except MOVED:
                raise self._moved(call) from None
            return await self.forward(call, lease, stream=True)

        async def unstarted() -> None:
            self._abandon(call, waiting)

        body = self.queued_stream(call, queued, waiting, keepalive)
        return OwnedStream(body, call, unstarted)

    def accepted(self, model: str, queued: dict[str, Any]) -> JSONResponse:
        self.metrics.answered(model, 202)
        body = {
            "message": "Request queued",
            "request_id": queued["request_id"],
            "position": queued["position"],
            "model_state": queued["model_state"],
        }
        return JSONResponse(body, 202, headers={"Location": f"/v1/queue/{queued['request_id']}"})

    async def wait_lease(self, call: Call) -> dict[str, Any]:
        """Wait in the queue; a client that goes away takes its place (or slot) back."""
        ref = call.handle.wait_lease.remote(call.request_id)
        waiting = self.waiting(call, ref)
        try:
            return await waiting
        except asyncio.CancelledError:
            self._abandon(call, waiting)
            raise
        except MOVED:
            raise self._moved(call) from None

    def _abandon(self, call: Call, waiting: asyncio.Future[Any]) -> None:
        """The client went away while its request waited: give back its place in the queue,
        or the slot, when the lease had already come and nobody will use it."""
        if waiting.done() and not waiting.cancelled() and waiting.exception() is None:
            self._release(call, waiting.result(), count=False)
            return
        # The actor gives the place back, or the slot if it grants it first. A lease already
        # on its way still reaches `waiting`, which hands it to the request's Owned: that one
        # is closed (or closes with the request), so the slot goes straight back.
        call.owned.left(call.request_id)()

    def waiting(self, call: Call, ref: Any) -> asyncio.Future[Any]:
        """The wait for a lease, during which this replica holds no slot of the model (it
        must not serve a newcomer ahead of the queue)."""
        self.backend.joined_queue(call.model)
        future = asyncio.ensure_future(
            self.backend.leased(call.handle, ref, lambda h, lease: self._own(call, h, lease))
        )
        future.add_done_callback(lambda _: self.backend.left_queue(call.model))
        future.add_done_callback(lambda _: call.owned.left(call.request_id))
        return future

    def _queued(self, call: Call, handle: Any) -> None:
        """The request waits in the queue: should it end before its wait does (its client
        gone before or while it waits), its place, or the slot just granted to it, goes back."""
        call.handle = handle
        call.owned.queued(
            call.request_id, lambda: self.backend.fire(handle.abandon.remote(call.request_id))
        )

    def _own(self, call: Call, handle: Any, lease: dict[str, Any]) -> None:
        """The request got a slot: from now on it is the request's to give back."""
        call.handle = handle
        self.backend.using(call.model, lease["lease_id"])
        call.owned.add(lease["lease_id"], handle, lambda: self._release(call, lease, count=False))

    async def queued_stream(
        self,
        call: Call,
        queued: dict[str, Any],
        waiting: asyncio.Future[Any],
        keepalive: float,
    ) -> AsyncGenerator[bytes, None]:
        """SSE comments while the request waits, then the tokens; an error after the stream
        began is an SSE `error` event with the same body as the HTTP error would have had."""
        call.streaming = True
        moves = 0
        try:
            yield _comment(queued["position"], queued["model_state"])
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=keepalive)
                if done and _moved_away(waiting) and moves < ATTEMPTS:
                    # The stream has begun: wait again, for the instance there is now.
                    moves += 1
                    self._moved(call)
                    waiting = await self._wait_again(call)
                    continue
                if done:
                    break
                with contextlib.suppress(Exception):
                    where = await call.handle.queue_position.remote(call.request_id)
                    yield _comment(where["position"], where["model_state"])
        except (asyncio.CancelledError, GeneratorExit):
            self._abandon(call, waiting)
            raise
        except ProxifierError as error:  # asking again for a slot failed: say why
            self.metrics.answered(call.model, error.status)
            yield sse_error(error, call.shape)
            return
        try:
            lease = waiting.result()
            self.metrics.waited(call.model, time.monotonic() - call.arrived)
            upstream = await self._open(call, lease)  # it gives the slot back if it fails
        except ProxifierError as error:
            self.metrics.answered(call.model, error.status)
            yield sse_error(error, call.shape)
            return
        if upstream.status != 200:
            try:
                body = await upstream.read()
            except UPSTREAM_ERRORS:
                body = b""
            finally:
                done_with(upstream)
                self._release(call, lease)
            failure = _upstream_failure(call, upstream.status, body)
            status = failure.status if isinstance(failure, ProxifierError) else upstream.status
            self.metrics.answered(call.model, status)
            yield sse_error(failure, call.shape)
            return
        async with contextlib.aclosing(self.relay(call, lease, upstream)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _wait_again(self, call: Call) -> asyncio.Future[Any]:
        """After a move: a slot at once (as a finished future) or a new wait in the queue."""
        answer = await self.enqueue(call)
        if "queued" in answer:
            return self.waiting(call, call.handle.wait_lease.remote(call.request_id))
        granted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        granted.set_result(answer["lease"])
        return granted

    async def forward(self, call: Call, lease: dict[str, Any], stream: bool) -> Response:
        model = call.model
        waited = time.monotonic() - call.arrived
        upstream = await self._open(call, lease)
        self.metrics.waited(model, waited)
        if stream and upstream.status == 200:

            async def unstarted() -> None:
                done_with(upstream)
                self._release(call, lease)
                self.metrics.answered(model, 499)

            return OwnedStream(self.relay(call, lease, upstream), call, unstarted)
        clean = False
        try:
            content = await upstream.read()
            clean = upstream.status < 500
        except TimeoutError:
            raise UpstreamTimeout(f"model '{model}' did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"model '{model}' failed while answering: {exc}") from None
        finally:
            done_with(upstream)
            self._release(call, lease, clean=clean)
        status = upstream.status
        if status == 501 or (status >= 400 and call.shape is not Shape.OPENAI):
            failure = _upstream_failure(call, status, content)
            if isinstance(failure, ProxifierError):
                raise failure
            self.metrics.answered(model, status)
            return JSONResponse(failure, status)
        self.metrics.answered(model, status)
        return Response(
            content, status, media_type=upstream.headers.get("content-type", "application/json")
        )

    async def relay(
        self, call: Call, lease: dict[str, Any], upstream: aiohttp.ClientResponse
    ) -> AsyncGenerator[bytes, None]:
        """Each upstream chunk to the client as it arrives; a disconnect ends the upstream
        request (closing its connection stops llama-server's generation) and frees the slot."""
        call.streaming = True
        status = 200
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        except UPSTREAM_ERRORS as exc:
            status = 502
            yield sse_error(
                UpstreamFailed(f"model '{call.model}' failed in the middle of the stream: {exc}"),
                call.shape,
            )
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away
            raise
        finally:
            done_with(upstream)
            self._release(call, lease, clean=status == 200)
            self.metrics.answered(call.model, status)

    async def _open(self, call: Call, lease: dict[str, Any]) -> aiohttp.ClientResponse:
        """Send the request to llama-server and return its response, headers read. Whatever
        stops it (an upstream error, a stale held slot, the client going away) gives the slot
        back; after it returns, the caller owns the release."""
        if call.granted_at is None:
            call.granted_at = time.monotonic()
        try:
            return await self._send(call, lease)
        except StaleLease:
            self._release(call, lease, count=False)  # served nothing; it starts over
            raise
        except BaseException:
            self._release(call, lease)
            raise

    async def _send(self, call: Call, lease: dict[str, Any]) -> aiohttp.ClientResponse:
        config = await self.backend.config()
        model = call.model
        model_config = config.models.get(model)
        upstream_timeout = (
            model_config.upstream_timeout if model_config is not None else None
        ) or config.settings.upstream_timeout
        url = f"{lease['url']}{call.path}"
        headers = {
            "Authorization": f"Bearer {lease['api_key']}",
            "Content-Type": "application/json",
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=upstream_timeout)
        try:
            try:
                upstream = await self.session.post(
                    url, data=call.raw, headers=headers, timeout=timeout
                )
            except STALE_CONNECTION as exc:
                if isinstance(exc, aiohttp.ClientConnectorError):
                    raise  # no connection at all: not a pooled one gone stale
                # llama-server closes a connection after a stream, and a keep-alive one after
                # 100 requests; a pooled connection can be closed as we reuse it (the request
                # cannot be written, or no answer comes). A new one is tried once; a server
                # that is really gone refuses it and the client gets 502.
                upstream = await self.session.post(
                    url, data=call.raw, headers=headers, timeout=timeout
                )
        except STALE_CONNECTION as exc:
            # refused, or a fresh connection closed unanswered too
            if call.reused:
                # A slot held from an earlier request outlived its llama-server (a crash, a
                # restart, a stop, a lost node): nothing reached the client yet, so the
                # request starts over through the queue.
                raise StaleLease from None
            raise UpstreamFailed(f"model '{model}' refused the request: {exc}") from None
        except aiohttp.ConnectionTimeoutError:
            if call.reused:
                raise StaleLease from None
            raise UpstreamTimeout(f"model '{model}' could not be reached in time") from None
        except TimeoutError:
            raise UpstreamTimeout(f"model '{model}' did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"model '{model}' refused the request: {exc}") from None
        if call.reused and upstream.status == 401:
            # Restarted on the same port with a new instance key: the held slot is stale.
            upstream.close()
            raise StaleLease
        return upstream

    def _release(
        self, call: Call, lease: dict[str, Any], *, clean: bool = False, count: bool = True
    ) -> None:
        """The request is over: the backend holds the lease for the next request (when it
        ended cleanly) or gives it back (proxifier.lease_reuse). `count`: whether this
        request counts as served on it (not when it never reached llama-server). Only the
        first release of a lease counts; later ones (the guard's) do nothing."""
        if not call.owned.drop(lease["lease_id"]):
            return
        self.backend.finish(
            call.model,
            call.handle,
            lease,
            granted_at=call.granted_at if call.granted_at is not None else time.monotonic(),
            served=call.served + (1 if count else 0),
            from_queue=call.queued,
            clean=clean,
        )


def _moved_away(waiting: asyncio.Future[Any]) -> bool:
    return not waiting.cancelled() and isinstance(waiting.exception(), MOVED)


def _is_admin(caller: Caller | None) -> bool:
    """Admin, or no keys at all (auth off: the one local user)."""
    return caller is None or ADMIN in caller.permissions


def check_model_access(caller: Caller | None, model: str) -> None:
    """403 when the caller's key has a `models:` allow-list that does not name this model."""
    if caller is not None and not may_use_model(caller, model):
        raise Forbidden(f"API key '{caller.name}' may not use model '{model}'")


def _comment(position: int | None, state: str) -> bytes:
    return f": queued position={position or 0} state={state}\n\n".encode()


def _upstream_failure(call: Call, status: int, body: bytes) -> ProxifierError | dict[str, Any]:
    """What llama-server's error answer becomes for the client: its 501 (the model was not
    started for this path, or lacks what it needs) a 400 that says what to do; any other
    error its own body, in the shape the path's clients parse."""
    parsed: Any = body.decode(errors="replace")
    with contextlib.suppress(ValueError):
        parsed = json.loads(body)
    if status == 501:
        message = parsed
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            message = parsed["error"].get("message", "")
        return unsupported(call.endpoint, call.model, str(message)[:300])
    return reshaped(parsed, status, call.shape)
