"""The ingress's gate: CORS preflights first, then API keys, permissions and rate limits, as one
plain ASGI middleware (no per-request thread hops, streams untouched). Decisions come from
`proxifier.auth`; the counters live in the rate-limiter actor."""

from __future__ import annotations

import asyncio
import json
import math

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxifier.auth import (
    Caller,
    Denied,
    authorize,
    identify,
    is_public,
    presented_key,
    repeated_credentials,
)
from proxifier.browser_guard import browser_refusal
from proxifier.config import AuthConfig
from proxifier.endpoints import error_shape
from proxifier.errors import ProxifierError
from serve_app.backend import Cluster
from serve_app.http_errors import error_body
from serve_app.metrics import ReplicaMetrics

CALLER = "proxifier.caller"  # where the authenticated key is left in the ASGI scope
RATE_LIMIT_WAIT = 5.0  # seconds the rate limiter may take to answer before a 503 (never a pass)


def caller_of(scope: Scope) -> Caller | None:
    return scope.get("state", {}).get(CALLER)


class Security:
    def __init__(
        self,
        app: ASGIApp,
        backend: Cluster,
        bound_host: str | None = None,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        self.app = app
        self.backend = backend
        self.bound_host = bound_host
        self.metrics = metrics  # counts rate-limit refusals (they never reach the proxy)
        self._cors: tuple[tuple[str, ...], ASGIApp] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        auth = await self.backend.auth()
        await self._with_cors(auth, scope, receive, send)

    async def _with_cors(
        self, auth: AuthConfig, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Starlette's CORS middleware (it answers preflights itself, before any key check),
        rebuilt when the allowed origins change in auth.yaml."""
        origins = tuple(auth.cors_origins)
        if not origins:
            await self._gate(auth, scope, receive, send)
            return
        if self._cors is None or self._cors[0] != origins:

            async def gated(scope: Scope, receive: Receive, send: Send) -> None:
                await self._gate(await self.backend.auth(), scope, receive, send)

            cors = CORSMiddleware(
                gated,
                allow_origins=list(origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=[
                    "authorization",
                    "x-api-key",
                    "content-type",
                    "prefer",
                    "anthropic-version",
                    "anthropic-beta",
                ],
                expose_headers=[
                    "x-ratelimit-limit",
                    "x-ratelimit-remaining",
                    "x-ratelimit-reset",
                    "retry-after",
                    "location",
                ],
                allow_credentials=False,
            )
            self._cors = (origins, cors)
        await self._cors[1](scope, receive, send)

    async def _gate(self, auth: AuthConfig, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        dashboard = method == "GET" and (path == "/dashboard" or path.startswith("/dashboard/"))
        # The page and its scripts hold no data and are how a browser gets to ask for a key;
        # the dashboard's data (its stream) needs one unless dashboard_auth_required is off.
        shell = dashboard and (path == "/dashboard" or path.startswith("/dashboard/static/"))
        open_dashboard = dashboard and (shell or not auth.dashboard_auth_required)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not auth.enabled:
            host = self.bound_host or (await self.backend.config()).settings.host
            refusal = browser_refusal(method, headers, host, auth.cors_origins, path)
            if refusal is not None:
                await _refuse(scope, send, Denied(*refusal))
                return
        if not auth.enabled or is_public(path, auth) or open_dashboard:
            if auth.enabled and path == "/metrics" and is_public(path, auth):
                _note_caller(auth, scope, headers)  # a key that may read it sees the names
            await self.app(scope, receive, send)
            return
        names = [k.decode("latin-1").lower() for k, _ in scope["headers"]]
        key = repeated_credentials(names) or presented_key(
            headers.get("authorization"), headers.get("x-api-key")
        )
        if key is None:
            key = Denied(
                401,
                "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                "missing_api_key",
            )
        caller = identify(key, auth) if isinstance(key, str) else key
        if isinstance(caller, Denied):
            await _refuse(scope, send, caller, {"WWW-Authenticate": "Bearer"})
            return
        denied = authorize(caller, method, path)
        if denied is not None:
            await _refuse(scope, send, denied)
            return
        limit_headers: dict[str, str] = {}
        if caller.limit is not None:
            try:
                limiter = await self.backend.rate_limiter()
                allowed, remaining, reset = await self.backend.call(
                    limiter.check.remote(caller.name, caller.limit), RATE_LIMIT_WAIT
                )
            except ProxifierError as error:  # the limiter cannot say: refused, never let by
                retry = error.retry_after_header()
                await _refuse(
                    scope,
                    send,
                    Denied(error.status, error.message, error.code),
                    {"Retry-After": retry} if retry else None,
                )
                return
            limit_headers = {
                "X-RateLimit-Limit": str(caller.limit),
                "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": str(math.ceil(reset)),
            }
            if not allowed:
                if self.metrics is not None:
                    self.metrics.rate_limited(caller.name)
                    self.metrics.start_flushing(self.backend.controller)
                retry = str(max(1, math.ceil(reset)))
                await _refuse(
                    scope,
                    send,
                    Denied(
                        429,
                        f"Rate limit of {caller.limit} requests per minute reached for API key "
                        f"'{caller.name}'; retry in {retry} s",
                        "rate_limit_exceeded",
                    ),
                    {**limit_headers, "Retry-After": retry},
                )
                return
        scope.setdefault("state", {})[CALLER] = caller
        await self.app(scope, receive, _adding_headers(send, limit_headers))


def _adding_headers(send: Send, extra: dict[str, str]) -> Send:
    if not extra:
        return send
    encoded = [(k.lower().encode(), v.encode()) for k, v in extra.items()]

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *encoded]}
        await send(message)

    return wrapped


def _note_caller(auth: AuthConfig, scope: Scope, headers: dict[str, str]) -> None:
    """On a public path, a valid key whose permissions open it is noted (/metrics then
    carries names); no key, or any other, changes nothing: the path stays public. A key sent
    twice counts as none, as everywhere else."""
    names = [k.decode("latin-1").lower() for k, _ in scope["headers"]]
    if repeated_credentials(names) is not None:
        return
    key = presented_key(headers.get("authorization"), headers.get("x-api-key"))
    if not isinstance(key, str):
        return
    caller = identify(key, auth)
    if isinstance(caller, Caller) and authorize(caller, scope["method"], scope["path"]) is None:
        scope.setdefault("state", {})[CALLER] = caller


async def _refuse(
    scope: Scope, send: Send, denied: Denied, headers: dict[str, str] | None = None
) -> None:
    shape = error_shape(scope["path"])
    body = json.dumps(error_body(denied.status, denied.message, denied.code, shape)).encode()
    raw_headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": denied.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class BodyDeadline:
    """A request body must arrive within `settings.body_timeout` seconds of the request: a
    client that trickles it (slowloris) gets 408 and its place is freed."""

    def __init__(self, app: ASGIApp, backend: Cluster) -> None:
        self.app = app
        self.backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        timeout = (await self.backend.config()).settings.body_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        complete = False

        async def within_deadline() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except TimeoutError:
                raise StarletteHTTPException(
                    408, f"The request body did not arrive within {timeout:g} s (body_timeout)"
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, within_deadline, send)
