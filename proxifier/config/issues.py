"""Configuration problems as values (`ConfigIssue`, `ConfigError`) and the YAML reading that
reports them with the file, the key and the field. No checks of meaning here: those are in
`models_check` and `auth_check`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from proxifier.config.values import ALLOWED


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


NAME_RE = re.compile(r"^[^/\x00-\x1f\x7f]+$")


def check_name(name: object, what: str, file: str) -> ConfigIssue | None:
    if (
        not isinstance(name, str)
        or not name.strip()
        or name != name.strip()
        or not NAME_RE.match(name)
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


def named_entries(
    entries: dict[Any, Any], what: str, file: str, issues: list[ConfigIssue]
) -> Iterator[tuple[str, Any, str]]:
    """Each (name, value, where) of a mapping of named entries (models, API keys), where the
    name is valid; a bad name is an issue in `issues` and its entry is passed over."""
    for name, raw in entries.items():
        bad_name = check_name(name, what, file)
        if bad_name:
            issues.append(bad_name)
            continue
        yield name, raw, f"{what} '{name}'"
