"""/health, /metrics, and two ingress replicas serving one burst."""

from __future__ import annotations

import concurrent.futures

import httpx

from tests.helpers import wait_for
from tests.serve.conftest import Deployment

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_health(deployment: Deployment) -> None:
    health = httpx.get(f"{deployment.url}/health").json()
    assert health["status"] == "ok" and health["controller"] == "reachable"
    assert health["models"]["total"] == 18 and health["models"]["ready"] >= 1


def test_two_replicas_serve_one_burst_and_metrics_add_up(deployment: Deployment) -> None:
    def one(_: int) -> int:
        return httpx.post(
            f"{deployment.url}/v1/chat/completions", json={"model": "chat", **CHAT}, timeout=60
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(40))) == [200] * 40

    import ray

    def both_replicas_counted() -> bool:
        data = ray.get(deployment.controller.metrics_data.remote())
        served = [
            sum(n for model, status, n in r["requests"] if model == "chat" and status == "200")
            for r in data["replicas"]
        ]
        return len(served) == 2 and all(served) and sum(served) >= 40

    wait_for(both_replicas_counted, timeout=30)
    text = httpx.get(f"{deployment.url}/metrics").text
    for family in (
        'proxifier_model_state{model="chat",state="ready"} 1.0',
        'proxifier_requests_total{model="chat",status="200"}',
        'proxifier_in_flight{model="chat",replica="chat"}',
        'proxifier_queue_depth{model="chat",replica="chat"}',
        'proxifier_queue_wait_seconds_bucket{le="0.005",model="chat"}',
        'proxifier_model_load_seconds_count{model="chat"}',
        'proxifier_model_restarts_total{model="chat"} 0.0',
    ):
        assert family in text, family
