"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against the product
with auth on and a model whose name is an HTML injection attempt."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import deployed

EVIL = "<img src=x onerror=alert(1)>"
CORRUPT = "error: tensor 'blk.0' is corrupt (fake)"
HUB_REPO, HUB_FILE = "proxifier-tests/tiny-GGUF", "tiny-Q8_0.gguf"  # tests/conftest.py's hub
ADMIN_KEY = "k-admin"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def chromium_path() -> str:
    found = os.environ.get("PROXIFIER_CHROMIUM") or shutil.which("chromium")
    if found:
        return found
    if os.environ.get("PROXIFIER_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is required here (scripts/setup installs Debian's package)")
    pytest.skip("chromium not installed; scripts/setup installs it (apt-get install chromium)")


@pytest.fixture(scope="package")
def dashboard_url(
    proxifier_home: Path,
    fake_server: Path,
    tiny_model: Path,
    hub: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("browser")
    fake = {"model_path": str(tiny_model), "llama_server": str(fake_server), "num_gpus": 0}
    (folder / "auth.yaml").write_text(
        yaml.safe_dump(
            {
                "api_keys": {
                    "admin-key": {"key": ADMIN_KEY, "permissions": ["admin"]},
                    "readonly-key": {"key": "k-read", "permissions": ["read"]},
                    "chat-reader": {"key": "k-chat", "permissions": ["read"], "models": ["chat"]},
                }
            }
        )
    )
    (folder / "models.yaml").write_text(
        yaml.safe_dump(
            {
                "settings": {"auth_file": "auth.yaml", "model_cache": str(folder / "cache")},
                "models": {
                    "chat": {**fake, "preload": True, "priority": 9, "resource_group": "prod"},
                    "idle": {**fake, "priority": 4, "resource_group": "dev"},
                    EVIL: {**fake, "priority": 1, "resource_group": "dev"},
                    # Loads for a minute: requests queue for it (the queue monitor's test).
                    "slow": {**fake, "priority": 1, "env": {"FAKE_LLAMA_LOAD_DELAY": "60"}},
                    # Fails to load, saying why in its log (the row must show it).
                    "broken": {**fake, "priority": 1, "env": {"FAKE_LLAMA_FAIL_LOAD": CORRUPT}},
                    # Fetched from the local Hub stand-in (its download shows in the row).
                    "hub": {
                        "llama_server": str(fake_server),
                        "num_gpus": 0,
                        "priority": 1,
                        "hf_repo": HUB_REPO,
                        "hf_file": HUB_FILE,
                        "env": {"HF_ENDPOINT": hub.url},
                    },
                },
            }
        )
    )
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with deployed(proxifier_home, folder / "models.yaml", ready="chat", headers=admin) as (
        url,
        _,
    ):
        yield url


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 850})
    opened = context.new_page()
    opened.console_errors = []  # type: ignore[attr-defined]
    opened.on(
        "console",
        lambda message: (
            opened.console_errors.append(message.text)  # type: ignore[attr-defined]
            if message.type == "error"
            else None
        ),
    )
    opened.on("dialog", lambda dialog: pytest.fail(f"a JavaScript dialog opened: {dialog.message}"))
    yield opened
    context.close()


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    """On a failure, keep what the browser showed (test-artifacts/failed-<test>.png)."""
    outcome = yield
    report = outcome.get_result()
    opened = item.funcargs.get("page") if hasattr(item, "funcargs") else None
    if report.failed and call.when == "call" and opened is not None:
        ARTIFACTS.mkdir(exist_ok=True)
        opened.screenshot(path=str(ARTIFACTS / f"failed-{item.name}.png"), full_page=True)
        (ARTIFACTS / f"failed-{item.name}.console.txt").write_text("\n".join(opened.console_errors))
