"""A person using the dashboard: it loads clean, shows the models, starts and stops one live,
asks for a key and refuses a wrong one, and shows hostile names as text."""

from __future__ import annotations

import re
import threading
from typing import Any

import httpx

from tests.browser.conftest import ADMIN_KEY, CORRUPT, EVIL, HUB_FILE, HUB_REPO, screenshot

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def logged_in(page: Any, url: str, key: str = ADMIN_KEY) -> Any:
    page.add_init_script(f"sessionStorage.setItem('proxifier.key', '{key}')")
    page.goto(f"{url}/dashboard")
    page.wait_for_selector("#live.live")
    page.wait_for_selector("tr[data-model='chat'] [data-state='ready']")
    return page


def button(page: Any, action: str, model: str) -> Any:
    return page.locator(f"button[data-do='{action}'][data-model='{model}']")


def row_state(page: Any, model: str) -> str:
    return page.locator(f"tr[data-model='{model}'] .state").inner_text()


def test_the_page_loads_clean_and_lists_every_model(page: Any, dashboard_url: str) -> None:
    logged_in(page, dashboard_url)
    names = page.locator("#models tbody tr td:first-child").all_inner_texts()
    # By priority, then name, as listed.
    assert names == ["chat", "idle", EVIL, "broken", "hub", "slow"]
    assert row_state(page, "chat") == "ready"
    assert page.console_errors == []
    path = screenshot(page, "overview")
    assert path.stat().st_size > 10_000


def test_a_failed_model_shows_in_its_row_what_its_log_says(page: Any, dashboard_url: str) -> None:
    """Not "...the last lines of its log:" and nothing: the error line of that log."""
    logged_in(page, dashboard_url)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    failed = httpx.post(f"{dashboard_url}/admin/models/broken/start", headers=admin, timeout=60)
    assert failed.status_code == 503, failed.text
    cell = page.locator("tr[data-model='broken'] td.error")
    cell.filter(has_text="corrupt (fake)").wait_for(timeout=30_000)
    text = cell.inner_text()
    assert "exited with code 1 while loading" in text and text.endswith(CORRUPT), text
    # One line however long the error (its whole text is the cell's title): a screen holds
    # many models, not five.
    assert page.locator("tr[data-model='broken']").bounding_box()["height"] < 60
    assert CORRUPT in (cell.get_attribute("title") or "")
    assert page.console_errors == []


def test_start_and_stop_change_the_state_live(page: Any, dashboard_url: str) -> None:
    logged_in(page, dashboard_url)
    page.click("button[data-do='start'][data-model='idle']")
    # No reload: the row changes when the stream brings the new state.
    page.wait_for_selector("tr[data-model='idle'] [data-state='ready']", timeout=30_000)
    page.click("button[data-do='stop'][data-model='idle']")
    page.wait_for_selector("tr[data-model='idle'] [data-state='stopped']", timeout=30_000)
    assert page.console_errors == []


def test_it_asks_for_a_key_and_refuses_a_wrong_one(page: Any, dashboard_url: str) -> None:
    page.goto(f"{dashboard_url}/dashboard")
    page.wait_for_selector("#key-dialog[open]")
    assert "Missing API key" in page.inner_text("#key-reason")
    page.fill("#key-input", "not-the-key")
    page.click("#key-save")
    page.wait_for_selector("#key-dialog[open]")
    page.wait_for_function(
        "document.querySelector('#key-reason').textContent.includes('Invalid API key')"
    )
    assert page.inner_text("#live-text") == "needs a key"
    page.fill("#key-input", ADMIN_KEY)
    page.click("#key-save")
    page.wait_for_selector("#live.live")
    page.wait_for_selector("tr[data-model='chat']")
    assert page.evaluate("sessionStorage.getItem('proxifier.key')") == ADMIN_KEY


def test_a_hostile_model_name_is_shown_as_text(page: Any, dashboard_url: str) -> None:
    logged_in(page, dashboard_url)
    cell = page.locator("#models tbody tr:nth-child(3) td:first-child")
    assert cell.inner_text() == EVIL
    assert page.locator("#models img").count() == 0
    page.click("#tabs button[data-view='groups']")
    assert page.locator("#groups img, #priorities img").count() == 0
    assert EVIL in page.inner_text("#priorities")


