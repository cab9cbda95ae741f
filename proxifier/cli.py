"""The `proxifier` command line."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from proxifier.config import (
    AuthConfig,
    ConfigError,
    ConfigIssue,
    ModelsConfig,
    load_auth_config,
    load_models_config,
    model_path_warnings,
    validate_auth,
)
from proxifier.config_diff import diff_models
from proxifier.console import start_line, table
from proxifier.gpu_inventory import memory_gib_text, ray_start_flags
from proxifier.model_files import hf_source

DEFAULT_MODELS = "configs/models.yaml"
DEFAULT_URL = "http://127.0.0.1:8000"


class AdminError(Exception):
    """An answer from the server that is an error, or no answer at all."""


class Admin:
    """The operator commands talk to a running server over its HTTP admin API."""

    def __init__(self, url: str, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=300)

    def call(self, method: str, path: str, **params: Any) -> Any:
        try:
            response = self.client.request(method, path, params=params or None)
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


def _gpu_text(model: dict[str, Any]) -> str:
    """Which GPUs and what share of them a model holds, and the memory it needs (measured,
    else configured, else estimated: `need`)."""
    memory = model.get("gpu_memory") or {}
    ids = model.get("gpu_ids") or []
    share = memory.get("num_gpus")
    held = f"GPU {','.join(map(str, ids))} x{share:g}" if ids and share else "-"
    return f"{held} need {_gib(memory.get('need'))}"


def _status_rows(models: list[dict[str, Any]]) -> list[list[str]]:
    head = "MODEL STATE PRI GROUP WHERE GPU IN-FLIGHT QUEUED UPTIME ERROR"
    rows = [head.split()]
    for m in models:
        where = f"{m['host']}:{m['port']}" if m.get("host") else "-"
        error = (m.get("last_error") or "").splitlines()[0][:60] if m.get("last_error") else ""
        rows.append(
            [
                m["name"],
                f"{m['state']} ({m['progress']})" if m.get("progress") else m["state"],
                str(m["priority"]),
                m["resource_group"],
                where,
                _gpu_text(m),
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
    return f"{head}\n{table(_status_rows(models))}"


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
            print(f"{CLEAR}every {interval:g}s, {stamp} (Ctrl-C quits)\n{text}", flush=True)
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


def run_admin(args: argparse.Namespace) -> int:
    admin = Admin(args.url, args.key)
    try:
        if args.command == "status":
            if args.watch:
                return _watch_status(admin, args.interval, args.count)
            print(_status_text(admin))
        elif args.command == "start":
            return _start(admin, args.model, wait=not args.no_wait)
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


def _model_line(config: ModelsConfig, name: str) -> str:
    model = config.models[name]
    flags = [
        flag
        for flag in ("preload", "auto_start", "embeddings", "reranking")
        if getattr(model, flag)
    ]
    port = str(model.port) if model.port is not None else "auto"
    source = hf_source(model.hf_repo, model.hf_file)
    path = model.model_path or (f"hf:{source.label}" if source else "-")
    parts = [
        f"{name:<24}",
        f"priority {model.priority:<2}",
        f"group {model.resource_group:<12}",
        f"port {port:<5}",
        f"{','.join(flags) or 'on demand':<20}",
        path,
    ]
    return "  ".join(parts).rstrip()


def _print_issues(issues: list[ConfigIssue], stream: object) -> None:
    for issue in issues:
        print(f"{issue.severity}: {issue}", file=stream)  # type: ignore[arg-type]


def config_validate(models_file: str | None, auth_file: str | None) -> int:
    """Validate both files (or only auth.yaml, when no models.yaml is named); print a line per
    model, or every error. Returns the exit code."""
    if models_file is None and auth_file is not None:
        return auth_validate(auth_file)
    models_file = models_file or DEFAULT_MODELS
    errors: list[ConfigIssue] = []
    config: ModelsConfig | None = None
    auth: AuthConfig | None = None
    try:
        config = load_models_config(models_file)
    except ConfigError as exc:
        errors += exc.issues
    auth_path = Path(auth_file) if auth_file else (config.auth_path() if config else None)
    if auth_path is not None:
        try:
            auth = load_auth_config(auth_path)
        except ConfigError as exc:
            errors += exc.issues
    if errors:
        _print_issues(errors, sys.stderr)
        print(f"{len(errors)} error(s); the configuration was not accepted", file=sys.stderr)
        return 1
    assert config is not None
    for name in sorted(config.models, key=lambda n: (-config.models[n].priority, n)):
        print(_model_line(config, name))
    warnings = model_path_warnings(config, models_file)
    _print_issues(warnings, sys.stderr)
    if auth is None:
        auth_line = "auth: off (no auth file)"
    elif not auth.enabled:
        auth_line = f"auth: off ({auth_path} says enabled: false)"
    else:
        auth_line = f"auth: on, {len(auth.api_keys)} key(s) ({auth_path})"
    print(
        f"OK: {len(config.models)} model(s), {len(warnings)} warning(s); {auth_line}",
    )
    return 0


def auth_validate(auth_file: str) -> int:
    try:
        auth = load_auth_config(Path(auth_file))
    except ConfigError as exc:
        _print_issues(exc.issues, sys.stderr)
        print(f"{len(exc.issues)} error(s); {auth_file} was not accepted", file=sys.stderr)
        return 1
    state = f"on, {len(auth.api_keys)} key(s)" if auth.enabled else "off (enabled: false)"
    print(f"OK: auth: {state} ({auth_file})")
    return 0


def config_diff(old_file: str, new_file: str) -> int:
    """Print what applying NEW over OLD would do. Returns the exit code."""
    try:
        old = load_models_config(old_file)
        new = load_models_config(new_file)
    except ConfigError as exc:
        _print_issues(exc.issues, sys.stderr)
        return 1
    diff = diff_models(old, new)
    for line in diff.summary() or ["no changes"]:
        print(line)
    return 0


def new_key(name: str, permissions: list[str], expires: str | None, models: list[str]) -> int:
    """Print a fresh key once, and the auth.yaml lines that store only its SHA-256 digest."""
    key = "px-" + secrets.token_urlsafe(32)
    entry: dict[str, Any] = {
        "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
        "permissions": permissions,
    }
    if expires:
        entry["expires"] = expires
    if models:
        entry["models"] = models
    try:  # the lines must load exactly as they will in auth.yaml
        validate_auth({"api_keys": {name: entry}}, file="the new key")
    except ConfigError as error:
        _print_issues(error.issues, sys.stderr)
        return 1
    print(f"key: {key}")
    print("(shown once: only its digest goes into auth.yaml)\n")
    print("Add under api_keys: in auth.yaml:")
    print(
        yaml.safe_dump({name: entry}, sort_keys=False, default_flow_style=None)
        .rstrip()
        .replace("\n", "\n  ")
        .join(["  ", ""])
    )
    return 0


def node_flags() -> int:
    """Print the `ray start` flags for this host's GPUs, ready to paste."""
    from actors.gpu_probe import local_gpus  # nvidia-smi or NVML, no Ray needed

    gpus = local_gpus()
    if gpus:
        print(f"# found: {memory_gib_text(gpus)}")
    else:
        print("# no NVIDIA GPU found here (no NVML, no nvidia-smi answer): a CPU-only node")
    flags = " ".join(ray_start_flags(gpus))
    print(f"ray start --address=HEAD:6379 {flags}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxifier",
        description="One OpenAI-compatible endpoint for many llama-server models on Ray.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="check and compare configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    validate = config_commands.add_parser(
        "validate", help="validate models.yaml (and auth.yaml); list every error"
    )
    validate.add_argument(
        "--models", default=None, help=f"default: {DEFAULT_MODELS}, unless only --auth is given"
    )
    validate.add_argument(
        "--auth", default=None, help="default: settings.auth_file of models.yaml, if set"
    )
    diff = config_commands.add_parser("diff", help="what reloading NEW over OLD would change")
    diff.add_argument("old")
    diff.add_argument("new")

    serve = commands.add_parser("serve", help="run the server (Ctrl-C stops it and its models)")
    serve.add_argument("--config", default=DEFAULT_MODELS, help=f"default: {DEFAULT_MODELS}")
    serve.add_argument("--host", help="default: settings.host (127.0.0.1)")
    serve.add_argument("--port", type=int, help="default: settings.port (8000)")
    serve.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default: RAY_ADDRESS, else a running one, else start one)",
    )
    serve.add_argument("--replicas", type=int, default=1, help="ingress replicas (default 1)")
    serve.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback address with auth off"
    )
    serve.add_argument(
        "--ingress",
        choices=["haproxy", "python"],
        default="haproxy",
        help="Serve's HTTP front: HAProxy (default, faster) or Serve's Python proxy",
    )
    serve.add_argument(
        "--verbose",
        action="store_true",
        help="print Ray's, Serve's and HAProxy's logs here too (else only in their log files)",
    )

    def admin_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "--url",
            default=os.environ.get("PROXIFIER_URL", DEFAULT_URL),
            help=f"server (default: PROXIFIER_URL or {DEFAULT_URL})",
        )
        sub.add_argument(
            "--key",
            default=os.environ.get("PROXIFIER_API_KEY"),
            help="API key (default: PROXIFIER_API_KEY)",
        )
        return sub

    keys = commands.add_parser("keys", help="make API keys for auth.yaml")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = keys_commands.add_parser("new", help="print a new key and its auth.yaml lines")
    new.add_argument("name")
    new.add_argument(
        "--permissions", nargs="+", required=True, choices=["admin", "models", "config", "read"]
    )
    new.add_argument("--expires", help="a date or date-time, e.g. 2027-01-31")
    new.add_argument("--models", nargs="*", default=[], help="allow-list of model globs")

    commands.add_parser(
        "node", help="the `ray start` flags that declare this host's GPUs (count, memory, type)"
    )
    status = admin_parser(
        "status", "every model's state, where it runs, its GPU and memory, its load"
    )
    status.add_argument("--watch", action="store_true", help="redraw until Ctrl-C, like top")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between redraws")
    status.add_argument("--count", type=int, default=0, help="with --watch: stop after N draws")
    admin_parser("models", "the models clients can ask for")
    start = admin_parser("start", "start a model and wait until it is ready, showing progress")
    start.add_argument("model")
    start.add_argument("--no-wait", action="store_true", help="return once its start is under way")
    stop = admin_parser("stop", "stop a model")
    stop.add_argument("model")
    stop.add_argument("--force", action="store_true", help="also stop a preloaded model")
    admin_parser("reload", "reload one model, or the whole config").add_argument("model", nargs="?")
    group = admin_parser("group", "start, stop or show resource groups")
    group.add_argument("action", choices=["start", "stop", "status"])
    group.add_argument("group", nargs="?")
    queue = admin_parser("queue", "queue depth and waits; --clear empties a model's queue")
    queue.add_argument("model", nargs="?")
    queue.add_argument("--clear", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config" and args.config_command == "validate":
        return config_validate(args.models, args.auth)
    if args.command == "config" and args.config_command == "diff":
        return config_diff(args.old, args.new)
    if args.command == "keys":
        return new_key(args.name, args.permissions, args.expires, args.models)
    if args.command == "node":
        return node_flags()
    if args.command == "serve":
        from serve_app.run import serve_forever  # Ray is only imported to serve

        return serve_forever(
            args.config,
            args.host,
            args.port,
            args.address,
            args.replicas,
            args.insecure,
            args.ingress,
            args.verbose,
        )
    if args.command == "group" and args.action != "status" and not args.group:
        print("error: group start|stop needs a GROUP", file=sys.stderr)
        return 2
    return run_admin(args)


if __name__ == "__main__":
    sys.exit(main())
