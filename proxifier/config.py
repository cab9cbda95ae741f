"""Configuration schema for models.yaml and auth.yaml, and the loaders that turn files into it.

Every problem is reported as a `ConfigIssue` that names the file, the model or key, the field,
the bad value and what is allowed; a file with problems raises `ConfigError` carrying all of
them, never just the first.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import shlex
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from proxifier.llama_flags import additional_args_conflicts
from proxifier.model_files import HF_REPO, cached_file, hf_source, model_cache

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


class QueueSettings(BaseModel):
    """Queue defaults for every model (DESIGN §5)."""

    model_config = _STRICT

    max_queue_size: int = Field(100, ge=1)
    queue_timeout: float = Field(30.0, gt=0)
    cleanup_interval: float = Field(10.0, gt=0)
    respond_async: bool = False
    keepalive_interval: float = Field(3.0, gt=0)
    lease_hold: float = Field(0.05, ge=0, le=5)


class Settings(BaseModel):
    """The `settings:` block of models.yaml: server-wide values and per-model defaults."""

    model_config = _STRICT

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    idle_timeout: float = Field(300.0, ge=0)
    cleanup_interval: float = Field(30.0, gt=0)
    max_running_models: int = Field(0, ge=0)
    # Models placed by GPU memory: fill the fullest GPU they fit on, or the emptiest.
    placement: Literal["binpack", "spread"] = "binpack"
    llama_server: str | None = None
    startup_timeout: float = Field(300.0, gt=0)
    stop_grace: float = Field(10.0, ge=0)
    placement_timeout: float = Field(60.0, gt=0)
    max_restarts: int = Field(3, ge=0)
    restart_window: float = Field(300.0, gt=0)
    cooldown: float = Field(60.0, ge=0)
    max_lease_time: float = Field(3600.0, gt=0)
    # A slot an ingress replica holds stays taken only while the replica renews it (every
    # lease_ttl/6 s): a replica that died, or bookkeeping that lost a slot, gives it back this fast.
    lease_ttl: float = Field(6.0, ge=1)
    min_residency: float = Field(10.0, ge=0)
    result_ttl: float = Field(600.0, gt=0)
    max_body_size: int = 10 * 1000**2
    body_timeout: float = Field(30.0, gt=0)
    upstream_timeout: float = Field(600.0, gt=0)
    queue: QueueSettings = QueueSettings()
    auth_file: str | None = None
    # Where each node keeps models fetched from Hugging Face (None: ~/.cache/proxifier/models).
    model_cache: str | None = None

    @field_validator("max_body_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)


class ModelConfig(BaseModel):
    """One entry of the `models:` mapping. `None` means "use the settings default"."""

    model_config = _STRICT

    model_path: str | None = None
    # Or fetched from Hugging Face on the node the model runs on (README: Models from Hugging Face).
    hf_repo: str | None = Field(None, pattern=HF_REPO.pattern)
    hf_file: str | None = Field(None, min_length=1)
    port: int | None = Field(None, ge=1024, le=65535)
    priority: int = Field(5, ge=1, le=10)
    resource_group: str = Field("default", min_length=1)
    auto_start: bool = False
    preload: bool = False
    gpu_layers: int | None = Field(None, ge=-1)
    context_length: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    parallel: int = Field(4, ge=1)
    chat_template: str | None = None
    embeddings: bool = False
    reranking: bool = False  # llama-server --reranking: /v1/rerank with the rank pooling it needs
    additional_args: list[str] = []
    env: dict[str, str] = {}
    llama_server: str | None = None
    num_gpus: float | None = Field(None, ge=0)
    # GPU memory the model needs (bytes, or "12GiB"): overrides the estimate from its GGUF.
    gpu_memory: int | None = None
    num_cpus: float = Field(0, ge=0)
    memory: int | None = None
    resources: dict[str, float] = {}
    labels: dict[str, str] = {}
    idle_timeout: float | None = Field(None, ge=0)
    max_queue_size: int | None = Field(None, ge=1)
    queue_timeout: float | None = Field(None, gt=0)
    startup_timeout: float | None = Field(None, gt=0)
    upstream_timeout: float | None = Field(None, gt=0)
    aliases: list[str] = []

    @field_validator("additional_args", mode="before")
    @classmethod
    def _split_args(cls, value: object) -> object:
        if isinstance(value, str):
            return shlex.split(value)
        if isinstance(value, list):
            return [str(item) if isinstance(item, int | float) else item for item in value]
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, value: object) -> object:
        if isinstance(value, dict):
            return {
                key: str(item) if isinstance(item, int | float | bool) else item
                for key, item in value.items()
            }
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"bad variable name {name!r}")
        return value

    @field_validator("memory", "gpu_memory", mode="before")
    @classmethod
    def _memory(cls, value: object) -> int | None:
        return None if value is None else parse_size(value)

    @field_validator("resources")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, quantity in value.items():
            if quantity < 0:
                raise ValueError(f"{name} = {quantity}")
        return value


class ModelsConfig(BaseModel):
    """A whole models.yaml: settings plus every model by name."""

    model_config = _STRICT

    settings: Settings = Settings()
    models: dict[str, ModelConfig] = {}
    # Where the file lives: relative model paths and auth_file resolve against it.
    base_dir: Path = Field(default=Path("."), exclude=True)

    def model_file(self, name: str) -> Path | None:
        """The model's file on this machine: its path, or its downloaded copy if this node
        has one (None when it is fetched elsewhere or not yet)."""
        model = self.models[name]
        source = hf_source(model.hf_repo, model.hf_file)
        if source is not None:
            return cached_file(source, model_cache(self.settings.model_cache))
        return model_file_for(model, self.base_dir)

    def auth_path(self) -> Path | None:
        auth = self.settings.auth_file
        return None if auth is None else resolve_path(self.base_dir, auth)

    def resolve_name(self, name: str) -> str | None:
        """The model a name or an alias refers to, or None."""
        if name in self.models:
            return name
        for model_name, model in self.models.items():
            if name in model.aliases:
                return model_name
        return None


class ApiKeyConfig(BaseModel):
    """One entry of auth.yaml's `api_keys:`; exactly one of `key` and `key_sha256`."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    key: str | None = Field(None, min_length=1, repr=False)
    key_sha256: str | None = Field(None, repr=False)
    permissions: list[Permission] = Field(min_length=1)
    expires: datetime | None = None
    models: list[str] | None = None
    description: str | None = None

    @field_validator("key", mode="before")
    @classmethod
    def _key_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("key_sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("not a SHA-256 digest")
        return None if value is None else value.lower()

    @field_validator("expires", mode="before")
    @classmethod
    def _expires(cls, value: object) -> datetime | None:
        return parse_expiry(value)

    def digest(self) -> str:
        """The SHA-256 hex digest the key is checked against."""
        if self.key_sha256 is not None:
            return self.key_sha256
        assert self.key is not None, "validated: key or key_sha256 is set"
        return hashlib.sha256(self.key.encode()).hexdigest()


class AuthConfig(BaseModel):
    """A whole auth.yaml. A file that exists turns auth on unless it says `enabled: false`."""

    model_config = _STRICT

    enabled: bool = True
    dashboard_auth_required: bool = True
    api_keys: dict[str, ApiKeyConfig] = {}
    rate_limits: dict[str, int] = {}
    public_endpoints: list[str] = ["/health", "/metrics"]
    cors_origins: list[str] = []

    @field_validator("rate_limits")
    @classmethod
    def _limits(cls, value: dict[str, int]) -> dict[str, int]:
        for name, limit in value.items():
            if limit < 1:
                raise ValueError(f"{name} = {limit}")
        return value


AUTH_DISABLED = AuthConfig(enabled=False)


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file; `where` is e.g. "model 'chat'" or "settings"."""

    file: str
    where: str
    field: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        place = f"{self.where}: " if self.where else ""
        field = f"field '{self.field}': " if self.field else ""
        return f"{self.file}: {place}{field}{self.message}"


class ConfigError(ValueError):
    """A config file that cannot be used; `issues` holds every error found in it."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses Ray as itself (the controller rejects a reload; the ingress reports it).
        return (ConfigError, (self.issues,))


def resolve_path(base_dir: Path, path: str) -> Path:
    expanded = Path(path).expanduser()
    return expanded if expanded.is_absolute() else (base_dir / expanded).resolve()


def _suggestion(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "allowed fields are " + ", ".join(choices)


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _issues_from_validation(
    error: ValidationError,
    *,
    file: str,
    where: str,
    schema: type[BaseModel],
    secret_fields: frozenset[str] = frozenset(),
    allowed_here: dict[str, str] | None = None,
) -> list[ConfigIssue]:
    """Turn pydantic's errors into ConfigIssues that say what is allowed."""
    words = ALLOWED | (allowed_here or {})
    issues: list[ConfigIssue] = []
    seen: set[tuple[str, str]] = set()
    for item in error.errors(include_url=False):
        loc = [str(part) for part in item["loc"]]
        kind = item["type"]
        if kind == "extra_forbidden":
            field_path = ".".join(loc)
            parent = _schema_at(schema, loc[:-1])
            choices = list(parent.model_fields) if parent else []
            message = f"unknown field; {_suggestion(loc[-1], choices)}"
        else:
            # Report a field once, at its top-level name, with the words of ALLOWED.
            top = loc[0] if loc else ""
            field_path = ".".join(loc) if top in {"queue", "api_keys"} else top
            leaf = loc[-1] if loc else ""
            allowed = words.get(leaf) or words.get(top)
            if top in secret_fields:
                shown = "the value given"
            elif kind == "missing":
                shown = ""
            else:
                shown = _show(item.get("input"))
            if kind == "missing":
                message = "is required" + (f"; expected {allowed}" if allowed else "")
            elif kind == "value_error" and top == "expires":
                message = f"{shown} is not a date; expected {allowed}"
            elif allowed:
                message = f"{shown} is not allowed; expected {allowed}"
            else:
                message = f"{shown}: {item['msg']}"
        key = (field_path, message)
        if key not in seen:
            seen.add(key)
            issues.append(ConfigIssue(file, where, field_path, message))
    return issues


def _schema_at(schema: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = schema
    for part in loc:
        if current is None or part not in current.model_fields:
            return None
        annotation = current.model_fields[part].annotation
        current = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return current


def _read_yaml(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(str(path), "", "", "file not found")]) from None
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), "", "", f"cannot read: {exc}")]) from None
    return parse_yaml_text(text, str(path))


