"""What the simulated-cluster test modules share: a controller over models on the fake
llama-server, made on the cluster the module's own `cluster` fixture starts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from actors.controller import create_controller


@pytest.fixture
def controller_for(
    cluster: dict, fake_server: Path, tiny_model: Path, tmp_path: Path
) -> Iterator[Any]:
    made: list[Any] = []

    def make(models: dict[str, dict[str, Any]], **settings: Any) -> Any:
        full = {
            name: {"model_path": str(tiny_model), "llama_server": str(fake_server), **fields}
            for name, fields in models.items()
        }
        # Default timing, but for quick idle checks and failure cooldowns.
        settings = {"cleanup_interval": 0.5, "cooldown": 1, **settings}
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump({"settings": settings, "models": full}))
        controller = create_controller(path)
        made.append(controller)
        ray.get(controller.ping.remote(), timeout=60)
        return controller

    yield make
    for controller in made:
        try:
            ray.get(controller.shutdown.remote(), timeout=60)
        finally:
            ray.kill(controller, no_restart=True)


def status(controller: Any, name: str) -> dict[str, Any]:
    return ray.get(controller.model_status.remote(name))
