"""Replicas through the deployed product (issue 23), on the test cluster with the fake
llama-server: a fixed count runs and shares the requests, a lost replica is replaced while the
model keeps answering, a count set at runtime, and a load that scales a model out and back in."""

from __future__ import annotations

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

from tests.conftest import deployed
from tests.helpers import wait_for

REPLICA = "x-proxifier-replica"


def models_config(fake: dict[str, Any]) -> dict[str, Any]:
    # Each answer token takes 0.05 s: a request of 20 tokens holds its slot for a second.
    slow = {**fake, "env": {"FAKE_LLAMA_TOKEN_DELAY": "0.05"}}
    return {
        "settings": {"cleanup_interval": 0.5},
        "models": {
            "chat": {**fake, "preload": True},
            "pair": {**slow, "replicas": 2, "parallel": 2},
            # A second replica takes a second to load: a burst queues at the first meanwhile.
            "burst": {
                **slow,
                "env": {**slow["env"], "FAKE_LLAMA_LOAD_DELAY": "1"},
                "parallel": 1,
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 1,
                    "upscale_delay_s": 0,
                    "downscale_delay_s": 600,
                },
            },
            "elastic": {
                **slow,
                "parallel": 1,
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 3,
                    "target_ongoing_requests": 1,
                    "upscale_delay_s": 0,
                    "downscale_delay_s": 2,
                },
            },
        },
    }


