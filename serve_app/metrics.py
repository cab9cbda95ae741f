"""Request metrics of one ingress replica, pushed to the controller, and the Prometheus text of
the whole system built from the controller's sums (so every replica's /metrics agrees)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
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
    """A prometheus_client collector over one snapshot of the controller's data."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def collect(self) -> Iterable[Metric]:
        statuses = self.data["statuses"]
        state = GaugeMetricFamily(
            "proxifier_model_state", METRICS["proxifier_model_state"], labels=["model", "state"]
        )
        in_flight = GaugeMetricFamily(
            "proxifier_in_flight", METRICS["proxifier_in_flight"], labels=["model"]
        )
        depth = GaugeMetricFamily(
            "proxifier_queue_depth", METRICS["proxifier_queue_depth"], labels=["model"]
        )
        restarts = CounterMetricFamily(
            "proxifier_model_restarts", METRICS["proxifier_model_restarts_total"], labels=["model"]
        )
        gpu_memory = GaugeMetricFamily(
            "proxifier_model_gpu_memory_bytes",
            METRICS["proxifier_model_gpu_memory_bytes"],
            labels=["model", "kind"],
        )
        for status in statuses:
            name = status["name"]
            for value in ModelState:
                state.add_metric([name, str(value)], 1.0 if status["state"] == value else 0.0)
            in_flight.add_metric([name], status.get("in_flight", 0))
            depth.add_metric([name], status.get("queue_depth", 0))
            restarts.add_metric([name], status.get("restarts", 0))
            memory = status.get("gpu_memory") or {}
            for kind in ("estimated", "measured", "configured"):
                if memory.get(kind):
                    gpu_memory.add_metric([name, kind], memory[kind])
        yield from (state, in_flight, depth, restarts, gpu_memory)

        requests = merge_snapshots(self.data["replicas"])
        total = CounterMetricFamily(
            "proxifier_requests", METRICS["proxifier_requests_total"], labels=["model", "status"]
        )
        for (model, code), count in sorted(requests.requests.items()):
            total.add_metric([model, code], count)
        yield total
        waits = HistogramMetricFamily(
            "proxifier_queue_wait_seconds",
            METRICS["proxifier_queue_wait_seconds"],
            labels=["model"],
        )
        for model, histogram in sorted(requests.waits.items()):
            waits.add_metric([model], histogram.cumulative(), sum_value=histogram.total)
        yield waits
        limited = CounterMetricFamily(
            "proxifier_rate_limited", METRICS["proxifier_rate_limited_total"], labels=["key"]
        )
        for key, count in sorted(requests.limited.items()):
            limited.add_metric([key], count)
        yield limited
        loads = HistogramMetricFamily(
            "proxifier_model_load_seconds",
            METRICS["proxifier_model_load_seconds"],
            labels=["model"],
        )
        for model, data in sorted(self.data["load_seconds"].items()):
            histogram = Histogram.from_dict(LOAD_BUCKETS, data)
            loads.add_metric([model], histogram.cumulative(), sum_value=histogram.total)
        yield loads
        evictions = CounterMetricFamily(
            "proxifier_evictions", METRICS["proxifier_evictions_total"], labels=["reason"]
        )
        for reason, count in sorted(self.data["evictions"].items()):
            evictions.add_metric([reason], count)
        yield evictions


def render(data: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(data))  # type: ignore[arg-type]
    return generate_latest(registry)
