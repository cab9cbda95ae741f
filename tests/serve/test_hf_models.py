"""Models named by a Hugging Face repository: fetched on the node that runs them, with progress
in their status and keep-alives for the requests that wait, from the local Hub stand-in."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import ray

from tests.helpers import wait_for
from tests.serve.conftest import Deployment

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
REPO = "proxifier-tests/tiny-GGUF"


def events(deployment: Deployment, model: str) -> list[dict[str, Any]]:
    return [
        e for e in ray.get(deployment.controller.events_since.remote()) if e.get("model") == model
    ]


def test_a_hub_model_downloads_with_progress_while_its_request_waits(
    deployment: Deployment, hub: Any
) -> None:
    gate = hub.hold(REPO, "tiny-Q8_0.gguf")  # half the file, then wait for the test
    lines: list[str] = []
    answer: list[httpx.Response] = []

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{deployment.url}/v1/chat/completions",
            json={"model": "hf", **CHAT, "stream": True},
            timeout=60,
        ) as response:
            answer.append(response)
            for line in response.iter_lines():
                if line:
                    lines.append(line)  # seen by the test as it comes

    waiting = threading.Thread(target=stream)
    waiting.start()
    try:
        wait_for(lambda: (deployment.status("hf").get("download") or {}).get("done", 0) > 0)
        status = deployment.status("hf")
        download = status["download"]
        assert status["state"] == "starting"
        assert download["file"] == f"{REPO}/tiny-Q8_0.gguf"
        assert 0 < download["done"] < download["total"] == 24 * 1024**2  # held at half
        done_mib = download["done"] / 1024**2
        assert status["progress"] == f"downloading {done_mib:.1f}/24.0 MiB"
        assert deployment.status("hf")["queue_depth"] == 1  # the request waits for it
        # ... and is kept alive while it does, as during a load
        wait_for(lambda: ": queued position=1 state=starting" in lines)
    finally:
        gate.set()
    waiting.join(60)
    assert answer[0].status_code == 200
    data = [line for line in lines if line.startswith("data: ")]
    assert lines.index(data[0]) > lines.index(": queued position=1 state=starting")
    assert data[-1] == "data: [DONE]"

    status = deployment.status("hf")
    assert status["state"] == "ready" and status["progress"] is None
    kinds = [e["kind"] for e in events(deployment, "hf")]
    assert kinds.index("downloading") < kinds.index("downloaded") < kinds.index("ready")
    ready = [e for e in events(deployment, "hf") if e["kind"] == "ready"][-1]
    assert "download" in ready["phases"]
    (cached,) = (deployment.config_path.parent / "model-cache").rglob("tiny-Q8_0.gguf")
    assert cached.read_bytes() == hub.repos[REPO].files["tiny-Q8_0.gguf"]


def test_a_node_fetches_a_file_once_and_a_tag_picks_the_file(
    deployment: Deployment, hub: Any
) -> None:
    with deployment.client() as client:
        first = client.post("/v1/chat/completions", json={"model": "hf-tagged", **CHAT})
        assert first.status_code == 200, first.text
        assert hub.downloads.count((REPO, "tiny-Q4_K_M.gguf")) == 1
        client.post("/admin/models/hf-tagged/stop")
        wait_for(lambda: deployment.status("hf-tagged")["state"] == "stopped")
        again = client.post("/v1/chat/completions", json={"model": "hf-tagged", **CHAT})
        assert again.status_code == 200, again.text
    assert hub.downloads.count((REPO, "tiny-Q4_K_M.gguf")) == 1  # this node's copy served
    kinds = [e["kind"] for e in events(deployment, "hf-tagged")]
    assert kinds.count("ready") == 2 and kinds.count("downloading") == 1  # found here, offline


def test_a_missing_repository_fails_the_model_with_the_hubs_message(
    deployment: Deployment,
) -> None:
    with deployment.client() as client:
        answer = client.post("/v1/chat/completions", json={"model": "hf-missing", **CHAT})
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "model_failed"
    assert (
        "could not fetch proxifier-tests/no-such-repo/model.gguf from Hugging Face"
        in (error["message"])
    )
    assert "Repository not found" in error["message"]  # the Hub's own words
    assert deployment.status("hf-missing")["state"] == "failed"
