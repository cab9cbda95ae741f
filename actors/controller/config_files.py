"""models.yaml and auth.yaml on disk, as the controller uses them: reading and showing them (keys
redacted), backups in `backups/` beside models.yaml (the last 20), restoring one, and the copy of
the files last accepted, which a restarted controller goes on with (DESIGN §11)."""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from proxifier.backups import backups_to_prune, new_backup_id, valid_backup_id
from proxifier.config import (
    AUTH_DISABLED,
    AuthConfig,
    ModelsConfig,
    load_auth_config,
    load_models_config,
    parse_yaml_text,
    validate_auth,
    validate_models,
)
from proxifier.errors import InvalidRequest, NotFound

ACCEPTED_KEY = "proxifier:accepted:"
RESTORE_JOURNAL = ".restore-in-progress"  # in backups/: the backup whose files are going in


class ConfigFiles:
    def __init__(self, models_path: Path, explicit_auth: Path | None = None) -> None:
        self.models_path = models_path
        self.explicit_auth = explicit_auth

    # ------------------------------------------------------------------ reading
    def auth_path(self, config: ModelsConfig) -> Path | None:
        return self.explicit_auth or config.auth_path()

    def load_models(self) -> ModelsConfig:
        return load_models_config(self.models_path)

    def load_auth(self, config: ModelsConfig) -> AuthConfig:
        path = self.auth_path(config)
        return AUTH_DISABLED if path is None else load_auth_config(path)

    def models_from_text(self, text: str, label: str) -> ModelsConfig:
        return validate_models(
            parse_yaml_text(text, label), file=label, base_dir=self.models_path.parent
        )

    def auth_stamp(self, config: ModelsConfig) -> int | None:
        """auth.yaml's modification time (ns), None when absent: the watcher's change signal."""
        path = self.auth_path(config)
        try:
            return None if path is None else path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def shown(self, config: ModelsConfig) -> dict[str, Any]:
        """The files as they are on disk, key material in auth.yaml and secret-looking `env`
        values in models.yaml redacted."""
        auth_path = self.auth_path(config)
        auth_text = None
        if auth_path is not None and auth_path.exists():
            auth_text = redact_keys(auth_path.read_text())
        return {
            "models_path": str(self.models_path),
            "models_yaml": redact_env_secrets(self.models_path.read_text()),
            "auth_path": str(auth_path) if auth_path else None,
            "auth_yaml": auth_text,
        }

    # ------------------------------------------------------------------ backups
    @property
    def backup_root(self) -> Path:
        return self.models_path.parent / "backups"

    def backup(self, config: ModelsConfig, description: str = "") -> dict[str, Any]:
        """Copy the files (with their modes) into backups/<id>/ with a description."""
        root = self.backup_root
        root.mkdir(parents=True, exist_ok=True)
        backup_id = new_backup_id(datetime.now(UTC), (p.name for p in root.iterdir()))
        folder = root / backup_id
        folder.mkdir()
        files = {"models.yaml": self.models_path}
        auth = self.auth_path(config)
        if auth is not None and auth.exists():
            files["auth.yaml"] = auth
        for stored, source in files.items():
            shutil.copy2(source, folder / stored)
        meta = {
            "id": backup_id,
            "description": description,
            "created_at": datetime.now(UTC).isoformat(),
            "files": sorted(files),
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
        for old in backups_to_prune(p.name for p in root.iterdir() if valid_backup_id(p.name)):
            shutil.rmtree(root / old, ignore_errors=True)
        return meta

    def list_backups(self) -> list[dict[str, Any]]:
        root = self.backup_root
        if not root.exists():
            return []
        metas = []
        for folder in root.iterdir():
            meta = folder / "meta.json"
            if valid_backup_id(folder.name) and meta.exists():
                metas.append(json.loads(meta.read_text()))
        return sorted(metas, key=lambda m: m["id"], reverse=True)

    def backup_folder(self, backup_id: str) -> Path:
        if not valid_backup_id(backup_id):
            raise InvalidRequest(f"{backup_id!r} is not a backup id")
        folder = self.backup_root / backup_id
        if not (folder / "models.yaml").exists():
            raise NotFound(f"no backup '{backup_id}'")
        return folder

    def backup_models(self, backup_id: str) -> ModelsConfig:
        folder = self.backup_folder(backup_id)
        label = f"backup {backup_id}/models.yaml"
        return self.models_from_text((folder / "models.yaml").read_text(), label)

    def restore(self, backup_id: str, current: ModelsConfig) -> dict[str, Any]:
        """Put a backup's files in place: both are validated before either is written, the
        current ones are backed up first, each file keeps its mode (auth.yaml 0600 stays so),
        and each is replaced atomically. Returns the backup of the files it replaced."""
        restored = self.backup_models(backup_id)
        folder = self.backup_folder(backup_id)
        if (folder / "auth.yaml").exists():
            auth_text = (folder / "auth.yaml").read_text()
            validate_auth(parse_yaml_text(auth_text, "auth"), file=f"backup {backup_id}/auth.yaml")
        before = self.backup(current, f"before restoring {backup_id}")
        self._put_in_place(backup_id, restored)
        return before

    def _put_in_place(self, backup_id: str, restored: ModelsConfig) -> None:
        """Replace the files with the backup's as a pair: a journal names the backup while the
        files are replaced, so a crash in between is completed by the next controller start
        (`finish_restore`): the files are then the old pair or the new one, never a mix."""
        folder = self.backup_folder(backup_id)
        writes = [(self.models_path, folder / "models.yaml")]
        auth_path = self.auth_path(restored)
        if (folder / "auth.yaml").exists() and auth_path is not None:
            writes.append((auth_path, folder / "auth.yaml"))
        staged = [(_staged(path, source.read_text(), source), path) for path, source in writes]
        journal = self.backup_root / RESTORE_JOURNAL
        _staged(journal, backup_id, self.models_path).replace(journal)
        for temporary, path in staged:
            os.replace(temporary, path)
        journal.unlink()

    def finish_restore(self) -> str | None:
        """A restore a crash interrupted is completed; returns its backup id, if any."""
        journal = self.backup_root / RESTORE_JOURNAL
        if not journal.exists():
            return None
        backup_id = journal.read_text().strip()
        restored = self.backup_models(backup_id)
        self._put_in_place(backup_id, restored)
        return backup_id

    # ------------------------------------------------------------------ what was accepted
    def accept(self, config: ModelsConfig) -> None:
        """Remember the files just applied (their text now) for a restarted controller."""
        auth_path = self.auth_path(config)
        texts = {
            "models": self.models_path.read_text(),
            "auth": auth_path.read_text() if auth_path and auth_path.exists() else None,
        }
        from ray.experimental import internal_kv

        if internal_kv._internal_kv_initialized():
            key = ACCEPTED_KEY + str(self.models_path)
            internal_kv._internal_kv_put(key, json.dumps(texts), overwrite=True)

    def accepted(self) -> dict[str, Any] | None:
        """The files' text last accepted for this models.yaml, kept in Ray's key-value store
        (it lives as long as the cluster), or None."""
        from ray.experimental import internal_kv

        if not internal_kv._internal_kv_initialized():
            return None
        raw = internal_kv._internal_kv_get(ACCEPTED_KEY + str(self.models_path))
        return None if raw is None else json.loads(raw)


def _staged(path: Path, text: str, mode_from: Path) -> Path:
    """`text` written beside `path` under a temporary name, with the mode `path` has now (or,
    for a new file, the backup's), ready to be moved into place."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    mode = (path if path.exists() else mode_from).stat().st_mode & 0o777
    os.chmod(temporary, mode)
    return temporary


# `env` names whose values are secrets (a Hub token, a provider's key): never shown.
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def redact_env_secrets(text: str) -> str:
    """models.yaml for display: the value of every model `env` variable whose name looks
    like a secret (HF_TOKEN, *_KEY, *SECRET*, *PASSWORD*) replaced; the rest stays."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return text  # not YAML: shown as it is, nothing in it reached a model
    models = data.get("models") if isinstance(data, dict) else None
    secrets = {
        str(value)
        for model in (models or {}).values()
        if isinstance(model, dict) and isinstance(model.get("env"), dict)
        for name, value in model["env"].items()
        if SECRET_NAME.search(str(name)) and value not in (None, "")
    }
    return _replaced(text, secrets)


def _replaced(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):  # a longer one first: no partial
        text = text.replace(secret, "<redacted>")
    return text


def redact_keys(text: str) -> str:
    """auth.yaml for display: every `key:` and `key_sha256:` value replaced, in whatever YAML
    style it is written (block or flow, quoted or not); comments and layout stay."""
    data = yaml.safe_load(text) or {}
    entries = data.get("api_keys") if isinstance(data, dict) else None
    secrets = {
        str(value)
        for entry in (entries or {}).values()
        if isinstance(entry, dict)
        for field, value in entry.items()
        if field in ("key", "key_sha256") and value
    }
    return _replaced(text, secrets)