def test_every_view_renders(page: Any, dashboard_url: str) -> None:
    logged_in(page, dashboard_url)
    for view, ready in [
        ("groups", "#groups .group"),
        ("queues", "#queues .chart"),
        ("config", "#models-yaml:not(:empty)"),
        ("cluster", "#nodes tbody tr"),
        ("events", "#events li"),
    ]:
        page.click(f"#tabs button[data-view='{view}']")
        page.wait_for_selector(ready)
        screenshot(page, view)
    page.click("#tabs button[data-view='config']")
    page.wait_for_selector("#auth-yaml:not(:empty)")
    assert ADMIN_KEY not in page.inner_text("#auth-yaml")
    assert "<redacted>" in page.inner_text("#auth-yaml")
    assert page.console_errors == []


def test_the_queue_monitor_plots_a_queue_as_it_builds(page: Any, dashboard_url: str) -> None:
    logged_in(page, dashboard_url)
    page.click("#tabs button[data-view='queues']")
    answers: list[int] = []

    def ask() -> None:
        answers.append(
            httpx.post(
                f"{dashboard_url}/v1/chat/completions",
                json={"model": "slow", "messages": [{"role": "user", "content": "hi"}]},
                headers=ADMIN,
                timeout=60,
            ).status_code
        )

    waiting = [threading.Thread(target=ask) for _ in range(3)]
    for thread in waiting:
        thread.start()
    chart = "#queues .chart[data-model='slow']"
    try:
        page.wait_for_function(
            f"document.querySelector(\"{chart}\")?.textContent.includes('now: 3 queued')",
            timeout=30_000,
        )
        assert "queue depth (peak 3)" in page.inner_text(chart)
        assert page.locator(f"{chart} svg polyline").count() == 2  # depth and oldest wait
        screenshot(page, "queues")
    finally:
        httpx.post(f"{dashboard_url}/admin/queue/slow/clear", headers=ADMIN, timeout=30)
        for thread in waiting:
            thread.join()
        httpx.post(f"{dashboard_url}/admin/models/slow/stop", headers=ADMIN, timeout=60)
    assert answers == [503, 503, 503]  # told why: an admin cleared the queue
    page.wait_for_function(
        f"document.querySelector(\"{chart}\")?.textContent.includes('now: 0 queued')"
    )
    assert page.console_errors == []


def test_a_download_shows_its_progress_in_the_models_row(
    page: Any, dashboard_url: str, hub: Any
) -> None:
    logged_in(page, dashboard_url)
    gate = hub.hold(HUB_REPO, HUB_FILE)  # half the file, then wait for the test
    try:
        page.click("button[data-do='start'][data-model='hub']")
        progress = page.locator("tr[data-model='hub'] .progress")
        progress.wait_for(timeout=30_000)
        assert re.fullmatch(r" downloading \d+\.\d/24\.0 MiB", progress.inner_text())
        assert row_state(page, "hub") == "starting"
        screenshot(page, "download")
    finally:
        gate.set()
    page.wait_for_selector("tr[data-model='hub'] [data-state='ready']", timeout=30_000)
    assert page.locator("tr[data-model='hub'] .progress").count() == 0
    assert page.console_errors == []


