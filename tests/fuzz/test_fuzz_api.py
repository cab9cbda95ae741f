"""Every route of the running product (fake llama-servers, auth off), fuzzed from its own OpenAPI
schema: no client input yields a 500, and every error body is OpenAI-shaped (issue 12). Bounded:
a fixed number of derandomized examples per operation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxifier.body_cost import over_limits
from tests.conftest import deployed

EXAMPLES = 25  # per operation; about thirty operations
# Low enough that fuzzed bodies pass them (the defaults are 10,000 keys, 1,000,000 items).
MAX_KEYS, MAX_ITEMS = 12, 12


@pytest.fixture(scope="module")
def fuzz_url(
    proxifier_home: Path, fake_fields: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    config = {
        "settings": {
            "body_timeout": 5,
            "queue": {"queue_timeout": 5},
            "max_json_keys": MAX_KEYS,
            "max_json_items": MAX_ITEMS,
        },
        "models": {
            "chat": {**fake_fields, "preload": True, "aliases": ["gpt-4o-mini"]},
            "spare": {**fake_fields, "resource_group": "extra"},
        },
    }
    (folder / "models.yaml").write_text(yaml.safe_dump(config))
    with deployed(proxifier_home, folder / "models.yaml", ready="chat") as (url, _controller):
        yield url


def test_no_client_input_yields_a_500(fuzz_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 25  # every route of the product, not a stray few
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            response = case.call(base_url=fuzz_url, timeout=60)
            where = f"{case.method} {case.formatted_path} {case.query or ''} {str(case.body)[:200]}"
            assert response.status_code != 500, f"{where}: {response.text[:300]}"
            if response.status_code >= 400:
                error = response.json().get("error")
                assert isinstance(error, dict) and error.get("message"), response.text[:300]

        check()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=6)
    ),
    max_leaves=40,
)


def test_a_body_is_bounded_by_its_keys_and_items_whatever_its_shape(fuzz_url: str) -> None:
    """Any JSON riding along in a chat request: over a limit, the 400 names it before any slot
    is taken; within them, the request is served."""

    @given(extra=JSON)
    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    def check(extra: Any) -> None:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "extra": extra}
        body["max_tokens"] = 2
        response = httpx.post(f"{fuzz_url}/v1/chat/completions", json=body, timeout=60)
        refusal = over_limits(body, MAX_KEYS, MAX_ITEMS)
        if refusal is None:
            assert response.status_code == 200, response.text[:300]
        else:
            assert response.status_code == 400, response.text[:300]
            assert response.json()["error"]["message"] == refusal.message

    check()
