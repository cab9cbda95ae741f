"""The inference path's entry (DESIGN §3 steps 3-5, §12): a request walks one straight line,
gate (serve_app.gate) -> route (serve_app.route) -> admit (serve_app.admit) -> relay
(serve_app.relay). It may hold no state of a request itself and make no decision of theirs.
"""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response

from proxifier.endpoints import BY_PATH, Endpoint
from serve_app.admit import Admission, owned_by
from serve_app.gate import gate, raw_gate, upstream_model
from serve_app.metrics import ReplicaMetrics
from serve_app.relay import Relay
from serve_app.replica_slots import RayBackend


class Proxy:
    """Forwards inference requests; one per replica, with one relay (one pooled HTTP client)."""

    def __init__(self, backend: RayBackend, metrics: ReplicaMetrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self.relay = Relay(backend, metrics)

    async def aclose(self) -> None:
        await self.relay.aclose()

    async def handle(
        self, request: Request, endpoint: Endpoint, model: str | None = None
    ) -> Response:
        """One inference request on `endpoint`; `model`: already resolved (a passthrough)."""
        arrived, arrived_at = time.monotonic(), time.time()
        self.metrics.start_flushing(self.backend.controller)
        inbound = await gate(self.backend, request, endpoint, model, arrived, arrived_at)
        owned = owned_by(request.scope)
        choice = self.backend.pick(inbound.model, inbound.instances, owned)
        admission = Admission(self.backend, self.relay, inbound, owned)
        return await admission.serve(choice)

    async def passthrough(self, request: Request, name: str, rest: str) -> Response:
        """`/upstream/{model}/{rest}`: the model's llama-server itself, started on demand.
        An inference path there is that path with the model fixed (queue, slot and all);
        anything else (its /slots, /props, /metrics, web UI) is relayed raw and takes no
        slot. The model's own key is sent; the client's never is."""
        model = await upstream_model(self.backend, request, name)
        path = "/" + rest
        endpoint = BY_PATH.get(path)
        if endpoint is not None and request.method == "POST":
            return await self.handle(request, endpoint, model=model)
        body, timeout = await raw_gate(self.backend, request, model, path)
        _, where = await self.backend.on_model(
            model, time.time() + timeout, lambda h: h.endpoint.remote()
        )
        return await self.relay.raw(request, model, path, body, where)
