"""Replicas on a simulated cluster (issue 23's acceptance): ray.cluster_utils.Cluster with a
CPU-only head (the endpoint and the controller) and two nodes of two fake GPUs each, the whole
product deployed on it, the fake llama-server with slow answers. Default timings but for the
scaling delays. The tests run in order, each from the state the one before left:

1. a burst of 32 requests, all sent while one replica runs, scales the model 1 -> 4 over both
   nodes, and the replicas that came later serve requests that waited at the first; none fails;
2. a priority-9 model that needs a GPU (all four are held) evicts one surplus replica;
3. idle again, the model drains back to one replica without failing a request in flight;
4. with two replicas on the two nodes, one node is killed: the model keeps answering, only
   requests in flight there may fail, and the count comes back on the node that is left;
5. a reload that restarts the model, with no GPU free for a third copy, rolls: one replica
   drains and stops, its successor starts; under constant load no request fails.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from proxifier.startup import serve_environment
from tests.conftest import RUNTIME_HOOK, deployed
from tests.helpers import wait_for

REPLICA = "x-proxifier-replica"
GPU = {"num_gpus": 1}


@pytest.fixture(scope="module")
def cluster(proxifier_home: Path) -> Iterator[dict[str, Any]]:
    if ray.is_initialized():
        ray.shutdown()  # the session's single-node cluster; the next test module restarts it
    serving = {
        **serve_environment(haproxy=True),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }
    os.environ.update(serving)  # the raylets pass it on to every worker, as ensure_ray does
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=2) for _ in range(2)]
    ray.init(
        address=cluster.address,
        namespace="proxifier-tests",
        runtime_env={
            "env_vars": {"PROXIFIER_HOME": str(proxifier_home), **serving},
            "worker_process_setup_hook": RUNTIME_HOOK,
        },
        log_to_driver=False,
    )
    cluster.wait_for_nodes()
    yield {"cluster": cluster, "gpu_nodes": gpu_nodes}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def config_file(fake_fields: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Each answer token takes 0.05 s: a request of 20 tokens holds its slot for a second.
    slow = {**fake_fields, **GPU, "env": {"FAKE_LLAMA_TOKEN_DELAY": "0.05"}}
    config = {
        "settings": {"cleanup_interval": 0.5},
        "models": {
            "chat": {
                **slow,
                "preload": True,
                "parallel": 2,
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 4,
                    "target_ongoing_requests": 2,
                    "upscale_delay_s": 0,
                    "downscale_delay_s": 6,
                },
            },
            "top": {**fake_fields, **GPU, "priority": 9},
        },
    }
    path = tmp_path_factory.mktemp("replicas-cluster") / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def url(cluster: dict[str, Any], proxifier_home: Path, config_file: Path) -> Iterator[str]:
    with deployed(proxifier_home, config_file, ready="chat") as (base, _controller):
        yield base


def status(url: str, model: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/admin/models/{model}/status", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def replicas(url: str, state: str | None = None) -> list[dict[str, Any]]:
    shown = status(url, "chat")
    found = shown.get("replicas") or [{"name": "chat", **shown}]
    return [r for r in found if state is None or r["state"] == state]


def ask(url: str, model: str = "chat", tokens: int = 20) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=180)


def events(url: str, kind: str) -> list[dict[str, Any]]:
    found = httpx.get(f"{url}/admin/events", timeout=30).json()["events"]
    return [e for e in found if e["kind"] == kind]


class Load:
    """`clients` threads asking the model back to back until stopped; every status kept."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.done = url, threading.Event()
        self.answers: list[httpx.Response] = []
        self.threads = [threading.Thread(target=self._ask) for _ in range(clients)]

    def _ask(self) -> None:
        while not self.done.is_set():
            self.answers.append(ask(self.url))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join()

    def more(self, count: int, timeout: float = 60) -> None:
        """Wait for `count` more answers: the model answers now."""
        seen = len(self.answers)
        wait_for(lambda: len(self.answers) >= seen + count, timeout=timeout)


