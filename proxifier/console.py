"""What `proxifier serve` and `proxifier start` print: the product's own lines, one per thing
an operator wants to know, instead of Ray's, Serve's and HAProxy's logs, and aligned tables.
Pure: facts in, text out; the callers print it.
"""

from __future__ import annotations

import re
from typing import Any

from proxifier.model_files import unit_for


def table(rows: list[list[str]]) -> str:
    """Rows as aligned columns (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# Ray's and Serve's loggers in the driver; at WARNING unless --verbose.
RAY_LOGGERS = ("ray", "ray.serve", "ray.data", "ray.train", "ray.tune")


def _first_line(text: object) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0] if lines else ""


ERROR_LINE = re.compile(r"(^|\s)E\s|error|failed|fatal", re.IGNORECASE)  # llama.cpp marks E


def _reason(text: object, keep: int = 4) -> str:
    """A failure's first line and, below it, indented, what its log tail says went wrong:
    the last `keep` error lines (llama.cpp's `E` level, or words of failure), else its last
    lines. A reason that ends "the last lines of its log:" must not end there on the console."""
    lines = [line for line in str(text or "").strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    rest = lines[1:]
    errors = [line for line in rest if ERROR_LINE.search(line)]
    shown = (errors or rest)[-keep:]
    return "\n    ".join([lines[0], *(line.strip() for line in shown)])


def _size(value: float) -> str:
    if value < 1024:
        return f"{value:.0f} B"
    unit, scale = unit_for(value)
    return f"{value / scale:.1f} {unit}"


def event_line(event: dict[str, Any]) -> str | None:
    """One console line for a controller event worth an operator's attention, or None."""
    kind = event.get("kind")
    model = event.get("model", "")
    if kind == "downloading":
        return f"{model}: downloading {event.get('file')} into {event.get('cache')}"
    if kind == "downloaded":
        took, size = event.get("seconds", 0.0), _size(event.get("bytes", 0))
        return f"{model}: downloaded {event.get('file')} ({size}, {took:.1f} s)"
    if kind == "ready":
        return f"{model}: ready (loaded in {event.get('load_seconds', 0.0):.1f} s)"
    if kind == "stopped":
        return f"{model}: stopped ({event.get('reason')})"
    if kind == "evicted":
        return f"{model}: evicted for {event.get('for_model')} ({event.get('reason')})"
    if kind == "failed":
        return f"warning: {model}: failed: {_reason(event.get('reason'))}"
    if kind == "crashed":
        again = event.get("restart_in")
        then = f"; restarting in {again:g} s" if again is not None else ""
        return f"warning: {model}: llama-server exited with code {event.get('code')}{then}"
    if kind == "lost":
        return f"warning: {model}: {event.get('reason')}"
    if kind == "unreachable":
        return (
            f"warning: {model}: {event.get('reason')}; placed elsewhere,"
            f" and node {event.get('node_id')} takes no new model until it answers"
        )
    if kind == "reachable":
        return f"node {event.get('node_id')} ({event.get('host')}) answers again"
    if kind == "warning":
        where = f"{model}: " if model else ""
        return f"warning: {where}{event.get('message')}"
    if kind == "scheduler_error":
        return f"warning: the scheduler failed a pass: {event.get('error')}"
    if kind == "config_reloaded":
        changes = event.get("changes") or []
        return "config reloaded: " + ("; ".join(changes) if changes else "no changes")
    if kind == "config_rejected":
        errors = event.get("errors") or []
        return f"warning: config rejected (the running one is kept): {'; '.join(errors)}"
    if kind == "auth_reloaded":
        state = "on" if event.get("enabled") else "off"
        return f"auth reloaded: {event.get('keys')} key(s), auth {state}"
    return None


def start_line(model: str, status: dict[str, Any], waited: float) -> str:
    """`proxifier start`'s progress line for one status of the model it waits for."""
    state = status.get("state", "?")
    if status.get("progress"):
        return f"{model}: {status['progress']}"
    if status.get("waiting_for"):
        return f"{model}: waiting to be placed: {_first_line(status['waiting_for'])}"
    if state == "starting":
        return f"{model}: loading ({waited:.0f} s)"
    if state == "ready":
        return f"{model}: ready in {waited:.1f} s"
    if state == "failed":
        # Only the first line: `proxifier start` prints the log's lines itself, on stderr.
        return f"{model}: failed: {_first_line(status.get('last_error'))}"
    return f"{model}: {state}"
