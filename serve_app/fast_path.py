"""The inference routes without FastAPI's routing and dependency layers.

A POST to an inference path (`proxifier.endpoints`) goes straight to `Proxy.handle`, behind
the same gate, body deadline and slot guard as every route (this layer sits inside them), and
its errors get the responses the app's exception handlers give; everything else goes on to
FastAPI. The routes stay registered there too, for /docs and the OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from proxifier.endpoints import BY_PATH
from serve_app.proxy import Proxy

Handler = Callable[[Request, Exception], Awaitable[Response]]


class InferenceFastPath:
    def __init__(self, app: ASGIApp, proxy: Proxy, handlers: dict[Any, Handler]) -> None:
        self.app, self.proxy, self.handlers = app, proxy, handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = BY_PATH.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await self.proxy.handle(request, endpoint)
        except Exception as error:
            response = await self._handled(request, error)
        await response(scope, receive, send)

    async def _handled(self, request: Request, error: Exception) -> Response:
        """What the app's exception handler for this kind of error answers (they all exist:
        `install_error_handlers` has one for Exception)."""
        for kind in type(error).__mro__:
            handler = self.handlers.get(kind)
            if handler is not None:
                return await handler(request, error)
        raise error