def parse_yaml_text(text: str, file: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(file, place, "", f"invalid YAML: {problem}")]) from None


_NAME_RE = re.compile(r"^[^/\x00-\x1f\x7f]+$")


def _check_name(name: object, what: str, file: str) -> ConfigIssue | None:
    if (
        not isinstance(name, str)
        or not name.strip()
        or name != name.strip()
        or not _NAME_RE.match(name)
        or len(name) > 128
    ):
        return ConfigIssue(
            file,
            f"{what} {_show(name)}",
            "",
            "invalid name; expected 1 to 128 characters without '/', control characters "
            "or leading/trailing spaces",
        )
    return None


def validate_models(data: object, *, file: str, base_dir: Path = Path(".")) -> ModelsConfig:
    """Validate parsed models.yaml data; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue(file, "top level", "", "expected a mapping with settings: and models:")]
        )
    issues: list[ConfigIssue] = []
    top_fields = ["settings", "models"]
    for key in data:
        if key not in top_fields:
            issues.append(
                ConfigIssue(
                    file,
                    "top level",
                    str(key),
                    f"unknown field; {_suggestion(str(key), top_fields)}",
                )
            )

    settings = Settings()
    raw_settings = data.get("settings") or {}
    if not isinstance(raw_settings, dict):
        issues.append(ConfigIssue(file, "settings", "", "expected a mapping of setting: value"))
    else:
        try:
            settings = Settings.model_validate(raw_settings)
        except ValidationError as exc:
            issues += _issues_from_validation(
                exc,
                file=file,
                where="settings",
                schema=Settings,
                allowed_here={"port": "an integer from 1 to 65535"},
            )

    models: dict[str, ModelConfig] = {}
    raw_models = data.get("models") or {}
    if not isinstance(raw_models, dict):
        issues.append(ConfigIssue(file, "models", "", "expected a mapping of model name: settings"))
        raw_models = {}
    checked: dict[str, dict[str, Any]] = {}
    for name, raw in raw_models.items():
        bad_name = _check_name(name, "model", file)
        if bad_name:
            issues.append(bad_name)
            continue
        where = f"model '{name}'"
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            issues.append(ConfigIssue(file, where, "", "expected a mapping of field: value"))
            continue
        checked[name] = raw
        try:
            models[name] = ModelConfig.model_validate(raw)
        except ValidationError as exc:
            issues += _issues_from_validation(exc, file=file, where=where, schema=ModelConfig)

    # Checks across fields and models run on the raw data too, so one bad field elsewhere
    # does not hide them.
    issues += _cross_model_issues(checked, settings, file)
    if issues:
        raise ConfigError(issues)
    return ModelsConfig(settings=settings, models=models, base_dir=base_dir)


def _source_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Where the model file comes from: a path, or a Hugging Face repository, not both."""
    path, repo, file = raw.get("model_path"), raw.get("hf_repo"), raw.get("hf_file")
    problems = []
    if path is not None and repo is not None:
        problems.append(("hf_repo", "set either model_path or hf_repo, not both"))
    if file is not None and repo is None:
        problems.append(("hf_file", "needs hf_repo (the repository the file is in)"))
    if isinstance(repo, str) and ":" in repo and file is not None:
        problems.append(("hf_file", f"hf_repo {repo!r} names a tag already; set one of them"))
    return problems


