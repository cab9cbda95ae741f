"""One model's facts that cannot be read (issue 29, item 1) cost that model its own status entry,
never the answer: the status list, /v1/models and /metrics stay whole for every other model."""

from __future__ import annotations

import asyncio
from typing import Any

from actors.controller import views
from actors.controller.registry import Registry
from actors.ray_glue import Background
from proxifier.config import ModelConfig, ModelsConfig
from serve_app.metrics import render


class Facts:
    """The controller's fact source, failing for the model named `bad` (as a GGUF reader or a
    Hub cache lookup can fail in ways nobody listed)."""

    async def memory_of(self, name: str, wait: float | None = None) -> dict[str, Any]:
        if name == "bad":
            raise RuntimeError("the fact source broke")
        return {"configured": None, "need": 123, "calibration_key": None}


def parts() -> views.Viewed:
    config = ModelsConfig(
        models={"good": ModelConfig(model_path="good.gguf", priority=7), "bad": ModelConfig()}
    )
    registry = Registry(lambda *a, **k: None, lambda: None, Background())
    return views.Viewed(lambda: config, registry, Facts(), {})  # type: ignore[arg-type]


def test_a_failing_fact_source_shows_in_its_model_and_spares_the_others() -> None:
    viewed = parts()
    good, bad = asyncio.run(views.statuses(["good", "bad"], viewed))
    assert good["state"] == "stopped" and good["gpu_memory"]["need"] == 123
    assert good["priority"] == 7
    assert bad["state"] == "unknown"
    assert bad["last_error"] == "its status could not be read: RuntimeError: the fact source broke"
    # Every consumer of the list takes the entry as it takes any other.
    listed = views.models_view(viewed.config(), {}, [good, bad], [None, None])
    assert [(m["id"], m["state"]) for m in listed] == [("good", "stopped"), ("bad", "unknown")]
    text = render({"statuses": [good, bad], "replicas": [], "load_seconds": {}, "evictions": {}})
    assert b'proxifier_model_state{model="bad",state="unknown"} 1.0' in text
    assert b'proxifier_model_state{model="good",state="stopped"} 1.0' in text


def test_the_explanation_of_that_model_still_answers() -> None:
    explained = asyncio.run(views.explain("bad", parts()))
    assert explained["state"] == "unknown" and explained["last_decision"] is None
