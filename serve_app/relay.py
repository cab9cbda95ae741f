"""The relay: bytes from llama-server to the client as they come (DESIGN §3 steps 4-5, §5), the
SSE keep-alives of a queued stream, errors as SSE `error` events once a stream began, upstream
errors mapped, a stale pooled connection retried once. It may not take or keep slots: it is
handed one `Grant` (serve_app.call) and gives its slot back through the grant's `release`; it
asks the cluster only its config, and knows nothing of admission.

Bytes pass through untouched: SSE framing and `[DONE]` stay intact, and headers are computed
for what is actually sent (never the upstream Content-Length of a re-encoded body).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import aiohttp
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from proxifier.capabilities import unsupported
from proxifier.config import ModelsConfig
from proxifier.endpoints import Shape
from proxifier.errors import ProxifierError, UpstreamFailed, UpstreamTimeout
from proxifier.llama import public_props
from proxifier.reachability import reached
from serve_app.backend import Cluster
from serve_app.call import Accepted, Call, Grant, Granted, Waiting
from serve_app.http_errors import reshaped, sse_error
from serve_app.metrics import ReplicaMetrics

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
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


class StaleLease(Exception):
    """A lease taken over from an earlier request no longer reaches its llama-server."""


class Unreachable(UpstreamTimeout):
    """llama-server did not accept a connection within upstream_connect_timeout, or its host
    could not be reached at all (a lost host, a firewall): its instance is reported
    (serve_app.admit) before Ray may notice anything, and the request asks for a fresh one."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message, retry_after=1)
        self.url = url


REPLICA_HEADER = "x-proxifier-replica"


def replica_header(granted: Granted) -> dict[str, str]:
    """Which replica answered (its model actor's name: the model's own for its first)."""
    name = granted.lease.get("model")
    plain = isinstance(name, str) and name.isascii() and name.isprintable()
    return {REPLICA_HEADER: name} if plain else {}


