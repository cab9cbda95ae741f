"""Hosts the head cannot reach (`Reach`): the ingress reports a llama-server it could not
connect to, the controller tries the same address itself, and a host that does not answer
takes no new model (proxifier.reachability) until a connection there is answered again, or
Ray declares the node dead. Ray alone would keep sending work there until its health checks
give up, and never would for a path cut by a firewall."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxifier.reachability import Unreached, reached, why_unreached

RECHECK_EVERY = 2.0  # seconds between tries at each host the head could not reach


async def attempt(host: str, port: int, deadline: float) -> BaseException | None:
    """One TCP connection to host:port within `deadline`: None if it connected, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), deadline)
    except (OSError, TimeoutError) as error:
        return error
    writer.close()
    return None


class Reach:
    def __init__(
        self,
        unreached: dict[str, Unreached],
        deadline: Callable[[], float],
        alive: Callable[[], Awaitable[frozenset[str]]],
        event: Callable[..., Any],
        wake: Callable[[], None],
    ) -> None:
        self.unreached = unreached  # node id -> what failed there (the registry's table)
        self._alive = alive  # the nodes Ray counts alive
        self._deadline = deadline  # settings.upstream_connect_timeout, read each time
        self._event, self._wake = event, wake
        self._trying: dict[tuple[str, int], asyncio.Future[BaseException | None]] = {}
        self._rechecks: asyncio.Task[None] | None = None

    async def fails(self, host: str, port: int) -> BaseException | None:
        """Why the head cannot reach host:port now, or None if it can. Reports of many
        requests at once share one try."""
        key = (host, port)
        trying = self._trying.get(key)
        if trying is None:
            trying = asyncio.ensure_future(attempt(host, port, self._deadline()))
            self._trying[key] = trying
            trying.add_done_callback(lambda _: self._trying.pop(key, None))
        error = await asyncio.shield(trying)
        return None if reached(error) else error

    async def judge(
        self, node_id: str, llama: tuple[str, int] | None, raylet: tuple[str, int] | None
    ) -> Unreached | None:
        """Try what a caller could not reach (the instance's llama-server, else the node's
        raylet) and, at the same time, the raylet: None if the first answers; else the node
        is marked unreachable (the whole host when its raylet fails too) and returned."""
        targets = [
            t for t in (("its llama-server", llama), ("the Ray node it runs on", raylet)) if t[1]
        ]
        if not targets:
            return None
        errors = await asyncio.gather(*(self.fails(*where) for _, where in targets))
        if errors[0] is None:
            return None
        whole = raylet is not None and errors[-1] is not None
        what, (host, port) = targets[-1] if whole else targets[0]
        error = errors[-1] if whole else errors[0]
        assert error is not None and host is not None
        reason = why_unreached(what, host, port, error, self._deadline())
        entry = Unreached(node_id, host, port, time.time(), reason, whole_host=whole)
        self.unreached[node_id] = entry
        if self._rechecks is None or self._rechecks.done():
            self._rechecks = asyncio.create_task(self._recheck_while_unreached())
        return entry

    async def _recheck_while_unreached(self) -> None:
        while self.unreached:
            await asyncio.sleep(RECHECK_EVERY)
            with contextlib.suppress(Exception):  # the GCS away: try again next round
                self._forget_dead(await self._alive())
            for node_id, entry in list(self.unreached.items()):
                with contextlib.suppress(Exception):
                    answered = await self.fails(entry.host, entry.port) is None
                    if answered and self.unreached.get(node_id) is entry:  # not marked anew
                        del self.unreached[node_id]
                        self._event("reachable", node_id=node_id, host=entry.host)
                        self._wake()  # models waiting for a node may be placed there now

    def _forget_dead(self, alive: frozenset[str]) -> None:
        """Nodes Ray declared dead need no more tries: one that comes back has a new id."""
        for node_id in [n for n in self.unreached if n not in alive]:
            del self.unreached[node_id]
