"""Restoring a backup: both files validated before either is written, each keeps its mode, and a
restore a crash interrupted is completed by the next start (never a mixed pair)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from actors.controller.config_files import RESTORE_JOURNAL, ConfigFiles
from proxifier.config import ConfigError

OLD_MODELS = "settings: {auth_file: auth.yaml}\nmodels: {old: {}}\n"
NEW_MODELS = "settings: {auth_file: auth.yaml}\nmodels: {new: {}}\n"
OLD_AUTH = "api_keys: {ops: {key: k-old, permissions: [admin]}}\n"
NEW_AUTH = "api_keys: {ops: {key: k-new, permissions: [admin]}}\n"


@pytest.fixture
def files(tmp_path: Path) -> ConfigFiles:
    (tmp_path / "models.yaml").write_text(OLD_MODELS)
    (tmp_path / "auth.yaml").write_text(OLD_AUTH)
    os.chmod(tmp_path / "auth.yaml", 0o600)
    return ConfigFiles(tmp_path / "models.yaml")


def backup_of(files: ConfigFiles, models: str, auth: str) -> str:
    """A backup holding `models` and `auth`, made the way the controller makes them."""
    folder = files.models_path.parent
    current = files.load_models()
    meta = files.backup(current, "test")
    (files.backup_root / meta["id"] / "models.yaml").write_text(models)
    (files.backup_root / meta["id"] / "auth.yaml").write_text(auth)
    assert (folder / "models.yaml").read_text() == OLD_MODELS
    return meta["id"]


def test_restore_writes_both_files_and_keeps_their_modes(files: ConfigFiles) -> None:
    backup_id = backup_of(files, NEW_MODELS, NEW_AUTH)
    before = files.restore(backup_id, files.load_models())
    folder = files.models_path.parent
    assert (folder / "models.yaml").read_text() == NEW_MODELS
    assert (folder / "auth.yaml").read_text() == NEW_AUTH
    assert (folder / "auth.yaml").stat().st_mode & 0o777 == 0o600  # key material stays private
    assert before["description"] == f"before restoring {backup_id}"
    assert not (files.backup_root / RESTORE_JOURNAL).exists()


def test_a_bad_auth_yaml_in_the_backup_writes_neither_file(files: ConfigFiles) -> None:
    backup_id = backup_of(files, NEW_MODELS, "api_keys: {ops: {key: k, permissions: [root]}}\n")
    with pytest.raises(ConfigError):
        files.restore(backup_id, files.load_models())
    folder = files.models_path.parent
    assert (folder / "models.yaml").read_text() == OLD_MODELS
    assert (folder / "auth.yaml").read_text() == OLD_AUTH


def test_a_restore_interrupted_between_the_two_files_is_completed_at_start(
    files: ConfigFiles,
) -> None:
    backup_id = backup_of(files, NEW_MODELS, NEW_AUTH)
    folder = files.models_path.parent
    # The crash: the journal was written, models.yaml replaced, auth.yaml not yet.
    (files.backup_root / RESTORE_JOURNAL).write_text(backup_id)
    (folder / "models.yaml").write_text(NEW_MODELS)
    assert files.finish_restore() == backup_id
    assert (folder / "auth.yaml").read_text() == NEW_AUTH
    assert (folder / "auth.yaml").stat().st_mode & 0o777 == 0o600
    assert files.finish_restore() is None  # nothing left to finish
