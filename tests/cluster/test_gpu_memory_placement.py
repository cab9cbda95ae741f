"""Several models per GPU, placed by GPU memory, on a simulated cluster: fake GPUs whose memory
the operator declares with the `gpu-memory-gb` label (DESIGN §10). Node "one" has one 24 GiB GPU,
node "two" has two."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from proxifier.config import ModelConfig
from proxifier.errors import ModelFailed
from proxifier.gguf_facts import read_facts
from proxifier.gpu_memory import estimate
from proxifier.scheduler import gpu_fraction
from tests.cluster.conftest import status
from tests.helpers import wait_for

GiB = 1024**3


@pytest.fixture(scope="module")
def cluster(proxifier_home: Path) -> Iterator[dict[str, str]]:
    if ray.is_initialized():
        ray.shutdown()  # the session's single-node cluster; the next test module restarts it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    one = cluster.add_node(num_cpus=1, num_gpus=1, labels={"gpu-memory-gb": "24", "host": "one"})
    two = cluster.add_node(num_cpus=1, num_gpus=2, labels={"gpu-memory-gb": "24", "host": "two"})
    ray.init(
        address=cluster.address,
        namespace="proxifier-gpu-memory-tests",
        runtime_env={"env_vars": {"PROXIFIER_HOME": str(proxifier_home)}},
        log_to_driver=False,
    )
    cluster.wait_for_nodes()
    yield {"one": one.node_id, "two": two.node_id}
    ray.shutdown()
    cluster.shutdown()


def start(controller: Any, name: str) -> dict[str, Any]:
    return ray.get(controller.start_model.remote(name), timeout=120)


def on(host: str, gib: float, priority: int) -> dict[str, Any]:
    return {"gpu_memory": f"{gib}GiB", "priority": priority, "labels": {"host": host}}


def test_three_models_share_one_gpu_and_a_bigger_one_evicts_the_lowest_two(
    cluster: dict[str, str], controller_for: Any
) -> None:
    controller = controller_for(
        {
            "low": on("one", 7, 3),
            "mid": on("one", 7, 4),
            "high": on("one", 7, 5),
            "big": on("one", 12, 8),
        }
    )
    for name in ("low", "mid", "high"):
        start(controller, name)
    wait_for(lambda: all(status(controller, n)["state"] == "ready" for n in ("low", "mid", "high")))
    placed = [status(controller, n) for n in ("low", "mid", "high")]
    assert {s["node_id"] for s in placed} == {cluster["one"]}
    assert [s["gpu_memory"]["num_gpus"] for s in placed] == [0.3, 0.3, 0.3]
    assert len({tuple(s["gpu_ids"]) for s in placed}) == 1  # all three on the one GPU
    (node,) = [n for n in ray.get(controller.cluster.remote())["nodes"] if n["models"]]
    (gpu,) = node["gpus"]
    assert gpu["memory"] == 24 * GiB and gpu["used_fraction"] == 0.9
    assert sorted(m["name"] for m in gpu["models"]) == ["high", "low", "mid"]
    assert gpu["free"] == pytest.approx(0.1 * 24 * GiB)

    start(controller, "big")  # 12 GiB = 0.5 of the GPU: two of the 0.3 models must go
    wait_for(lambda: status(controller, "big")["state"] == "ready")
    assert status(controller, "big")["gpu_memory"]["num_gpus"] == 0.5
    states = {n: status(controller, n)["state"] for n in ("low", "mid", "high")}
    assert states == {"low": "stopped", "mid": "stopped", "high": "ready"}


def test_a_model_bigger_than_a_gpu_takes_two_whole_gpus_or_fails_saying_why(
    cluster: dict[str, str], controller_for: Any
) -> None:
    controller = controller_for(
        {"huge": on("two", 30, 5), "too-big": on("one", 30, 5), "whole": {"num_gpus": 1}}
    )
    start(controller, "huge")
    huge = status(controller, "huge")
    assert huge["node_id"] == cluster["two"] and huge["gpu_memory"]["num_gpus"] == 2.0
    assert sorted(huge["gpu_ids"]) == ["0", "1"]
    with pytest.raises(ModelFailed) as failed:
        start(controller, "too-big")
    message = str(failed.value)
    assert "it needs 30.0 GiB of GPU memory on a node labelled host=one" in message
    assert "1 GPU(s) of 24.0 GiB, free 24.0 GiB" in message  # each GPU's free memory
    # An explicit num_gpus still takes one whole GPU (node one's, the only one free).
    start(controller, "whole")
    whole = status(controller, "whole")
    assert whole["node_id"] == cluster["one"] and whole["gpu_memory"]["num_gpus"] == 1


def test_a_reload_that_changes_a_models_need_gives_it_a_new_share(
    cluster: dict[str, str],
    controller_for: Any,
    fake_server: Path,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    # No gpu_memory: placed by its GGUF estimate, dominated by the 300 MiB per process at a
    # short context (0.02 of a 24 GiB GPU); a 4M-token context adds 2 GiB of KV cache.
    model = {"labels": {"host": "two"}, "context_length": 2048}
    controller = controller_for({"grow": model})
    start(controller, "grow")
    before = status(controller, "grow")
    assert before["gpu_memory"]["num_gpus"] == 0.02
    models = {
        "grow": {
            "model_path": str(tiny_model),
            "llama_server": str(fake_server),
            **model,
            "context_length": 4_000_000,
        }
    }
    path = tmp_path / "models.yaml"
    settings = yaml.safe_load(path.read_text())["settings"]
    path.write_text(yaml.safe_dump({"settings": settings, "models": models}))
    answer = ray.get(controller.reload_config.remote(), timeout=120)
    assert answer["replacing"] == {"grow": "blue/green"}  # a new actor, not a restart in place

    grown = estimate(read_facts(tiny_model), ModelConfig(context_length=4_000_000)).total
    share = gpu_fraction(grown, 24 * GiB)
    assert share > 0.3

    def regrown() -> bool:
        now = status(controller, "grow")
        return now["state"] == "ready" and now["gpu_memory"]["num_gpus"] == share

    wait_for(regrown, timeout=60)
    assert status(controller, "grow")["actor_pid"] != before["actor_pid"]
