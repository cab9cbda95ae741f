"""Placement on a simulated three-node cluster (ray.cluster_utils.Cluster): two nodes carry
`gpu_type:a100` with one fake GPU each, the head is CPU-only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from proxifier.errors import ModelFailed, QueueTimeout
from tests.cluster.conftest import status
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


def explained(controller: Any, name: str) -> str:
    decision = ray.get(controller.explain.remote(name))["last_decision"] or {}
    return decision.get("reason", "")


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
        },
        placement_timeout=2,  # how long boot reports on a model that must wait
    )
    results = ray.get(controller.boot.remote(), timeout=120)
    assert [(r["model"], r["placed"]) for r in results] == [
        ("g9", True),
        ("g7", True),
        ("g5", False),
    ]
    # It could run (a node has the totals), so it waits: never "failed", and it says why.
    assert "waiting for GPU 1, gpu_type:a100 1" in results[2]["error"]
    wait_for(lambda: ready(controller, "g9", "g7"), timeout=60)
    reason = "higher priority hold it (g7, g9)"
    wait_for(lambda: reason in status(controller, "g5").get("waiting_for", ""), timeout=30)
    assert status(controller, "g5")["state"] == "stopped"


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
    # Both GPUs are taken by a preloaded and a busy model: nothing may be evicted now; the
    # request waits, and the scheduler says for what.
    waiting = controller.get_model.remote("top")
    wait_for(lambda: "waiting for 'low'" in explained(controller, "top"), timeout=60)
    assert "evicted as soon as it is idle" in explained(controller, "top")
    assert ready(controller, "kept", "low")
    ray.get(low.release.remote(lease["lease_id"]))
    # As soon as "low" is idle it is evicted, and the waiting request gets "top".
    top = ray.get(waiting, timeout=60)
    lease = ray.get(top.acquire.remote("now"), timeout=60)
    assert lease["model"] == "top"
    assert status(controller, "low")["state"] == "stopped"
    assert status(controller, "kept")["state"] == "ready"
    evicted = [e for e in ray.get(controller.events_since.remote()) if e["kind"] == "evicted"]
    assert [(e["model"], e["for_model"]) for e in evicted] == [("low", "top")]
    ray.get(top.release.remote(lease["lease_id"]))


def _replace_gpu_node(cluster: dict) -> None:
    node = cluster["cluster"].add_node(
        num_cpus=1, num_gpus=1, resources={"gpu_type:a100": 1}, labels={"gpu-type": "a100"}
    )
    cluster["gpu_nodes"].append(node)
    cluster["gpu_node_ids"].add(node.node_id)
    cluster["cluster"].wait_for_nodes()


def test_a_removed_nodes_models_move_when_they_fit_and_wait_when_not(
    cluster: dict, controller_for: Any, request: pytest.FixtureRequest
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
    request.addfinalizer(lambda: _replace_gpu_node(cluster))  # later tests get two again
    # The label-only model fits on the other a100 node; the GPU model has nowhere to go.
    wait_for(lambda: ready(controller, "mover"), timeout=90)
    assert status(controller, "mover")["node_id"] not in (victim_id, None)
    # The GPU model could run on the other node (its totals fit), so it waits for it rather
    # than failing; the busy model there is never stopped mid-request.
    wait_for(lambda: "waiting_for" in status(controller, stranded), timeout=90)
    assert status(controller, stranded)["state"] == "stopped"
    assert ready(controller, survivor)
    kinds = [(e["kind"], e.get("model")) for e in ray.get(controller.events_since.remote())]
    assert ("lost", "mover") in kinds and ("lost", stranded) in kinds
    ray.get(survivor_handle.release.remote(lease["lease_id"]))


# One of the two a100 GPUs is held by a preloaded model of top priority, so the tests below
# share a single GPU, like a workstation with one card.
PIN = {**A100, "priority": 10, "preload": True}
LOAD = 1.0  # seconds the fake llama-server takes to load


def warm(controller: Any, name: str, deadline: float | None = None) -> Any:
    """One request through the model's actor (placing and starting it), answered in time."""
    handle = ray.get(controller.get_model.remote(name, deadline), timeout=120)
    lease = ray.get(handle.acquire.remote(f"r-{time.monotonic_ns()}", deadline), timeout=120)
    ray.get(handle.release.remote(lease["lease_id"]))
    return handle


def evictions(controller: Any) -> list[tuple[str, str, str]]:
    events = ray.get(controller.events_since.remote())
    return [(e["model"], e["for_model"], e["reason"]) for e in events if e["kind"] == "evicted"]


