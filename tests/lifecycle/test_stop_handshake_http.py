"""Through the deployed product: a model being stopped (idle cleanup) or moved to a new actor (a
reload of a placement field) never costs a request. The registry drops the old instance before
it stops; requests that race it wait for a fresh one and are answered 200."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import deployed
from tests.helpers import alive, wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
STOP_GRACE = 8  # seconds the old llama-server ignores SIGTERM before it is killed


def models_config(fake: dict[str, Any], movable_cpus: float = 0) -> dict[str, Any]:
    return {
        "settings": {"cleanup_interval": 0.5, "stop_grace": STOP_GRACE},
        "models": {
            "chat": {**fake, "preload": True},
            # Stopped for idleness 2 s after its last request; its llama-server ignores SIGTERM,
            # so the stop takes the whole grace.
            "deaf": {**fake, "idle_timeout": 2, "env": {"FAKE_LLAMA_IGNORE_SIGTERM": "1"}},
            # Loads for 4 s: long enough to see which instance serves while the new one loads.
            "movable": {
                **fake,
                "num_cpus": movable_cpus,
                "parallel": 2,
                "env": {"FAKE_LLAMA_LOAD_DELAY": "4"},
            },
            "nowhere": {**fake, "resources": {"tpu": 1}},  # no node has one
        },
    }


@pytest.fixture(scope="module")
def setup(
    proxifier_home: Path, fake_fields: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    path = tmp_path_factory.mktemp("lifecycle") / "models.yaml"
    path.write_text(yaml.safe_dump(models_config(fake_fields)))
    with deployed(proxifier_home, path, replicas=2, ready="chat") as (url, _controller):
        yield url, path


def status(url: str, model: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/admin/models/{model}/status", timeout=30)
    assert answer.status_code == 200, f"{model}: {answer.status_code} {answer.text[:300]}"
    return answer.json()


def ask(url: str, model: str) -> int:
    body = {"model": model, **CHAT}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code


def test_requests_that_race_an_idle_stop_get_a_fresh_instance(setup: tuple[str, Path]) -> None:
    url, _ = setup
    assert ask(url, "deaf") == 200
    old_pid = status(url, "deaf")["pid"]
    # Idle cleanup takes the model out of the registry, then stops it (for STOP_GRACE s).
    wait_for(lambda: status(url, "deaf")["state"] == "stopping", timeout=30)
    assert alive(old_pid), "the old llama-server should still be in its SIGTERM grace"
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ask(url, "deaf"), range(8)))
    assert answers == [200] * 8
    fresh = status(url, "deaf")
    assert fresh["state"] == "ready" and fresh["pid"] != old_pid


def test_reloading_a_placement_field_answers_2xx_and_loses_no_request(
    setup: tuple[str, Path], fake_fields: dict[str, Any]
) -> None:
    url, path = setup
    assert ask(url, "movable") == 200
    before = status(url, "movable")
    answers: list[int] = []
    done = threading.Event()

    def keep_asking() -> None:
        while not done.is_set():
            answers.append(ask(url, "movable"))

    senders = [threading.Thread(target=keep_asking) for _ in range(3)]
    for sender in senders:
        sender.start()
    try:
        wait_for(lambda: len(answers) >= 6, timeout=60)
        path.write_text(yaml.safe_dump(models_config(fake_fields, movable_cpus=0.5)))
        reload = httpx.post(f"{url}/admin/config/reload", timeout=120)
        assert reload.status_code == 200, reload.text
        assert reload.json()["replacing"] == {"movable": "blue/green"}  # it fits beside
        # Blue/green: while the new instance loads, the old one is still the one serving.
        during = status(url, "movable")
        assert during["replacing"] and during["actor_pid"] == before["actor_pid"]
        assert during["state"] == "ready"
        # Then the new instance (a new actor, holding half a CPU) takes over.
        wait_for(lambda: status(url, "movable").get("actor_pid") != before["actor_pid"], 60)
        wait_for(lambda: status(url, "movable")["state"] == "ready", timeout=60)
        served = len(answers)
        wait_for(lambda: len(answers) >= served + 6, timeout=60)
    finally:
        done.set()
        for sender in senders:
            sender.join()
    assert set(answers) == {200}, answers


def test_the_scheduler_explains_where_a_model_runs_and_why_another_cannot(
    setup: tuple[str, Path],
) -> None:
    url, _ = setup
    placed = httpx.get(f"{url}/admin/scheduler/explain", params={"model": "chat"}, timeout=30)
    assert placed.status_code == 200
    assert placed.json()["last_decision"]["decision"] == "placed"
    assert placed.json()["last_decision"]["reason"] == f"placed on node {placed.json()['node_id']}"
    body = {"model": "nowhere", **CHAT}
    refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert refused.status_code == 503
    message = refused.json()["error"]["message"]
    assert "model 'nowhere' cannot be placed: it needs tpu 1; no node has that at all" in message
    explained = httpx.get(f"{url}/admin/scheduler/explain?model=nowhere", timeout=30).json()
    assert explained["last_decision"]["decision"] == "failed"
    assert explained["last_decision"]["reason"] == message
    unknown = httpx.get(f"{url}/admin/scheduler/explain?model=nope", timeout=30)
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["error"]["message"]


VIEWS = ["/health", "/metrics", "/v1/models", "/admin/models/status", "/admin/cluster"]
VIEWS += ["/admin/queue/status", "/admin/groups/status", "/admin/config/files", "/dashboard"]


def test_after_a_bad_reload_no_answer_breaks(
    setup: tuple[str, Path], fake_fields: dict[str, Any], tmp_path: Path
) -> None:
    """Issue 29, item 1: a path out of the Hub cache is refused at the reload and the running
    config stays; a model whose file is no GGUF is taken, shows its own error, and every view
    still answers."""
    url, path = setup
    running = path.read_text()
    config = yaml.safe_load(running)
    config["models"]["escape"] = {
        **{k: v for k, v in fake_fields.items() if k != "model_path"},
        "hf_repo": "owner/name",
        "hf_file": "../../../../etc/passwd",
    }
    path.write_text(yaml.safe_dump(config))
    refused = httpx.post(f"{url}/admin/config/reload", timeout=120)
    assert 400 <= refused.status_code < 500 and "hf_file" in refused.text, refused.text
    assert "escape" not in httpx.get(f"{url}/v1/models", timeout=30).text
    garbage = tmp_path / "not-a-model.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    del config["models"]["escape"]
    config["models"]["garbage"] = {**fake_fields, "model_path": str(garbage)}
    path.write_text(yaml.safe_dump(config))
    try:
        taken = httpx.post(f"{url}/admin/config/reload", timeout=120)
        assert taken.status_code == 200, taken.text
        for view in VIEWS:
            answer = httpx.get(f"{url}{view}", timeout=60)
            assert answer.status_code == 200, f"{view}: {answer.status_code} {answer.text[:300]}"
        shown = status(url, "garbage")
        assert shown["state"] == "stopped"
        assert "not a GGUF model file" in shown["gpu_memory"]["error"], shown["gpu_memory"]
        assert status(url, "chat")["state"] == "ready"  # the others stay whole
    finally:
        path.write_text(running)
        assert httpx.post(f"{url}/admin/config/reload", timeout=120).status_code == 200
