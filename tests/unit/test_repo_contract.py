"""README's two commands are real, and CI runs README's test command."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from proxifier.config import ModelConfig, QueueSettings, Settings, validate_auth, validate_models


def readme_commands(repo: Path) -> list[str]:
    text = (repo / "README.md").read_text()
    return re.findall(r"^\s*(scripts/[\w-]+)\s*$", text, re.M)


def test_readme_names_a_demo_and_a_test_command(repo: Path) -> None:
    commands = readme_commands(repo)
    assert "scripts/demo" in commands and "scripts/test" in commands
    for command in commands:
        assert os.access(repo / command, os.X_OK), command


def test_ci_runs_the_readme_test_command(repo: Path) -> None:
    ci = (repo / ".ci" / "run").read_text()
    assert re.search(r"^exec scripts/test\b", ci, re.M)
    assert os.access(repo / ".ci" / "run", os.X_OK)


def test_test_command_sets_up_everything(repo: Path) -> None:
    test = (repo / "scripts" / "test").read_text()
    setup = (repo / "scripts" / "setup").read_text()
    assert "scripts/setup" in test and "RAY_AUTH_MODE=disabled" in test
    assert "pytest" in test and "ruff check" in test
    for step in (
        "pip install",
        "scripts/install-llama-server",
        "scripts/make-tiny-model",
        "apt-get install -y -q $missing",  # the Debian packages the tests need:
        "chromium:chromium",  # the dashboard's browser tests
        "curl:curl",  # the lines `proxifier serve` prints, run as printed
    ):
        assert step in setup, step


def test_readme_yaml_examples_load(repo: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", (repo / "README.md").read_text(), re.S)
    assert len(blocks) == 4
    replicas = validate_models(yaml.safe_load(blocks[0]), file="README Replicas")
    assert replicas.models["chat"].replicas == 2
    scaling = replicas.models["docs"].autoscaling
    assert scaling is not None and scaling.max_replicas == 4
    models = validate_models(yaml.safe_load(blocks[1]), file="README models.yaml")
    assert models.models["chat"].aliases == ["gpt-4o-mini"]
    hub = validate_models(yaml.safe_load(blocks[2]), file="README Hugging Face models")
    assert hub.models["gemma"].hf_repo == "ggml-org/gemma-3-1b-it-GGUF:Q4_K_M"
    auth = validate_auth(yaml.safe_load(blocks[3]), file="README auth.yaml")
    assert auth.api_keys["ops"].models == ["qwen-*"]


def test_readme_lists_every_setting_and_model_field(repo: Path) -> None:
    text = (repo / "README.md").read_text()
    for field in Settings.model_fields:
        if field != "queue":
            assert f"| `{field}` |" in text, field
    for field in QueueSettings.model_fields:
        assert f"| `queue.{field}` |" in text, field
    for field in ModelConfig.model_fields:
        assert f"`{field}`" in text, field


def test_readme_documents_every_metric(repo: Path) -> None:
    from proxifier.metrics import METRICS

    text = (repo / "README.md").read_text()
    for name, meaning in METRICS.items():
        assert f"| `{name}" in text and meaning in text, name


def test_readme_permission_table_matches_the_code(repo: Path) -> None:
    from proxifier.auth import ROUTES

    text = (repo / "README.md").read_text()
    for permission in ("admin", "models", "config", "read"):
        assert f"| `{permission}` |" in text
    assert "`ROUTES`" in text and len(ROUTES) >= 15


def test_readme_api_table_lists_every_inference_path_with_its_example(repo: Path) -> None:
    from proxifier.endpoints import ENDPOINTS, curl_example

    text = (repo / "README.md").read_text()
    shown: set[str] = set()
    for endpoint in ENDPOINTS:
        assert f"`{endpoint.path}`" in text or f"`POST {endpoint.path}`" in text, endpoint.path
        if endpoint.example not in shown:  # the rerank paths share one row and one example
            assert curl_example(endpoint) in text, endpoint.path
            shown.add(endpoint.example)


def test_gpu_memory_docs_table_is_what_the_estimate_says(repo: Path) -> None:
    import subprocess
    import sys

    table = subprocess.run(
        [sys.executable, str(repo / "scripts" / "gpu-memory-table")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert table.strip() in (repo / "docs" / "gpu-memory.md").read_text()
