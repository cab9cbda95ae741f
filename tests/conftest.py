"""Fixtures shared by every test layer: the repository, the tiny model, llama-server binaries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxifier.llama import LlamaServerNotFound, find_llama_server

REPO = Path(__file__).resolve().parent.parent
FAKE_SERVER = REPO / "tests" / "fakes" / "fake-llama-server"
TINY_MODEL = REPO / "models" / "tiny.gguf"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny GGUF model, written by scripts/make-tiny-model when absent."""
    if not TINY_MODEL.is_file():
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
def real_server() -> str:
    """The real llama-server binary. scripts/test installs it and makes its absence a failure."""
    try:
        return find_llama_server()
    except LlamaServerNotFound as exc:
        if os.environ.get("PROXIFIER_REQUIRE_LLAMA") == "1":
            pytest.fail(f"the real llama-server is required here: {exc}")
        pytest.skip(f"real llama-server not installed ({exc}); scripts/test installs it")
