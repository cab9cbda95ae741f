"""Every route of the running product (fake llama-servers, auth off), fuzzed from its own OpenAPI
schema: no client input yields a 500, and every error body is OpenAI-shaped (issue 12). Bounded:
a fixed number of derandomized examples per operation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings

from tests.conftest import deployed

EXAMPLES = 25  # per operation; about thirty operations


@pytest.fixture(scope="module")
def fuzz_url(
    proxifier_home: Path, fake_fields: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    config = {
        "settings": {"body_timeout": 5, "queue": {"queue_timeout": 5}},
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
