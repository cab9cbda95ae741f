"""What changed between two models.yaml configurations, and whether each change needs a restart.

Pure: two loaded configs in, a diff out; no I/O, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxifier.config import ModelsConfig, effective, model_file_for

# A change to any of these means a new llama-server process (its command line, binary,
# environment or placement changes).
RESTART_FIELDS: frozenset[str] = frozenset(
    {
        "model_path",
        "hf_repo",
        "hf_file",
        "llama_server",
        "additional_args",
        "context_length",
        "gpu_layers",
        "threads",
        "parallel",
        "port",
        "chat_template",
        "embeddings",
        "reranking",
        "env",
        "num_gpus",
        "gpu_memory",
        "num_cpus",
        "memory",
        "resources",
        "labels",
    }
)

# The subset of RESTART_FIELDS that decides where the model's actor runs: changing one means a
# new actor, not only a new process.
PLACEMENT_FIELDS: frozenset[str] = frozenset(
    {"num_gpus", "gpu_memory", "num_cpus", "memory", "resources", "labels"}
)

# These apply to a running model without touching its process.
LIVE_FIELDS: frozenset[str] = frozenset(
    {
        "priority",
        "resource_group",
        "replicas",  # the scaler applies a new count at its next pass
        "autoscaling",
        "preload",
        "auto_start",
        "idle_timeout",
        "max_queue_size",
        "queue_timeout",
        "aliases",
        "startup_timeout",
        "upstream_timeout",
        "upstream_idle_timeout",
    }
)


@dataclass(frozen=True)
class ModelsDiff:
    """Models added, removed, and changed (by field), split by whether a restart is needed."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restart: dict[str, list[str]] = field(default_factory=dict)
    live: dict[str, list[str]] = field(default_factory=dict)
    settings: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.restart or self.live or self.settings)

    def summary(self) -> list[str]:
        """One human-readable line per change."""
        lines = [f"added model '{name}'" for name in self.added]
        lines += [f"removed model '{name}'" for name in self.removed]
        lines += [
            f"model '{name}' needs a restart: {', '.join(fields)} changed"
            for name, fields in self.restart.items()
        ]
        lines += [
            f"model '{name}' changes live: {', '.join(fields)}"
            for name, fields in self.live.items()
        ]
        lines += [f"setting changed: {name}" for name in self.settings]
        return lines


def diff_models(old: ModelsConfig, new: ModelsConfig) -> ModelsDiff:
    """Compare two configs model by model, with settings defaults filled in on both sides."""
    added = sorted(set(new.models) - set(old.models))
    removed = sorted(set(old.models) - set(new.models))
    restart: dict[str, list[str]] = {}
    live: dict[str, list[str]] = {}
    for name in sorted(set(old.models) & set(new.models)):
        before = effective(old.models[name], old.settings)
        after = effective(new.models[name], new.settings)
        # A relative path means a different file when models.yaml moved.
        before["model_path"] = model_file_for(old.models[name], old.base_dir)
        after["model_path"] = model_file_for(new.models[name], new.base_dir)
        changed = sorted(key for key in after if before.get(key) != after[key])
        needs_restart = [key for key in changed if key in RESTART_FIELDS]
        applies_live = [key for key in changed if key in LIVE_FIELDS]
        unknown = set(changed) - RESTART_FIELDS - LIVE_FIELDS
        assert not unknown, f"fields without a reload rule: {sorted(unknown)}"
        if needs_restart:
            restart[name] = needs_restart
        if applies_live:
            live[name] = applies_live
    old_settings = old.settings.model_dump()
    new_settings = new.settings.model_dump()
    settings = sorted(key for key in new_settings if old_settings[key] != new_settings[key])
    return ModelsDiff(added, removed, restart, live, settings)
