"""Who may call what: API keys, the route -> permission table, model allow-lists, rate-limit
classes and the sliding-window counting behind them. Pure: the ingress and the rate-limit actor
apply these decisions."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from proxifier.config import ApiKeyConfig, AuthConfig
from proxifier.endpoints import PATTERN as INFERENCE

ADMIN = "admin"

# (method, path pattern) -> the permissions any one of which opens it; admin opens everything.
# Order matters: the first matching row decides. The README's table is checked against this.
ROUTES: list[tuple[str, str, frozenset[str], str]] = [
    ("POST", f"({INFERENCE})", frozenset({"models"}), "inference"),
    ("GET", r"/v1/queue/[^/]+", frozenset({"models"}), "inference"),
    ("GET", r"/v1/responses/[^/]+(/input_items)?", frozenset({"models"}), "inference"),
    ("DELETE", r"/v1/responses/[^/]+", frozenset({"models"}), "inference"),
    ("POST", r"/v1/responses/[^/]+/cancel", frozenset({"models"}), "inference"),
    ("GET", r"/upstream/[^/]+(/.*)?", frozenset({"models"}), "raw upstream"),
    ("POST", r"/upstream/[^/]+(/.*)?", frozenset({"models"}), "raw upstream"),
    ("GET", r"/v1/models(/[^/]+)?", frozenset({"models", "read"}), "list models"),
    (
        "POST",
        r"/admin/models/[^/]+/(start|stop|reload|scale)",
        frozenset({"models"}),
        "model actions",
    ),
    ("POST", r"/admin/(start-all|stop-all)", frozenset({"models"}), "model actions"),
    ("POST", r"/admin/groups/[^/]+/(start|stop)", frozenset({"models"}), "model actions"),
    ("POST", r"/admin/queue/[^/]+/clear", frozenset({"models"}), "model actions"),
    ("GET", r"/admin/models/status", frozenset({"models", "read"}), "status"),
    ("GET", r"/admin/models/[^/]+/(status|logs)", frozenset({"models", "read"}), "status"),
    ("GET", r"/admin/queue/(status|[^/]+/status)", frozenset({"models", "read"}), "status"),
    ("GET", r"/admin/groups/status", frozenset({"models", "read"}), "status"),
    ("GET", r"/admin/(cluster|events|scheduler/explain)", frozenset({"read"}), "status"),
    ("GET", r"/admin/config/.*", frozenset({"config"}), "config"),
    ("POST", r"/admin/config/.*", frozenset({"config"}), "config"),
    ("GET", r"/(health|metrics)", frozenset({"read"}), "health and metrics"),
    ("GET", r"/dashboard(/.*)?", frozenset({"read"}), "dashboard"),
    ("GET", r"/(docs|openapi\.json|redoc)", frozenset({"read"}), "API docs"),
]
_COMPILED = [(m, re.compile(p + r"\Z"), perms, label) for m, p, perms, label in ROUTES]


def required_permissions(method: str, path: str) -> frozenset[str] | None:
    """The permissions that open this route (any one of them), or None for an unknown route
    (which only admin may try; it then gets the normal 404/405)."""
    for route_method, pattern, permissions, _ in _COMPILED:
        if route_method == method and pattern.match(path):
            return permissions
    return None


@dataclass(frozen=True)
class Caller:
    """An authenticated key: its name, permissions, model allow-list and rate-limit class."""

    name: str
    permissions: frozenset[str]
    models: tuple[str, ...] | None
    rate_class: str | None
    limit: int | None  # requests per minute, None = no limit


@dataclass(frozen=True)
class Denied:
    """Why a request is refused: 401 (who are you?) or 403 (not you)."""

    status: int
    message: str
    code: str


def repeated_credentials(header_names: list[str]) -> Denied | None:
    """A 401 for a request that carries its key twice (two `Authorization` or two `x-api-key`
    headers): which one counts would depend on the proxy in between, so none does."""
    for name in ("authorization", "x-api-key"):
        if header_names.count(name) > 1:
            return Denied(
                401,
                f"More than one {name} header: send one key, once",
                "invalid_authorization_header",
            )
    return None


def presented_key(authorization: str | None, x_api_key: str | None) -> str | Denied | None:
    """The key a request carries (`Authorization: Bearer`, any case, or `x-api-key`), None when
    it carries none, Denied when the header is there but malformed."""
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            return Denied(
                401,
                "Malformed Authorization header: expected 'Authorization: Bearer <key>'",
                "invalid_authorization_header",
            )
        return token
    if x_api_key is not None:
        return x_api_key.strip() or Denied(401, "Empty x-api-key header", "invalid_api_key")
    return None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def identify(key: str, auth: AuthConfig, now: datetime | None = None) -> Caller | Denied:
    """Match a presented key against every stored digest in constant time per key (all keys
    are compared, so the time does not say which one nearly matched)."""
    presented = digest(key)
    found: tuple[str, ApiKeyConfig] | None = None
    for name, entry in auth.api_keys.items():
        if hmac.compare_digest(presented, entry.digest()) and found is None:
            found = (name, entry)
    if found is None:
        return Denied(401, "Invalid API key", "invalid_api_key")
    name, entry = found
    now = now or datetime.now(UTC)
    if entry.expires is not None and now >= entry.expires:
        when = entry.expires.strftime("%Y-%m-%dT%H:%M:%SZ")
        return Denied(401, f"API key '{name}' expired at {when}", "expired_api_key")
    rate_class = rate_limit_class(name, auth.rate_limits)
    return Caller(
        name=name,
        permissions=frozenset(entry.permissions),
        models=tuple(entry.models) if entry.models is not None else None,
        rate_class=rate_class,
        limit=auth.rate_limits.get(rate_class) if rate_class else None,
    )


def rate_limit_class(key_name: str, rate_limits: dict[str, int]) -> str | None:
    """Its own name if listed, else its name without a `-key` suffix, else `default`."""
    if key_name in rate_limits:
        return key_name
    short = key_name.removesuffix("-key")
    if short in rate_limits:
        return short
    return "default" if "default" in rate_limits else None


def authorize(caller: Caller, method: str, path: str) -> Denied | None:
    if ADMIN in caller.permissions:
        return None
    needed = required_permissions(method, path)
    if needed is None or not (needed & caller.permissions):
        what = "this route" if needed is None else " or ".join(sorted(needed))
        return Denied(
            403,
            f"API key '{caller.name}' may not {method} {path}: it needs {what} permission",
            "insufficient_permissions",
        )
    return None


def may_use_model(caller: Caller, model: str) -> bool:
    if caller.models is None or ADMIN in caller.permissions:
        return True
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in caller.models)


def models_for(caller: Caller | None, names: Iterable[str]) -> list[str]:
    """Those of `names` the caller's key may use (all of them with auth off)."""
    return [name for name in names if caller is None or may_use_model(caller, name)]


def is_public(path: str, auth: AuthConfig) -> bool:
    return path in auth.public_endpoints


@dataclass
class SlidingWindow:
    """Exact requests-per-minute counting: a request is allowed when fewer than `limit` were
    allowed in the 60 s before it."""

    window: float = 60.0
    hits: dict[str, deque[float]] = field(default_factory=dict)

    def check(self, key: str, limit: int, now: float) -> tuple[bool, int, float]:
        """(allowed, remaining after this one, seconds until one more would be allowed)."""
        hits = self.hits.setdefault(key, deque())
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) >= limit:
            return False, 0, max(0.0, hits[0] + self.window - now)
        hits.append(now)
        reset = hits[0] + self.window - now
        return True, limit - len(hits), max(0.0, reset)

    def forget_idle(self, now: float) -> None:
        """Drop counters with nothing in the window (keys that went quiet)."""
        for key in [k for k, h in self.hits.items() if not h or h[-1] <= now - self.window]:
            del self.hits[key]
