"""InferenceFastPath: an inference POST goes straight to the proxy, anything else to FastAPI,
and an error gets the response the app's own handler for it gives (a body deadline's 408
stays a 408)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from proxifier.endpoints import BY_PATH, Endpoint
from proxifier.errors import ModelNotFound
from serve_app.fast_path import InferenceFastPath
from serve_app.http_errors import install_error_handlers

pytestmark = pytest.mark.asyncio


class StubProxy:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.paths: list[str] = []

    async def handle(self, request: Request, endpoint: Endpoint) -> Response:
        self.paths.append(endpoint.path)
        await request.body()
        if self.error is not None:
            raise self.error
        return JSONResponse({"proxied": endpoint.path})


def app_with(proxy: StubProxy) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(InferenceFastPath, proxy=proxy, handlers=app.exception_handlers)

    @app.post("/v1/chat/completions")
    async def not_reached() -> dict[str, Any]:
        return {"proxied": "by FastAPI's route"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"data": []}

    return app


async def post(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path, json={"model": "m"})


async def test_inference_posts_go_straight_to_the_proxy_and_the_rest_to_fastapi() -> None:
    proxy = StubProxy()
    app = app_with(proxy)
    assert (await post(app, "/v1/chat/completions")).json() == {"proxied": "/v1/chat/completions"}
    assert (await post(app, "/v1/messages")).json() == {"proxied": "/v1/messages"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/v1/models")).json() == {"data": []}
    assert proxy.paths == ["/v1/chat/completions", "/v1/messages"]
    assert "/v1/messages" in BY_PATH


async def test_errors_get_the_apps_own_answers_in_the_paths_shape() -> None:
    reply = await post(app_with(StubProxy(ModelNotFound("no such model"))), "/v1/chat/completions")
    assert reply.status_code == 404 and reply.json()["error"]["message"] == "no such model"
    reply = await post(app_with(StubProxy(ModelNotFound("no such model"))), "/v1/messages")
    assert reply.json()["type"] == "error"  # Anthropic's shape on its path
    timed_out = HTTPException(408, "Request body not received in time")
    reply = await post(app_with(StubProxy(timed_out)), "/v1/chat/completions")
    assert reply.status_code == 408
    reply = await post(app_with(StubProxy(RuntimeError("bug"))), "/v1/chat/completions")
    assert reply.status_code == 500 and reply.json()["error"]["code"] == "internal_error"
