"""The configuration schema: settings, models, API keys and auth (pydantic models).
Pure: no I/O; reads only `values` and the Hugging Face name rules in `proxifier.model_files`.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from proxifier.config.values import _STRICT, Permission, parse_expiry, parse_size, resolve_path
from proxifier.llama_flags import fields_switched_on
from proxifier.model_files import HF_REPO, cached_file, hf_source, model_cache


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
    # What a body may cost beyond its bytes (proxifier/body_cost.py), checked before a slot.
    max_json_keys: int = Field(10_000, ge=1)
    max_json_items: int = Field(1_000_000, ge=1)
    body_timeout: float = Field(30.0, gt=0)
    upstream_timeout: float = Field(600.0, gt=0)
    # A llama-server that does not accept the connection this fast is unreachable (its host
    # lost, a firewall): the client hears 504 now, not when Ray declares the host dead.
    upstream_connect_timeout: float = Field(5.0, gt=0)
    # Once llama-server has begun its answer (it sends its headers with the first token), a gap
    # this long between two pieces of it is a hung server or a host gone silent: the stream
    # ends with an upstream_timeout error event. upstream_timeout still bounds the first byte,
    # which waits for the whole prompt to be read.
    upstream_idle_timeout: float = Field(60.0, gt=0)
    # A ready llama-server answers /health within liveness_timeout, asked every
    # liveness_interval s; after liveness_failures misses in a row it counts as hung, is killed
    # and restarted like a crash (a stopped or wedged process never exits on its own).
    liveness_interval: float = Field(10.0, gt=0)
    liveness_timeout: float = Field(5.0, gt=0)
    liveness_failures: int = Field(3, ge=1)
    queue: QueueSettings = QueueSettings()
    auth_file: str | None = None
    # Where each node keeps models fetched from Hugging Face (None: ~/.cache/proxifier/models).
    model_cache: str | None = None

    @field_validator("max_body_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)


class Autoscaling(BaseModel):
    """A model's replica count chosen from its load, in Ray Serve's `autoscaling_config` names
    (README: Replicas)."""

    model_config = _STRICT

    min_replicas: int = Field(0, ge=0)  # 0: start on demand, stop when idle (as one instance)
    max_replicas: int = Field(1, ge=1)
    # In flight + queued per replica the scaler aims at; default: the model's `parallel`.
    target_ongoing_requests: float | None = Field(None, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is more than max_replicas"
                f" ({self.max_replicas})"
            )
        return self


class ModelConfig(BaseModel):
    """One entry of the `models:` mapping. `None` means "use the settings default"."""

    model_config = _STRICT

    model_path: str | None = None
    # Or fetched from Hugging Face on the node the model runs on (README: Models from Hugging Face).
    hf_repo: str | None = None  # owner/name[:TAG], checked by `_hf_repo`
    hf_file: str | None = None  # a .gguf path inside the repository, checked by `_hf_file`
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
    upstream_idle_timeout: float | None = Field(None, gt=0)
    aliases: list[str] = []
    # Replicas (README: Replicas): a fixed count, or one chosen from the load; neither: one
    # instance, started on demand.
    replicas: int | None = Field(None, ge=1)
    autoscaling: Autoscaling | None = None

    @field_validator("replicas", "autoscaling")
    @classmethod
    def _one_count(cls, value: object, info: ValidationInfo) -> object:
        if value is None:
            return value
        if info.field_name == "autoscaling" and info.data.get("replicas") is not None:
            raise ValueError(
                "replicas is set too: give a fixed count (replicas: N) or a range chosen"
                " from the load (autoscaling: {min_replicas, max_replicas}), not both"
            )
        most = value.max_replicas if isinstance(value, Autoscaling) else value
        port = info.data.get("port")
        if port is not None and isinstance(most, int) and most > 1:
            raise ValueError(
                f"port {port} is fixed, and two replicas on one node cannot share it:"
                " leave port out (each replica gets a free one) or keep one replica"
            )
        return value

    @property
    def max_replicas(self) -> int:
        if self.autoscaling is not None:
            return self.autoscaling.max_replicas
        return self.replicas or 1

    @model_validator(mode="before")
    @classmethod
    def _switches_in_args(cls, data: object) -> object:
        """`--embeddings` or `--reranking` in additional_args (the seed's way) counts as the
        field set to true; the field stays as written when the file sets it (a repeat of it is
        the cross-model check's error)."""
        if not isinstance(data, dict):
            return data
        args = data.get("additional_args")
        if isinstance(args, str):
            try:
                args = shlex.split(args)
            except ValueError:
                return data  # the field's own check says why
        if not isinstance(args, list):
            return data
        switched = fields_switched_on(str(arg) for arg in args)
        missing = {field: True for field in switched if data.get(field) is None}
        return {**data, **missing} if missing else data

    @field_validator("additional_args", mode="before")
    @classmethod
    def _split_args(cls, value: object) -> object:
        if isinstance(value, str):
            return shlex.split(value)
        if isinstance(value, list):
            return [str(item) if isinstance(item, int | float) else item for item in value]
        return value

    @field_validator("hf_repo")
    @classmethod
    def _hf_repo(cls, value: str | None) -> str | None:
        """owner/name, optionally :TAG, by the Hub's own rules for names (huggingface_hub's
        validate_repo_id): no URL, no path, no line break reaches the Hub or the cache."""
        if value is None:
            return value
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        example = "e.g. bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M"
        if not HF_REPO.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a Hugging Face repository as owner/name[:TAG] ({example})"
            )
        try:
            validate_repo_id(value.partition(":")[0])
        except HFValidationError:
            raise ValueError(
                f"{value!r} is not a valid Hugging Face repository name: letters, digits, '-', "
                f"'_' and '.', not starting or ending with '-' or '.', no '--' or '..' ({example})"
            ) from None
        return value

    @field_validator("hf_file")
    @classmethod
    def _hf_file(cls, value: str | None) -> str | None:
        """A .gguf file inside the repository: a relative path that cannot leave it."""
        if value is None:
            return value
        parts = value.split("/")
        if (
            not value.endswith(".gguf")
            or value.startswith("/")
            or any(part in ("", ".", "..") for part in parts)
            or any(not char.isprintable() or char == "\\" for char in value)
        ):
            raise ValueError(
                f"{value!r} is not a .gguf file inside the repository (a relative path such as "
                "'model-Q4_K_M.gguf' or 'Q8_0/model-Q8_0-00001-of-00002.gguf')"
            )
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
            try:
                return cached_file(source, model_cache(self.settings.model_cache))
            except (ValueError, OSError):
                # One model's unreadable cache (or a name the Hub's library refuses) must not
                # break the status, listing and metrics of all: it is simply not here; its
                # start says why.
                return None
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
    # /metrics without a key that may read it: no model or key names, only sums (a stranger
    # learns neither which models there are nor who uses them). True: the names for anyone.
    metrics_public_labels: bool = False

    @field_validator("rate_limits")
    @classmethod
    def _limits(cls, value: dict[str, int]) -> dict[str, int]:
        for name, limit in value.items():
            if limit < 1:
                raise ValueError(f"{name} = {limit}")
        return value


AUTH_DISABLED = AuthConfig(enabled=False)


def model_file_for(model: ModelConfig, base_dir: Path) -> Path | None:
    """The model's .gguf path, relative paths resolved against models.yaml's folder."""
    return None if model.model_path is None else resolve_path(base_dir, model.model_path)
