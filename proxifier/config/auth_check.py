"""auth.yaml checked as a whole (keys, permissions, expiry, allow-lists, rate-limit classes);
`load_auth_config` turns a file into `AuthConfig` or raises `ConfigError`. Reads files; no Ray.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    ValidationError,
)

from proxifier.config.issues import (
    ConfigError,
    ConfigIssue,
    _issues_from_validation,
    _read_yaml,
    named_entries,
)
from proxifier.config.schema import AUTH_DISABLED, ApiKeyConfig, AuthConfig
from proxifier.config.values import PROTECTED_PREFIXES


def validate_auth(data: object, *, file: str) -> AuthConfig:
    """Validate parsed auth.yaml data; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(file, "top level", "", "expected a mapping")])
    issues: list[ConfigIssue] = []
    top_schema = {k: v for k, v in data.items() if k != "api_keys"}
    try:
        base = AuthConfig.model_validate(top_schema)
    except ValidationError as exc:
        issues += _issues_from_validation(exc, file=file, where="", schema=AuthConfig)
        base = AUTH_DISABLED

    keys: dict[str, ApiKeyConfig] = {}
    raw_keys = data.get("api_keys") or {}
    if not isinstance(raw_keys, dict):
        issues.append(ConfigIssue(file, "", "api_keys", "expected a mapping of key name: settings"))
        raw_keys = {}
    digests: dict[str, str] = {}
    for name, raw, where in named_entries(raw_keys, "api key", file, issues):
        if not isinstance(raw, dict):
            issues.append(ConfigIssue(file, where, "", "expected a mapping of field: value"))
            continue
        try:
            key = ApiKeyConfig.model_validate(raw)
        except ValidationError as exc:
            issues += _issues_from_validation(
                exc,
                file=file,
                where=where,
                schema=ApiKeyConfig,
                secret_fields=frozenset({"key", "key_sha256"}),
            )
            continue
        if (key.key is None) == (key.key_sha256 is None):
            issues.append(
                ConfigIssue(
                    file,
                    where,
                    "key",
                    "set exactly one of key (plain text) and key_sha256 (preferred: "
                    "the SHA-256 hex digest of the key)",
                )
            )
            continue
        digest = key.digest()
        if digest in digests:
            issues.append(
                ConfigIssue(
                    file,
                    where,
                    "key",
                    f"the same key value as api key '{digests[digest]}'; "
                    "each key needs its own value",
                )
            )
        else:
            digests[digest] = name
        keys[name] = key

    for path in base.public_endpoints:
        if not path.startswith("/"):
            issues.append(
                ConfigIssue(
                    file,
                    "",
                    "public_endpoints",
                    f"{path!r} is not allowed; expected an exact path starting with /",
                )
            )
        elif any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES):
            issues.append(
                ConfigIssue(
                    file,
                    "",
                    "public_endpoints",
                    f"{path!r} cannot be public; admin and dashboard routes always need a key",
                )
            )
    if issues:
        raise ConfigError(issues)
    return base.model_copy(update={"api_keys": keys})


def load_auth_config(path: str | Path) -> AuthConfig:
    """Read and validate auth.yaml; raise ConfigError listing every problem."""
    path = Path(path)
    return validate_auth(_read_yaml(path), file=str(path))
