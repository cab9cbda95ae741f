"""The hosts harness's fixtures: a head, two GPU workers (one fake GPU each, labelled by host)
and a client, each a network namespace, with the product served on the head as a user does it.

Needs root: without it the tests skip, saying why; where PROXIFIER_REQUIRE_HOSTS=1 (CI) that is
a failure instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.multihost.cluster import ProductOnHosts, Worker, product_on
from tests.multihost.hosts import hosts, why_not

HOSTS = ["head", "w1", "w2", "client"]
WORKERS = {"w1": Worker(gpus=1), "w2": Worker(gpus=1)}


@pytest.fixture(scope="module")
def product(
    tmp_path_factory: pytest.TempPathFactory,
    fake_server: Path,
    tiny_model: Path,
    request: pytest.FixtureRequest,
) -> Iterator[ProductOnHosts]:
    reason = why_not()
    if reason is not None:
        if os.environ.get("PROXIFIER_REQUIRE_HOSTS") == "1":
            pytest.fail(f"the hosts harness must run here: {reason}")
        pytest.skip(f"hosts harness: {reason}")
    models: dict[str, dict[str, Any]] = request.module.MODELS
    settings: dict[str, Any] = getattr(request.module, "SETTINGS", {})
    base = {"model_path": str(tiny_model), "llama_server": str(fake_server)}
    store: str | None = getattr(request.module, "STORE", None)  # a host for Redis (GCS FT)
    names = [*HOSTS, store] if store else HOSTS
    root = tmp_path_factory.mktemp("hosts")
    ray_env: dict[str, str] = getattr(request.module, "RAY_ENV", {})  # more of Ray's settings
    with hosts(names, root) as net, product_on(net, WORKERS, store, ray_env) as made:
        made.serve({name: {**base, **fields} for name, fields in models.items()}, settings)
        with made.client() as http:
            made.wait_until("the server answers", lambda: http.get("/health").is_success, 180)
            made.wait_until(
                "every host joined", lambda: made.alive_hosts(http) == {"head", *WORKERS}, 60
            )
        yield made
