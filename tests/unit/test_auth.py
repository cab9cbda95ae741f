"""API keys, permissions, allow-lists, rate-limit classes and the sliding window."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from proxifier.auth import (
    ROUTES,
    Caller,
    Denied,
    SlidingWindow,
    authorize,
    identify,
    is_public,
    may_use_model,
    presented_key,
    rate_limit_class,
    repeated_credentials,
    required_permissions,
)
from proxifier.config import validate_auth

AUTH = validate_auth(
    {
        "api_keys": {
            "admin-key": {"key": "a-1", "permissions": ["admin"], "expires": "2030-01-01"},
            "old-key": {"key": "o-1", "permissions": ["admin"], "expires": "2024-12-31T23:59:59Z"},
            "readonly-key": {"key": "r-1", "permissions": ["read"]},
            "team-key": {
                "key_sha256": hashlib.sha256(b"t-1").hexdigest(),
                "permissions": ["models"],
                "models": ["qwen-*", "chat"],
            },
        },
        "rate_limits": {"admin": 1000, "default": 100, "readonly": 50},
    },
    file="auth.yaml",
)
NOW = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        ("Bearer abc", None, "abc"),
        ("bearer abc", None, "abc"),
        ("BEARER   abc  ", None, "abc"),
        (None, "abc", "abc"),
        (None, None, None),
    ],
)
def test_presented_key(
    authorization: str | None, x_api_key: str | None, expected: str | None
) -> None:
    assert presented_key(authorization, x_api_key) == expected


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "Bearer ", "abc", "Bearer a b"])
def test_malformed_authorization_is_401(header: str) -> None:
    denied = presented_key(header, None)
    assert isinstance(denied, Denied) and denied.status == 401
    assert denied.code == "invalid_authorization_header"


def test_plain_and_digest_keys_identify_their_owner() -> None:
    admin = identify("a-1", AUTH, NOW)
    team = identify("t-1", AUTH, NOW)
    assert isinstance(admin, Caller) and admin.name == "admin-key"
    assert isinstance(team, Caller) and team.permissions == {"models"}
    assert team.models == ("qwen-*", "chat")


def test_unknown_key_is_401_without_echoing_it() -> None:
    denied = identify("nope-secret", AUTH, NOW)
    assert denied == Denied(401, "Invalid API key", "invalid_api_key")


def test_expired_key_is_401_saying_when() -> None:
    assert identify("o-1", AUTH, NOW) == Denied(
        401, "API key 'old-key' expired at 2024-12-31T23:59:59Z", "expired_api_key"
    )
    assert isinstance(identify("o-1", AUTH, datetime(2024, 12, 31, 12, tzinfo=UTC)), Caller)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("admin-key", "admin"),
        ("readonly-key", "readonly"),
        ("team-key", "default"),
        ("admin", "admin"),
    ],
)
def test_rate_limit_class(name: str, expected: str) -> None:
    assert rate_limit_class(name, AUTH.rate_limits) == expected
    assert rate_limit_class(name, {}) is None


def test_callers_carry_their_limit() -> None:
    readonly = identify("r-1", AUTH, NOW)
    assert isinstance(readonly, Caller)
    assert (readonly.rate_class, readonly.limit) == ("readonly", 50)


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("POST", "/v1/chat/completions", {"models"}),
        ("POST", "/v1/embeddings", {"models"}),
        ("GET", "/v1/queue/req_1", {"models"}),
        ("GET", "/v1/models", {"models", "read"}),
        ("POST", "/admin/models/chat/start", {"models"}),
        ("POST", "/admin/groups/production/stop", {"models"}),
        ("POST", "/admin/queue/chat/clear", {"models"}),
        ("GET", "/admin/models/status", {"models", "read"}),
        ("GET", "/admin/queue/chat/status", {"models", "read"}),
        ("GET", "/admin/cluster", {"read"}),
        ("POST", "/admin/config/reload", {"config"}),
        ("GET", "/admin/config/backups", {"config"}),
        ("GET", "/metrics", {"read"}),
        ("GET", "/dashboard", {"read"}),
    ],
)
def test_route_permission_table(method: str, path: str, needed: set[str]) -> None:
    assert required_permissions(method, path) == needed


def test_permissions_match_whole_paths_not_prefixes() -> None:
    assert required_permissions("POST", "/v1/chat/completions/extra") is None
    assert required_permissions("GET", "/admin/clusterfoo") is None
    assert required_permissions("DELETE", "/v1/models") is None


def test_authorize() -> None:
    readonly = identify("r-1", AUTH, NOW)
    team = identify("t-1", AUTH, NOW)
    admin = identify("a-1", AUTH, NOW)
    assert isinstance(readonly, Caller) and isinstance(team, Caller) and isinstance(admin, Caller)
    denied = authorize(readonly, "POST", "/v1/chat/completions")
    assert denied == Denied(
        403,
        "API key 'readonly-key' may not POST /v1/chat/completions: it needs models permission",
        "insufficient_permissions",
    )
    assert authorize(readonly, "GET", "/admin/models/status") is None
    assert authorize(team, "POST", "/v1/chat/completions") is None
    assert authorize(team, "POST", "/admin/config/reload") is not None
    assert authorize(admin, "POST", "/admin/config/reload") is None
    assert authorize(admin, "GET", "/anything/at/all") is None


def test_model_allow_list_uses_globs() -> None:
    team = identify("t-1", AUTH, NOW)
    assert isinstance(team, Caller)
    assert may_use_model(team, "qwen-32b") and may_use_model(team, "chat")
    assert not may_use_model(team, "llama-70b")
    admin = identify("a-1", AUTH, NOW)
    assert isinstance(admin, Caller) and may_use_model(admin, "anything")


def test_public_endpoints_are_exact() -> None:
    assert is_public("/health", AUTH) and is_public("/metrics", AUTH)
    assert not is_public("/health/", AUTH) and not is_public("/healthz", AUTH)


def test_sliding_window_is_exact_at_the_limit() -> None:
    window = SlidingWindow()
    answers = [window.check("k", 3, now=t) for t in (0.0, 1.0, 2.0)]
    assert [a[:2] for a in answers] == [(True, 2), (True, 1), (True, 0)]
    assert window.check("k", 3, now=3.0) == (False, 0, 57.0)  # the 0.0 hit leaves at 60.0
    assert window.check("k", 3, now=59.9)[0] is False
    assert window.check("k", 3, now=60.0)[:2] == (True, 0)
    assert window.check("other", 3, now=60.0)[:2] == (True, 2)


def test_idle_counters_are_forgotten() -> None:
    window = SlidingWindow()
    window.check("quiet", 5, now=0.0)
    window.check("busy", 5, now=100.0)
    window.forget_idle(now=100.0)
    assert set(window.hits) == {"busy"}


def test_every_route_row_compiles_and_has_a_label() -> None:
    assert all(label for *_, label in ROUTES)


def test_a_credential_header_twice_is_401() -> None:
    twice = repeated_credentials(["host", "authorization", "x-api-key", "authorization"])
    assert isinstance(twice, Denied) and twice.status == 401
    assert repeated_credentials(["x-api-key", "x-api-key"]) is not None
    assert repeated_credentials(["authorization", "x-api-key"]) is None  # one of each: as today
