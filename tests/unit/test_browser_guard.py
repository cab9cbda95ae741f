"""With API keys off, a web page cannot drive the server: Host, Origin and Content-Type checks."""

from __future__ import annotations

import pytest

from proxifier.browser_guard import browser_refusal, host_name

HOST = {"host": "127.0.0.1:8000"}


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("127.0.0.1:8000", "127.0.0.1"),
        ("[::1]:8000", "::1"),
        ("LocalHost", "localhost"),
        ("::1", "::1"),
    ],
)
def test_host_name_drops_the_port_and_brackets(host: str, name: str) -> None:
    assert host_name(host) == name


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1", "[::1]:8000", "gpu-box:8000"])
def test_loopback_names_and_the_bound_host_are_served(host: str) -> None:
    assert browser_refusal("GET", {"host": host}, "gpu-box") is None


def test_a_rebound_dns_name_is_refused() -> None:
    refusal = browser_refusal("GET", {"host": "attacker.example:8000"}, "127.0.0.1")
    assert refusal is not None and refusal[:1] == (403,) and refusal[2] == "host_not_allowed"
    assert browser_refusal("GET", {"host": "attacker.example"}, "0.0.0.0") is None  # any address


def test_a_post_from_another_origin_is_refused_the_same_origin_is_not() -> None:
    evil = {**HOST, "origin": "https://attacker.example", "content-type": "application/json"}
    refusal = browser_refusal("POST", evil, "127.0.0.1")
    assert refusal is not None and refusal[0] == 403 and refusal[2] == "origin_not_allowed"
    assert browser_refusal("GET", evil, "127.0.0.1") is None  # reading is not changing
    same = {**HOST, "origin": "http://127.0.0.1:8000"}
    assert browser_refusal("POST", same, "127.0.0.1") is None
    listed = {**HOST, "origin": "https://app.example.com"}
    assert browser_refusal("POST", listed, "127.0.0.1", ["https://app.example.com"]) is None


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"]
)
def test_a_form_post_is_refused(content_type: str) -> None:
    refusal = browser_refusal("POST", {**HOST, "content-type": content_type}, "127.0.0.1")
    assert refusal is not None and refusal[0] == 415


def test_json_or_no_body_type_passes() -> None:
    json_type = {**HOST, "content-type": "application/json; charset=utf-8"}
    assert browser_refusal("POST", json_type, "127.0.0.1") is None
    assert browser_refusal("POST", HOST, "127.0.0.1") is None  # e.g. curl -X POST .../start


def test_a_get_of_upstream_from_another_site_is_refused() -> None:
    # It starts the model (and may stop others): a change, even as a GET.
    evil = {**HOST, "origin": "https://attacker.example"}
    refusal = browser_refusal("GET", evil, "127.0.0.1", path="/upstream/chat/slots")
    assert refusal is not None and refusal[2] == "origin_not_allowed"
    # An <img src> from another site sends no Origin, but the browser says cross-site.
    tagged = {**HOST, "sec-fetch-site": "cross-site"}
    assert browser_refusal("GET", tagged, "127.0.0.1", path="/upstream/chat/") is not None
    # The web UI itself (same origin), and GETs of other paths from anywhere, are served.
    own = {**HOST, "origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}
    assert browser_refusal("GET", own, "127.0.0.1", path="/upstream/chat/props") is None
    assert browser_refusal("GET", tagged, "127.0.0.1", path="/v1/models") is None
