"""The Ray Serve application: the ingress deployment and the one builder that wires the config,
the controller and the ingress together (`proxifier serve` and `serve run` both use it)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from actors.controller import create_controller, get_controller
from proxifier.config import load_models_config
from serve_app.api import build_api
from serve_app.replica_slots import RayBackend

log = logging.getLogger("proxifier")

APP_NAME = "proxifier"
# The folder holding serve_app/: the repository for a checkout or an editable install.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@serve.deployment(
    # On the head node, beside the HTTP front and the controller: a GPU host that is lost must
    # not take the endpoint with it (tests/multihost: an ingress replica on a worker whose cable
    # was pulled stalled every model's requests, healthy hosts' too, until Serve replaced it).
    ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
    # Streams hold a request open for their whole length: allow many at once per replica.
    max_ongoing_requests=1000,
    health_check_period_s=10,
)
@serve.ingress()
class Ingress:
    """One replica of the HTTP surface; it keeps no state of its own (all of it is in actors)."""

    def __init__(self, bound_host: str | None = None) -> None:
        self.bound_host = bound_host  # the address `proxifier serve` bound (else settings.host)
        self._tell_controller()

    def check_health(self) -> None:
        """Serve's periodic health check (health_check_period_s): it also tells the controller
        again which application this is, so one that Ray restarted knows what to watch."""
        self._tell_controller()

    def _tell_controller(self) -> None:
        # The controller stops the models when this application is deleted (serve shutdown).
        with contextlib.suppress(Exception):  # never fails the replica or its health check
            get_controller().serve_app.remote(serve.get_replica_context().app_name)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(RayBackend(), bound_host=self.bound_host)


def config_path(config: str | Path) -> Path:
    """The models.yaml a `config` argument names. A relative path is taken from the current
    folder when the file is there (`serve run` from any folder, as the user means it), else
    from the project root: `serve deploy` builds the app in a Ray worker whose folder is
    wherever the raylet started, not where the Serve config was written, and a runtime_env
    `working_dir` cannot fix that (`serve deploy` accepts only remote URIs there). Neither
    holding it: the current folder's path, so the error names what was asked for."""
    path = Path(config).expanduser()
    if path.is_absolute():
        return path
    here = path.resolve()
    if here.is_file():
        return here
    in_project = PROJECT_ROOT / path
    return in_project if in_project.is_file() else here


def ensure_controller(config: str | Path) -> Any:
    """The running controller, or a new one for `config` (validated first: a bad file fails
    here with every error, before anything starts)."""
    path = config_path(config).resolve()
    load_models_config(path)
    try:
        controller = get_controller()
        paths = ray.get(controller.config_paths.remote(), timeout=30)
        if Path(paths["models"]) != path:
            log.warning("a controller already serves %s; keeping it", paths["models"])
        return controller
    except ValueError:
        controller = create_controller(path)
        ray.get(controller.ping.remote(), timeout=120)
        return controller


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder. args: `config` (models.yaml; a relative one: config_path),
    `replicas` (default 1)."""
    controller = ensure_controller(args.get("config", "configs/models.yaml"))
    controller.boot.remote()  # auto-start and preload models; the app does not wait for loads
    replicas = int(args.get("replicas", 1))
    return Ingress.options(num_replicas=replicas).bind(args.get("host"))
