"""A model fetched from Hugging Face is fetched by each node that runs it, into that node's own
cache, once: a simulated two-node cluster whose nodes keep their caches apart (each raylet
gets its own $PROXIFIER_NODE_CACHE, which `settings.model_cache` names)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from tests.cluster.conftest import status
from tests.helpers import wait_for

REPO = "proxifier-tests/tiny-GGUF"
FILE = "tiny-Q8_0.gguf"


@pytest.fixture(scope="module")
def cluster(proxifier_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    if ray.is_initialized():
        ray.shutdown()  # the session's single-node cluster; the next test module restarts it
    caches = {name: tmp_path_factory.mktemp(f"cache-{name}") for name in ("a", "b")}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for name, cache in caches.items():
        cluster.add_node(
            num_cpus=1,
            resources={f"node-{name}": 1},
            env_vars={"PROXIFIER_NODE_CACHE": str(cache)},
        )
    ray.init(
        address=cluster.address,
        namespace="proxifier-hub-tests",
        runtime_env={"env_vars": {"PROXIFIER_HOME": str(proxifier_home)}},
        log_to_driver=False,
    )
    cluster.wait_for_nodes()
    yield {"caches": caches}
    ray.shutdown()
    cluster.shutdown()


def test_each_node_downloads_its_own_copy_once(
    cluster: dict, controller_for: Any, hub: Any
) -> None:
    def on(node: str) -> dict[str, Any]:
        return {
            "hf_repo": REPO,
            "hf_file": FILE,
            "model_path": None,
            "env": {"HF_ENDPOINT": hub.url},
            "resources": {f"node-{node}": 0.5},
            "auto_start": True,
        }

    before = hub.downloads.count((REPO, FILE))
    controller = controller_for(
        {"on-a": on("a"), "on-b": on("b"), "also-a": {**on("a"), "auto_start": False}},
        model_cache="$PROXIFIER_NODE_CACHE",
    )
    ray.get(controller.boot.remote(), timeout=120)
    wait_for(lambda: all(status(controller, m)["state"] == "ready" for m in ("on-a", "on-b")))
    assert hub.downloads.count((REPO, FILE)) == before + 2  # one per node
    for node, cache in cluster["caches"].items():
        (copy,) = cache.rglob(FILE)
        assert copy.stat().st_size > 0, node

    # A second model of the same file on node a: that node has it already.
    handle = ray.get(controller.get_model.remote("also-a"), timeout=60)
    lease = ray.get(handle.acquire.remote("r1"), timeout=60)
    ray.get(handle.release.remote(lease["lease_id"]))
    assert hub.downloads.count((REPO, FILE)) == before + 2
    assert status(controller, "also-a")["node_id"] == status(controller, "on-a")["node_id"]
