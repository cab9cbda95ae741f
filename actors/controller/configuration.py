"""The configuration in force: models.yaml and auth.yaml as accepted, the auth keys and their
version, when each model first appeared, and the config files (reload, validate, backups). It
places nothing: applying a new config goes through the callback the facade gives it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import ray

from actors.controller.config_files import ConfigFiles
from actors.controller.reconcile import not_found_message
from proxifier.config import AuthConfig, ConfigError, ModelsConfig, parse_yaml_text, validate_auth
from proxifier.config_diff import ModelsDiff, diff_models
from proxifier.errors import ModelNotFound
from proxifier.planning import ReloadPlan, reload_plan

ApplyPlan = Callable[[ModelsDiff, ReloadPlan, ModelsConfig], Awaitable[dict[str, Any]]]


class Configuration:
    """The accepted config and auth keys, and the operations on the files behind them."""

    def __init__(
        self,
        models_path: Path,
        auth_path: Path | None,
        event: Callable[..., Any],
        running: Callable[[], Iterable[str]],
        apply_plan: ApplyPlan,
    ) -> None:
        self.models_path = models_path
        self.files = ConfigFiles(models_path, auth_path)
        self._event = event
        self._running = running  # the models with an actor now
        self._apply_plan = apply_plan  # a reload's actions, once the new config is in force
        # A restarted controller goes on with the configuration it last accepted, not with
        # whatever is on disk now (an edit not reloaded yet, or a bad file). A first start
        # reads the files; one that does not load fails the actor's creation (`proxifier serve`
        # validates first).
        finished = self.files.finish_restore()  # one a crash interrupted, before reading
        if finished is not None:
            self._event("config_restored", id=finished, completed_after_restart=True)
        self.config, self.auth = self._accepted_or_files(read_files=finished is not None)
        self.auth_version = 0
        # When each model first appeared: /v1/models' stable `created`.
        now = int(time.time())
        self.registered_at: dict[str, int] = dict.fromkeys(self.config.models, now)

    # ------------------------------------------------------------------ the accepted config
    def _accepted_or_files(self, read_files: bool = False) -> tuple[ModelsConfig, AuthConfig]:
        restarted = ray.is_initialized() and (
            ray.get_runtime_context().was_current_actor_reconstructed
        )
        stored = self.files.accepted() if restarted and not read_files else None
        if stored is None:
            config = self.files.load_models()
            auth = self.files.load_auth(config)
            self.accept(config)
            return config, auth
        config = self.files.models_from_text(stored["models"], str(self.models_path))
        try:
            auth = self.files.load_auth(config)  # auth.yaml applies as it changes on disk
        except ConfigError as error:
            if stored.get("auth") is None:
                raise
            auth = validate_auth(parse_yaml_text(stored["auth"], "auth"), file="accepted auth")
            self._event("config_rejected", file="auth.yaml", errors=[str(i) for i in error.issues])
        self._event("config_restored_after_restart", models_path=str(self.models_path))
        return config, auth

    def accept(self, config: ModelsConfig) -> None:
        with contextlib.suppress(Exception):  # no store (no Ray): a restart reads the files
            self.files.accept(config)

    def set_auth(self, auth: AuthConfig) -> None:
        self.auth, self.auth_version = auth, self.auth_version + 1

    # ------------------------------------------------------------------ configuration
    async def reload_config(self) -> dict[str, Any]:
        """Re-read models.yaml and auth.yaml; apply the difference. A bad file changes nothing."""
        try:
            new = self.files.load_models()
            auth = self.files.load_auth(new)
        except ConfigError as error:
            self._event("config_rejected", errors=[str(i) for i in error.issues])
            raise
        result = await self._apply(new)
        if auth != self.auth:
            self.auth = auth
            self.auth_version += 1
            result["auth_reloaded"] = True
        self.accept(new)
        return result

    async def reload_model(self, name: str) -> dict[str, Any]:
        """Re-read models.yaml and apply only what changed for one model."""
        new = self.files.load_models()
        model = self.config.resolve_name(name) or new.resolve_name(name)
        if model is None:
            raise ModelNotFound(not_found_message(self.config, name))
        models = dict(self.config.models)
        if model in new.models:
            models[model] = new.models[model]
        else:
            models.pop(model)
        partial = self.config.model_copy(update={"models": models})
        return await self._apply(partial)

    async def _apply(self, new: ModelsConfig) -> dict[str, Any]:
        diff = diff_models(self.config, new)
        plan = reload_plan(diff, new, set(self._running()))
        self.config = new
        for name in plan.register:
            self.registered_at.setdefault(name, int(time.time()))
        return await self._apply_plan(diff, plan, new)

    def validate_config(self) -> dict[str, Any]:
        """Validate the files on disk without applying them."""
        errors: list[str] = []
        try:
            new = self.files.load_models()
        except ConfigError as error:
            return {"valid": False, "errors": [str(i) for i in error.issues]}
        try:
            self.files.load_auth(new)
        except ConfigError as error:
            errors = [str(i) for i in error.issues]
        diff = diff_models(self.config, new)
        return {"valid": not errors, "errors": errors, "changes": diff.summary()}

    def config_files(self) -> dict[str, Any]:
        """The config files as they are on disk, key material in auth.yaml redacted."""
        return self.files.shown(self.config)

    def backup_diff(self, backup_id: str) -> dict[str, Any]:
        """What restoring a backup would change, without changing anything."""
        restored = self.files.backup_models(backup_id)
        return {"id": backup_id, "changes": diff_models(self.config, restored).summary()}

    def config_paths(self) -> dict[str, str | None]:
        auth = self.files.auth_path(self.config)
        return {"models": str(self.models_path), "auth": str(auth) if auth else None}

    # ------------------------------------------------------------------ backups
    def backup(self, description: str = "") -> dict[str, Any]:
        """Copy the config files into backups/<id>/ with a description; keep the last 20."""
        meta = self.files.backup(self.config, description)
        self._event("config_backup", id=meta["id"], description=description)
        return meta

    def list_backups(self) -> list[dict[str, Any]]:
        return self.files.list_backups()

    async def restore(self, backup_id: str) -> dict[str, Any]:
        """Put a backup's files in place (both validated first, modes kept) and apply them."""
        before = self.files.restore(backup_id, self.config)
        self._event("config_backup", id=before["id"], description=before["description"])
        result = await self.reload_config()
        self._event("config_restored", id=backup_id, previous=before["id"])
        return {"restored": backup_id, "backup_of_previous": before["id"], **result}
