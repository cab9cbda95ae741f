"""Reload planning input: which changes need a llama-server restart and which apply live."""

from __future__ import annotations

import pytest

from proxifier.config import ModelConfig, validate_models
from proxifier.config_diff import LIVE_FIELDS, RESTART_FIELDS, diff_models


def config(models: dict, settings: dict | None = None):
    return validate_models({"settings": settings or {}, "models": models}, file="m.yaml")


def test_every_model_field_has_a_reload_rule() -> None:
    assert set(ModelConfig.model_fields) == RESTART_FIELDS | LIVE_FIELDS
    assert not RESTART_FIELDS & LIVE_FIELDS


def test_added_and_removed() -> None:
    diff = diff_models(config({"a": {}, "b": {}}), config({"b": {}, "c": {}}))
    assert (diff.added, diff.removed, diff.restart, diff.live) == (["c"], ["a"], {}, {})
    assert diff.summary() == ["added model 'c'", "removed model 'a'"]


def test_unchanged_config_is_empty() -> None:
    models = {"a": {"priority": 7, "model_path": "x.gguf", "additional_args": "--jinja"}}
    assert diff_models(config(models), config(models)).empty


@pytest.mark.parametrize(
    ("field", "before", "after"),
    [
        ("model_path", "a.gguf", "b.gguf"),
        ("llama_server", "/bin/one", "/bin/two"),
        ("additional_args", ["--jinja"], ["--no-jinja"]),
        ("context_length", 4096, 8192),
        ("gpu_layers", 20, -1),
        ("threads", 4, 8),
        ("parallel", 4, 8),
        ("port", 11001, 11002),
        ("resources", {"gpu_type:a100": 1}, {"gpu_type:h100": 1}),
        ("env", {"A": "1"}, {"A": "2"}),
        ("num_gpus", 1, 2),
        ("labels", {"gpu-type": "a100"}, {"gpu-type": "h100"}),
    ],
)
def test_changes_that_need_a_restart(field: str, before: object, after: object) -> None:
    diff = diff_models(config({"m": {field: before}}), config({"m": {field: after}}))
    assert diff.restart == {"m": [field]} and diff.live == {}
    assert diff.summary() == [f"model 'm' needs a restart: {field} changed"]


@pytest.mark.parametrize(
    ("field", "before", "after"),
    [
        ("priority", 5, 9),
        ("resource_group", "default", "production"),
        ("preload", False, True),
        ("auto_start", False, True),
        ("idle_timeout", 300, 60),
        ("max_queue_size", 100, 5),
        ("queue_timeout", 30, 5),
        ("aliases", [], ["chat"]),
        ("upstream_timeout", 60, 30),
    ],
)
def test_changes_that_apply_live(field: str, before: object, after: object) -> None:
    diff = diff_models(config({"m": {field: before}}), config({"m": {field: after}}))
    assert diff.live == {"m": [field]} and diff.restart == {}


def test_settings_defaults_count_as_the_models_values() -> None:
    # The model's own idle_timeout is unset on both sides; the settings default changed.
    diff = diff_models(
        config({"m": {}}, {"idle_timeout": 300}), config({"m": {}}, {"idle_timeout": 60})
    )
    assert diff.live == {"m": ["idle_timeout"]}
    assert diff.settings == ["idle_timeout"]
    # Writing the default out explicitly is no change at all.
    same = diff_models(config({"m": {}}), config({"m": {"idle_timeout": 300.0}}))
    assert same.live == {} and same.settings == []


def test_settings_binary_change_restarts_models_that_use_it() -> None:
    diff = diff_models(
        config({"a": {}, "b": {"llama_server": "/opt/own"}}, {"llama_server": "/bin/one"}),
        config({"a": {}, "b": {"llama_server": "/opt/own"}}, {"llama_server": "/bin/two"}),
    )
    assert diff.restart == {"a": ["llama_server"]}


def test_mixed_change_is_reported_both_ways() -> None:
    diff = diff_models(
        config({"m": {"priority": 5, "context_length": 100}}),
        config({"m": {"priority": 6, "context_length": 200}}),
    )
    assert diff.restart == {"m": ["context_length"]}
    assert diff.live == {"m": ["priority"]}