class OwnedStream(StreamingResponse):
    """A streamed answer that owns a slot or a place in a queue. A body generator that never
    started never runs its `finally`, so when the client is gone before the first byte,
    `unstarted` gives back what the stream owns; a started one is closed here, at once."""

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        call: Call,
        unstarted: Callable[[], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> None:
        headers = STREAM_HEADERS if not headers else {**STREAM_HEADERS, **headers}
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.body, self.call, self.unstarted = body, call, unstarted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.call.streaming:
                await self.body.aclose()  # runs its cleanup now, not when collected
            else:
                await self.unstarted()


class Relay:
    """Sends requests to llama-server and relays the answers; one per replica, with one pooled
    HTTP client."""

    def __init__(self, cluster: Cluster, metrics: ReplicaMetrics) -> None:
        self.cluster = cluster
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

    async def answer(self, grant: Grant) -> Response:
        """The answer to a request admission settled: on its slot, after its wait in the queue
        (a stream of keep-alive comments, then the tokens), or its 202."""
        if isinstance(grant, Accepted):
            return self.accepted(grant.model, grant.queued)
        if isinstance(grant, Granted):
            return await self.forward(grant)

        async def unstarted() -> None:
            grant.abandon()

        return OwnedStream(self.queued_stream(grant), grant.call, unstarted)

    def accepted(self, model: str, queued: dict[str, Any]) -> JSONResponse:
        self.metrics.answered(model, 202)
        body = {
            "message": "Request queued",
            "request_id": queued["request_id"],
            "position": queued["position"],
            "model_state": queued["model_state"],
        }
        return JSONResponse(body, 202, headers={"Location": f"/v1/queue/{queued['request_id']}"})

    async def raw(
        self, request: Request, model: str, path: str, body: bytes, where: dict[str, Any]
    ) -> Response:
        """A passthrough to llama-server's `path` that takes no slot, relayed raw with the
        model's own key (`where`: its address and key); the client's key is never sent."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED} | {
            "Authorization": f"Bearer {where['api_key']}"
        }
        if path == "/props":  # read here (its path is cut): plain JSON, never compressed
            headers = {k: v for k, v in headers.items() if k.lower() != "accept-encoding"}
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
        if request.method == "GET" and path == "/props" and upstream.status == 200:
            return await _props_answer(upstream)
        # llama-server echoes any Origin in Access-Control-Allow-Origin: never relayed, or
        # any web page could read a model's answers through the proxifier.
        kept = {
            k: v
            for k, v in upstream.headers.items()
            if k.lower() not in _HOP_BY_HOP and not k.lower().startswith("access-control-")
        }
        return Relayed(upstream, kept)

    async def queued_stream(self, wait: Waiting) -> AsyncGenerator[bytes, None]:
        """SSE comments while the request waits, then the tokens; an error after the stream
        began is an SSE `error` event with the same body as the HTTP error would have had."""
        call = wait.call
        call.streaming = True
        try:
            yield _comment(wait.queued["position"], wait.queued["model_state"])
            while (granted := await wait.granted(wait.keepalive)) is None:
                with contextlib.suppress(Exception):  # no answer in time: a comment less
                    where = await asyncio.wait_for(wait.position(), wait.keepalive)
                    yield _comment(where["position"], where["model_state"])
        except (asyncio.CancelledError, GeneratorExit):
            wait.abandon()
            raise
        except ProxifierError as error:  # the wait failed, or asking again for a slot did
            self.metrics.answered(call.model, error.status)
            yield sse_error(error, call.shape)
            return
        release = granted.release
        try:
            self.metrics.waited(call.model, time.monotonic() - call.arrived)
            upstream = await self._open(granted)  # it gives the slot back if it fails
        except ProxifierError as error:
            if isinstance(error, Unreachable):  # the stream began: others may go elsewhere
                self.cluster.report_unreachable(call.model, call.handle, error.url)
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
                release()
            failure = _upstream_failure(call, upstream.status, body)
            status = failure.status if isinstance(failure, ProxifierError) else upstream.status
            self.metrics.answered(call.model, status)
            yield sse_error(failure, call.shape)
            return
        async with contextlib.aclosing(self.relay(granted, upstream)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def forward(self, granted: Granted) -> Response:
        call, release = granted.call, granted.release
        model = call.model
        waited = time.monotonic() - call.arrived
        upstream = await self._open(granted)
        self.metrics.waited(model, waited)
        if call.stream and upstream.status == 200:

            async def unstarted() -> None:
                done_with(upstream)
                release()
                self.metrics.answered(model, 499)

            return OwnedStream(
                self.relay(granted, upstream), call, unstarted, replica_header(granted)
            )
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
            release(clean=clean)
        status = upstream.status
        if status == 501 or (status >= 400 and call.shape is not Shape.OPENAI):
            failure = _upstream_failure(call, status, content)
            if isinstance(failure, ProxifierError):
                raise failure
            self.metrics.answered(model, status)
            return JSONResponse(failure, status)
        self.metrics.answered(model, status)
        return Response(
            content,
            status,
            media_type=upstream.headers.get("content-type", "application/json"),
            headers=replica_header(granted),
        )

    async def relay(
        self, granted: Granted, upstream: aiohttp.ClientResponse
    ) -> AsyncGenerator[bytes, None]:
        """Each upstream chunk to the client as it arrives; a disconnect ends the upstream
        request (closing its connection stops llama-server's generation) and frees the slot."""
        call = granted.call
        call.streaming = True
        status = 200
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        except TimeoutError:
            status = 504
            _, idle = _deadlines(await self.cluster.config(), call.model)
            yield sse_error(
                UpstreamTimeout(
                    f"model '{call.model}' sent nothing for {idle:g} s in the middle of the"
                    " stream (upstream_idle_timeout)"
                ),
                call.shape,
            )
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
            granted.release(clean=status == 200)
            self.metrics.answered(call.model, status)

    async def _open(self, granted: Granted) -> aiohttp.ClientResponse:
        """Send the request to llama-server and return its response, headers read. Whatever
        stops it (an upstream error, a stale held slot, the client going away) gives the slot
        back; after it returns, the caller owns the release."""
        call = granted.call
        if call.granted_at is None:
            call.granted_at = time.monotonic()
        try:
            return await self._send(call, granted.lease)
        except StaleLease:
            granted.release(count=False)  # served nothing; it starts over
            raise
        except BaseException:
            granted.release()
            raise

    async def _send(self, call: Call, lease: dict[str, Any]) -> aiohttp.ClientResponse:
        """The request sent and its answer's headers, unless the controller confirms its
        instance unreachable first (another request's report: a host cut off, where a pooled
        connection waits for an answer that cannot come and no connect deadline applies):
        then Unreachable, and the request starts over on a fresh instance (nothing reached
        the client yet)."""
        if call.handle is None:
            return await self._post(call, lease)
        posting = asyncio.ensure_future(self._post(call, lease))
        lost = self.cluster.lost_signal(call.handle)
        gave_up = False
        try:
            await asyncio.wait({posting, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not posting.done():
                posting.cancel()
                posting.add_done_callback(_close_late)
                gave_up = True
        if gave_up:
            raise Unreachable(
                f"model '{call.model}': its instance became unreachable while the request"
                " waited for its answer",
                lease["url"],
            )
        return posting.result()

    async def _post(self, call: Call, lease: dict[str, Any]) -> aiohttp.ClientResponse:
        config = await self.cluster.config()
        model = call.model
        upstream_timeout, idle_timeout = _deadlines(config, model)
        url = f"{lease['url']}{call.path}"
        headers = {
            "Authorization": f"Bearer {lease['api_key']}",
            "Content-Type": "application/json",
        }
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=config.settings.upstream_connect_timeout,
            sock_read=upstream_timeout,
        )
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
            if isinstance(exc, aiohttp.ClientConnectorError) and not reached(exc.os_error):
                raise Unreachable(
                    f"model '{model}' could not be reached: {exc.os_error}", lease["url"]
                ) from None
            if call.reused:
                # A slot held from an earlier request outlived its llama-server (a crash, a
                # restart, a stop, a lost node): nothing reached the client yet, so the
                # request starts over through the queue.
                raise StaleLease from None
            raise UpstreamFailed(f"model '{model}' refused the request: {exc}") from None
        except aiohttp.ConnectionTimeoutError:
            raise Unreachable(
                f"model '{model}' did not accept a connection within"
                f" {config.settings.upstream_connect_timeout:g} s (upstream_connect_timeout)",
                lease["url"],
            ) from None
        except TimeoutError:
            raise UpstreamTimeout(f"model '{model}' did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"model '{model}' refused the request: {exc}") from None
        if call.reused and upstream.status == 401:
            # Restarted on the same port with a new instance key: the held slot is stale.
            upstream.close()
            raise StaleLease
        _after_first_byte(upstream, idle_timeout)
        return upstream


def _close_late(posting: asyncio.Future[aiohttp.ClientResponse]) -> None:
    """A send given up on: an answer that still came goes back to the pool's care."""
    if not posting.cancelled() and posting.exception() is None:
        posting.result().close()


async def _props_answer(upstream: aiohttp.ClientResponse) -> Response:
    """/props with the model's path cut to its file name (proxifier.llama.public_props)."""
    try:
        props = json.loads(await upstream.read())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        raise UpstreamFailed("llama-server's /props could not be read") from None
    finally:
        done_with(upstream)
    shown = public_props(props) if isinstance(props, dict) else props
    return JSONResponse(shown)


def _deadlines(config: ModelsConfig, model: str) -> tuple[float, float]:
    """How long the model's llama-server may take to its first byte, and then between two
    pieces of its answer: the model's own values, else the settings'."""
    own = config.models.get(model)
    settings = config.settings
    first = (own.upstream_timeout if own else None) or settings.upstream_timeout
    idle = (own.upstream_idle_timeout if own else None) or settings.upstream_idle_timeout
    return first, idle


def _after_first_byte(upstream: aiohttp.ClientResponse, idle: float) -> None:
    """From the headers on, the socket's read deadline is the between-chunk one: set once
    here, so relaying a chunk costs nothing more (aiohttp restarts the timer on each read)."""
    connection = upstream.connection
    protocol = connection.protocol if connection is not None else None
    # A body already complete has no timer (aiohttp dropped it at its end): none is started
    # on a connection that goes back to the pool.
    if protocol is not None and not upstream.content.is_eof():
        protocol.read_timeout = idle
        protocol.start_timeout()  # the timer running now was set with the first-byte deadline


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
