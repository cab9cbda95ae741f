"""What `proxifier serve` checks before it starts anything: a Ray cluster marked on this machine
that no longer answers, and ports an earlier instance left taken. Local probes only (a marker
file, a socket, the process table); no Ray imported, never a wait for what will not come."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import psutil

HAPROXY_SIDE_PORTS = (8404, 9101)  # Serve's HAProxy stats and health ports (fixed by Ray)
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


def taken_ports(host: str, ports: list[int]) -> list[str]:
    """One line per port that something already listens on, naming what holds it."""
    problems = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("0.0.0.0" if port in HAPROXY_SIDE_PORTS else host, port))
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    continue
                problems.append(f"port {port} is taken by {holder_of(port)}")
    return problems


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
