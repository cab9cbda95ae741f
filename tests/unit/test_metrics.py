"""Counters the replicas keep and the controller sums: rate-limit refusals by key."""

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
