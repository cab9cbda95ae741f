"""The `proxifier` command line: argument parsing, the config and key commands done here, and
the admin commands handed to `proxifier.cli_admin`. Ray only when it serves."""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from proxifier.cli_admin import run_admin
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
from proxifier.gpu_inventory import memory_gib_text, ray_start_flags
from proxifier.llama_flags import fields_switched_on
from proxifier.model_files import hf_source

DEFAULT_MODELS = "configs/models.yaml"
DEFAULT_URL = "http://127.0.0.1:8000"


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
        for field, flag in fields_switched_on(config.models[name].additional_args).items():
            print(f"  {name}: {field}: on, from {flag!r} in additional_args")
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
    scale = admin_parser("scale", "run a model on N replicas (until its config changes)")
    scale.add_argument("model")
    scale.add_argument("replicas", type=int)
    stop = admin_parser("stop", "stop a model")
    stop.add_argument("model")
    stop.add_argument("--force", action="store_true", help="also stop a preloaded model")
    admin_parser("reload", "reload one model, or the whole config").add_argument("model", nargs="?")
    group = admin_parser("group", "start, stop or show resource groups")
    group.add_argument("action", choices=["start", "stop", "status"])
    group.add_argument("group", nargs="?")
    logs = admin_parser("logs", "a model's llama-server log (also of a stopped or failed one)")
    logs.add_argument("model")
    logs.add_argument("-n", "--lines", type=int, default=100, help="how many of the last lines")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="then print new lines as they come"
    )
    logs.add_argument(
        "--interval", type=float, default=1.0, help="with --follow: seconds between reads"
    )
    queue = admin_parser("queue", "queue depth and waits; --clear empties a model's queue")
    queue.add_argument("model", nargs="?")
    queue.add_argument("--clear", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _command(argv)
        sys.stdout.flush()  # here, where a reader gone away is still ours to handle
        return code
    except BrokenPipeError:
        # `proxifier status | head`: the reader has what it wanted. The rest goes nowhere,
        # with no traceback (Python's advice for SIGPIPE, docs: signal, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _command(argv: Sequence[str] | None) -> int:
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
