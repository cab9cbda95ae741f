"""The files of one model's llama-server: its log (each instance's lines after a mark of its
own) and the instance key file it reads at start.

Plain file handling: no process, no state machine, no other part of the actor.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from actors.process import log_tail, trim_log
from proxifier.home import proxifier_home

INSTANCE_MARK = "=== proxifier: llama-server instance"


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class InstanceLog:
    """`~/.proxifier/logs/<model>.log`, shared by the model's successive instances."""

    def __init__(self, name: str) -> None:
        self.path = proxifier_home() / "logs" / f"{safe_name(name)}.log"
        self._start = 0

    def begin(self, instance: int) -> None:
        """Mark where instance number `instance` begins writing."""
        trim_log(self.path)  # before this instance's mark, which must stay
        with self.path.open("a") as log:
            log.write(f"\n{INSTANCE_MARK} {instance} starting at {time.ctime()}\n")
            self._start = log.tell()  # where this instance's own lines begin

    def text(self, limit: int = 8 * 1024 * 1024) -> str:
        """Everything this instance wrote so far (its load log: at -lv 4 longer than a tail)."""
        try:
            with self.path.open("rb") as log:
                log.seek(self._start)
                return log.read(limit).decode("utf-8", errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int) -> list[str]:
        """The last lines this instance wrote (not the previous instance's)."""
        tail = log_tail(self.path, 400)
        marks = [i for i, line in enumerate(tail) if line.startswith(INSTANCE_MARK)]
        if marks:
            tail = tail[marks[-1] + 1 :]
        return tail[-lines:]


class KeyFile:
    """The instance key in a file only this user can read (0600, in a 0700 folder of its
    own), for `--api-key-file`; removed with its folder once llama-server has loaded, or
    when it stops."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._dir: Path | None = None
        self._file: Path | None = None

    def write(self, key: str) -> Path:
        self.forget()
        if self._dir is None or not self._dir.exists():
            self._dir = Path(tempfile.mkdtemp(prefix="proxifier-key-"))
        path = self._dir / f"{safe_name(self.name)}.key"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(key + "\n")
        self._file = path
        return path

    def forget(self) -> None:
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None
        if self._dir is not None:
            with contextlib.suppress(OSError):  # gone already, or not empty: not ours to force
                self._dir.rmdir()
            self._dir = None
