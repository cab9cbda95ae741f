"""One actor holds every key's request counters, so limits are exact across ingress replicas.

It only counts (proxifier.auth decides what a limit is); it never calls another actor or serve_app.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from actors.model import cluster_singleton_options
from proxifier.auth import SlidingWindow

RATE_LIMITER_NAME = "proxifier:ratelimiter"


class RateLimiter:
    def __init__(self) -> None:
        self.window = SlidingWindow()
        self._checks = 0

    def check(self, key: str, limit: int) -> tuple[bool, int, float]:
        """(allowed, remaining, seconds until the next request would be allowed)."""
        now = time.monotonic()
        self._checks += 1
        if self._checks % 10_000 == 0:
            self.window.forget_idle(now)
        return self.window.check(key, limit, now)

    def ping(self) -> str:
        return "pong"


def get_or_create_rate_limiter() -> Any:
    """The cluster's rate limiter (created on first use: detached, on the head node)."""
    options = cluster_singleton_options(RATE_LIMITER_NAME)
    return ray.remote(RateLimiter).options(**options, get_if_exists=True).remote()
