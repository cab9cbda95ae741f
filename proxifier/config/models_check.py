"""models.yaml checked as a whole: each model's fields, then the rules across models (names,
aliases, ports, groups); `load_models_config` turns a file into `ModelsConfig` or raises
`ConfigError` with every problem. Reads files; no Ray.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)

from proxifier.config.issues import (
    ConfigError,
    ConfigIssue,
    _issues_from_validation,
    _read_yaml,
    _suggestion,
    check_name,
    named_entries,
)
from proxifier.config.schema import ModelConfig, ModelsConfig, Settings
from proxifier.llama_flags import additional_args_conflicts, fields_switched_on


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
    for name, raw, where in named_entries(raw_models, "model", file, issues):
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
        switched: dict[str, str] = {}
        if isinstance(args, list):
            set_fields = {field for field, value in raw.items() if value is not None}
            for problem in additional_args_conflicts([str(a) for a in args], set_fields):
                issues.append(ConfigIssue(file, where, "additional_args", problem))
            switched = fields_switched_on(str(a) for a in args)
        on = {f: f"'{f}: true'" for f in ("embeddings", "reranking") if raw.get(f) is True}
        on |= {f: f"{flag!r} in additional_args" for f, flag in switched.items()}
        if "embeddings" in on and "reranking" in on:
            issues.append(
                ConfigIssue(
                    file,
                    where,
                    "reranking" if raw.get("reranking") is True else "additional_args",
                    ("" if raw.get("reranking") is True else f"{on['reranking']}: ")
                    + f"cannot be set with {on['embeddings']}: reranking pools each input into "
                    "one score, so the model's embeddings would be meaningless; configure the "
                    "file twice, under two names, one for each",
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
            bad = check_name(alias, "alias", file)
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
