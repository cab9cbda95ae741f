"""Requests queued with `Prefer: respond-async`: the actor takes a slot for each, sends it to
llama-server itself and keeps the answer until its owner collects it (or it expires).

Slots come through the `acquire` and `release` given by the facade; nothing here reads the
queue or the instance itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from proxifier.config import Settings
from proxifier.errors import InvalidRequest, ProxifierError


@dataclass
class Job:
    """A request queued with `Prefer: respond-async`: the actor runs it and keeps the answer."""

    request_id: str
    path: str
    body: dict[str, Any]
    state: str = "pending"  # pending -> running -> done
    http_status: int | None = None
    response: Any = None
    done_at: float | None = None
    owner: str | None = None  # the API key that queued it: only it may read the result
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Jobs:
    """One model's async jobs, by request id."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        acquire: Callable[[str, float | None], Awaitable[dict[str, Any]]],
        release: Callable[[str], Awaitable[None]],
        http: Callable[[], httpx.AsyncClient],
        where: Callable[[str], dict[str, Any]],
    ) -> None:
        self.name, self.settings = name, settings
        self._acquire = acquire
        self._release = release
        self._http = http
        self._where = where  # {position, model_state} of a request
        self.jobs: dict[str, Job] = {}

    async def submit(
        self,
        request_id: str,
        path: str,
        body: dict[str, Any],
        deadline: float | None,
        owner: str | None,
    ) -> dict[str, Any]:
        if request_id in self.jobs:
            raise InvalidRequest(f"request {request_id!r} was already submitted")
        job = Job(request_id, path, {**body, "stream": False}, owner=owner)
        self.jobs[request_id] = job
        job.task = asyncio.create_task(self._run(job, deadline))
        await asyncio.sleep(0)  # let the job take its place in the queue
        return {"request_id": request_id, **self._where(request_id)}

    def result(self, request_id: str) -> dict[str, Any]:
        job = self.jobs.get(request_id)
        if job is None:
            return {"status": "unknown", "request_id": request_id}
        if job.state == "done":
            return _result(job)
        return {
            "status": job.state,
            "request_id": request_id,
            "owner": job.owner,
            **self._where(request_id),
        }

    def take_results(self) -> dict[str, dict[str, Any]]:
        done = {rid: _result(job) for rid, job in self.jobs.items() if job.state == "done"}
        for request_id in done:
            del self.jobs[request_id]
        return done

    def unfinished(self) -> int:
        return sum(1 for job in self.jobs.values() if job.state != "done")

    def sweep(self, now: float) -> None:
        """Drop results kept longer than result_ttl."""
        for request_id, job in list(self.jobs.items()):
            if job.done_at is not None and now - job.done_at > self.settings.result_ttl:
                del self.jobs[request_id]

    async def _run(self, job: Job, deadline: float | None) -> None:
        try:
            lease = await self._acquire(job.request_id, deadline)
        except ProxifierError as error:
            _finish(job, error.status, error.body())
            return
        job.state = "running"
        try:
            response = await self._http().post(
                f"{lease['url']}{job.path}",
                json=job.body,
                headers={"Authorization": f"Bearer {lease['api_key']}"},
                timeout=None,
            )
            try:
                payload: Any = response.json()
            except ValueError:
                payload = response.text
            _finish(job, response.status_code, payload)
        except httpx.HTTPError as exc:
            _finish(
                job,
                502,
                {
                    "error": {
                        "message": f"model '{self.name}' failed while answering: {exc}",
                        "type": "upstream_error",
                        "code": "upstream_failed",
                    }
                },
            )
        finally:
            with contextlib.suppress(ProxifierError):
                await self._release(lease["lease_id"])


def _result(job: Job) -> dict[str, Any]:
    return {
        "status": "done",
        "request_id": job.request_id,
        "owner": job.owner,
        "http_status": job.http_status,
        "body": job.response,
        "done_at": job.done_at,
    }


def _finish(job: Job, status: int, body: Any) -> None:
    job.state, job.http_status, job.response, job.done_at = "done", status, body, time.time()
