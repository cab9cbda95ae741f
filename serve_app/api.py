"""The HTTP surface (DESIGN §6): the OpenAI API, the seed's admin API, /health and /metrics.

`build_api(backend)` makes the FastAPI app; the Serve deployment in `serve_app.app` wraps it,
and tests can build it around any backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from proxifier.auth import ADMIN, Caller, may_use_model, models_for
from proxifier.endpoints import ENDPOINTS, STORED_RESPONSES, Endpoint
from proxifier.errors import ModelNotFound, NotFound
from serve_app.admit import LeaseGuard
from serve_app.dashboard import install_dashboard
from serve_app.fast_path import InferenceFastPath
from serve_app.http_errors import error_response, install_error_handlers
from serve_app.metrics import ReplicaMetrics, render
from serve_app.proxy import Proxy
from serve_app.replica_slots import RayBackend
from serve_app.security import BodyDeadline, Security, caller_of


def inference_schema(endpoint: Endpoint) -> dict[str, Any]:
    """The body an inference route takes (passed to llama-server as it is) and, for
    llama-server's own paths, `?model=`: in the OpenAPI document for /docs, and what the
    fuzz tests generate requests from."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "messages": {"type": "array", "items": {"type": "object"}},
            "prompt": {},
            "input": {},
            "stream": {"type": "boolean"},
            "max_tokens": {"type": "integer"},
        },
    }
    extra: dict[str, Any] = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
    }
    if endpoint.model_in_query:
        extra["parameters"] = [
            {"name": "model", "in": "query", "required": False, "schema": {"type": "string"}}
        ]
    else:
        schema["required"] = ["model"]
    return extra