def test_a_burst_scales_one_to_four_over_both_nodes_and_fails_nothing(
    url: str, cluster: dict[str, Any]
) -> None:
    assert len(replicas(url)) == 1
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: ask(url), range(32)))
    assert [a.status_code for a in answers] == [200] * 32, Counter(a.status_code for a in answers)
    served = Counter(a.headers[REPLICA] for a in answers)
    # Every request was sent while one replica ran: the others served requests moved to them.
    assert len(served) >= 3, served
    running = replicas(url)
    assert len(running) == 4, running
    nodes = {node.node_id for node in cluster["gpu_nodes"]}
    assert {r["node_id"] for r in running} == nodes, running  # spread over both


def test_a_priority_9_model_evicts_a_surplus_replica(url: str) -> None:
    # All four GPUs hold replicas of chat, idle now and within their downscale delay.
    assert len(replicas(url)) == 4
    assert ask(url, "top", tokens=2).status_code == 200
    evicted = [e for e in events(url, "evicted") if e.get("for_model") == "top"]
    assert len(evicted) == 1 and evicted[0]["model"].startswith("chat#"), evicted
    wait_for(lambda: len(replicas(url)) == 3, timeout=30)


def test_idle_again_it_drains_back_to_one_without_failing_a_request(url: str) -> None:
    with Load(url, clients=1) as load:
        wait_for(lambda: len(replicas(url)) == 1, timeout=90)
        load.more(2)
    assert {a.status_code for a in load.answers} == {200}
    assert events(url, "scaled_in")


def test_a_lost_node_fails_only_its_requests_in_flight_and_the_count_comes_back(
    url: str, cluster: dict[str, Any]
) -> None:
    assert httpx.post(f"{url}/admin/models/top/stop", timeout=60).status_code == 200
    scaled = httpx.post(f"{url}/admin/models/chat/scale", json={"replicas": 2}, timeout=30)
    assert scaled.status_code == 200, scaled.text
    wait_for(lambda: len(replicas(url, "ready")) == 2, timeout=60)
    placed = {r["name"]: r["node_id"] for r in replicas(url, "ready")}
    assert len(set(placed.values())) == 2, placed  # one on each node
    doomed_name = sorted(placed)[-1]
    doomed = next(n for n in cluster["gpu_nodes"] if n.node_id == placed[doomed_name])
    with Load(url, clients=4) as load:
        load.more(4)
        cluster["cluster"].remove_node(doomed, allow_graceful=False)
        lost_at = len(load.answers)

        def restored() -> bool:
            ready = replicas(url, "ready")
            return len(ready) == 2 and placed[doomed_name] not in {r["node_id"] for r in ready}

        wait_for(restored, timeout=120)
        load.more(8)
    failed = [a for a in load.answers if a.status_code != 200]
    # Only the requests in flight on the lost replica (its two slots) may fail, and say why.
    assert len(failed) <= 2, [(a.status_code, a.text[:200]) for a in failed]
    assert all(a.json()["error"]["message"] for a in failed)
    assert {a.status_code for a in load.answers[lost_at + 4 :]} == {200}
    assert any(e.get("replica") == doomed_name for e in events(url, "replica_lost"))


def test_a_rolling_reload_with_no_room_beside_replaces_one_at_a_time(
    url: str, config_file: Path
) -> None:
    # Two replicas on the node that is left, which has two GPUs: no room for a third copy.
    before = {r["port"] for r in replicas(url, "ready")}
    assert len(before) == 2
    config = yaml.safe_load(config_file.read_text())
    config["models"]["chat"]["env"]["FAKE_LLAMA_MARK"] = "rolled"  # env: a restart
    config_file.write_text(yaml.safe_dump(config))
    fewest: list[int] = []
    with Load(url, clients=2) as load:
        load.more(2)
        reloaded = httpx.post(f"{url}/admin/config/reload", timeout=120)
        assert reloaded.status_code == 200, reloaded.text
        how = reloaded.json()["replacing"]["chat"]
        assert how.startswith("rolling") and "drains and stops" in how, how

        def rolled() -> bool:
            fewest.append(len(replicas(url, "ready")))
            return len([e for e in events(url, "replica_replaced") if e["model"] == "chat"]) == 2

        wait_for(rolled, timeout=120)
        load.more(4)
    assert {a.status_code for a in load.answers} == {200}, Counter(
        a.status_code for a in load.answers
    )
    assert min(fewest) >= 1, fewest
    after = replicas(url, "ready")
    assert len(after) == 2 and not {r["port"] for r in after} & before, after
