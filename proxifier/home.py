"""Where the product keeps its per-user cache ($PROXIFIER_HOME). No I/O beyond reading the
environment; the lowest floor: imports nothing of the product."""

from __future__ import annotations

import os
from pathlib import Path


def proxifier_home() -> Path:
    """Where the installer caches llama-server and the tiny model ($PROXIFIER_HOME)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "proxifier"
    return Path(os.environ.get("PROXIFIER_HOME", default))