@pytest.fixture(scope="module")
def config_file(fake_fields: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("replicas") / "models.yaml"
    path.write_text(yaml.safe_dump(models_config(fake_fields)))
    return path


@pytest.fixture(scope="module")
def url(proxifier_home: Path, config_file: Path) -> Iterator[str]:
    with deployed(proxifier_home, config_file, replicas=2, ready="chat") as (base, _controller):
        yield base


def status(url: str, model: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/models/{model}/status", timeout=30).json()


def ready_replicas(url: str, model: str) -> list[dict[str, Any]]:
    return [r for r in status(url, model).get("replicas", []) if r["state"] == "ready"]


def ask(url: str, model: str, tokens: int = 4) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_a_fixed_count_runs_every_replica_and_shares_the_requests(url: str) -> None:
    assert ask(url, "pair").status_code == 200  # started on demand, then the second one
    wait_for(lambda: len(ready_replicas(url, "pair")) == 2, timeout=60)
    shown = status(url, "pair")
    assert [r["name"] for r in shown["replicas"]] == ["pair", "pair#2"]
    assert shown["desired"]["replicas"] == 2
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ask(url, "pair", tokens=10), range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    served = Counter(a.headers[REPLICA] for a in answers)
    assert set(served) == {"pair", "pair#2"}, served  # both took a share


def test_a_lost_replica_is_replaced_while_the_model_answers(url: str) -> None:
    assert ask(url, "pair").status_code == 200
    wait_for(lambda: len(ready_replicas(url, "pair")) == 2, timeout=60)
    before = {r["name"]: r for r in status(url, "pair")["replicas"]}
    named = [
        e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
        if e["name"].startswith("proxifier:model:pair#2@")
    ]  # fmt: skip
    assert len(named) == 1, named
    ray.kill(ray.get_actor(named[0], namespace="proxifier"), no_restart=True)
    answers = [ask(url, "pair").status_code for _ in range(6)]
    assert answers == [200] * 6  # the other replica answers meanwhile
    seen: list[dict[str, Any]] = []

    def replaced() -> bool:
        seen.append(status(url, "pair"))
        ready = [r for r in seen[-1].get("replicas", []) if r["state"] == "ready"]
        ports = {r["name"]: r["port"] for r in ready}
        return len(ports) == 2 and ports.get("pair#2") not in (None, before["pair#2"]["port"])

    try:
        wait_for(replaced, timeout=60)
    except TimeoutError:
        pytest.fail(f"not replaced; last status: {seen[-1]}")
    events = httpx.get(f"{url}/admin/events", timeout=30).json()["events"]
    assert any(e["kind"] == "replica_lost" and e.get("replica") == "pair#2" for e in events)


def test_a_count_set_at_runtime(url: str) -> None:
    assert ask(url, "pair").status_code == 200
    scaled = httpx.post(f"{url}/admin/models/pair/scale", json={"replicas": 3}, timeout=30)
    assert scaled.status_code == 200, scaled.text
    assert scaled.json()["replicas"] == 3
    wait_for(lambda: len(ready_replicas(url, "pair")) == 3, timeout=60)
    back = httpx.post(f"{url}/admin/models/pair/scale", json={"replicas": 2}, timeout=30)
    assert back.status_code == 200
    wait_for(lambda: len(status(url, "pair")["replicas"]) == 2, timeout=60)
    refused = httpx.post(f"{url}/admin/models/pair/scale", json={"replicas": 0}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["message"]


def test_requests_waiting_at_the_first_replica_are_served_by_a_new_one(url: str) -> None:
    """Every request of the burst is routed to the only replica there is and waits in its
    queue; once the second is ready, waiting requests leave that queue and it serves them."""
    assert ask(url, "burst").status_code == 200
    assert len(status(url, "burst").get("replicas", [])) <= 1
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: ask(url, "burst", tokens=40), range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    served = Counter(a.headers[REPLICA] for a in answers)
    assert served["burst#2"] >= 1, served


def test_load_scales_a_model_out_and_back_in_without_failing_a_request(url: str) -> None:
    assert ask(url, "elastic").status_code == 200
    answers: list[int] = []
    served: Counter[str] = Counter()
    done = threading.Event()

    def keep_asking() -> None:
        while not done.is_set():
            answer = ask(url, "elastic", tokens=20)
            answers.append(answer.status_code)
            served[answer.headers.get(REPLICA, "")] += 1

    senders = [threading.Thread(target=keep_asking) for _ in range(4)]
    for sender in senders:
        sender.start()
    try:
        # Four at once on one slot each: target 1 per replica, so up to max_replicas (3).
        wait_for(lambda: len(ready_replicas(url, "elastic")) == 3, timeout=90)
        seen = sum(served.values())
        wait_for(lambda: sum(served.values()) >= seen + 6, timeout=60)
    finally:
        done.set()
        for sender in senders:
            sender.join()
    assert set(answers) == {200}, Counter(answers)
    assert len([name for name in served if name]) >= 2, served  # the new replicas served
    # Idle now: after downscale_delay_s it drains back to min_replicas, failing nothing.
    wait_for(lambda: len(status(url, "elastic").get("replicas", [])) == 1, timeout=60)
    assert ask(url, "elastic").status_code == 200
    events = httpx.get(f"{url}/admin/events", timeout=30).json()["events"]
    kinds = [e["kind"] for e in events if e.get("model") == "elastic"]
    assert "scaled_out" in kinds and "scaled_in" in kinds


def test_a_rolling_reload_under_load_fails_no_request(url: str, config_file: Path) -> None:
    """A reload that restarts a model with two replicas replaces them one at a time: a new
    one takes requests once ready, then an old one drains; never fewer than one ready, and
    no request fails. (Last in the module: it leaves the new config in force.)"""
    assert ask(url, "pair").status_code == 200
    wait_for(lambda: len(ready_replicas(url, "pair")) == 2, timeout=60)
    before = {r["port"] for r in ready_replicas(url, "pair")}
    generations = {r["generation"] for r in ready_replicas(url, "pair")}
    assert len(generations) == 2 and all(generations)
    answers: list[int] = []
    done = threading.Event()

    def keep_asking() -> None:
        while not done.is_set():
            answers.append(ask(url, "pair", tokens=10).status_code)

    senders = [threading.Thread(target=keep_asking) for _ in range(4)]
    for sender in senders:
        sender.start()
    fewest: list[int] = []
    try:
        config = yaml.safe_load(config_file.read_text())
        config["models"]["pair"]["env"]["FAKE_LLAMA_MARK"] = "rolled"  # env: a restart
        config_file.write_text(yaml.safe_dump(config))
        reloaded = httpx.post(f"{url}/admin/config/reload", timeout=120)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["replacing"]["pair"].startswith("rolling"), reloaded.json()

        def rolled() -> bool:
            fewest.append(len(ready_replicas(url, "pair")))
            events = httpx.get(f"{url}/admin/events", timeout=30).json()["events"]
            replaced = [e for e in events if e["kind"] == "replica_replaced"]
            return len([e for e in replaced if e.get("model") == "pair"]) == 2

        wait_for(rolled, timeout=120)
        seen = len(answers)
        wait_for(lambda: len(answers) >= seen + 4, timeout=60)  # the new ones answer
    finally:
        done.set()
        for sender in senders:
            sender.join()
    assert set(answers) == {200}, Counter(answers)
    assert min(fewest) >= 1, fewest
    after = ready_replicas(url, "pair")
    assert len(after) == 2 and not {r["port"] for r in after} & before, after
    assert not {r["generation"] for r in after} & generations  # new instances, each its own
