"""The controller's planners: start order, groups, eviction, idle stops, reload plans."""

from __future__ import annotations

from proxifier.config import validate_models
from proxifier.config_diff import diff_models
from proxifier.planning import (
    RunningModel,
    group_members,
    group_stop_plan,
    idle_stops,
    reload_plan,
    startup_order,
)


def models(spec: dict) -> dict:
    return validate_models({"models": spec}, file="m").models


def running(name: str, **fields: object) -> RunningModel:
    values: dict = {
        "priority": 5,
        "preload": False,
        "state": "ready",
        "busy": False,
        "last_active": 100.0,
        "idle_for": 0.0,
        "idle_timeout": 300.0,
        "demand": {"GPU": 1.0},
    }
    values.update(fields)
    return RunningModel(name=name, **values)


# --- startup order --------------------------------------------------------------------------


def test_startup_order_is_descending_priority_of_auto_start_and_preload() -> None:
    spec = {
        "low": {"priority": 1, "auto_start": True},
        "high": {"priority": 10, "auto_start": True},
        "kept": {"priority": 7, "preload": True},
        "manual": {"priority": 9},
    }
    assert startup_order(models(spec)) == ["high", "kept", "low"]


def test_startup_order_ties_by_name() -> None:
    spec = {n: {"priority": 5, "auto_start": True} for n in ("b", "c", "a")}
    assert startup_order(models(spec)) == ["a", "b", "c"]


# --- groups ---------------------------------------------------------------------------------


def test_group_members_in_priority_order() -> None:
    spec = {
        "p1": {"resource_group": "production", "priority": 8},
        "p2": {"resource_group": "production", "priority": 9},
        "d": {"resource_group": "development"},
    }
    assert group_members(models(spec), "production") == ["p2", "p1"]
    assert group_members(models(spec), "nobody") == []


def test_group_stop_keeps_preloaded_members() -> None:
    spec = {
        "chat": {"resource_group": "production", "preload": True, "priority": 9},
        "code": {"resource_group": "production", "priority": 8},
    }
    assert group_stop_plan(models(spec), "production") == (["code"], ["chat"])


# --- idle -----------------------------------------------------------------------------------


def test_idle_stops_only_ready_idle_unpreloaded_models_past_their_timeout() -> None:
    fleet = [
        running("stale", idle_for=400.0),
        running("fresh", idle_for=100.0),
        running("busy", idle_for=999.0, busy=True),
        running("preloaded", idle_for=999.0, preload=True),
        running("starting", idle_for=999.0, state="starting"),
        running("never", idle_for=999.0, idle_timeout=0.0),
        running("own-timeout", idle_for=61.0, idle_timeout=60.0),
        running("exactly", idle_for=300.0),
    ]
    assert idle_stops(fleet) == ["stale", "own-timeout"]


def test_idle_stops_longest_idle_first() -> None:
    fleet = [running("a", idle_for=400.0), running("b", idle_for=900.0)]
    assert idle_stops(fleet) == ["b", "a"]


# --- reload ---------------------------------------------------------------------------------


def plan(old: dict, new: dict, running_names: set[str]):
    before = validate_models({"models": old}, file="m")
    after = validate_models({"models": new}, file="m")
    return reload_plan(diff_models(before, after), after, running_names)


def test_added_models_are_registered_and_auto_start_ones_started_by_priority() -> None:
    result = plan(
        {"a": {}},
        {
            "a": {},
            "lazy": {},
            "low": {"auto_start": True, "priority": 2},
            "high": {"preload": True, "priority": 9},
        },
        {"a"},
    )
    assert result.register == ["high", "lazy", "low"]
    assert result.start == ["high", "low"]
    assert result.touches == set()  # "a" is unchanged and never touched


def test_removed_running_models_are_drained() -> None:
    result = plan({"a": {}, "b": {}, "c": {}}, {"a": {}}, {"a", "b"})
    assert result.drain == ["b"]  # "c" was not running: nothing to stop


def test_process_change_restarts_only_that_model() -> None:
    result = plan(
        {"a": {"context_length": 512}, "b": {}},
        {"a": {"context_length": 1024}, "b": {}},
        {"a", "b"},
    )
    assert (result.restart, result.recreate, result.live) == (["a"], [], [])


def test_placement_change_recreates_the_actor() -> None:
    result = plan({"a": {"num_gpus": 1}}, {"a": {"num_gpus": 2, "priority": 7}}, {"a"})
    assert (result.restart, result.recreate, result.live) == ([], ["a"], [])


def test_live_change_applies_without_restart() -> None:
    result = plan({"a": {"priority": 3}}, {"a": {"priority": 4}}, {"a"})
    assert (result.restart, result.recreate, result.live) == ([], [], ["a"])


def test_changes_to_stopped_models_need_no_action() -> None:
    result = plan({"a": {"context_length": 1}}, {"a": {"context_length": 2}}, set())
    assert result.touches == set() and result.start == []


def test_a_model_that_becomes_preloaded_is_started() -> None:
    result = plan({"a": {}}, {"a": {"preload": True}}, set())
    assert result.start == ["a"]
