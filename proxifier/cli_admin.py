"""The admin commands of `proxifier`: an HTTP client of the running server (status, start,
stop, reload, logs, queue, backups) and how their answers are printed. No Ray; never imports
`proxifier.cli` (which parses the arguments and calls `run_admin`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx

from proxifier.console import start_line, table


class AdminError(Exception):
    """An answer from the server that is an error, or no answer at all."""


class Admin:
    """The operator commands talk to a running server over its HTTP admin API."""

    def __init__(self, url: str, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=300)

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        try:
            response = self.client.request(method, path, params=params or None, json=body)
        except httpx.TransportError as exc:
            raise AdminError(
                f"cannot reach {self.url} ({exc}); is `proxifier serve` running there?"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text[:500]}}
        if response.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise AdminError(f"{response.status_code}: {error.get('message', body)}")
        return body


def _ago(seconds: float | None) -> str:
    if not seconds:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _gib(value: float | None) -> str:
    return f"{value / 1024**3:.1f}G" if value else "-"


def _gpu_text(model: dict[str, Any], cluster_gpus: bool = True) -> str:
    """Which GPUs and what share of them a model holds, and the memory it needs (measured,
    else configured, else estimated: `need`); nothing on a cluster without GPUs, or for a
    model configured to run on none."""
    memory = model.get("gpu_memory") or {}
    if not cluster_gpus or memory.get("wants_gpu") is False:
        return "-"
    ids = model.get("gpu_ids") or []
    share = memory.get("num_gpus")
    held = f"GPU {','.join(map(str, ids))} x{share:g}" if ids and share else "-"
    return f"{held} need {_gib(memory.get('need'))}"


def _has_gpus(admin: Admin) -> bool:
    """Whether some node has a GPU; True when the key may not read the cluster (the GPU
    column then says what a model would need on one)."""
    try:
        nodes = admin.call("GET", "/admin/cluster")["nodes"]
    except AdminError:
        return True
    return any(node.get("resources", {}).get("GPU", 0) > 0 for node in nodes)


def _replicas_text(model: dict[str, Any]) -> str:
    """Ready replicas of how many wanted (`2/4`); `-` for a model of one instance."""
    replicas = model.get("replicas")
    if not replicas:
        return "-"
    ready = sum(1 for r in replicas if r["state"] == "ready")
    wanted = (model.get("desired") or {}).get("replicas", len(replicas))
    return f"{ready}/{wanted}"


def _status_rows(models: list[dict[str, Any]], cluster_gpus: bool = True) -> list[list[str]]:
    head = "MODEL STATE REPLICAS PRI GROUP WHERE GPU IN-FLIGHT QUEUED UPTIME ERROR"
    rows = [head.split()]
    for m in models:
        where = f"{m['host']}:{m['port']}" if m.get("host") else "-"
        error = (m.get("last_error") or "").splitlines()[0][:60] if m.get("last_error") else ""
        rows.append(
            [
                m["name"],
                f"{m['state']} ({m['progress']})" if m.get("progress") else m["state"],
                _replicas_text(m),
                str(m["priority"]),
                m["resource_group"],
                where,
                _gpu_text(m, cluster_gpus),
                str(m.get("in_flight", 0)),
                str(m.get("queue_depth", 0)),
                _ago(m.get("uptime")),
                error,
            ]
        )
    return rows


def _status_text(admin: Admin) -> str:
    health = admin.call("GET", "/health")
    models = admin.call("GET", "/admin/models/status")["models"]
    head = f"{admin.url}: {health['status']}, controller {health['controller']}"
    return f"{head}\n{table(_status_rows(models, _has_gpus(admin)))}"


CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: how `watch` and `top` redraw


def _watch_status(admin: Admin, interval: float, count: int) -> int:
    """`status --watch`: the status table redrawn every `interval` s, with the time, until
    Ctrl-C (or `count` draws). A server that stops answering is shown, not fatal."""
    drawn = 0
    try:
        while True:
            try:
                text = _status_text(admin)
            except AdminError as error:
                text = f"error: {error}"
            stamp = time.strftime("%H:%M:%S")
            # A terminal is redrawn; a pipe or a file gets one frame after another.
            start = CLEAR if sys.stdout.isatty() else ("\n" if drawn else "")
            print(f"{start}every {interval:g}s, {stamp} (Ctrl-C quits)\n{text}", flush=True)
            drawn += 1
            if count and drawn >= count:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def _start(admin: Admin, model: str, wait: bool) -> int:
    """`proxifier start`: start the model, then follow its status with one progress line
    (redrawn in place on a terminal, printed when it changes otherwise) until it is ready
    or failed."""
    began = time.monotonic()
    answer = admin.call("POST", f"/admin/models/{model}/start", wait="false")
    name = answer["model"]
    if not wait:
        print(f"{name}: {answer['state']}")
        return 0
    live = sys.stdout.isatty()
    shown: tuple[Any, ...] | None = None
    shown_at = 0.0
    try:
        while True:
            status = admin.call("GET", f"/admin/models/{name}/status")
            now = time.monotonic()
            line = start_line(name, status, now - began)
            # What the line says, without its running numbers: printed when that changes.
            kind = (status["state"], bool(status.get("progress")), status.get("waiting_for"))
            done = status["state"] in ("ready", "failed", "stopped")
            if live:
                print(f"\r\x1b[K{line}", end="\n" if done else "", flush=True)
            elif kind != shown or done or now - shown_at >= 5:
                print(line, flush=True)
                shown, shown_at = kind, now
            if status["state"] == "ready":
                return 0
            if status["state"] in ("failed", "stopped"):
                rest = (status.get("last_error") or "").strip().splitlines()[1:]
                for more in rest:  # the log lines that say why
                    print(f"  {more}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; {name} goes on starting (proxifier status shows it)")
        return 130


FOLLOW_WINDOW = 400  # lines read each time `logs --follow` looks for new ones


def new_lines(seen: list[str], now: list[str]) -> list[str]:
    """The lines at the end of `now` (a log's last lines, read again) that `seen` (the
    previous read) did not end with: the longest end of `seen` that `now` begins with, or
    the whole of `now` when the two do not overlap (more came than one read holds)."""
    for overlap in range(min(len(seen), len(now)), 0, -1):
        if seen[-overlap:] == now[:overlap]:
            return now[overlap:]
    return now


def _logs(admin: Admin, model: str, lines: int, follow: bool, interval: float) -> int:
    path = f"/admin/models/{model}/logs"
    # Read as much as each later read, so that the next one is matched against all of it.
    seen: list[str] = admin.call("GET", path, lines=max(lines, FOLLOW_WINDOW) if follow else lines)[
        "lines"
    ]
    shown = seen[-lines:] if lines > 0 else []
    print("\n".join(shown) if shown else f"({model}: no log lines yet)", flush=True)
    try:
        while follow:
            time.sleep(interval)
            now = admin.call("GET", path, lines=FOLLOW_WINDOW)["lines"]
            fresh = new_lines(seen, now)
            if fresh:
                print("\n".join(fresh), flush=True)
            seen = now
    except KeyboardInterrupt:  # how a follow ends
        pass
    return 0


def run_admin(args: argparse.Namespace) -> int:
    admin = Admin(args.url, args.key)
    try:
        if args.command == "status":
            if args.watch:
                return _watch_status(admin, args.interval, args.count)
            print(_status_text(admin))
        elif args.command == "start":
            return _start(admin, args.model, wait=not args.no_wait)
        elif args.command == "scale":
            answer = admin.call(
                "POST", f"/admin/models/{args.model}/scale", {"replicas": args.replicas}
            )
            print(f"{answer['model']}: {answer['replicas']} replicas ({answer['running']} now)")
        elif args.command == "models":
            listed = admin.call("GET", "/v1/models")["data"]
            rows = [["MODEL", "STATE", "PRIORITY", "GROUP", "ALIASES"]]
            rows += [
                [
                    m["id"],
                    m["state"],
                    str(m["priority"]),
                    m["resource_group"],
                    ", ".join(m["aliases"]),
                ]
                for m in listed
            ]
            print(table(rows))
        elif args.command in ("stop", "reload"):
            if args.command == "reload" and args.model is None:
                answer = admin.call("POST", "/admin/config/reload")
                print("\n".join(answer["changes"]) or "no changes")
                return 0
            params = {"force": "true"} if args.command == "stop" and args.force else {}
            answer = admin.call("POST", f"/admin/models/{args.model}/{args.command}", **params)
            if args.command == "reload":
                print("\n".join(answer["changes"]) or "no changes")
            else:
                print(f"{answer['model']}: {answer['state']}")
        elif args.command == "group":
            if args.action == "status":
                groups = admin.call("GET", "/admin/groups/status")["groups"]
                rows = [["GROUP", "RUNNING", "MEMBERS"]]
                rows += [
                    [
                        g,
                        f"{v['running']}/{v['total']}",
                        ", ".join(f"{m['name']} ({m['state']})" for m in v["members"]),
                    ]
                    for g, v in groups.items()
                ]
                print(table(rows))
            else:
                answer = admin.call("POST", f"/admin/groups/{args.group}/{args.action}")
                print(json.dumps(answer, indent=2))
        elif args.command == "logs":
            return _logs(admin, args.model, args.lines, args.follow, args.interval)
        elif args.command == "queue":
            if args.clear:
                if not args.model:
                    raise AdminError("--clear needs a MODEL")
                answer = admin.call("POST", f"/admin/queue/{args.model}/clear")
                print(f"{answer['model']}: cleared {answer['cleared']} waiting request(s)")
                return 0
            path = f"/admin/queue/{args.model}/status" if args.model else "/admin/queue/status"
            answer = admin.call("GET", path)
            queues = [answer] if args.model else answer["queues"]
            rows = [["MODEL", "STATE", "IN-FLIGHT", "QUEUED", "OLDEST WAIT"]]
            rows += [
                [
                    q["model"],
                    q["state"],
                    str(q.get("in_flight", 0)),
                    str(q.get("depth", 0)),
                    f"{q.get('oldest_wait', 0):.1f}s",
                ]
                for q in queues
            ]
            print(table(rows))
    except AdminError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
