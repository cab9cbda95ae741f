"""Counters the replicas keep and the controller sums, and the Prometheus text made of them:
with model and key names, or (for anyone without a key that may read it) without."""

from __future__ import annotations

from proxifier.metrics import RequestMetrics, merge_snapshots
from serve_app.metrics import render


def test_rate_limit_refusals_are_summed_over_replicas_and_rendered_by_key() -> None:
    one, two = RequestMetrics(), RequestMetrics()
    one.rate_limited("burst")
    two.rate_limited("burst")
    two.rate_limited("ci")
    two.answered("chat", 200)
    older = {"requests": [["chat", "200", 1]], "waits": {}}  # a replica of the version before
    total = merge_snapshots([one.snapshot(), two.snapshot(), older])
    assert total.limited == {"burst": 2, "ci": 1}
    assert total.requests == {("chat", "200"): 2}  # refusals are not answered requests
    text = render(
        {
            "statuses": [],
            "replicas": [one.snapshot(), two.snapshot()],
            "load_seconds": {},
            "evictions": {},
        }
    ).decode()
    assert 'proxifier_rate_limited_total{key="burst"} 2.0' in text
    assert 'proxifier_rate_limited_total{key="ci"} 1.0' in text


def test_without_names_every_series_is_summed_and_names_nothing() -> None:
    replica = RequestMetrics()
    for model in ("qwen-private", "chat", "chat"):
        replica.answered(model, 200)
        replica.waited(model, 0.2)
    replica.rate_limited("team-secret")
    statuses = [
        {"name": "qwen-private", "state": "ready", "in_flight": 1, "queue_depth": 2},
        {"name": "chat", "state": "ready", "in_flight": 2, "queue_depth": 0},
        {"name": "sleeper", "state": "stopped"},
    ]
    data = {
        "statuses": statuses,
        "replicas": [replica.snapshot()],
        "load_seconds": {},
        "evictions": {"idle": 1},
    }
    text = render(data, names=False).decode()
    for name in ("qwen-private", "chat", "sleeper", "team-secret"):
        assert f'"{name}"' not in text
    assert 'proxifier_model_state{model="",state="ready"} 2.0' in text
    assert 'proxifier_model_state{model="",state="stopped"} 1.0' in text
    assert 'proxifier_in_flight{model="",replica=""} 3.0' in text
    assert 'proxifier_requests_total{model="",status="200"} 3.0' in text
    assert 'proxifier_queue_wait_seconds_count{model=""} 3.0' in text
    assert 'proxifier_rate_limited_total{key=""} 1.0' in text
    assert 'proxifier_evictions_total{reason="idle"} 1.0' in text  # reasons name nobody
    named = render(data).decode()
    assert 'proxifier_requests_total{model="chat",status="200"} 2.0' in named


def test_a_model_with_replicas_has_a_series_per_replica() -> None:
    statuses = [
        {
            "name": "chat",
            "state": "ready",
            "in_flight": 3,
            "queue_depth": 1,
            "replicas": [
                {"name": "chat", "state": "ready", "in_flight": 2, "queue_depth": 1},
                {"name": "chat#2", "state": "starting", "in_flight": 1, "queue_depth": None},
            ],
        },
        {"name": "solo", "state": "ready", "in_flight": 1, "queue_depth": 0},
    ]
    data = {"statuses": statuses, "replicas": [], "load_seconds": {}, "evictions": {}}
    text = render(data).decode()
    assert 'proxifier_in_flight{model="chat",replica="chat"} 2.0' in text
    assert 'proxifier_in_flight{model="chat",replica="chat#2"} 1.0' in text
    assert 'proxifier_queue_depth{model="chat",replica="chat#2"} 0.0' in text
    assert 'proxifier_in_flight{model="solo",replica="solo"} 1.0' in text
