"""Whether one connection attempt proves a host reachable, and what placement sees of one that
is not (proxifier.reachability); the controller's try at an address (actors/controller)."""

from __future__ import annotations

import asyncio
import errno
import socket

from actors.controller.reachability import attempt
from proxifier.placement import NodeView
from proxifier.reachability import reached, seen_as_away


def test_an_answer_of_any_kind_proves_the_host_reachable() -> None:
    assert reached(None)  # connected
    assert reached(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))  # nothing listens
    assert not reached(TimeoutError())  # a dropped SYN: a cable out, a firewall
    assert not reached(OSError(errno.EHOSTUNREACH, "no route to host"))  # no ARP answer
    assert not reached(OSError(errno.ENETUNREACH, "network is unreachable"))


def test_a_node_the_head_cannot_reach_counts_as_not_alive_for_placement() -> None:
    views = [NodeView(n, f"10.0.0.{i}", True, {"CPU": 2}, {"CPU": 2}) for i, n in enumerate("ab")]
    seen = seen_as_away(views, {"b": "why"})
    assert [(v.node_id, v.alive) for v in seen] == [("a", True), ("b", False)]
    assert seen[1].total == views[1].total  # nothing else changes


def test_the_controllers_try_tells_a_listener_a_closed_port_and_silence_apart() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert asyncio.run(attempt("127.0.0.1", port, 5.0)) is None
    refused = asyncio.run(attempt("127.0.0.1", port, 5.0))  # closed now: refused at once
    assert isinstance(refused, ConnectionRefusedError) and reached(refused)


def test_a_host_that_drops_the_connection_attempt_is_not_reached() -> None:
    """What a firewall or a pulled cable does to a SYN, made here by Linux itself: a listener
    whose accept queue is full drops new SYNs without a word."""

    async def second_try(port: int) -> BaseException | None:
        first = await asyncio.open_connection("127.0.0.1", port)  # fills the queue of one
        try:
            return await attempt("127.0.0.1", port, 0.3)
        finally:
            first[1].close()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        silent = asyncio.run(second_try(listener.getsockname()[1]))
    assert isinstance(silent, TimeoutError) and not reached(silent)
