"""Every error the HTTP surface gives is OpenAI-shaped: {"error": {"message", "type", "code"}}."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxifier.config import ConfigError
from proxifier.errors import ProxifierError

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


def error_body(status: int, message: str, code: str | None = None, **extra: Any) -> dict[str, Any]:
    kind, default_code = _STATUS_TYPES.get(status, ("server_error", "internal_error"))
    return {"error": {"message": message, "type": kind, "code": code or default_code, **extra}}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, **extra), status, headers=headers)


def proxifier_error_response(error: ProxifierError) -> JSONResponse:
    retry = error.retry_after_header()
    return JSONResponse(
        error.body(), error.status, headers={"Retry-After": retry} if retry else None
    )


def sse_error(error: ProxifierError | dict[str, Any]) -> bytes:
    """The same body as the HTTP error, as an SSE `error` event (for streams already begun)."""
    body = error.body() if isinstance(error, ProxifierError) else error
    return f"event: error\ndata: {json.dumps(body)}\n\n".encode()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProxifierError)
    async def _proxifier(_: Request, error: ProxifierError) -> JSONResponse:
        return proxifier_error_response(error)

    @app.exception_handler(ConfigError)
    async def _config(_: Request, error: ConfigError) -> JSONResponse:
        return error_response(
            400,
            f"the configuration was not accepted: {len(error.issues)} error(s)",
            "invalid_config",
            errors=[str(issue) for issue in error.issues],
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        messages = {404: "Unknown path", 405: "Method not allowed for this path"}
        message = messages.get(error.status_code, str(error.detail))
        return error_response(error.status_code, message, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        return error_response(400, f"Invalid request: {problems}")

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, error: RecursionError) -> JSONResponse:
        # Only a client's body nests this deep (FastAPI parses it before any route runs).
        return error_response(400, "Invalid request: the JSON body is nested too deeply")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"Internal error: {type(error).__name__}")