class ScaleBody(BaseModel):
    """`POST /admin/models/{m}/scale`: a fixed replica count."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(ge=1, le=64)


HEALTH_WAIT = 5.0  # seconds /health waits for the controller before it answers 503


def build_api(backend: RayBackend, bound_host: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await backend.give_back_all()  # slots this replica holds go back before it exits
        await proxy.aclose()

    app = FastAPI(
        title="LLM Proxifier",
        description="One OpenAI-compatible endpoint for many llama-server models on Ray.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    metrics = ReplicaMetrics()
    proxy = Proxy(backend, metrics)
    # Innermost: behind the gate; its errors answered by the handlers installed above.
    app.add_middleware(InferenceFastPath, proxy=proxy, handlers=app.exception_handlers)
    app.add_middleware(Security, backend=backend, bound_host=bound_host, metrics=metrics)
    app.add_middleware(BodyDeadline, backend=backend)
    app.add_middleware(LeaseGuard, backend=backend)  # outermost: it outlives every other layer

    async def ask(ref: Any) -> Any:
        return await backend.call(ref)

    def ctl() -> Any:
        """The controller handle (looked up when first needed, by name)."""
        return backend.controller

    # ------------------------------------------------------------------ OpenAI
    def inference_route(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        async def inference(request: Request) -> Response:
            return await proxy.handle(request, endpoint)

        return inference

    for endpoint in ENDPOINTS:
        app.add_api_route(
            endpoint.path,
            inference_route(endpoint),
            methods=["POST"],
            include_in_schema=True,
            openapi_extra=inference_schema(endpoint),
        )

    # llama-server's Responses API keeps no responses: what needs a stored one is a clear 404.
    async def stored_response(response_id: str) -> Response:
        raise NotFound(f"No stored response '{response_id}': {STORED_RESPONSES}")

    app.add_api_route("/v1/responses/{response_id}", stored_response, methods=["GET", "DELETE"])
    app.add_api_route("/v1/responses/{response_id}/input_items", stored_response, methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}/cancel", stored_response, methods=["POST"])

    @app.get("/upstream/{model}", include_in_schema=False)
    async def upstream_root(model: str, request: Request) -> Response:
        """The web UI's address without its slash: its relative links need one."""
        await visible(request, model)
        return RedirectResponse(f"/upstream/{model}/", 307)

    @app.api_route("/upstream/{model}/{rest:path}", methods=["GET", "POST"])
    async def upstream(model: str, rest: str, request: Request) -> Response:
        """The model's own llama-server, raw (its /slots, /props, /metrics, web UI)."""
        return await proxy.passthrough(request, model, rest)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        caller = caller_of(request.scope)
        listed = await ask(ctl().models_list.remote())
        visible = [m for m in listed if caller is None or may_use_model(caller, m["id"])]
        return {"object": "list", "data": visible}

    @app.get("/v1/models/{model}")
    async def get_model(model: str, request: Request) -> dict[str, Any]:
        name = await visible(request, model)
        listed = await ask(ctl().models_list.remote())
        return next(entry for entry in listed if entry["id"] == name)

    @app.get("/v1/queue/{request_id}")
    async def queued_result(request_id: str, request: Request) -> Response:
        result = await ask(ctl().find_result.remote(request_id))
        caller = caller_of(request.scope)
        owner = result.get("owner")
        theirs = owner is not None and caller is not None and caller.name != owner
        if theirs and caller is not None and not _is_admin(caller):
            result = {"status": "unknown"}  # another key's request: as if it did not exist
        if result["status"] == "unknown":
            raise NotFound(f"No queued request '{request_id}' (unknown, or its result expired)")
        if result["status"] == "done":
            return JSONResponse(result["body"], result["http_status"])
        return JSONResponse(
            {
                "message": "Request queued" if result["status"] == "pending" else "Running",
                "request_id": request_id,
                "status": result["status"],
                "position": result.get("position", 0),
                "model_state": result.get("model_state"),
            },
            202,
            headers={"Location": f"/v1/queue/{request_id}"},
        )

    # ------------------------------------------------------------------ admin: models
    # A key with a `models:` allow-list sees and acts on those models only: one named outside
    # it is the same 404 as an unknown name (listing only its models), and bulk operations and
    # listings leave the others out.
    async def visible(request: Request, model: str) -> str:
        return await backend.resolve(model, caller_of(request.scope))

    async def only(request: Request) -> list[str] | None:
        return await backend.visible_models(caller_of(request.scope))

    @app.get("/admin/models/status")
    async def models_status(request: Request) -> dict[str, Any]:
        allowed = await only(request)
        statuses = await ask(ctl().status.remote())
        return {"models": [s for s in statuses if allowed is None or s["name"] in allowed]}

    @app.post("/admin/models/{model}/start")
    async def start_model(
        model: str, request: Request, wait: Annotated[bool, Query()] = True
    ) -> dict[str, Any]:
        # wait=false: answer once it is placed and its start is under way (a client then
        # follows its status: `proxifier start` shows the download and the load that way).
        stats = await ask(ctl().start_model.remote(await visible(request, model), wait))
        return {"model": stats["name"], "state": stats["state"], "status": stats}

    @app.post("/admin/models/{model}/stop")
    async def stop_model(
        model: str, request: Request, force: Annotated[bool, Query()] = False
    ) -> dict[str, Any]:
        return await ask(ctl().stop_model.remote(await visible(request, model), force))

    @app.post("/admin/models/{model}/scale")
    async def scale_model(model: str, body: ScaleBody, request: Request) -> dict[str, Any]:
        """Run this many replicas of the model from now on (until its entry in models.yaml
        changes); `proxifier scale MODEL N`."""
        return await ask(ctl().scale.remote(await visible(request, model), body.replicas))

    @app.post("/admin/models/{model}/reload")
    async def reload_model(model: str, request: Request) -> dict[str, Any]:
        config = await backend.config()  # a model new in the file is checked by its name
        caller = caller_of(request.scope)
        if caller is not None and not may_use_model(caller, config.resolve_name(model) or model):
            raise ModelNotFound.named(model, models_for(caller, config.models))
        return await ask(ctl().reload_model.remote(model))

    @app.get("/admin/models/{model}/status")
    async def model_status(model: str, request: Request) -> dict[str, Any]:
        return await ask(ctl().model_status.remote(await visible(request, model)))

    @app.get("/admin/models/{model}/logs")
    async def model_logs(
        model: str, request: Request, lines: Annotated[int, Query(ge=1, le=5000)] = 100
    ) -> dict[str, Any]:
        name = await visible(request, model)
        return {"model": name, "lines": await ask(ctl().model_logs.remote(name, lines))}

    @app.post("/admin/start-all")
    async def start_all(request: Request) -> dict[str, Any]:
        return await ask(ctl().start_all.remote(await only(request)))

    @app.post("/admin/stop-all")
    async def stop_all(request: Request) -> dict[str, Any]:
        return await ask(ctl().stop_all.remote(await only(request)))

    # ------------------------------------------------------------------ admin: groups
    @app.post("/admin/groups/{group}/start")
    async def start_group(group: str, request: Request) -> dict[str, Any]:
        return await ask(ctl().start_group.remote(group, await only(request)))

    @app.post("/admin/groups/{group}/stop")
    async def stop_group(group: str, request: Request) -> dict[str, Any]:
        return await ask(ctl().stop_group.remote(group, await only(request)))

    @app.get("/admin/groups/status")
    async def groups_status(request: Request) -> dict[str, Any]:
        return {"groups": await ask(ctl().groups_status.remote(await only(request)))}

    # ------------------------------------------------------------------ admin: queues
    @app.get("/admin/queue/status")
    async def queue_status(request: Request) -> dict[str, Any]:
        allowed = await only(request)
        queues = await ask(ctl().queue_status.remote())
        shown = [q for q in queues if allowed is None or q["model"] in allowed]
        return {"queues": [_queue_view(q, caller_of(request.scope)) for q in shown]}

    @app.get("/admin/queue/{model}/status")
    async def model_queue_status(model: str, request: Request) -> dict[str, Any]:
        (status,) = await ask(ctl().queue_status.remote(await visible(request, model)))
        return _queue_view(status, caller_of(request.scope))

    @app.post("/admin/queue/{model}/clear")
    async def clear_queue(model: str, request: Request) -> dict[str, Any]:
        return await ask(ctl().clear_queue.remote(await visible(request, model)))

    # ------------------------------------------------------------------ admin: config
    @app.post("/admin/config/reload")
    async def reload_config() -> dict[str, Any]:
        try:
            return await ask(ctl().reload_config.remote())
        finally:
            backend.config_changed()

    @app.get("/admin/config/validate")
    async def validate_config() -> dict[str, Any]:
        return await ask(ctl().validate_config.remote())

    @app.post("/admin/config/backup")
    async def backup_config(
        body: Annotated[dict[str, Any] | None, Body()] = None,
    ) -> dict[str, Any]:
        description = str((body or {}).get("description", ""))
        return await ask(ctl().backup.remote(description))

    @app.get("/admin/config/backups")
    async def list_backups() -> dict[str, Any]:
        return {"backups": await ask(ctl().list_backups.remote())}

    @app.get("/admin/config/backups/{backup_id}/diff")
    async def backup_diff(backup_id: str) -> dict[str, Any]:
        return await ask(ctl().backup_diff.remote(backup_id))

    @app.get("/admin/config/files")
    async def config_files() -> dict[str, Any]:
        return await ask(ctl().config_files.remote())

    @app.post("/admin/config/restore/{backup_id}")
    async def restore_config(backup_id: str) -> dict[str, Any]:
        try:
            return await ask(ctl().restore.remote(backup_id))
        finally:
            backend.config_changed()

    # ------------------------------------------------------------------ admin: cluster, events
    @app.get("/admin/cluster")
    async def cluster() -> dict[str, Any]:
        return await ask(ctl().cluster.remote())

    @app.get("/admin/scheduler/explain")
    async def explain(model: str, request: Request) -> dict[str, Any]:
        """Why a model runs where it runs, waits, or failed: the scheduler's last decision."""
        return await ask(ctl().explain.remote(await visible(request, model)))

    @app.get("/admin/events")
    async def events(
        since: Annotated[int, Query()] = -1, limit: Annotated[int, Query(ge=1, le=1000)] = 500
    ) -> Any:
        return {"events": await ask(ctl().events_since.remote(since, limit))}

    install_dashboard(app, ask, ctl)

    # ------------------------------------------------------------------ health, metrics
    @app.get("/health")
    async def health() -> Response:
        started = time.monotonic()
        try:
            # A model whose host froze is counted `unreachable` well before this deadline:
            # the controller is fine, and /health says so.
            statuses = await asyncio.wait_for(
                ask(ctl().status.remote(within=HEALTH_WAIT / 2)), HEALTH_WAIT
            )
        except Exception as error:  # the ingress is up; say what is not
            return error_response(
                503, f"controller unreachable: {type(error).__name__}", "controller_unreachable"
            )
        states: dict[str, int] = {}
        for status in statuses:
            states[status["state"]] = states.get(status["state"], 0) + 1
        return JSONResponse(
            {
                "status": "ok",
                "controller": "reachable",
                "models": {"total": len(statuses), **states},
                "checked_in_ms": round((time.monotonic() - started) * 1000, 1),
            }
        )

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        auth = await backend.auth()
        # Public by default, and then without names unless a key that may read it came.
        names = not auth.enabled or auth.metrics_public_labels or caller_of(request.scope)
        data = await ask(ctl().metrics_data.remote())
        return Response(
            render(data, names=bool(names)), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app


def _is_admin(caller: Caller) -> bool:
    return ADMIN in caller.permissions


def _queue_view(status: dict[str, Any], caller: Caller | None) -> dict[str, Any]:
    """A queue as a caller may see it: request ids (other keys' requests) only for admin."""
    if caller is None or _is_admin(caller):
        return status
    waiting = [{k: v for k, v in w.items() if k != "request_id"} for w in status.get("waiting", [])]
    leases = [
        {k: v for k, v in entry.items() if k == "held_for"} for entry in status.get("leases", [])
    ]
    return {**status, "waiting": waiting, "leases": leases}