def _cross_model_issues(
    raw_models: dict[str, dict[str, Any]], settings: Settings, file: str
) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    ports: dict[int, str] = {}
    names: dict[str, str] = {name: name for name in raw_models}
    for name, raw in raw_models.items():
        where = f"model '{name}'"
        port = raw.get("port")
        if isinstance(port, int) and not isinstance(port, bool) and 1024 <= port <= 65535:
            if port in ports:
                issues.append(
                    ConfigIssue(
                        file,
                        where,
                        "port",
                        f"{port} is already used by model '{ports[port]}'; "
                        "each model needs its own port (or leave port out to pick a free one)",
                    )
                )
            elif port == settings.port:
                issues.append(
                    ConfigIssue(
                        file,
                        where,
                        "port",
                        f"{port} is the proxy's own port (settings.port); "
                        "choose another or leave port out",
                    )
                )
            else:
                ports[port] = name
        issues += [ConfigIssue(file, where, f, why) for f, why in _source_problems(raw)]
        args = raw.get("additional_args")
        if isinstance(args, str):
            try:
                args = shlex.split(args)
            except ValueError:
                args = None
        if isinstance(args, list):
            set_fields = {field for field, value in raw.items() if value is not None}
            for problem in additional_args_conflicts([str(a) for a in args], set_fields):
                issues.append(ConfigIssue(file, where, "additional_args", problem))
        if raw.get("embeddings") is True and raw.get("reranking") is True:
            issues.append(
                ConfigIssue(
                    file,
                    where,
                    "reranking",
                    "cannot be set with 'embeddings: true': reranking pools each input into one "
                    "score, so the model's embeddings would be meaningless; configure the file "
                    "twice, under two names, one for each",
                )
            )
        aliases = raw.get("aliases")
        for alias in aliases if isinstance(aliases, list) else []:
            owner = names.get(alias) if isinstance(alias, str) else None
            if owner is not None and owner != name:
                issues.append(
                    ConfigIssue(
                        file,
                        where,
                        "aliases",
                        f"{alias!r} already names model '{owner}'; "
                        "names and aliases must be unique",
                    )
                )
                continue
            bad = _check_name(alias, "alias", file)
            if bad:
                issues.append(ConfigIssue(file, where, "aliases", bad.message))
            else:
                names[alias] = name
    return issues


