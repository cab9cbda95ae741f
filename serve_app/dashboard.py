"""The web dashboard: its files (shipped in the package, no CDN) and its live stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse

from proxifier.errors import NotFound

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
    while not await request.is_disconnected():
        statuses, events = await asyncio.gather(
            ask(ctl().status.remote()), ask(ctl().events_since.remote(seq, 200))
        )
        for status in statuses:
            status.pop("log_tail", None)  # the log has its own view
        yield _event("stats", {"models": statuses})
        if events:
            seq = events[-1]["seq"]
            yield _event("events", events[-100:] if first else events)
        first = False
        await asyncio.sleep(TICK)


def _event(kind: str, payload: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()