def test_a_priority_request_swaps_out_an_idle_lower_model_at_once(controller_for: Any) -> None:
    slow = {"env": {"FAKE_LLAMA_LOAD_DELAY": str(LOAD)}}
    controller = controller_for(
        {"pin": PIN, "low": {**A100, "priority": 2}, "high": {**A100, "priority": 9, **slow}}
    )
    ray.get(controller.boot.remote(), timeout=120)
    warm(controller, "low")
    # Answered within the load time and 5 s, or the deadline answers QueueTimeout.
    warm(controller, "high", deadline=time.time() + LOAD + 5)
    assert evictions(controller) == [("low", "high", "priority")]
    assert ready(controller, "pin", "high") and status(controller, "low")["state"] == "stopped"


def test_two_equal_priority_models_on_one_gpu_take_turns(controller_for: Any) -> None:
    controller = controller_for({"pin": PIN, "alpha": A100, "beta": A100})
    ray.get(controller.boot.remote(), timeout=120)
    for name in ("alpha", "beta", "alpha"):
        # Each within the default queue_timeout (30 s): a swap waits at most min_residency
        # (10 s) after the other became ready, plus its load.
        warm(controller, name, deadline=time.time() + 30)
    assert evictions(controller) == [("alpha", "beta", "swap"), ("beta", "alpha", "swap")]


def test_a_lower_priority_request_never_evicts_a_higher_one(controller_for: Any) -> None:
    controller = controller_for(
        {"pin": PIN, "high": {**A100, "priority": 9}, "low": {**A100, "priority": 2}}
    )
    ray.get(controller.boot.remote(), timeout=120)
    warm(controller, "high")
    with pytest.raises(QueueTimeout, match="higher priority hold it"):
        ray.get(controller.get_model.remote("low", time.time() + 10), timeout=60)
    assert ready(controller, "high") and evictions(controller) == []


def test_a_model_no_node_could_ever_hold_fails_at_once_saying_why(controller_for: Any) -> None:
    controller = controller_for({"huge": {"num_gpus": 2, "resources": {"gpu_type:a100": 1}}})
    with pytest.raises(ModelFailed) as failure:
        ray.get(controller.get_model.remote("huge"), timeout=60)
    message = failure.value.message
    assert "model 'huge' cannot be placed: it needs GPU 2" in message
    assert "no node has that at all" in message and message.count("node ") >= 3


def test_a_reload_with_no_room_beside_stops_the_old_instance_then_starts_the_new(
    controller_for: Any, tmp_path: Path
) -> None:
    controller = controller_for({"pin": PIN, "alpha": A100})
    ray.get(controller.boot.remote(), timeout=120)
    warm(controller, "alpha")
    old_actor = status(controller, "alpha")["actor_pid"]
    path = tmp_path / "models.yaml"
    config = yaml.safe_load(path.read_text())
    config["models"]["alpha"]["memory"] = "1GiB"  # a placement field: a new actor
    path.write_text(yaml.safe_dump(config))
    result = ray.get(controller.reload_config.remote(), timeout=120)
    # The only free GPU is alpha's own: the new instance cannot start beside the old one.
    assert result["replacing"] == {"alpha": "stop, then start"}
    warm(controller, "alpha", deadline=time.time() + 30)
    assert status(controller, "alpha")["actor_pid"] != old_actor


def test_a_model_no_node_could_hold_is_placed_as_soon_as_a_fitting_node_joins(
    cluster: dict, controller_for: Any
) -> None:
    """A host that was gone and comes back (or a new one) is no crash loop: the model it can
    hold is placed on the next request, not after the failure cooldown (an hour here)."""
    controller = controller_for(
        {"pinned": {"num_gpus": 0, "labels": {"host": "late"}}}, cooldown=3600
    )
    with pytest.raises(ModelFailed, match="cannot be placed"):
        ray.get(controller.get_model.remote("pinned"), timeout=60)
    with pytest.raises(ModelFailed):  # the same nodes: still refused, at once
        ray.get(controller.get_model.remote("pinned"), timeout=60)
    late = cluster["cluster"].add_node(num_cpus=1, labels={"host": "late"})
    try:
        cluster["cluster"].wait_for_nodes()
        ray.get(controller.get_model.remote("pinned", time.time() + 60), timeout=90)
        assert status(controller, "pinned")["node_id"] == late.node_id
        ray.get(controller.stop_model.remote("pinned"), timeout=60)
    finally:
        cluster["cluster"].remove_node(late)
