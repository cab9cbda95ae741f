"""Request metrics of one ingress replica, pushed to the controller, and the Prometheus text of
the whole system built from the controller's sums (so every replica's /metrics agrees)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxifier.lifecycle import ModelState
from proxifier.metrics import (
    LOAD_BUCKETS,
    METRICS,
    Histogram,
    RequestMetrics,
    merge_snapshots,
)

FLUSH_INTERVAL = 2.0


class ReplicaMetrics:
    """Counts this replica's requests; also records them in Ray's metrics when running in Ray."""

    def __init__(self) -> None:
        self.replica_id = uuid.uuid4().hex
        self.local = RequestMetrics()
        self._ray: tuple[Any, Any] | None = None
        self._flusher: asyncio.Task[None] | None = None

    def answered(self, model: str, status: int) -> None:
        self.local.answered(model, status)
        if self._ray_metrics():
            assert self._ray is not None
            self._ray[0].inc(1, tags={"model": model, "status": str(status)})

    def waited(self, model: str, seconds: float) -> None:
        self.local.waited(model, seconds)
        if self._ray_metrics():
            assert self._ray is not None
            self._ray[1].observe(seconds, tags={"model": model})

    def rate_limited(self, key: str) -> None:
        self.local.rate_limited(key)

    def start_flushing(self, controller: Any) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush(controller))

    async def _flush(self, controller: Any) -> None:
        while True:
            with contextlib.suppress(Exception):
                await controller.report_metrics.remote(self.replica_id, self.local.snapshot())
            await asyncio.sleep(FLUSH_INTERVAL)

    def _ray_metrics(self) -> bool:
        if self._ray is None:
            try:
                import ray
                from ray.util import metrics

                if not ray.is_initialized():
                    return False
                self._ray = (
                    metrics.Counter(
                        "proxifier_requests",
                        METRICS["proxifier_requests_total"],
                        tag_keys=("model", "status"),
                    ),
                    metrics.Histogram(
                        "proxifier_queue_wait_seconds",
                        METRICS["proxifier_queue_wait_seconds"],
                        boundaries=[b for b in (0.01, 0.1, 1, 5, 30, 120)],
                        tag_keys=("model",),
                    ),
                )
            except Exception:  # metrics are best effort; requests never fail for them
                return False
        return True


class _Snapshot:
    """A prometheus_client collector over one snapshot of the controller's data. Without
    `names`, every model and key name is left out (an empty label is no label to Prometheus)
    and the series that only names told apart are summed: what anyone may read."""

    def __init__(self, data: dict[str, Any], names: bool = True) -> None:
        self.data = data
        self.names = names

    def _name(self, name: str) -> str:
        return name if self.names else ""

    def collect(self) -> Iterable[Metric]:
        name = self._name
        states: Counter[tuple[str, str]] = Counter()
        in_flight: Counter[tuple[str, str]] = Counter()  # (model, replica)
        depth: Counter[tuple[str, str]] = Counter()
        restarts: Counter[str] = Counter()
        gpu_memory: Counter[tuple[str, str]] = Counter()
        for status in self.data["statuses"]:
            model = name(status["name"])
            # unreachable: its actor did not answer; unknown: its status could not be read
            for value in [*map(str, ModelState), "unreachable", "unknown"]:
                states[model, value] += 1 if status["state"] == value else 0
            # Per instance: each replica its own series (one that runs alone is the model's).
            for replica in status.get("replicas") or [status]:
                key = model, name(replica["name"])
                in_flight[key] += replica.get("in_flight") or 0
                depth[key] += replica.get("queue_depth") or 0
            restarts[model] += status.get("restarts", 0)
            memory = status.get("gpu_memory") or {}
            for kind in ("estimated", "measured", "configured"):
                if memory.get(kind):
                    gpu_memory[model, kind] += memory[kind]
        yield _family(GaugeMetricFamily, "proxifier_model_state", ["model", "state"], states)
        yield _family(GaugeMetricFamily, "proxifier_in_flight", ["model", "replica"], in_flight)
        yield _family(GaugeMetricFamily, "proxifier_queue_depth", ["model", "replica"], depth)
        yield _family(CounterMetricFamily, "proxifier_model_restarts", ["model"], restarts)
        yield _family(
            GaugeMetricFamily, "proxifier_model_gpu_memory_bytes", ["model", "kind"], gpu_memory
        )

        requests = merge_snapshots(self.data["replicas"])
        answered: Counter[tuple[str, str]] = Counter()
        for (model, code), count in requests.requests.items():
            answered[name(model), code] += count
        yield _family(CounterMetricFamily, "proxifier_requests", ["model", "status"], answered)
        yield _histograms("proxifier_queue_wait_seconds", self._merged(requests.waits))
        limited: Counter[str] = Counter()
        for key, count in requests.limited.items():
            limited[name(key)] += count
        yield _family(CounterMetricFamily, "proxifier_rate_limited", ["key"], limited)
        loads = {
            m: Histogram.from_dict(LOAD_BUCKETS, d) for m, d in self.data["load_seconds"].items()
        }
        yield _histograms("proxifier_model_load_seconds", self._merged(loads))
        evictions = Counter({(reason,): n for reason, n in self.data["evictions"].items()})
        yield _family(CounterMetricFamily, "proxifier_evictions", ["reason"], evictions)

    def _merged(self, by_model: dict[str, Histogram]) -> dict[str, Histogram]:
        merged: dict[str, Histogram] = {}
        for model, histogram in by_model.items():
            key = self._name(model)
            if key in merged:
                merged[key].merge(histogram)
            else:
                merged[key] = Histogram(histogram.buckets, list(histogram.counts),
                                        histogram.total, histogram.count)  # fmt: skip
        return merged


def _family(kind: Any, metric: str, labels: list[str], values: Counter[Any]) -> Metric:
    """One metric family, its series in label order (a plain key is a one-label tuple)."""
    documented = METRICS.get(metric) or METRICS[f"{metric}_total"]
    family = kind(metric, documented, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


def _histograms(metric: str, by_model: dict[str, Histogram]) -> Metric:
    family = HistogramMetricFamily(metric, METRICS[metric], labels=["model"])
    for model, histogram in sorted(by_model.items()):
        family.add_metric([model], histogram.cumulative(), sum_value=histogram.total)
    return family


def render(data: dict[str, Any], names: bool = True) -> bytes:
    """The Prometheus text; `names`: whether model and key names are in it (_Snapshot)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(data, names))  # type: ignore[arg-type]
    return generate_latest(registry)
