"""The `proxifier` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from proxifier.config import (
    AuthConfig,
    ConfigError,
    ConfigIssue,
    ModelsConfig,
    load_auth_config,
    load_models_config,
    model_path_warnings,
)
from proxifier.config_diff import diff_models

DEFAULT_MODELS = "configs/models.yaml"


def _model_line(config: ModelsConfig, name: str) -> str:
    model = config.models[name]
    flags = [flag for flag in ("preload", "auto_start", "embeddings") if getattr(model, flag)]
    port = str(model.port) if model.port is not None else "auto"
    path = model.model_path or "-"
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


def config_validate(models_file: str, auth_file: str | None) -> int:
    """Validate both files; print a line per model, or every error. Returns the exit code."""
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
    validate.add_argument("--models", default=DEFAULT_MODELS, help=f"default: {DEFAULT_MODELS}")
    validate.add_argument(
        "--auth", default=None, help="default: settings.auth_file of models.yaml, if set"
    )
    diff = config_commands.add_parser("diff", help="what reloading NEW over OLD would change")
    diff.add_argument("old")
    diff.add_argument("new")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config" and args.config_command == "validate":
        return config_validate(args.models, args.auth)
    if args.command == "config" and args.config_command == "diff":
        return config_diff(args.old, args.new)
    raise AssertionError(f"unhandled command {args}")


if __name__ == "__main__":
    sys.exit(main())
