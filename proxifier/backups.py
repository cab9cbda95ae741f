"""Config backup ids: unique even within one second, validated so no id can escape the folder.

Pure: no I/O (the controller reads and writes the backups).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime

KEEP = 20
_ID = re.compile(r"^\d{8}-\d{6}-\d{6}(?:-\d{1,4})?$")


def new_backup_id(now: datetime, existing: Iterable[str]) -> str:
    """A sortable id from the time (microseconds), with a suffix if that one is taken."""
    base = now.astimezone(UTC).strftime("%Y%m%d-%H%M%S-%f")
    taken = set(existing)
    candidate, counter = base, 0
    while candidate in taken:
        counter += 1
        candidate = f"{base}-{counter}"
    return candidate


def valid_backup_id(backup_id: str) -> bool:
    return bool(_ID.match(backup_id))


def backups_to_prune(ids: Iterable[str], keep: int = KEEP) -> list[str]:
    """The oldest ids beyond the newest `keep`."""
    ordered = sorted(ids, key=_sort_key)
    return ordered[: max(0, len(ordered) - keep)]


def _sort_key(backup_id: str) -> tuple[str, int]:
    parts = backup_id.split("-")
    return "-".join(parts[:3]), int(parts[3]) if len(parts) == 4 else 0