def load_models_config(path: str | Path) -> ModelsConfig:
    """Read and validate models.yaml; raise ConfigError listing every problem."""
    path = Path(path)
    data = _read_yaml(path)
    return validate_models(data, file=str(path), base_dir=path.resolve().parent)


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
    for name, raw in raw_keys.items():
        bad_name = _check_name(name, "api key", file)
        if bad_name:
            issues.append(bad_name)
            continue
        where = f"api key '{name}'"
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


def model_path_warnings(config: ModelsConfig, file: str) -> list[ConfigIssue]:
    """Warnings for models whose file is absent: fine at load, an error when the model starts."""
    warnings: list[ConfigIssue] = []
    for name, model in config.models.items():
        if model.hf_repo:
            continue  # fetched where it runs
        where = f"model '{name}'"
        path = config.model_file(name)
        if path is None:
            warnings.append(
                ConfigIssue(
                    file,
                    where,
                    "model_path",
                    "not set; the model cannot start until it is",
                    "warning",
                )
            )
        elif not path.is_file():
            warnings.append(
                ConfigIssue(
                    file,
                    where,
                    "model_path",
                    f"{str(path)!r} does not exist on this machine; the model cannot start "
                    "here until it does",
                    "warning",
                )
            )
    return warnings


def model_file_for(model: ModelConfig, base_dir: Path) -> Path | None:
    """The model's .gguf path, relative paths resolved against models.yaml's folder."""
    return None if model.model_path is None else resolve_path(base_dir, model.model_path)


def model_start_problem_for(name: str, model: ModelConfig, base_dir: Path) -> str | None:
    """Why this model cannot start on this node, or None: checked right before starting it."""
    if model.hf_repo:
        return None  # fetched on the node before it starts; a failed download says why
    path = model_file_for(model, base_dir)
    if path is None:
        return f"model '{name}' has no model_path or hf_repo; set one in models.yaml"
    if not path.is_file():
        return f"model '{name}': model_path {str(path)!r} does not exist"
    return None


def model_start_problem(config: ModelsConfig, name: str) -> str | None:
    return model_start_problem_for(name, config.models[name], config.base_dir)


def effective(model: ModelConfig, settings: Settings) -> dict[str, Any]:
    """Every value the model runs with, settings defaults filled in (for diffs and display)."""
    values = model.model_dump()
    defaults = {
        "idle_timeout": settings.idle_timeout,
        "max_queue_size": settings.queue.max_queue_size,
        "queue_timeout": settings.queue.queue_timeout,
        "startup_timeout": settings.startup_timeout,
        "upstream_timeout": settings.upstream_timeout,
        "llama_server": settings.llama_server,
    }
    for field, default in defaults.items():
        if values[field] is None:
            values[field] = default
    return values