def test_a_starting_model_shows_how_long_it_has_been_loading(page: Any, dashboard_url: str) -> None:
    logged_in(page, dashboard_url)
    started = httpx.post(
        f"{dashboard_url}/admin/models/slow/start", params={"wait": "false"}, headers=ADMIN
    )
    assert started.status_code == 200, started.text
    try:
        elapsed = page.locator("tr[data-model='slow'] .elapsed")
        elapsed.wait_for(timeout=30_000)
        first = int(re.fullmatch(r" for (\d+)s", elapsed.inner_text()).group(1))
        # It counts up live (the stream's next updates), not a number fixed at the start.
        page.wait_for_function(
            "(first) => { const t = document.querySelector(\"tr[data-model='slow'] .elapsed\");"
            " const m = t && t.textContent.match(/for (\\d+)s/); return m && +m[1] >= first + 2; }",
            arg=first,
            timeout=30_000,
        )
        assert row_state(page, "slow") == "starting"
        # Starting already: its Start is off and says why; Stop is on.
        assert button(page, "start", "slow").is_disabled()
        assert button(page, "start", "slow").get_attribute("title") == "not now: it is starting"
        assert button(page, "stop", "slow").is_enabled()
        screenshot(page, "starting")
    finally:
        httpx.post(f"{dashboard_url}/admin/models/slow/stop", headers=ADMIN, timeout=60)
    page.wait_for_selector("tr[data-model='slow'] [data-state='stopped']", timeout=30_000)
    assert page.locator("tr[data-model='slow'] .elapsed").count() == 0
    assert page.console_errors == []


def test_buttons_follow_the_keys_permissions_and_the_models_state(
    page: Any, dashboard_url: str
) -> None:
    logged_in(page, dashboard_url, "k-read")
    for action in ("start", "stop", "reload"):
        for model in ("chat", "idle"):
            assert button(page, action, model).is_disabled(), (action, model)
            title = button(page, action, model).get_attribute("title")
            assert title == "needs a key with the models permission"
    assert button(page, "logs", "chat").is_enabled()  # reading a log is what it may do
    assert page.locator("[data-action='start-all']").is_disabled()
    assert page.locator("[data-action='validate']").is_disabled()
    assert page.console_errors == []


def test_an_admin_gets_the_buttons_the_models_state_allows(page: Any, dashboard_url: str) -> None:
    logged_in(page, dashboard_url)
    assert button(page, "start", "chat").is_disabled()  # ready already
    assert button(page, "start", "chat").get_attribute("title") == "not now: it is ready"
    assert button(page, "stop", "chat").is_enabled() and button(page, "reload", "chat").is_enabled()
    page.wait_for_selector("tr[data-model='idle'] [data-state='stopped']", timeout=30_000)
    assert button(page, "start", "idle").is_enabled()
    assert button(page, "stop", "idle").is_disabled()
    assert page.locator("[data-action='start-all']").is_enabled()
    assert page.console_errors == []


def test_a_key_limited_to_some_models_sees_only_those(page: Any, dashboard_url: str) -> None:
    logged_in(page, dashboard_url, "k-chat")
    assert page.locator("#models tbody tr td:first-child").all_inner_texts() == ["chat"]
    page.click("#tabs button[data-view='events']")
    page.wait_for_selector("#events li")
    shown = page.inner_text("#events")
    assert "broken" not in shown and EVIL not in shown
    assert page.console_errors == []


def test_a_model_with_replicas_shows_a_row_per_replica(page: Any, dashboard_url: str) -> None:
    """Each replica under its model: where it runs, its state and what it holds; the model's
    row says how many run of how many wanted."""
    logged_in(page, dashboard_url)
    scale = f"{dashboard_url}/admin/models/idle/scale"
    scaled = httpx.post(scale, json={"replicas": 2}, headers=ADMIN, timeout=30)
    assert scaled.status_code == 200, scaled.text
    try:
        started = httpx.post(f"{dashboard_url}/admin/models/idle/start", headers=ADMIN, timeout=60)
        assert started.status_code == 200, started.text
        page.wait_for_selector("tr[data-replica='idle#2'] [data-state='ready']", timeout=60_000)
        page.wait_for_selector("tr[data-replica='idle'] [data-state='ready']", timeout=30_000)
        assert "2/2" in page.locator("tr[data-model='idle'] td:first-child").inner_text()
        node = page.locator("tr[data-replica='idle#2'] td.node").inner_text()
        assert node and node != "-"
        assert page.console_errors == []
    finally:
        httpx.post(scale, json={"replicas": 1}, headers=ADMIN, timeout=30)
        httpx.post(f"{dashboard_url}/admin/models/idle/stop", headers=ADMIN, timeout=60)
