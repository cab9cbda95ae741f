"""Whether the head can reach a host, judged from one TCP connection attempt, and what the
scheduler sees of hosts it cannot reach. Pure: no sockets, no Ray.

Ray declares a host dead only when its raylet misses health checks (30-60 s at Ray's defaults),
and never when only the path to a llama-server is cut (a firewall): until then the product
itself stops sending requests there and places models elsewhere (DESIGN §16).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass, replace

from proxifier.placement import NodeView

# The host said nothing (a dropped SYN, no ARP answer) or there is no route to it.
UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT})


@dataclass(frozen=True)
class Unreached:
    """A node the head could not reach: where it was tried, and why (shown to operators)."""

    node_id: str
    host: str
    port: int
    since: float  # wall clock
    reason: str
    # Its raylet did not answer either: the whole host is cut off, not one port of it.
    whole_host: bool = False


def why_unreached(what: str, host: str, port: int, error: BaseException, limit: float) -> str:
    if isinstance(error, TimeoutError):
        return f"{what} at {host}:{port} did not accept a connection in {limit:g} s"
    return f"{what} at {host}:{port} could not be reached ({error})"


def reached(error: BaseException | None) -> bool:
    """Whether a connection attempt that ended with `error` (None: it connected) proves the
    host reachable. A refusal does: the host answered, only nothing listens on the port."""
    if error is None or isinstance(error, ConnectionRefusedError):
        return True
    if isinstance(error, TimeoutError):
        return False
    return not (isinstance(error, OSError) and error.errno in UNREACHABLE_ERRNOS)


def seen_as_away(views: Iterable[NodeView], unreached: Iterable[str]) -> list[NodeView]:
    """The nodes as placement should see them: one the head cannot reach counts as not alive,
    so nothing new is placed there and a model only it could hold waits (failures.py) until it
    is reachable again."""
    away = set(unreached)
    return [replace(view, alive=False) if view.node_id in away else view for view in views]
