"""Client headers that must not steer the server.

Ray Serve's HTTP proxy lets any client set its own request timeout
(`x-request-timeout-seconds`) and switch off disconnect detection
(`x-request-disconnect-disabled`). On a public endpoint neither is the client's to choose: a
short timeout turns into a 408 before the model answers, and a disabled disconnect keeps a
slot busy for a client that is gone. `ignore_client_timeout_headers` runs in every Ray worker
process (a `worker_process_setup_hook`) and makes the proxy use the server's settings only.
"""

from __future__ import annotations

from typing import Any


def ignore_client_timeout_headers() -> None:
    try:
        from ray.serve._private import proxy, replica
    except ImportError:  # not a Serve process, or another Ray version: nothing to change
        return

    def server_timeout(_headers: Any, default_timeout_s: float | None) -> float | None:
        return default_timeout_s

    def disconnects_watched(_headers: Any) -> bool:
        return False

    for module in (proxy, replica):
        if hasattr(module, "parse_request_timeout_header"):
            module.parse_request_timeout_header = server_timeout
        if hasattr(module, "parse_disconnect_disabled_header"):
            module.parse_disconnect_disabled_header = disconnects_watched
