"""Starting and stopping llama-server processes so that none outlives its actor.
OS processes, sockets and log files only: no Ray, no config, no model state.

The child stays in the actor's session and process group (Ray kills that group with the actor),
and it asks the kernel for SIGKILL when the thread that spawned it dies (PR_SET_PDEATHSIG): so
spawn from the actor's event loop thread, which lives as long as the actor. Its output goes to a
log file, never to a pipe nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
from collections import deque
from pathlib import Path

import psutil

_PR_SET_PDEATHSIG = 1
# Looked up once here: dlopen between fork and exec in a threaded parent can deadlock.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_LOG_LIMIT = 20 * 1024 * 1024  # truncate a model's log at start once it grows past this


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def trim_log(log_path: Path) -> None:
    """Start a model's log afresh once it has grown past the limit (at a start, never while
    a process writes it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists() and log_path.stat().st_size > _LOG_LIMIT:
        log_path.write_bytes(b"")


async def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    """Start `argv` with its output appended to `log_path`."""
    trim_log(log_path)
    parent = os.getpid()
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            preexec_fn=lambda: _die_with_parent(parent),
        )


async def terminate(process: asyncio.subprocess.Process, grace: float) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code. Never blocks the loop."""
    if process.returncode is not None:
        return process.returncode
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        return await asyncio.wait_for(process.wait(), timeout=grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return await process.wait()


def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last `lines` lines of a log file (reads at most its last 64 KiB)."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - 65536))
            data = log.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace")
    return list(deque(text.splitlines(), maxlen=lines))


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def free_port(host: str) -> int:
    """A port free on `host` now (the OS picks it; llama-server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
