"""The controller on a local Ray cluster with the fake llama-server."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import yaml

from actors.controller import create_controller
from proxifier.config import ConfigError
from proxifier.errors import ModelFailed, ModelNotFound, NotFound, QueueTimeout, Refused
from tests.helpers import wait_for, wait_gone

MakeController = Callable[..., tuple[Any, Path]]


@pytest.fixture
def make_controller(
    ray_cluster: Path, fake_server: Path, tiny_model: Path, tmp_path: Path
) -> Iterator[MakeController]:
    """make_controller(models, settings=..., auth=...) -> (controller, models.yaml path)."""
    created: list[Any] = []

    def make(
        models: dict[str, dict[str, Any]],
        settings: dict[str, Any] | None = None,
        auth: dict[str, Any] | None = None,
    ) -> tuple[Any, Path]:
        path = tmp_path / "models.yaml"
        write_models(path, models, settings, fake_server, tiny_model, auth is not None)
        if auth is not None:
            (tmp_path / "auth.yaml").write_text(yaml.safe_dump(auth))
        controller = create_controller(path)
        created.append(controller)
        ray.get(controller.ping.remote(), timeout=60)
        return controller, path

    yield make
    for controller in created:
        try:
            ray.get(controller.shutdown.remote(), timeout=60)
        finally:
            ray.kill(controller, no_restart=True)


def write_models(
    path: Path,
    models: dict[str, dict[str, Any]],
    settings: dict[str, Any] | None,
    fake_server: Path,
    tiny_model: Path,
    with_auth: bool = False,
) -> None:
    # The test cluster has two fake GPUs; a model takes one only when the test says so.
    full = {
        name: {
            "model_path": str(tiny_model),
            "llama_server": str(fake_server),
            "num_gpus": 0,
            **fields,
        }
        for name, fields in models.items()
    }
    data: dict[str, Any] = {"settings": dict(settings or {}), "models": full}
    if with_auth:
        data["settings"]["auth_file"] = "auth.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def state(controller: Any, name: str) -> str:
    return ray.get(controller.model_status.remote(name))["state"]


def pid(controller: Any, name: str) -> int:
    return ray.get(controller.model_status.remote(name))["pid"]


def all_ready(controller: Any, names: list[str]) -> bool:
    return all(state(controller, n) == "ready" for n in names)


def test_boot_starts_models_in_priority_order(make_controller: MakeController) -> None:
    controller, _ = make_controller(
        {
            "low": {"priority": 1, "auto_start": True},
            "mid": {"priority": 5, "auto_start": True},
            "high": {"priority": 10, "preload": True},
            "manual": {"priority": 9},
        }
    )
    results = ray.get(controller.boot.remote(), timeout=120)
    assert [r["model"] for r in results] == ["high", "mid", "low"]
    wait_for(lambda: all_ready(controller, ["high", "mid", "low"]), timeout=60)
    started = {n: psutil.Process(pid(controller, n)).create_time() for n in ("high", "mid", "low")}
    assert started["high"] <= started["mid"] <= started["low"]
    assert state(controller, "manual") == "stopped"


def test_get_model_resolves_aliases_and_starts_on_demand(make_controller: MakeController) -> None:
    controller, _ = make_controller({"chat": {"aliases": ["gpt-4o-mini"]}})
    handle = ray.get(controller.get_model.remote("gpt-4o-mini"), timeout=60)
    lease = ray.get(handle.acquire.remote("r1"), timeout=60)
    assert lease["model"] == "chat"
    ray.get(handle.release.remote(lease["lease_id"]))
    with pytest.raises(ModelNotFound) as caught:
        ray.get(controller.get_model.remote("gpt-5"))
    assert caught.value.message == "The model 'gpt-5' does not exist. Available models: chat"


def test_idle_model_is_stopped_and_preloaded_one_kept(make_controller: MakeController) -> None:
    controller, _ = make_controller(
        {"idle": {"auto_start": True, "idle_timeout": 0.5}, "kept": {"preload": True}},
        settings={"cleanup_interval": 0.2, "idle_timeout": 0.5},
    )
    ray.get(controller.boot.remote(), timeout=60)
    wait_for(lambda: state(controller, "kept") == "ready", timeout=60)
    kept_pid = pid(controller, "kept")

    def kinds() -> list[tuple[str, str | None]]:
        return [(e["kind"], e.get("model")) for e in ray.get(controller.events_since.remote())]

    # "idle" may load and be stopped before "kept" is ready: the feed says it ran, then stopped.
    wait_for(lambda: ("stopped", "idle") in kinds(), timeout=60)
    assert ("ready", "idle") in kinds()
    # Its llama-server is down; the status says "stopping" until the actor itself is gone.
    wait_for(lambda: state(controller, "idle") == "stopped", timeout=60)
    assert state(controller, "kept") == "ready" and pid(controller, "kept") == kept_pid


def test_a_busy_model_is_never_stopped_for_idleness(make_controller: MakeController) -> None:
    controller, _ = make_controller(
        {"busy": {"idle_timeout": 0.3}}, settings={"cleanup_interval": 0.1}
    )
    handle = ray.get(controller.get_model.remote("busy"), timeout=60)
    lease = ray.get(handle.acquire.remote("long-generation"), timeout=60)
    # Several cleanup rounds pass with the lease out: it stays up.
    wait_for(lambda: ray.get(handle.stats.remote())["requests_served"] == 0, timeout=1)
    events_before = len(ray.get(controller.events_since.remote()))
    ray.get(controller.ping.remote())
    assert state(controller, "busy") == "ready"
    ray.get(handle.release.remote(lease["lease_id"]))
    wait_for(lambda: state(controller, "busy") == "stopped", timeout=30)
    assert len(ray.get(controller.events_since.remote())) > events_before


def test_stopping_a_preloaded_model_needs_force(make_controller: MakeController) -> None:
    controller, _ = make_controller({"kept": {"preload": True}})
    ray.get(controller.boot.remote(), timeout=60)
    with pytest.raises(Refused, match="is preloaded and stays running; stop it with force=true"):
        ray.get(controller.stop_model.remote("kept"))
    wait_for(lambda: state(controller, "kept") == "ready", timeout=60)
    first = pid(controller, "kept")
    ray.get(controller.stop_model.remote("kept", force=True), timeout=60)
    assert state(controller, "kept") == "stopped"
    assert wait_gone(first)


def test_group_start_and_stop(make_controller: MakeController) -> None:
    controller, _ = make_controller(
        {
            "p-chat": {"resource_group": "production", "priority": 9, "preload": True},
            "p-code": {"resource_group": "production", "priority": 8},
            "dev": {"resource_group": "development", "priority": 3},
        }
    )
    started = ray.get(controller.start_group.remote("production"), timeout=60)
    assert [r["model"] for r in started["results"]] == ["p-chat", "p-code"]
    wait_for(lambda: all_ready(controller, ["p-chat", "p-code"]), timeout=60)
    groups = ray.get(controller.groups_status.remote())
    assert groups["production"]["running"] == 2 and groups["development"]["running"] == 0
    stopped = ray.get(controller.stop_group.remote("production"), timeout=60)
    assert stopped == {"group": "production", "stopped": ["p-code"], "kept_preloaded": ["p-chat"]}
    assert state(controller, "p-code") == "stopped" and state(controller, "p-chat") == "ready"
    with pytest.raises(NotFound, match="no model is in resource group 'nope'"):
        ray.get(controller.start_group.remote("nope"))


def test_reload_restarts_only_the_changed_model(
    make_controller: MakeController, fake_server: Path, tiny_model: Path
) -> None:
    models = {"a": {"auto_start": True, "context_length": 512}, "b": {"auto_start": True}}
    controller, path = make_controller(models)
    ray.get(controller.boot.remote(), timeout=60)
    wait_for(lambda: all_ready(controller, ["a", "b"]), timeout=60)
    before = {n: pid(controller, n) for n in ("a", "b")}
    models["a"]["context_length"] = 1024
    models["b"]["priority"] = 7  # a live change
    write_models(path, models, None, fake_server, tiny_model)
    result = ray.get(controller.reload_config.remote(), timeout=60)
    assert result["changes"] == [
        "model 'a' needs a restart: context_length changed",
        "model 'b' changes live: priority",
    ]
    wait_for(lambda: state(controller, "a") == "ready", timeout=60)
    assert pid(controller, "a") != before["a"]
    assert pid(controller, "b") == before["b"]
    assert ray.get(controller.model_status.remote("b"))["priority"] == 7
    argv = psutil.Process(pid(controller, "a")).cmdline()
    assert argv[argv.index("-c") + 1] == "1024"


def test_reload_adds_and_removes_models(
    make_controller: MakeController, fake_server: Path, tiny_model: Path
) -> None:
    controller, path = make_controller({"old": {"auto_start": True}})
    ray.get(controller.boot.remote(), timeout=60)
    wait_for(lambda: state(controller, "old") == "ready", timeout=60)
    old_pid = pid(controller, "old")
    write_models(path, {"new": {"auto_start": True}}, None, fake_server, tiny_model)
    result = ray.get(controller.reload_config.remote(), timeout=60)
    assert result["changes"] == ["added model 'new'", "removed model 'old'"]
    assert wait_gone(old_pid)
    wait_for(lambda: state(controller, "new") == "ready", timeout=60)
    with pytest.raises(ModelNotFound):
        ray.get(controller.get_model.remote("old"))


def test_an_invalid_reload_is_rejected_and_the_old_config_still_serves(
    make_controller: MakeController,
) -> None:
    controller, path = make_controller({"chat": {"priority": 5}})
    good = path.read_text()
    path.write_text(good.replace("priority: 5", "priority: 42\n    colour: blue"))
    with pytest.raises(ConfigError) as caught:
        ray.get(controller.reload_config.remote())
    assert [issue.field for issue in caught.value.issues] == ["priority", "colour"]
    handle = ray.get(controller.get_model.remote("chat"), timeout=60)
    lease = ray.get(handle.acquire.remote("still-served"), timeout=60)
    assert lease["model"] == "chat"
    ray.get(handle.release.remote(lease["lease_id"]))
    assert ray.get(controller.model_status.remote("chat"))["priority"] == 5
    assert not ray.get(controller.validate_config.remote())["valid"]


def test_reload_of_one_model_leaves_the_others(
    make_controller: MakeController, fake_server: Path, tiny_model: Path
) -> None:
    models = {"a": {"priority": 3}, "b": {"priority": 3}}
    controller, path = make_controller(models)
    write_models(path, {"a": {"priority": 4}, "b": {"priority": 6}}, None, fake_server, tiny_model)
    result = ray.get(controller.reload_model.remote("a"), timeout=60)
    assert result["changes"] == ["model 'a' changes live: priority"]
    assert ray.get(controller.model_status.remote("a"))["priority"] == 4
    assert ray.get(controller.model_status.remote("b"))["priority"] == 3


def test_backup_and_restore_round_trip(
    make_controller: MakeController, fake_server: Path, tiny_model: Path
) -> None:
    auth = {"api_keys": {"ops": {"key": "k-1", "permissions": ["admin"], "expires": "2030-01-01"}}}
    controller, path = make_controller(
        {
            "chat": {
                "priority": 9,
                "aliases": ["x"],
                "additional_args": "--jinja",
                "env": {"A": "1"},
            }
        },
        auth=auth,
    )
    original_models, original_auth = path.read_text(), (path.parent / "auth.yaml").read_text()
    first = ray.get(controller.backup.remote("before experiments"))
    second = ray.get(controller.backup.remote("same second"))
    assert first["id"] != second["id"] and first["files"] == ["auth.yaml", "models.yaml"]
    write_models(path, {"other": {}}, None, fake_server, tiny_model, with_auth=True)
    (path.parent / "auth.yaml").write_text("enabled: false\n")
    ray.get(controller.reload_config.remote(), timeout=60)
    restored = ray.get(controller.restore.remote(first["id"]), timeout=60)
    assert path.read_text() == original_models  # byte for byte: no field lost
    assert (path.parent / "auth.yaml").read_text() == original_auth
    assert restored["changes"] == ["added model 'chat'", "removed model 'other'"]
    config = ray.get(controller.get_config.remote())
    assert config.models["chat"].aliases == ["x"] and config.models["chat"].env == {"A": "1"}
    _version, auth_config = ray.get(controller.get_auth.remote())
    assert auth_config.enabled and "ops" in auth_config.api_keys
    backups = ray.get(controller.list_backups.remote())
    assert backups[0]["description"] == f"before restoring {first['id']}"
    assert {b["id"] for b in backups} >= {first["id"], second["id"]}
    meta = json.loads((path.parent / "backups" / first["id"] / "meta.json").read_text())
    assert meta["description"] == "before experiments"


def test_restore_refuses_bad_ids(make_controller: MakeController) -> None:
    controller, _ = make_controller({"chat": {}})
    with pytest.raises(Exception, match="is not a backup id"):
        ray.get(controller.restore.remote("../../etc"))
    with pytest.raises(NotFound):
        ray.get(controller.restore.remote("20200101-000000-000000"))


def test_max_running_models_evicts_the_idle_lower_priority_model(
    make_controller: MakeController,
) -> None:
    controller, _ = make_controller(
        {"low": {"priority": 2}, "high": {"priority": 8}, "top": {"priority": 9}},
        settings={"max_running_models": 1},
    )
    low = ray.get(controller.get_model.remote("low"), timeout=60)
    ray.get(low.start.remote(), timeout=60)
    high = ray.get(controller.get_model.remote("high"), timeout=60)
    ray.get(high.start.remote(), timeout=60)
    assert state(controller, "low") == "stopped"
    events = ray.get(controller.events_since.remote())
    assert {
        "kind": "evicted",
        "model": "low",
        "for_model": "high",
        "reason": "capacity",
    }.items() <= next(e for e in events if e["kind"] == "evicted").items()
    # A busy model is never evicted: the newcomer waits, then hears why.
    lease = ray.get(high.acquire.remote("busy"), timeout=60)
    with pytest.raises(QueueTimeout, match=r"max_running_models"):
        ray.get(controller.get_model.remote("top", __import__("time").time() + 10), timeout=30)
    assert state(controller, "high") == "ready"
    ray.get(high.release.remote(lease["lease_id"]))


def test_controller_restart_adopts_running_models(make_controller: MakeController) -> None:
    controller, _ = make_controller({"chat": {"auto_start": True}})
    ray.get(controller.boot.remote(), timeout=60)
    wait_for(lambda: state(controller, "chat") == "ready", timeout=60)
    first = pid(controller, "chat")
    old_controller = ray.get(controller.pid.remote())
    ray.kill(controller, no_restart=False)  # Ray restarts it; __init__ runs again
    wait_for(lambda: _controller_pid(controller) not in (None, old_controller), timeout=60)
    assert state(controller, "chat") == "ready"
    assert pid(controller, "chat") == first
    handle = ray.get(controller.get_model.remote("chat"))
    lease = ray.get(handle.acquire.remote("after-restart"), timeout=30)
    assert lease["instance"] == 1  # the same llama-server, not a second one
    ray.get(handle.release.remote(lease["lease_id"]))
    kinds = [e["kind"] for e in ray.get(controller.events_since.remote())]
    assert "adopted" in kinds


def test_a_restarted_controller_runs_its_loops_and_keeps_the_accepted_config(
    make_controller: MakeController,
) -> None:
    controller, path = make_controller(
        {"chat": {"auto_start": True}, "idle": {"idle_timeout": 3}},
        settings={"cleanup_interval": 0.5},
        auth={"enabled": False},
    )
    ray.get(controller.boot.remote(), timeout=60)
    wait_for(lambda: state(controller, "chat") == "ready", timeout=60)
    first = pid(controller, "chat")
    idle = ray.get(controller.get_model.remote("idle"), timeout=60)
    ray.get(idle.start.remote(), timeout=60)
    path.write_text("models: [an edit left on disk, never reloaded, and not even valid")
    old_controller = ray.get(controller.pid.remote())
    ray.kill(controller, no_restart=False)  # Ray restarts it; __init__ runs again
    wait_for(lambda: _controller_pid(controller) not in (None, old_controller), timeout=60)
    # It came back with the configuration it had accepted, not the file on disk.
    assert set(ray.get(controller.get_config.remote()).models) == {"chat", "idle"}
    assert pid(controller, "chat") == first  # adopted: no second llama-server
    # Idle cleanup runs without any request having reached the new controller.
    wait_for(lambda: state(controller, "idle") == "stopped", timeout=30)
    # So does the auth.yaml watcher.
    (path.parent / "auth.yaml").write_text(
        yaml.safe_dump({"api_keys": {"ops": {"key": "k" * 32, "permissions": ["admin"]}}})
    )
    wait_for(lambda: ray.get(controller.get_auth.remote())[1].enabled, timeout=30)


def _controller_pid(controller: Any) -> int | None:
    try:
        return ray.get(controller.pid.remote(), timeout=2)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None  # being restarted


def test_cluster_view_lists_nodes_and_where_models_run(make_controller: MakeController) -> None:
    controller, _ = make_controller({"chat": {"auto_start": True}})
    ray.get(controller.boot.remote(), timeout=60)
    wait_for(lambda: state(controller, "chat") == "ready", timeout=60)
    (node,) = ray.get(controller.cluster.remote())["nodes"]
    assert node["alive"] and node["resources"]["GPU"] == 2
    assert node["models"] == ["chat"]


def test_a_models_typed_error_reaches_the_caller_through_the_controller(
    make_controller: MakeController,
) -> None:
    controller, _ = make_controller(
        {"broken": {"env": {"FAKE_LLAMA_FAIL_LOAD": "error: bad (fake)"}}}
    )
    with pytest.raises(ModelFailed, match=r"error: bad \(fake\)"):
        ray.get(controller.start_model.remote("broken"), timeout=60)
    status = ray.get(controller.model_status.remote("broken"))
    assert status["state"] == "failed" and "bad (fake)" in status["last_error"]


def test_async_results_outlive_an_idle_stop(make_controller: MakeController) -> None:
    controller, _ = make_controller(
        {"chat": {"idle_timeout": 0.3}}, settings={"cleanup_interval": 0.1}
    )
    handle = ray.get(controller.get_model.remote("chat"), timeout=60)
    ray.get(handle.submit.remote("job-1", "/v1/completions", {"prompt": "hi"}))
    wait_for(lambda: state(controller, "chat") == "stopped", timeout=30)
    result = ray.get(controller.job_result.remote("job-1"))
    assert result["status"] == "done" and result["http_status"] == 200


def test_status_reports_the_gpu_memory_estimate_and_calibrates_on_first_load(
    make_controller: MakeController, tiny_model: Path
) -> None:
    from proxifier.config import ModelConfig
    from proxifier.gguf_facts import read_facts
    from proxifier.gpu_memory import PROCESS_OVERHEAD, estimate

    buffers = {"FAKE_LLAMA_GPU_BUFFERS_MIB": "1000,200,100"}  # what a GPU load would log
    controller, _ = make_controller(
        {
            "measured": {"context_length": 512, "env": buffers},
            "configured": {"gpu_memory": "3GiB"},
        }
    )
    memory = ray.get(controller.model_status.remote("measured"))["gpu_memory"]
    expected = estimate(read_facts(tiny_model), ModelConfig(context_length=512))
    assert memory["estimated"] == memory["need"] == expected.total
    assert memory["estimate"]["kv_cache"] == expected.kv_cache
    assert memory["measured"] is None and memory["configured"] is None
    configured = ray.get(controller.model_status.remote("configured"))["gpu_memory"]
    assert configured["need"] == configured["configured"] == 3 * 1024**3
    # The first load of this file with these flags runs at -lv 4 and is measured; the
    # measurement is the need from then on, and the next load is not measured again.
    ray.get(controller.start_model.remote("measured"), timeout=60)
    status = ray.get(controller.model_status.remote("measured"))
    assert status["memory_measured"]["gpu"] == 1300 * 1024**2
    assert status["memory_measured"]["buffers"]["CUDA0"]["kv"] == 200 * 1024**2
    memory = status["gpu_memory"]
    assert memory["measured"] == memory["need"] == 1300 * 1024**2 + PROCESS_OVERHEAD
    ray.get(controller.stop_model.remote("measured"), timeout=60)
    ray.get(controller.start_model.remote("measured"), timeout=60)
    again = ray.get(controller.model_status.remote("measured"))
    assert again["memory_measured"] is None  # llama-server ran at its default verbosity
    assert again["gpu_memory"]["measured"] == memory["measured"]  # kept


def spares_after(moment: float) -> list[psutil.Process]:
    """Ray workers that wait, never used, and started after `moment` (wall clock)."""
    found = []
    for process in psutil.process_iter(["cmdline", "create_time"]):
        title = (process.info["cmdline"] or [""])[0]  # the title Ray gives its workers
        if title == "ray::IDLE" and process.info["create_time"] > moment:
            found.append(process)
    return found


def test_a_model_actor_starts_in_a_spare_worker_and_reports_the_phases_of_its_start(
    make_controller: MakeController,
) -> None:
    """Starting a Ray worker takes about a second; a spare one, started for this job before a
    model needs it, is what the model's actor runs in. Each start's `ready` event says how
    long each phase took."""
    controller, _ = make_controller({"first": {}, "second": {}})
    ray.get(controller.get_model.remote("first"), timeout=60)
    wait_for(lambda: state(controller, "first") == "ready", timeout=60)
    events = ray.get(controller.events_since.remote(-1))
    ready = next(e for e in events if e["kind"] == "ready" and e["model"] == "first")
    assert set(ready["phases"]) == {"decide", "actor", "prepare", "load"}
    assert all(seconds >= 0 for seconds in ready["phases"].values())
    # The spare "first" took is replaced a moment after its load, then "second" runs in it.
    wait_for(lambda: bool(spares_after(ready["time"])), timeout=60)
    asked_at = time.time()
    handle = ray.get(controller.get_model.remote("second"), timeout=60)
    actor_pid = ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
    assert psutil.Process(actor_pid).create_time() < asked_at  # no new process for it
