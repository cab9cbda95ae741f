"""What `proxifier serve` checks before it starts anything: a Ray cluster marked on this machine
that no longer answers, and ports an earlier instance left taken. Local probes only (a marker
file, a socket, the process table); no Ray imported; the one wait, for ports an instance that
just stopped is letting go of, is bounded."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psutil

PORT_RELEASE_WAIT = 10.0  # seconds serve waits for ports an earlier instance is letting go of
PROBE_WAIT = 2.0  # seconds for a TCP connect to a GCS that is alive (it takes milliseconds)


def serve_environment(haproxy: bool) -> dict[str, str]:
    """How Ray Serve runs the product; Serve reads these at process start, so they go in the
    environment of every process of the job (and of a local cluster's raylet).

    HAProxy in front of the replicas instead of Serve's Python proxy: 3x lower latency floor
    (docs/benchmarks.md). Throughput-optimized Serve runs the ingress's code on the replica's
    own event loop (not a second thread), buffers access logs and freezes the start-up heap for
    the garbage collector: 20-25% less CPU per proxied request here (scripts/bench_proxy.py)."""
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1" if haproxy else "0",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    }


def ray_marker() -> Path:
    """Where Ray notes the cluster running on this machine (as Ray finds its temp folder)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray" / "ray_current_cluster"


def marked_cluster() -> str | None:
    """The cluster `ray.init(address="auto")` would join: the one the marker file names."""
    try:
        text = ray_marker().read_text().strip()
    except OSError:
        return None
    return text.splitlines()[0].strip() if text else None


def answers(address: str, wait: float = PROBE_WAIT) -> bool:
    """False only when `host:port` says no (the connection is refused, or the host is known
    unreachable): nothing listens where the cluster was. A probe that merely takes long
    proves nothing, so then Ray is left to try."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return True  # not host:port (e.g. ray://): let Ray say what it makes of it
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=wait):
            return True
    except TimeoutError:
        return True
    except OSError:
        return False


def haproxy_side_ports() -> tuple[int, int]:
    """Serve's HAProxy stats and metrics ports: Ray's defaults (8404, 9101) unless its
    settings in the environment move them (RAY_SERVE_HAPROXY_STATS_PORT, ..._METRICS_PORT)."""
    return (
        int(os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT") or 8404),
        int(os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT") or 9101),
    )


def taken_ports(host: str, ports: list[int], all_interfaces: tuple[int, ...] = ()) -> list[str]:
    """One line per port that something already listens on, naming what holds it;
    `all_interfaces`: ports a listener binds on every interface (HAProxy's side ports)."""
    problems = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As the listener will: connections an earlier instance left in TIME_WAIT on the
            # port do not hold it (a bind without this fails on them); a listener still does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0" if port in all_interfaces else host, port))
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    continue
                problems.append(f"port {port} is taken by {holder_of(port)}")
    return problems


def ports_released(
    host: str,
    ports: list[int],
    all_interfaces: tuple[int, ...] = (),
    wait: float = PORT_RELEASE_WAIT,
    on_wait: Callable[[list[str]], None] | None = None,
) -> list[str]:
    """`taken_ports`, after waiting up to `wait` seconds for taken ones to be let go: an
    instance that just stopped may still be closing its listeners (its HAProxy goes away a
    moment after it). `on_wait` hears what is taken when the wait begins."""
    taken = taken_ports(host, ports, all_interfaces)
    if taken and on_wait is not None:
        on_wait(taken)
    deadline = time.monotonic() + wait
    while taken and time.monotonic() < deadline:
        time.sleep(0.2)
        taken = taken_ports(host, ports, all_interfaces)
    return taken


def holder_of(port: int) -> str:
    """ "haproxy (pid 123)" for the process listening on `port`, or what can be said of it."""
    try:
        for connection in psutil.net_connections(kind="inet"):
            listening = connection.status == psutil.CONN_LISTEN and connection.pid
            if listening and connection.laddr and connection.laddr.port == port:
                name = psutil.Process(connection.pid).name()
                return f"{name} (pid {connection.pid})"
    except (psutil.Error, OSError):
        pass
    return "another process (not visible to this user)"
