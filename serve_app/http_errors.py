"""Every error the HTTP surface gives is OpenAI-shaped, {"error": {"message", "type", "code"}},
except on the Anthropic Messages paths, whose clients parse {"type": "error", "error": {"type",
"message"}} (`proxifier.endpoints.error_shape` says which)."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxifier.config import ConfigError
from proxifier.endpoints import Shape, error_shape
from proxifier.errors import ProxifierError, anthropic_body

log = logging.getLogger("proxifier.ingress")

_STATUS_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    502: ("upstream_error", "upstream_failed"),
    503: ("service_unavailable", "service_unavailable"),
    504: ("upstream_error", "upstream_timeout"),
}


def error_body(
    status: int,
    message: str,
    code: str | None = None,
    shape: Shape = Shape.OPENAI,
    **extra: Any,
) -> dict[str, Any]:
    kind, default_code = _STATUS_TYPES.get(status, ("server_error", "internal_error"))
    if shape is Shape.ANTHROPIC:
        body = anthropic_body(status, message, code or default_code)
        body["error"].update(extra)
        return body
    return {"error": {"message": message, "type": kind, "code": code or default_code, **extra}}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    shape: Shape = Shape.OPENAI,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, shape, **extra), status, headers=headers)


def proxifier_error_response(error: ProxifierError, shape: Shape = Shape.OPENAI) -> JSONResponse:
    retry = error.retry_after_header()
    return JSONResponse(
        error.body(anthropic=shape is Shape.ANTHROPIC),
        error.status,
        headers={"Retry-After": retry} if retry else None,
    )


def sse_error(error: ProxifierError | dict[str, Any], shape: Shape = Shape.OPENAI) -> bytes:
    """The same body as the HTTP error, as an SSE `error` event (for streams already begun)."""
    if isinstance(error, ProxifierError):
        body = error.body(anthropic=shape is Shape.ANTHROPIC)
    else:
        body = error
    return f"event: error\ndata: {json.dumps(body)}\n\n".encode()


def reshaped(body: Any, status: int, shape: Shape) -> dict[str, Any]:
    """An upstream error body (llama-server's is OpenAI-shaped on every path) in the shape the
    path's clients parse; its message is kept, or the raw text when it has none."""
    message = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
        if shape is Shape.OPENAI:
            return body
    if not isinstance(message, str) or not message:
        text = body if isinstance(body, str) else json.dumps(body)
        message = text[:500] or f"upstream status {status}"
    kind = "upstream_error" if status >= 500 else "invalid_request_error"
    if shape is Shape.ANTHROPIC:
        return anthropic_body(status, message)
    return {"error": {"message": message, "type": kind, "code": "upstream_failed"}}


def install_error_handlers(app: FastAPI) -> None:
    def shape(request: Request) -> Shape:
        return error_shape(request.url.path)

    @app.exception_handler(ProxifierError)
    async def _proxifier(request: Request, error: ProxifierError) -> JSONResponse:
        return proxifier_error_response(error, shape(request))

    @app.exception_handler(ConfigError)
    async def _config(_: Request, error: ConfigError) -> JSONResponse:
        return error_response(
            400,
            f"the configuration was not accepted: {len(error.issues)} error(s)",
            "invalid_config",
            errors=[str(issue) for issue in error.issues],
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        messages = {404: "Unknown path", 405: "Method not allowed for this path"}
        message = messages.get(error.status_code, str(error.detail))
        return error_response(
            error.status_code, message, None, dict(error.headers or {}), shape(request)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        return error_response(400, f"Invalid request: {problems}", shape=shape(request))

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, error: RecursionError) -> JSONResponse:
        # Only a client's body nests this deep (FastAPI parses it before any route runs).
        message = "Invalid request: the JSON body is nested too deeply"
        return error_response(400, message, shape=shape(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        message = f"Internal error: {type(error).__name__}"
        return error_response(500, message, shape=shape(request))
