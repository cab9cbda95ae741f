"""Backup ids: unique within one second, sortable, and never a path."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from proxifier.backups import backups_to_prune, new_backup_id, valid_backup_id

NOW = datetime(2026, 11, 26, 14, 30, 5, 123456, tzinfo=UTC)


def test_ids_are_unique_within_the_same_instant() -> None:
    ids: list[str] = []
    for _ in range(3):
        ids.append(new_backup_id(NOW, ids))
    assert ids == ["20261126-143005-123456", "20261126-143005-123456-1", "20261126-143005-123456-2"]
    assert all(valid_backup_id(i) for i in ids)


@pytest.mark.parametrize(
    "bad",
    ["../models", "20261126-143005-123456/../../x", "", "latest", "20261126-143005", "a" * 30],
)
def test_ids_that_are_not_ours_are_refused(bad: str) -> None:
    assert not valid_backup_id(bad)


def test_only_the_newest_twenty_are_kept() -> None:
    ids = [f"20261126-1430{i:02d}-000000" for i in range(25)] + ["20261126-143024-000000-1"]
    pruned = backups_to_prune(ids)
    assert pruned == [f"20261126-1430{i:02d}-000000" for i in range(6)]
    assert backups_to_prune(ids[:3]) == []
