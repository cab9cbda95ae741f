"""Field values for models.yaml and auth.yaml: sizes, expiry dates, permissions, paths, and
the words that say what each field allows. Pure: no I/O; imports nothing of the product.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Literal

from pydantic import (
    ConfigDict,
)

Permission = Literal["admin", "models", "config", "read"]
PERMISSIONS: tuple[str, ...] = ("admin", "models", "config", "read")

# Paths that stay behind a key whatever public_endpoints says.
PROTECTED_PREFIXES: tuple[str, ...] = ("/admin", "/dashboard")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as "512MiB", "16GB" or "1048576"."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("expected a size of 0 or more")
        return value
    if isinstance(value, float) and value >= 0:
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError("expected a size")


def parse_expiry(value: object) -> datetime | None:
    """An aware UTC datetime from a date or datetime, with or without a time zone.

    A bare date means the key works through that whole day (UTC); a time without a zone is UTC.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        return datetime.combine(value, time(0), tzinfo=UTC) + timedelta(days=1)
    elif isinstance(value, str):
        text = value.strip()
        try:
            if "T" not in text and " " not in text:
                return parse_expiry(date.fromisoformat(text))
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError("not a date") from None
    else:
        raise ValueError("not a date")
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


# What each field allows, in words, for error messages; keyed by field name.
ALLOWED: dict[str, str] = {
    "priority": "an integer from 1 (lowest) to 10 (highest)",
    "port": "an integer from 1024 to 65535",
    "resource_group": "a non-empty name",
    "auto_start": "true or false",
    "preload": "true or false",
    "embeddings": "true or false",
    "reranking": "true or false",
    "gpu_layers": "an integer: -1 for all layers, 0 for CPU only, or a layer count",
    "context_length": "a positive integer (tokens)",
    "threads": "a positive integer",
    "parallel": "a positive integer (slots served at once)",
    "chat_template": "a template name or Jinja text",
    "additional_args": "a list of strings or one string split like a shell command line",
    "env": "a mapping of NAME: value (names of letters, digits and _)",
    "llama_server": "a path to a llama-server binary, or a command name on PATH",
    "num_gpus": "a number of 0 or more",
    "num_cpus": "a number of 0 or more",
    "memory": "a size in bytes, or a string such as 16GiB",
    "gpu_memory": "a size in bytes, or a string such as 12GiB",
    "max_body_size": "a size in bytes, or a string such as 10MB",
    "upstream_timeout": "a number of seconds greater than 0",
    "upstream_connect_timeout": "a number of seconds greater than 0",
    "upstream_idle_timeout": "a number of seconds greater than 0",
    "max_json_keys": "an integer of 1 or more",
    "max_json_items": "an integer of 1 or more",
    "liveness_interval": "a number of seconds greater than 0",
    "liveness_timeout": "a number of seconds greater than 0",
    "liveness_failures": "an integer of 1 or more",
    "resources": "a mapping of resource name: quantity (a number of 0 or more)",
    "labels": "a mapping of label: value (Ray label selector syntax such as in(a100,h100))",
    "idle_timeout": "a number of seconds, 0 or more (0 = never stop for idleness)",
    "max_queue_size": "an integer of 1 or more",
    "queue_timeout": "a number of seconds greater than 0",
    "startup_timeout": "a number of seconds greater than 0",
    "stop_grace": "a number of seconds, 0 or more",
    "cleanup_interval": "a number of seconds greater than 0",
    "placement_timeout": "a number of seconds greater than 0",
    "max_running_models": "an integer of 0 or more (0 = no limit)",
    "placement": "binpack or spread",
    "max_restarts": "an integer of 0 or more",
    "restart_window": "a number of seconds greater than 0",
    "cooldown": "a number of seconds, 0 or more",
    "max_lease_time": "a number of seconds greater than 0",
    "lease_ttl": "a number of seconds, 1 or more",
    "body_timeout": "a number of seconds greater than 0",
    "min_residency": "a number of seconds, 0 or more",
    "result_ttl": "a number of seconds greater than 0",
    "respond_async": "true or false",
    "keepalive_interval": "a number of seconds greater than 0",
    "lease_hold": "a number of seconds from 0 to 5 (0 = every slot goes back at once)",
    "aliases": "a list of names",
    "model_path": "a path to a .gguf file",
    "hf_repo": "a Hugging Face repository owner/name, optionally :TAG (a quantisation)",
    "hf_file": "a file of the hf_repo repository, such as model-Q4_K_M.gguf",
    "model_cache": "a folder on each node for downloaded models ($VARS and ~ expanded there)",
    "host": "a host name or IP address to bind",
    "auth_file": "a path to auth.yaml, relative to models.yaml",
    "enabled": "true or false",
    "dashboard_auth_required": "true or false",
    "permissions": "a list from admin, models, config, read",
    "expires": (
        "an ISO 8601 date such as 2025-12-31 or 2025-12-31T23:59:59Z (no time zone means UTC)"
    ),
    "key": "a non-empty string",
    "key_sha256": "64 hexadecimal characters (the SHA-256 digest of the key)",
    "models": "a list of model names or glob patterns",
    "rate_limits": "a mapping of key class: requests per minute (an integer of 1 or more)",
    "public_endpoints": "a list of exact paths starting with /",
    "cors_origins": "a list of origins such as https://app.example.com (empty: CORS off)",
}

_STRICT = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def resolve_path(base_dir: Path, path: str) -> Path:
    expanded = Path(path).expanduser()
    return expanded if expanded.is_absolute() else (base_dir / expanded).resolve()
