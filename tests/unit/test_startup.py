"""`proxifier serve`'s checks before it starts: a marked Ray cluster that no longer answers,
and ports an earlier instance left taken."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from proxifier import startup


def test_a_marked_cluster_that_answers_and_one_that_does_not() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert startup.answers(address)
    assert not startup.answers(address)  # closed now: refused at once, no waiting


def test_the_marker_is_where_ray_keeps_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert startup.ray_marker() == tmp_path / "ray" / "ray_current_cluster"
    assert startup.marked_cluster() is None
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.5:6379\n")
    assert startup.marked_cluster() == "10.0.0.5:6379"


def test_a_taken_port_is_named_with_what_holds_it() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        (problem,) = startup.taken_ports("127.0.0.1", [port])
    assert problem.startswith(f"port {port} is taken by ") and f"(pid {os.getpid()})" in problem
    assert startup.taken_ports("127.0.0.1", [port]) == []  # free again


def test_connections_left_in_time_wait_do_not_hold_a_port() -> None:
    """The state an earlier instance leaves when it answered a request and closed first: no
    process holds the port and a listener can bind it, so it is not taken."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server's side closes first: its end waits in TIME_WAIT
        client.close()
    # The state is there: a bind without SO_REUSEADDR fails on it.
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    assert startup.taken_ports("127.0.0.1", [port]) == []
    with socket.socket() as holder:  # a listener on every interface still takes it
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", port))
        holder.listen()
        (problem,) = startup.taken_ports("127.0.0.1", [port])
    assert f"(pid {os.getpid()})" in problem


def test_a_port_being_let_go_is_waited_for() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    heard: list[list[str]] = []

    def let_go(taken: list[str]) -> None:  # the earlier instance finishes going away
        heard.append(taken)
        holder.close()

    assert startup.ports_released("127.0.0.1", [port], on_wait=let_go) == []
    assert len(heard) == 1 and heard[0][0].startswith(f"port {port} is taken by ")


def test_a_port_that_stays_taken_is_named_after_the_wait() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        (problem,) = startup.ports_released("127.0.0.1", [port], wait=0.0)
    assert f"(pid {os.getpid()})" in problem


def test_haproxy_side_ports_follow_rays_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_HAPROXY_STATS_PORT", raising=False)
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_PORT", raising=False)
    assert startup.haproxy_side_ports() == (8404, 9101)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "19101")
    assert startup.haproxy_side_ports() == (18404, 19101)
