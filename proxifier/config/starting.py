"""What a configured model needs to start: its file on this node (or from the Hub), the
problem that stops it, the effective value of a setting. Reads the filesystem; no Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxifier.config.issues import ConfigIssue
from proxifier.config.schema import ModelConfig, ModelsConfig, Settings, model_file_for


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
        "upstream_idle_timeout": settings.upstream_idle_timeout,
        "llama_server": settings.llama_server,
    }
    for field, default in defaults.items():
        if values[field] is None:
            values[field] = default
    return values
