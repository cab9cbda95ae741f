"""The web dashboard: its files (shipped in the package, no CDN) and its live stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse

from proxifier.auth import Caller, may_use_model
from proxifier.errors import NotFound
from serve_app.security import caller_of

ASSETS = Path(__file__).resolve().parent / "dashboard"
FILES = {"app.js": "text/javascript", "style.css": "text/css"}
TICK = 1.0  # seconds between updates on the stream


def install_dashboard(app: FastAPI, ask: Callable[[Any], Awaitable[Any]], ctl: Any) -> None:
    @app.get("/dashboard", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(ASSETS / "index.html", media_type="text/html")

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in FILES:
            raise NotFound(f"no dashboard file '{name}'")
        return FileResponse(ASSETS / name, media_type=FILES[name])

    @app.get("/dashboard/stream", include_in_schema=False)
    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(
            _updates(request, ask, ctl),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def _updates(
    request: Request, ask: Callable[[Any], Awaitable[Any]], ctl: Any
) -> AsyncIterator[bytes]:
    """Every TICK: the models' stats, and the lifecycle events since the last tick. The
    browser reconnects by itself (and gets the recent events again) if this ends."""
    seq = -1
    first = True
    caller = caller_of(request.scope)
    yield _event("caller", who(caller))
    while not await request.is_disconnected():
        statuses, events = await asyncio.gather(
            ask(ctl().status.remote()), ask(ctl().events_since.remote(seq, 200))
        )
        statuses = [s for s in statuses if visible(caller, s["name"])]
        for status in statuses:
            status.pop("log_tail", None)  # the log has its own view
        yield _event("stats", {"models": statuses})
        if events:
            seq = events[-1]["seq"]
            shown = [e for e in events if visible(caller, e.get("model"))]
            yield _event("events", shown[-100:] if first else shown)
        first = False
        await asyncio.sleep(TICK)


def who(caller: Caller | None) -> dict[str, Any]:
    """What the page may offer this caller: its key's permissions (None with auth off, or
    no key on an open dashboard: every button is offered, and the API has the last word)."""
    if caller is None:
        return {"key": None, "permissions": None}
    return {"key": caller.name, "permissions": sorted(caller.permissions)}


def visible(caller: Caller | None, model: str | None) -> bool:
    """Whether the caller's key may see this model (its allow-list; events of no model are
    everyone's). The dashboard names no model a key may not use, as /v1/models does not."""
    return caller is None or model is None or may_use_model(caller, model)


def _event(kind: str, payload: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()
