"""The configuration of models.yaml and auth.yaml: the schema, the loaders and every check.

Pure but for reading the files it is given; no Ray. Its modules, lowest first: `values` (field
values and their words), `schema` (the pydantic models), `issues` (problems and YAML reading),
`models_check`, `auth_check`, `starting` (what a model needs to start). Every problem is a
`ConfigIssue` naming the file, the model or key, the field, the bad value and what is allowed; a
file with problems raises `ConfigError` carrying all of them, never just the first.
"""

from proxifier.config.auth_check import load_auth_config, validate_auth
from proxifier.config.issues import (
    ConfigError,
    ConfigIssue,
    parse_yaml_text,
)
from proxifier.config.models_check import (
    load_models_config,
    validate_models,
)
from proxifier.config.schema import (
    AUTH_DISABLED,
    ApiKeyConfig,
    AuthConfig,
    Autoscaling,
    ModelConfig,
    ModelsConfig,
    QueueSettings,
    Settings,
    model_file_for,
)
from proxifier.config.starting import (
    effective,
    model_path_warnings,
    model_start_problem,
    model_start_problem_for,
)
from proxifier.config.values import (
    ALLOWED,
    PERMISSIONS,
    PROTECTED_PREFIXES,
    Permission,
    parse_expiry,
    parse_size,
    resolve_path,
)

__all__ = [
    "ALLOWED",
    "AUTH_DISABLED",
    "PERMISSIONS",
    "PROTECTED_PREFIXES",
    "ApiKeyConfig",
    "AuthConfig",
    "Autoscaling",
    "ConfigError",
    "ConfigIssue",
    "ModelConfig",
    "ModelsConfig",
    "Permission",
    "QueueSettings",
    "Settings",
    "effective",
    "load_auth_config",
    "load_models_config",
    "model_file_for",
    "model_path_warnings",
    "model_start_problem",
    "model_start_problem_for",
    "parse_expiry",
    "parse_size",
    "parse_yaml_text",
    "resolve_path",
    "validate_auth",
    "validate_models",
]
