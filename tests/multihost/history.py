"""A Jepsen-style history of client requests, and the invariants a run must keep.

The load generator (`Load`) gives every request an id and records when it was sent, every chunk
it received and how it ended: `ok` (200 with a complete body, or a stream that ends with a
`finish_reason` and `[DONE]`), `fail` (an HTTP error, or an SSE error event, with an
OpenAI-shaped body and its `code`), or `info` (no answer by the client's deadline, or the
connection broke: the client cannot know what happened). `check` is pure: a history in,
the broken invariants out, each said in words.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

OK, FAIL, INFO = "ok", "fail", "info"


@dataclass
class Op:
    id: int
    model: str
    stream: bool
    invoked: float  # monotonic
    completed: float | None = None
    outcome: str | None = None
    status: int | None = None
    code: str | None = None  # the OpenAI-shaped error's code (or type), for a fail
    text: str = ""  # the content the answer carried
    chunks: int = 0
    note: str = ""  # why it is a fail or an info, in words

    def end(self, outcome: str, **fields: Any) -> None:
        self.outcome, self.completed = outcome, time.monotonic()
        for key, value in fields.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class Window:
    """A fault: from `start` to `end` (monotonic; None: until the run's end), requests for
    `models` may end `info`: they were in flight on the faulted host."""

    models: frozenset[str]
    start: float
    end: float | None = None


def error_code(body: Any) -> str | None:
    """The code of an OpenAI-shaped error body ({"error": {"message", "type", "code"}})."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    code = error.get("code") or error.get("type")
    return str(code) if code else None


def check(
    history: Sequence[Op], expected: Callable[[Op], str], windows: Iterable[Window] = ()
) -> list[str]:
    """The invariants the history breaks (empty: none):
    - one outcome per request, and ids unique;
    - an ok answer carries exactly the content `expected(op)` says;
    - a fail carries an OpenAI-shaped error with a code;
    - an info only for a request that was in flight during a fault window for its model."""
    problems = []
    ids = Counter(op.id for op in history)
    problems += [f"request {i} recorded {n} times" for i, n in ids.items() if n > 1]
    windows = list(windows)
    for op in history:
        if op.outcome not in (OK, FAIL, INFO):
            problems.append(f"request {op.id} ({op.model}) has no outcome")
        elif op.outcome == OK and op.text != expected(op):
            problems.append(
                f"request {op.id} ({op.model}, stream={op.stream}) ok with wrong content "
                f"{op.text[:80]!r}"
            )
        elif op.outcome == FAIL and op.code is None:
            problems.append(
                f"request {op.id} ({op.model}) failed with status {op.status} and no "
                f"OpenAI-shaped error: {op.note[:200]}"
            )
        elif op.outcome == INFO and not any(_during(op, w) for w in windows):
            problems.append(
                f"request {op.id} ({op.model}) got no answer outside any fault: {op.note[:200]}"
            )
    return problems


def _during(op: Op, window: Window) -> bool:
    if op.model not in window.models:
        return False
    ended = op.completed if op.completed is not None else float("inf")
    return op.invoked <= (window.end or float("inf")) and ended >= window.start


def outcomes(history: Iterable[Op]) -> dict[str, int]:
    """Counts per outcome, a fail by its code: {"ok": 40, "fail:model_failed": 3, "info": 1}."""
    counts: Counter[str] = Counter()
    for op in history:
        counts[op.outcome if op.outcome != FAIL else f"fail:{op.code}"] += 1
    return dict(sorted(counts.items()))


@dataclass
class Load:
    """Clients that send requests one after another until stopped, each with its own deadline,
    streamed and not by turns, and record every one."""

    client: httpx.AsyncClient
    models: Sequence[str]
    deadline: float = 30.0  # seconds a client waits for an answer (and between chunks)
    max_tokens: int = 8
    history: list[Op] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def run(self, clients: int, stop: asyncio.Event) -> list[Op]:
        await asyncio.gather(*(self._client(i, stop) for i in range(clients)))
        return self.history

    async def _client(self, number: int, stop: asyncio.Event) -> None:
        for turn in itertools.count():
            if stop.is_set():
                return
            model = self.models[(number + turn) % len(self.models)]
            op = Op(next(self._ids), model, stream=(number + turn) % 2 == 0,
                    invoked=time.monotonic())  # fmt: skip
            self.history.append(op)
            await self.one(op)

    async def one(self, op: Op) -> Op:
        body = {
            "model": op.model,
            "messages": [{"role": "user", "content": f"request {op.id}"}],
            "max_tokens": self.max_tokens,
            "stream": op.stream,
        }
        try:
            async with asyncio.timeout(self.deadline):
                await self._send(op, body)
        except TimeoutError:
            op.end(INFO, note=f"no answer within {self.deadline} s ({op.chunks} chunks)")
        except httpx.HTTPError as error:
            op.end(INFO, note=f"{type(error).__name__}: {error}")
        return op

    async def _send(self, op: Op, body: dict[str, Any]) -> None:
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as answer:
            op.status = answer.status_code
            if answer.status_code != 200 or not op.stream:
                raw = await answer.aread()
                self._whole(op, answer.status_code, raw)
                return
            await self._stream(op, answer)

    def _whole(self, op: Op, status: int, raw: bytes) -> None:
        try:
            parsed = json.loads(raw)
        except ValueError:
            op.end(FAIL if status != 200 else INFO, note=raw[:200].decode("utf-8", "replace"))
            return
        if status != 200:
            op.end(FAIL, code=error_code(parsed), note=raw[:200].decode("utf-8", "replace"))
            return
        choice = (parsed.get("choices") or [{}])[0]
        op.text = (choice.get("message") or {}).get("content") or ""
        if choice.get("finish_reason"):
            op.end(OK)
        else:
            op.end(INFO, note="a 200 without a finish_reason")

    async def _stream(self, op: Op, answer: httpx.Response) -> None:
        finished = False
        async for line in answer.aiter_lines():
            if not line.startswith("data:"):
                continue  # keep-alive comments and blank lines
            data = line[5:].strip()
            op.chunks += 1
            if data == "[DONE]":
                op.end(OK if finished else INFO, note="[DONE] without a finish_reason")
                return
            event = json.loads(data)
            if "error" in event:
                op.end(FAIL, code=error_code(event), note=data[:200])
                return
            for choice in event.get("choices") or []:
                op.text += (choice.get("delta") or {}).get("content") or ""
                finished = finished or bool(choice.get("finish_reason"))
        op.end(INFO, note=f"the stream ended without [DONE] after {op.chunks} chunks")


class Background:
    """The load generator on its own thread and event loop, while the test pulls cables."""

    def __init__(
        self,
        client: Callable[..., httpx.AsyncClient],
        models: Sequence[str],
        clients: int = 6,
        deadline: float = 30.0,
        max_tokens: int = 8,
    ) -> None:
        self.client, self.models, self.clients = client, models, clients
        self.deadline, self.max_tokens = deadline, max_tokens
        self.history: list[Op] = []
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        async with self.client(timeout=self.deadline * 2) as client:
            load = Load(client, self.models, self.deadline, self.max_tokens)
            self.history = load.history
            await load.run(self.clients, self._stop)

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        while self._stop is None:
            time.sleep(0.01)  # the thread has not reached its loop yet
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "a client is still waiting past its deadline"
