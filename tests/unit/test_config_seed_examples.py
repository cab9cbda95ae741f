"""Every YAML example of the seed feature document loads unchanged, with the values it promises."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from proxifier.config import (
    ApiKeyConfig,
    AuthConfig,
    ModelsConfig,
    load_auth_config,
    load_models_config,
    validate_auth,
    validate_models,
)

FEATURES = Path(__file__).resolve().parents[2] / "docs" / "FEATURES.md"


def seed_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", FEATURES.read_text(), re.S)


def load_block(text: str) -> ModelsConfig | AuthConfig:
    """A block is a whole models.yaml, a whole auth.yaml, or a fragment of the models: mapping."""
    data = yaml.safe_load(text)
    if "api_keys" in data:
        return validate_auth(data, file="seed auth.yaml")
    if "models" in data:
        return validate_models(data, file="seed models.yaml")
    return validate_models({"models": data}, file="seed models: fragment")


def summary(config: ModelsConfig) -> dict[str, tuple[int, str, bool, bool]]:
    return {
        name: (model.priority, model.resource_group, model.preload, model.auto_start)
        for name, model in config.models.items()
    }


def test_seed_has_the_seven_yaml_examples() -> None:
    assert len(seed_blocks()) == 7


def test_priority_example() -> None:
    config = load_block(seed_blocks()[0])
    assert isinstance(config, ModelsConfig)
    assert summary(config) == {
        "critical-model": (10, "default", False, True),
        "standard-model": (5, "default", False, True),
        "experimental-model": (1, "default", False, False),
    }
    assert [config.models[n].port for n in config.models] == [11001, 11002, 11003]
    assert config.models["critical-model"].model_path == "./models/critical.gguf"


def test_resource_groups_example() -> None:
    config = load_block(seed_blocks()[1])
    assert isinstance(config, ModelsConfig)
    assert summary(config) == {
        "production-chat": (9, "production", True, False),
        "production-code": (8, "production", True, False),
        "dev-experimental": (3, "development", False, False),
    }
    assert all(model.model_path is None and model.port is None for model in config.models.values())


def test_preload_example() -> None:
    config = load_block(seed_blocks()[2])
    assert isinstance(config, ModelsConfig)
    assert summary(config) == {
        "always-ready": (10, "default", True, True),
        "frequently-used": (8, "default", False, True),
        "on-demand": (5, "default", False, False),
    }


def test_auth_example() -> None:
    auth = load_block(seed_blocks()[3])
    assert isinstance(auth, AuthConfig)
    assert auth.enabled and auth.dashboard_auth_required
    assert list(auth.api_keys) == ["admin-key", "readonly-key", "team-key"]
    admin, readonly, team = auth.api_keys.values()
    assert admin.permissions == ["admin", "models", "config"]
    assert admin.expires == datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert readonly.permissions == ["read"] and readonly.expires is None
    assert team.permissions == ["models"] and team.expires is None
    assert admin.key == "your-secure-admin-key"
    assert auth.rate_limits == {"admin": 1000, "default": 100, "readonly": 50}
    assert auth.public_endpoints == ["/health", "/metrics"]


def test_multi_environment_example() -> None:
    config = load_block(seed_blocks()[4])
    assert isinstance(config, ModelsConfig)
    assert summary(config) == {
        "prod-chat": (10, "production", True, True),
        "prod-code": (9, "production", True, True),
        "dev-experimental": (3, "development", False, False),
    }


def test_resource_optimization_fragment() -> None:
    config = load_block(seed_blocks()[5])
    assert isinstance(config, ModelsConfig)
    assert summary(config) == {
        "large-model": (6, "default", False, True),
        "small-model": (8, "default", True, True),
    }


def test_gpu_fragment() -> None:
    config = load_block(seed_blocks()[6])
    assert isinstance(config, ModelsConfig)
    assert {n: (m.resource_group, m.gpu_layers, m.priority) for n, m in config.models.items()} == {
        "gpu-model-1": ("gpu-cluster", -1, 9),
        "gpu-model-2": ("gpu-cluster", 20, 7),
        "cpu-model": ("cpu-cluster", 0, 5),
    }


def test_defaults_of_a_model_without_fields() -> None:
    model = validate_models({"models": {"bare": None}}, file="m.yaml").models["bare"]
    assert (model.priority, model.resource_group, model.preload, model.auto_start) == (
        5,
        "default",
        False,
        False,
    )
    assert model.parallel == 4 and model.num_cpus == 0 and model.port is None


@pytest.mark.parametrize("name", ["models.yaml", "demo.yaml"])
def test_shipped_models_configs_load(repo: Path, name: str) -> None:
    config = load_models_config(repo / "configs" / name)
    assert config.models


def test_shipped_models_yaml_holds_every_seed_model(repo: Path) -> None:
    shipped = load_models_config(repo / "configs" / "models.yaml")
    for block in seed_blocks():
        example = load_block(block)
        if isinstance(example, ModelsConfig):
            for name, model in example.models.items():
                ours = shipped.models[name]
                for field in (
                    "priority",
                    "resource_group",
                    "preload",
                    "auto_start",
                    "gpu_layers",
                    "port",
                ):
                    assert getattr(ours, field) == getattr(model, field), (name, field)


def test_shipped_auth_yaml_is_the_seed_example(repo: Path) -> None:
    shipped = load_auth_config(repo / "configs" / "auth.yaml")
    assert shipped == load_block(seed_blocks()[3])
    assert isinstance(shipped.api_keys["team-key"], ApiKeyConfig)
