"""The fake llama-server's fault modes behave as the tests that use them expect."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import running_server, wait_healthy

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_load_delay_answers_503_until_loaded(
    fake_server: Path, tiny_model: Path, tmp_path: Path
) -> None:
    with running_server(
        fake_server, tiny_model, tmp_path, env={"FAKE_LLAMA_LOAD_DELAY": "1"}, wait=False
    ) as server:
        statuses = []
        while not statuses or statuses[-1] != 200:
            with contextlib.suppress(httpx.TransportError):  # not listening yet
                statuses.append(httpx.get(f"{server.url}/health").status_code)
            time.sleep(0.02)
        assert statuses[0] == 503 and set(statuses) == {503, 200}
        loading = httpx.get(f"{server.url}/health")
        assert loading.json() == {"status": "ok"}


def test_failed_load_exits_with_its_message_on_stderr(
    fake_server: Path, tiny_model: Path, tmp_path: Path
) -> None:
    with running_server(
        fake_server,
        tiny_model,
        tmp_path,
        env={"FAKE_LLAMA_FAIL_LOAD": "error: out of memory loading tensors"},
        wait=False,
    ) as server:
        assert server.process.wait(timeout=10) == 1
        assert "error: out of memory loading tensors" in server.log_text()


def test_missing_model_file_fails_like_the_real_one(fake_server: Path, tmp_path: Path) -> None:
    with running_server(fake_server, tmp_path / "none.gguf", tmp_path, wait=False) as server:
        assert server.process.wait(timeout=10) == 1
        assert "failed to load model" in server.log_text()


def test_api_key_is_enforced(fake_server: Path, tiny_model: Path, tmp_path: Path) -> None:
    with running_server(fake_server, tiny_model, tmp_path) as server:
        url = f"{server.url}/v1/chat/completions"
        assert httpx.post(url, json=CHAT).status_code == 401
        assert (
            httpx.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
        assert httpx.post(url, json=CHAT, headers=server.headers).status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_crash_after_n_requests(fake_server: Path, tiny_model: Path, tmp_path: Path) -> None:
    with running_server(
        fake_server, tiny_model, tmp_path, env={"FAKE_LLAMA_CRASH_AFTER": "2"}
    ) as server:
        url = f"{server.url}/v1/chat/completions"
        for _ in range(2):
            assert httpx.post(url, json=CHAT, headers=server.headers).status_code == 200
        with pytest.raises(httpx.TransportError):
            httpx.post(url, json=CHAT, headers=server.headers)
        assert server.process.wait(timeout=10) == 134


def test_crash_in_the_middle_of_a_stream(
    fake_server: Path, tiny_model: Path, tmp_path: Path
) -> None:
    with running_server(
        fake_server, tiny_model, tmp_path, env={"FAKE_LLAMA_CRASH_AFTER": "0"}
    ) as server:
        events = []
        with (
            pytest.raises(httpx.TransportError),
            httpx.stream(
                "POST",
                f"{server.url}/v1/chat/completions",
                json={**CHAT, "stream": True},
                headers=server.headers,
            ) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
        assert events and "[DONE]" not in events[-1]


def test_slow_stream_spaces_its_tokens(fake_server: Path, tiny_model: Path, tmp_path: Path) -> None:
    delay = 0.2
    with running_server(
        fake_server, tiny_model, tmp_path, env={"FAKE_LLAMA_TOKEN_DELAY": str(delay)}
    ) as server:
        arrivals = []
        with httpx.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers=server.headers,
        ) as response:
            for line in response.iter_lines():
                is_chunk = line.startswith("data: {")
                if is_chunk and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    arrivals.append(time.monotonic())
        assert len(arrivals) == 3
        # Lower bound only: each token is produced after its delay, so it cannot arrive sooner.
        assert arrivals[-1] - arrivals[0] >= 2 * delay * 0.9


def test_ignore_sigterm_needs_sigkill(fake_server: Path, tiny_model: Path, tmp_path: Path) -> None:
    with running_server(
        fake_server, tiny_model, tmp_path, env={"FAKE_LLAMA_IGNORE_SIGTERM": "1"}
    ) as server:
        server.process.send_signal(signal.SIGTERM)
        # It keeps answering after the signal was delivered.
        wait_healthy(server)
        assert server.process.poll() is None
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(timeout=10) == -signal.SIGKILL


def test_sigterm_stops_it_normally(fake_server: Path, tiny_model: Path, tmp_path: Path) -> None:
    with running_server(fake_server, tiny_model, tmp_path) as server:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=10) == -signal.SIGTERM


def test_version_flag(fake_server: Path) -> None:
    result = subprocess.run(
        [str(fake_server), "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "fake" in result.stdout
