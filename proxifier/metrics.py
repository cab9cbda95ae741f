"""Metric names, histogram buckets and the plain-data counters replicas and the controller keep.
Pure: plain dicts and text, no I/O, no Ray, no Prometheus client.

Counters live where events happen (each ingress replica, the controller) as plain dicts; the
controller sums the replicas' snapshots, and /metrics renders the sum in Prometheus text.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# name -> help text; README's metrics table is checked against this.
METRICS: dict[str, str] = {
    "proxifier_model_state": "1 for the state each model is in now (label state)",
    "proxifier_requests_total": "requests answered, by model and HTTP status",
    "proxifier_in_flight": (
        "slots out now on each of the model's replicas (`replica` is the instance, `chat#2`; a"
        " model with one instance: its own name): requests running, and slots an ingress replica"
        " keeps for its next request (at most `queue.lease_hold`)"
    ),
    "proxifier_queue_depth": "requests waiting in each replica's queue now",
    "proxifier_queue_wait_seconds": "time from arrival to a granted slot",
    "proxifier_model_load_seconds": "time from starting llama-server to its first 200 on /health",
    "proxifier_model_restarts_total": "crash restarts of the model's llama-server",
    "proxifier_evictions_total": "models stopped to make room or for idleness, by reason",
    "proxifier_rate_limited_total": (
        "requests refused with 429 by an API key's rate limit (auth.yaml rate_limits), by key"
    ),
    "proxifier_model_gpu_memory_bytes": (
        "GPU memory of the model by kind: estimated from its GGUF, measured on its last"
        " calibrated load (with the per-process overhead), configured (`gpu_memory`)"
    ),
}


@dataclass
class Histogram:
    """Cumulative-bucket histogram as plain data (mergeable across processes)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.count += other.count

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound, observations <= it), ending with +Inf."""
        running, result = 0, []
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            result.append((f"{bound:g}", running))
        result.append(("+Inf", self.count))
        return result

    def to_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "total": self.total, "count": self.count}

    @classmethod
    def from_dict(cls, buckets: tuple[float, ...], data: dict[str, Any]) -> Histogram:
        return cls(buckets, list(data["counts"]), data["total"], data["count"])


@dataclass
class RequestMetrics:
    """One process's request counters: requests by (model, status) and queue waits by model."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    waits: dict[str, Histogram] = field(default_factory=dict)
    # Refused by the gate before a model is known: by the key's name, not by model.
    limited: dict[str, int] = field(default_factory=dict)

    def answered(self, model: str, status: int) -> None:
        key = (model, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1

    def waited(self, model: str, seconds: float) -> None:
        self.waits.setdefault(model, Histogram(QUEUE_WAIT_BUCKETS)).observe(seconds)

    def rate_limited(self, key: str) -> None:
        self.limited[key] = self.limited.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": [[m, s, n] for (m, s), n in self.requests.items()],
            "waits": {m: h.to_dict() for m, h in self.waits.items()},
            "limited": dict(self.limited),
        }


def merge_snapshots(snapshots: list[dict[str, Any]]) -> RequestMetrics:
    total = RequestMetrics()
    for snapshot in snapshots:
        for model, status, count in snapshot["requests"]:
            total.requests[(model, status)] = total.requests.get((model, status), 0) + count
        for key, count in snapshot.get("limited", {}).items():  # absent from older replicas
            total.limited[key] = total.limited.get(key, 0) + count
        for model, data in snapshot["waits"].items():
            histogram = Histogram.from_dict(QUEUE_WAIT_BUCKETS, data)
            if model in total.waits:
                total.waits[model].merge(histogram)
            else:
                total.waits[model] = histogram
    return total
