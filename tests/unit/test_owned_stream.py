"""OwnedStream: what a streamed answer owns (a slot, a place in a queue) goes back however the
client leaves, including before the first byte, when the body generator never started."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from starlette.requests import ClientDisconnect

from serve_app.call import Call
from serve_app.relay import OwnedStream

SCOPE = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/"}


def owned(log: list[str]) -> tuple[OwnedStream, Call]:
    call = Call("m", "/v1/chat/completions", b"{}", "req_1", 0.0)

    async def body() -> AsyncGenerator[bytes, None]:
        call.streaming = True
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
        finally:
            log.append("body cleaned up")

    async def unstarted() -> None:
        log.append("given back unstarted")

    return OwnedStream(body(), call, unstarted), call


async def receive() -> dict[str, Any]:
    await asyncio.Event().wait()  # the client never sends anything more
    return {}


def gone_after(messages: int) -> Any:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if len(sent) == messages:
            raise OSError("client went away")
        sent.append(message)

    return send


@pytest.mark.asyncio
async def test_a_client_gone_before_the_first_byte_gets_its_slot_given_back() -> None:
    log: list[str] = []
    response, call = owned(log)
    with pytest.raises(ClientDisconnect):
        await response(SCOPE, receive, gone_after(0))
    assert not call.streaming
    assert log == ["given back unstarted"]


@pytest.mark.asyncio
async def test_a_client_gone_mid_stream_closes_the_body_at_once() -> None:
    log: list[str] = []
    response, call = owned(log)
    with pytest.raises(ClientDisconnect):
        await response(SCOPE, receive, gone_after(2))  # headers and one chunk got through
    assert call.streaming
    assert log == ["body cleaned up"]


@pytest.mark.asyncio
async def test_a_finished_stream_cleans_up_once() -> None:
    log: list[str] = []
    response, _ = owned(log)
    await response(SCOPE, receive, gone_after(10))
    assert log == ["body cleaned up"]
