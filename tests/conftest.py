"""Fixtures shared by every test layer: the repository, the tiny model, llama-server binaries."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxifier.config import ModelConfig, Settings
from proxifier.llama import LlamaServerNotFound, find_llama_server
from proxifier.startup import serve_environment
from serve_app.worker_setup import HOOK as WORKER_SETUP_HOOK

# Ray 2.60 turns token auth on for local clusters; tests run their own cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

MakeActor = Callable[..., Any]
RUNTIME_HOOK = WORKER_SETUP_HOOK  # as `proxifier serve` sets it

REPO = Path(__file__).resolve().parent.parent
FAKE_SERVER = REPO / "tests" / "fakes" / "fake-llama-server"
TINY_MODEL = REPO / "models" / "tiny.gguf"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny GGUF model, written by scripts/make-tiny-model when absent or older than it."""
    script = REPO / "scripts" / "make-tiny-model"
    if not TINY_MODEL.is_file() or script.stat().st_mtime > TINY_MODEL.stat().st_mtime:
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "make-tiny-model"),
                "--output",
                str(TINY_MODEL),
            ],
            check=True,
        )
    return TINY_MODEL


@pytest.fixture(scope="session")
def fake_server() -> Path:
    return FAKE_SERVER


@pytest.fixture(scope="session")
def fake_fields(fake_server: Path, tiny_model: Path) -> dict[str, Any]:
    """The fields of a model that runs on the fake llama-server with the tiny model, no GPU."""
    return {"model_path": str(tiny_model), "llama_server": str(fake_server), "num_gpus": 0}


@pytest.fixture(scope="session")
def real_server() -> str:
    """The real llama-server binary. scripts/test installs it and makes its absence a failure."""
    try:
        return find_llama_server()
    except LlamaServerNotFound as exc:
        if os.environ.get("PROXIFIER_REQUIRE_LLAMA") == "1":
            pytest.fail(f"the real llama-server is required here: {exc}")
        pytest.skip(f"real llama-server not installed ({exc}); scripts/test installs it")


@pytest.fixture(scope="session")
def hub(tiny_model: Path) -> Iterator[Any]:
    """A local Hugging Face Hub stand-in (tests/fakes/hub.py) with the tiny model in two
    quantisations' names: models point HF_ENDPOINT at its `url`. The Q8_0 one is padded to
    24 MiB (trailing bytes a GGUF reader ignores): huggingface_hub reports progress per 10 MiB
    it reads, so a held download shows some."""
    from tests.fakes.hub import Repo, running_hub

    data = tiny_model.read_bytes()
    padded = data + bytes(24 * 1024**2 - len(data))
    with running_hub() as stand_in:
        stand_in.repos["proxifier-tests/tiny-GGUF"] = Repo(
            {"tiny-Q4_K_M.gguf": data, "tiny-Q8_0.gguf": padded, "README.md": b"# tiny\n"}
        )
        yield stand_in


@pytest.fixture(scope="session")
def proxifier_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PROXIFIER_HOME for the actors of the test cluster (their llama-server logs go there)."""
    return tmp_path_factory.mktemp("proxifier-home")


@pytest.fixture
def ray_cluster(proxifier_home: Path) -> Iterator[Path]:
    """A local Ray cluster with two fake GPUs, started once and reused by every test.

    Function-scoped so that a test module with its own multi-node cluster (tests/cluster) can
    shut it down: the next test that asks for it gets a fresh one.
    """
    ensure_ray(proxifier_home)
    yield proxifier_home


def ensure_ray(proxifier_home: Path) -> None:
    import ray

    os.environ.update(serve_environment(haproxy=True))  # as `proxifier serve` runs it
    # Replicas behind HAProxy drain for 30 s before they stop; tests stop Serve with no client
    # left, and the raylet (started here) passes this on to every worker.
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=2,
            include_dashboard=False,
            namespace="proxifier-tests",
            runtime_env={
                "env_vars": {
                    "PROXIFIER_HOME": str(proxifier_home),
                    **serve_environment(haproxy=True),
                },
                "worker_process_setup_hook": RUNTIME_HOOK,
            },
            log_to_driver=False,
        )


@pytest.fixture
def make_actor(ray_cluster: Path, fake_server: Path, tiny_model: Path) -> Iterator[MakeActor]:
    """make_actor(env=..., settings=..., options=..., **model fields) -> actor handle."""
    import ray

    from actors.model import create_model_actor

    created = []

    def make(
        env: dict[str, str] | None = None,
        settings: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Any:
        name = f"m-{uuid.uuid4().hex[:8]}"
        fields.setdefault("llama_server", str(fake_server))
        fields.setdefault("model_path", str(tiny_model))
        model = ModelConfig(env=env or {}, **fields)
        handle = create_model_actor(
            name, model, Settings(**(settings or {})), tiny_model.parent, **(options or {})
        )
        created.append(handle)
        return handle

    yield make
    for handle in created:
        # Already dead, or the test killed it: either way nothing is left to stop.
        with contextlib.suppress(Exception):
            ray.get(handle.stop.remote("test over"), timeout=30)
        ray.kill(handle)


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_the_end() -> Iterator[None]:
    yield
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


@contextlib.contextmanager
def deployed(
    proxifier_home: Path,
    config: Path,
    *,
    replicas: int = 1,
    ready: str,
    headers: dict[str, str] | None = None,
) -> Iterator[tuple[str, Any]]:
    """The whole product on the test cluster: deploy `config`, wait until model `ready` is up,
    yield (base URL, controller); afterwards stop every model and Serve."""
    import httpx
    import ray
    from ray import serve

    from actors.controller import get_controller
    from serve_app.app import APP_NAME, build_app
    from tests.helpers import free_port, wait_for

    ensure_ray(proxifier_home)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": None})
    serve.run(
        build_app({"config": str(config), "replicas": replicas}), name=APP_NAME, route_prefix="/"
    )
    url = f"http://127.0.0.1:{port}"
    status = f"{url}/admin/models/{ready}/status"
    # A fresh cluster on a busy machine answers its first status calls slowly: a slow answer
    # is no answer yet, and the deadline is the wait's own.
    wait_for(
        lambda: httpx.get(status, headers=headers or {}, timeout=60).json().get("state") == "ready",
        timeout=60,
    )
    controller = get_controller()
    try:
        yield url, controller
    finally:
        try:
            ray.get(controller.shutdown.remote(), timeout=120)
        finally:
            ray.kill(controller, no_restart=True)
            serve.shutdown()
            _wait_until_serve_is_gone()


def _wait_until_serve_is_gone() -> None:
    """serve.shutdown() gives up waiting after 30 s while Serve's controller goes on shutting
    down; a serve.start() before it is gone would join the dying instance. Killing it instead
    is worse: its "shutdown in progress" flag stays in the GCS and the next controller obeys it."""
    import ray

    from tests.helpers import wait_for

    def serve_actors() -> list[dict[str, str]]:
        return [
            a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"
        ]

    wait_for(lambda: not serve_actors(), timeout=120)
