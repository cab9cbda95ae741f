"""Placement on a simulated three-node cluster (ray.cluster_utils.Cluster): two nodes carry
`gpu_type:a100` with one fake GPU each, the head is CPU-only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from actors.controller import create_controller
from proxifier.errors import ModelFailed
from tests.helpers import wait_for

A100 = {"num_gpus": 1, "resources": {"gpu_type:a100": 1}}


@pytest.fixture(scope="module")
def cluster(proxifier_home: Path) -> Iterator[dict[str, Any]]:
    if ray.is_initialized():
        ray.shutdown()  # the session's single-node cluster; the next test module restarts it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    gpu_nodes = [
        cluster.add_node(
            num_cpus=1, num_gpus=1, resources={"gpu_type:a100": 1}, labels={"gpu-type": "a100"}
        )
        for _ in range(2)
    ]
    ray.init(
        address=cluster.address,
        namespace="proxifier-cluster-tests",
        runtime_env={"env_vars": {"PROXIFIER_HOME": str(proxifier_home)}},
        log_to_driver=False,
    )
    cluster.wait_for_nodes()
    ids = {node.node_id for node in gpu_nodes}
    yield {"cluster": cluster, "gpu_nodes": gpu_nodes, "gpu_node_ids": ids}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def controller_for(
    cluster: dict, fake_server: Path, tiny_model: Path, tmp_path: Path
) -> Iterator[Any]:
    made: list[Any] = []

    def make(models: dict[str, dict[str, Any]], **settings: Any) -> Any:
        full = {
            name: {"model_path": str(tiny_model), "llama_server": str(fake_server), **fields}
            for name, fields in models.items()
        }
        settings = {"placement_timeout": 2, "cleanup_interval": 0.5, "cooldown": 1, **settings}
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump({"settings": settings, "models": full}))
        controller = create_controller(path)
        made.append(controller)
        ray.get(controller.ping.remote(), timeout=60)
        return controller

    yield make
    for controller in made:
        try:
            ray.get(controller.shutdown.remote(), timeout=60)
        finally:
            ray.kill(controller, no_restart=True)


def places(controller: Any, name: str) -> bool:
    try:
        ray.get(controller.get_model.remote(name), timeout=60)
        return True
    except ModelFailed:
        return False


def status(controller: Any, name: str) -> dict[str, Any]:
    return ray.get(controller.model_status.remote(name))


def ready(controller: Any, *names: str) -> bool:
    return all(status(controller, n)["state"] == "ready" for n in names)


def test_tagged_models_land_only_on_matching_nodes(cluster: dict, controller_for: Any) -> None:
    controller = controller_for(
        {
            "by-resource": {**A100, "auto_start": True},
            "by-label": {"num_gpus": 0, "labels": {"gpu-type": "a100"}, "auto_start": True},
            "cpu": {"num_gpus": 0, "gpu_layers": 0, "auto_start": True},
        }
    )
    ray.get(controller.boot.remote(), timeout=120)
    wait_for(lambda: ready(controller, "by-resource", "by-label", "cpu"), timeout=60)
    assert status(controller, "by-resource")["node_id"] in cluster["gpu_node_ids"]
    assert status(controller, "by-label")["node_id"] in cluster["gpu_node_ids"]
    nodes = ray.get(controller.cluster.remote())["nodes"]
    assert len(nodes) == 3
    tagged = [n for n in nodes if n["labels"].get("gpu-type") == "a100"]
    assert len(tagged) == 2 and all(n["resources"]["gpu_type:a100"] == 1 for n in tagged)
    placed = {m for n in nodes for m in n["models"]}
    assert placed == {"by-resource", "by-label", "cpu"}


def test_three_gpu_models_for_two_gpus_the_two_highest_run(controller_for: Any) -> None:
    controller = controller_for(
        {
            "g9": {**A100, "priority": 9, "auto_start": True},
            "g7": {**A100, "priority": 7, "auto_start": True},
            "g5": {**A100, "priority": 5, "auto_start": True},
        }
    )
    results = ray.get(controller.boot.remote(), timeout=120)
    assert [(r["model"], r["placed"]) for r in results] == [
        ("g9", True),
        ("g7", True),
        ("g5", False),
    ]
    assert "model 'g5' cannot be placed: it needs GPU 1, gpu_type:a100 1" in results[2]["error"]
    assert "no node has that free" in results[2]["error"]
    wait_for(lambda: ready(controller, "g9", "g7"), timeout=60)
    assert status(controller, "g5")["state"] == "failed"


def test_a_higher_priority_request_evicts_the_idle_lowest_never_busy_or_preloaded(
    controller_for: Any,
) -> None:
    controller = controller_for(
        {
            "kept": {**A100, "priority": 2, "preload": True},
            "low": {**A100, "priority": 3},
            "top": {**A100, "priority": 9},
        }
    )
    ray.get(controller.boot.remote(), timeout=120)
    low = ray.get(controller.get_model.remote("low"), timeout=60)
    lease = ray.get(low.acquire.remote("busy"), timeout=60)
    wait_for(lambda: ready(controller, "kept", "low"), timeout=60)
    # Both GPUs are taken by a preloaded and a busy model: nothing may be evicted.
    with pytest.raises(ModelFailed, match="model 'top' cannot be placed"):
        ray.get(controller.get_model.remote("top"), timeout=60)
    assert ready(controller, "kept", "low")
    ray.get(low.release.remote(lease["lease_id"]))
    # Once the failed placement's cooldown (1 s) is over, the next request evicts "low".
    wait_for(lambda: places(controller, "top"), timeout=60)
    top = ray.get(controller.get_model.remote("top"), timeout=60)
    lease = ray.get(top.acquire.remote("now"), timeout=60)
    assert lease["model"] == "top"
    assert status(controller, "low")["state"] == "stopped"
    assert status(controller, "kept")["state"] == "ready"
    evicted = [e for e in ray.get(controller.events_since.remote()) if e["kind"] == "evicted"]
    assert [(e["model"], e["for_model"]) for e in evicted] == [("low", "top")]
    ray.get(top.release.remote(lease["lease_id"]))


def test_a_removed_nodes_models_move_when_they_fit_and_fail_when_not(
    cluster: dict, controller_for: Any
) -> None:
    controller = controller_for(
        {
            "mover": {
                "num_gpus": 0,
                "labels": {"gpu-type": "a100"},
                "auto_start": True,
                "priority": 8,
            },
            "gpu-a": {**A100, "priority": 7, "auto_start": True},
            "gpu-b": {**A100, "priority": 6, "auto_start": True},
        }
    )
    ray.get(controller.boot.remote(), timeout=120)
    wait_for(lambda: ready(controller, "mover", "gpu-a", "gpu-b"), timeout=60)
    # Remove the node "mover" runs on: one GPU model runs there too (one GPU per node).
    victim_id = status(controller, "mover")["node_id"]
    stranded = next(g for g in ("gpu-a", "gpu-b") if status(controller, g)["node_id"] == victim_id)
    survivor = "gpu-b" if stranded == "gpu-a" else "gpu-a"
    # Busy, so the stranded model (which may have the higher priority) cannot evict it.
    survivor_handle = ray.get(controller.get_model.remote(survivor), timeout=60)
    lease = ray.get(survivor_handle.acquire.remote("keeps-it-busy"), timeout=60)
    node = next(n for n in cluster["gpu_nodes"] if n.node_id == victim_id)
    cluster["cluster"].remove_node(node)
    cluster["gpu_nodes"].remove(node)
    # The label-only model fits on the other a100 node; the GPU model has nowhere to go.
    wait_for(lambda: ready(controller, "mover"), timeout=90)
    assert status(controller, "mover")["node_id"] not in (victim_id, None)
    wait_for(
        lambda: "cannot be placed" in (status(controller, stranded).get("last_error") or ""),
        timeout=90,
    )
    assert status(controller, stranded)["state"] == "failed"
    assert ready(controller, survivor)
    kinds = [(e["kind"], e.get("model")) for e in ray.get(controller.events_since.remote())]
    assert ("lost", "mover") in kinds and ("lost", stranded) in kinds
    ray.get(survivor_handle.release.remote(lease["lease_id"]))
