"""The "Try it" lines `proxifier serve` prints (proxifier.examples); a serve test runs them."""

from __future__ import annotations

import shlex

from proxifier.config import AuthConfig
from proxifier.examples import reachable_host, try_it


def test_with_auth_off_the_lines_carry_no_key() -> None:
    lines = try_it("http://127.0.0.1:8000", "chat", AuthConfig(enabled=False))
    curl, python = lines
    assert "Authorization" not in curl and '"model": "chat"' in shlex.split(curl)[-1]
    assert 'api_key="none"' in python


def test_with_auth_on_the_lines_read_the_key_from_the_environment() -> None:
    auth = AuthConfig.model_validate(
        {
            "api_keys": {
                "reader": {"key": "r", "permissions": ["read"]},
                "user": {"key": "u", "permissions": ["models"]},
                "root": {"key": "a", "permissions": ["admin"]},
            }
        }
    )
    hint, curl, python = try_it("http://10.0.0.5:8000", "chat", auth)
    assert hint.endswith("(one of: root, user)")  # keys that may send inference requests
    assert "Authorization: Bearer $PROXIFIER_API_KEY" in shlex.split(curl)
    assert 'api_key=os.environ["PROXIFIER_API_KEY"]' in python


def test_an_address_for_every_interface_is_one_a_client_can_use() -> None:
    assert reachable_host("10.1.2.3") == "10.1.2.3"
    assert reachable_host("127.0.0.1") == "127.0.0.1"
    for every in ("0.0.0.0", "::"):
        assert reachable_host(every) not in {"0.0.0.0", "::", ""}
