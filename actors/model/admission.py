"""Who gets one of a model's slots, and when: its bounded FIFO queue, the leases and their
renewals, the reclaim of slots nobody renews, the futures of waiting requests.

The slots themselves are plain data (`proxifier.slots.SlotQueue`); this part turns its answers
into resolved futures. It reads the instance through `InstanceView` (state, address, a start to
ask for) and never calls the actor facade.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from proxifier.config import ModelConfig, Settings
from proxifier.errors import (
    LeaseError,
    ProxifierError,
    QueueCleared,
    QueueFull,
    QueueTimeout,
    Rerouted,
    Unavailable,
)
from proxifier.lifecycle import ModelState
from proxifier.slots import Lease, Outcome, SlotQueue

logger = logging.getLogger(__name__)


class Address(Protocol):
    @property
    def url(self) -> str: ...

    api_key: str | None


class InstanceView(Protocol):
    """What admission may read of the instance and ask of it."""

    state: ModelState
    llama: Address

    def ensure_starting(self) -> object: ...

    def refuse_if_closed(self) -> None: ...


class Admission:
    """The slots, queue and leases of one model actor (`slots`), and the waiters' futures."""

    def __init__(
        self,
        name: str,
        model: ModelConfig,
        settings: Settings,
        instance: InstanceView,
        event: Callable[..., None],
        sweep: Callable[[float], None],
    ) -> None:
        self.name, self.model, self.settings = name, model, settings
        self._instance = instance
        self._event = event
        self._sweep = sweep  # more to drop at each upkeep round (old job results)
        self.slots = SlotQueue(model.parallel, self._max_queue())
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.in_lines: dict[str, tuple[int, float]] = {}  # holder -> (in its line, when told)
        self._unclaimed: set[str] = set()
        self._background: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None

    def configure(self, model: ModelConfig, settings: Settings) -> None:
        self.model, self.settings = model, settings
        self.slots.max_queue = self._max_queue()

    # ------------------------------------------------------------------ requests
    def enqueue(
        self,
        request_id: str,
        deadline: float | None,
        arrived: float | None = None,
        holder: str | None = None,
    ) -> dict[str, Any]:
        """`{"lease": ...}` at once, or `{"queued": {position, model_state}}` (then `wait`)."""
        self.ensure_upkeep()
        now = min(time.time(), arrived or math.inf)
        self._instance.refuse_if_closed()
        deadline = min(deadline or math.inf, now + self.queue_timeout())
        outcome, lease = self.slots.request(request_id, now, deadline, holder)
        if outcome is Outcome.GRANTED:
            assert lease is not None
            return {"lease": self._lease(lease)}
        if outcome is Outcome.FULL:
            raise self.queue_full()
        self.waiters[request_id] = asyncio.get_running_loop().create_future()
        if self._instance.state in (ModelState.STOPPED, ModelState.FAILED):
            self._instance.ensure_starting()
        return {
            "queued": {
                "position": self.slots.position(request_id),
                "model_state": str(self._instance.state),
            }
        }

    async def wait(self, request_id: str) -> dict[str, Any]:
        future = self.waiters.get(request_id)
        if future is None:
            raise Unavailable(f"request {request_id!r} is not waiting for model '{self.name}'")
        waiter = self.slots.waiters.get(request_id)
        deadline = waiter.deadline if waiter is not None else time.time()
        enqueued = waiter.enqueued_at if waiter is not None else time.time()
        try:
            await asyncio.wait({future}, timeout=max(0.0, deadline - time.time()))
        except asyncio.CancelledError:
            self._abandon(request_id, future)
            raise
        if self.waiters.pop(request_id, None) is None:
            # Its caller abandoned it meanwhile (`abandon`), which gave a granted slot back.
            raise Unavailable(f"request {request_id!r} was abandoned by its caller")
        if future.done():
            return future.result()
        self.slots.cancel(request_id)
        future.cancel()
        raise QueueTimeout(
            f"Request waited {time.time() - enqueued:.1f}s in the queue of model '{self.name}' "
            f"(model state: {self._instance.state}) and timed out",
            retry_after=self.queue_timeout(),
        )

    def free_now(self) -> bool:
        """A slot is free and nobody waits for one."""
        return self.slots.free_slots() > 0 and not self.slots.waiters

    def release(self, lease_id: str, served: int = 1) -> None:
        self._grant(self.slots.release(lease_id, time.time(), served))

    def give_back(self, released: Sequence[tuple[str, int]]) -> None:
        """Releases sent in a batch: one this actor does not know (it was restarted since)
        must not fail the others or the request they rode with."""
        for lease_id, served in released:
            try:
                self._grant(self.slots.release(lease_id, time.time(), served))
            except LeaseError as error:
                logger.warning("model %s: %s", self.name, error)

    def renew(self, holder: str, lease_ids: Sequence[str], in_line: int) -> list[str]:
        now = time.time()
        self.in_lines[holder] = (in_line, now)
        return self.slots.renew(holder, lease_ids, now)

    def abandon(self, request_id: str) -> None:
        future = self.waiters.get(request_id)
        if future is not None:
            self._abandon(request_id, future)
        else:
            self.slots.cancel(request_id)

    def cancel(self, request_id: str) -> bool:
        waiter = self.slots.cancel(request_id)
        if waiter is None:
            return False
        self._fail_waiter(
            request_id, Unavailable(f"request {request_id!r} was cancelled", retry_after=1)
        )
        return True

    def clear_queue(self, reason: str) -> int:
        cleared = self.turn_away(
            lambda: QueueCleared(
                f"Request removed from the queue of model '{self.name}': {reason}",
                retry_after=1,
            )
        )
        if cleared:
            self._event("queue_cleared", count=cleared, reason=reason)
        return cleared

    def shed(self, count: int, keep: set[str]) -> int:
        """Send up to `count` of the oldest waiting requests away (Rerouted), none in `keep`
        (the actor's own async jobs): another replica has free slots for them. How many went."""
        moved = 0
        for request_id in list(self.slots.waiters):
            if moved >= count:
                break
            if request_id in keep or request_id not in self.waiters:
                continue
            self.slots.cancel(request_id)
            self._fail_waiter(
                request_id,
                Rerouted(f"model '{self.name}': the request moves to a replica with a free slot"),
            )
            moved += 1
        if moved:
            self._event("rerouted", count=moved)
        return moved

    def queue_status(self) -> dict[str, Any]:
        now = time.time()
        waiting = [
            {"request_id": w.request_id, "position": i + 1, "waited": now - w.enqueued_at}
            for i, w in enumerate(self.slots.waiters.values())
        ]
        return {
            "model": self.name,
            "state": str(self._instance.state),
            "depth": len(waiting),
            "waiting_in_replicas": self._waiting_in_replicas(now),
            "max_queue_size": self.slots.max_queue,
            "queue_timeout": self.queue_timeout(),
            "oldest_wait": self.slots.oldest_wait(now),
            "in_flight": len(self.slots.leases),
            "slots": self.slots.slots,
            "waiting": waiting[:100],
            "leases": [
                {
                    "request_id": lease.request_id,
                    "holder": lease.holder,
                    "held_for": now - lease.granted_at,
                    "renewed_ago": now - self.slots.renewed.get(lease.lease_id, lease.granted_at),
                }
                for lease in list(self.slots.leases.values())[:100]
            ],
        }

    def _waiting_in_replicas(self, now: float) -> int:
        """Requests in replicas' lines, as their last renewals said (older ones are stale)."""
        ttl = self.settings.lease_ttl
        return sum(count for count, at in self.in_lines.values() if now - at <= ttl)

    def queue_full(self) -> QueueFull:
        return QueueFull(
            "Service temporarily unavailable - queue is full", retry_after=self.queue_timeout()
        )

    def _max_queue(self) -> int:
        return self.model.max_queue_size or self.settings.queue.max_queue_size

    def queue_timeout(self) -> float:
        return self.model.queue_timeout or self.settings.queue.queue_timeout

    # ------------------------------------------------------------------ told by the instance
    def open(self, instance: int, now: float) -> None:
        self._grant(self.slots.open(instance, now))

    def close(self) -> int:
        return len(self.slots.close())

    def turn_away(self, error: Callable[[], ProxifierError]) -> int:
        """Answer every waiting request with a fresh `error()`; how many there were."""
        cleared = self.slots.clear()
        for waiter in cleared:
            self._fail_waiter(waiter.request_id, error())
        return len(cleared)

    # ------------------------------------------------------------------ waiters and leases
    def _lease(self, lease: Lease) -> dict[str, Any]:
        return {
            "lease_id": lease.lease_id,
            "request_id": lease.request_id,
            "url": self._instance.llama.url,
            "api_key": self._instance.llama.api_key,
            "instance": lease.instance,
            "seq": lease.seq,
            "ticket": lease.ticket,
            "model": self.name,
        }

    def _grant(self, leases: list[Lease]) -> None:
        """Hand granted leases to their waiters; a lease nobody waits for any more goes back."""
        pending = list(leases)
        while pending:
            lease = pending.pop(0)
            future = self.waiters.get(lease.request_id)
            if future is not None and not future.done():
                future.set_result(self._lease(lease))
            else:
                pending += self.slots.release(lease.lease_id, time.time())

    def _fail_waiter(self, request_id: str, error: ProxifierError) -> None:
        # The future stays until its waiter collects it (a caller between enqueue and
        # wait_lease must still hear why); unclaimed ones are swept by _upkeep.
        future = self.waiters.get(request_id)
        if future is not None and not future.done():
            future.set_exception(error)

    def _abandon(self, request_id: str, future: asyncio.Future[dict[str, Any]]) -> None:
        """The caller went away while waiting: free its place, or its slot if it was granted."""
        self.waiters.pop(request_id, None)
        if future.done() and not future.cancelled() and future.exception() is None:
            self._grant(self.slots.release(future.result()["lease_id"], time.time()))
        else:
            self.slots.cancel(request_id)
            future.cancel()

    # ------------------------------------------------------------------ background upkeep
    def ensure_upkeep(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self._upkeep())
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_leases())

    async def _reap_leases(self) -> None:
        """Slots whose holder stopped renewing them (an ingress replica that died, or a request
        whose bookkeeping lost its lease) go back to the queue within seconds, not hours."""
        while True:
            await asyncio.sleep(min(1.0, self.settings.lease_ttl / 4))
            now = time.time()
            renewed = dict(self.slots.renewed)
            reclaimed, granted = self.slots.reap(
                now, self.settings.max_lease_time, self.settings.lease_ttl
            )
            if reclaimed:
                holders = sorted({str(lease.holder) for lease in reclaimed})
                # Which request lost its slot, and whether its holder ever renewed it: a lease
                # never renewed was lost on its way, one renewed once was dropped after.
                leases = [
                    {
                        "request_id": lease.request_id,
                        "holder": lease.holder,
                        "held_for": round(now - lease.granted_at, 2),
                        "renewed_ago": (
                            round(now - renewed[lease.lease_id], 2)
                            if lease.lease_id in renewed
                            else None
                        ),
                        "from_queue": lease.ticket is not None,
                    }
                    for lease in reclaimed
                ]
                self._event(
                    "leases_reclaimed", count=len(reclaimed), holders=holders, leases=leases
                )
                logger.warning(
                    "model %s: reclaimed %d slot(s) nobody renewed (holders %s)",
                    self.name,
                    len(reclaimed),
                    ", ".join(holders),
                )
            self._grant(granted)

    async def _upkeep(self) -> None:
        """Sweep expired waiters, drop old job results and answers nobody came for."""
        while True:
            await asyncio.sleep(self.settings.queue.cleanup_interval)
            now = time.time()
            for waiter in self.slots.expire(now):
                self._fail_waiter(
                    waiter.request_id,
                    QueueTimeout(
                        f"Request waited {now - waiter.enqueued_at:.1f}s in the queue of model "
                        f"'{self.name}' (model state: {self._instance.state}) and timed out",
                        retry_after=self.queue_timeout(),
                    ),
                )
            self._sweep(now)
            self._sweep_unclaimed()

    def _sweep_unclaimed(self) -> None:
        """Answers nobody came for (the caller enqueued, then vanished before wait_lease): after
        a whole sweep interval, drop them, giving a granted slot back."""
        done = {rid for rid, future in self.waiters.items() if future.done()}
        for request_id in done & self._unclaimed:
            future = self.waiters.pop(request_id)
            if not future.cancelled() and future.exception() is None:
                with contextlib.suppress(ProxifierError):
                    self._grant(self.slots.release(future.result()["lease_id"], time.time()))
        self._unclaimed = done - self._unclaimed
