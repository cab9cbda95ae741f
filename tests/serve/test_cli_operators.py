"""The operator commands (`proxifier status|models|start|stop|reload|group|queue`) over HTTP."""

from __future__ import annotations

import pytest

from proxifier.cli import main
from tests.serve.conftest import Deployment


def run(
    deployment: Deployment, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    code = main([*args[:1], "--url", deployment.url, *args[1:]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_status_prints_a_table_of_every_model(deployment: Deployment, capsys) -> None:
    code, out, _ = run(deployment, capsys, "status")
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == f"{deployment.url}: ok, controller reachable"
    assert lines[1].split() == [
        "MODEL",
        "STATE",
        "PRI",
        "GROUP",
        "WHERE",
        "GPU",
        "IN-FLIGHT",
        "QUEUED",
        "UPTIME",
        "ERROR",
    ]
    chat = next(line for line in lines if line.startswith("chat "))
    assert chat.split()[1:4] == ["ready", "9", "production"]
    # No GPU here: none held; what it would need on one is its GGUF's estimate.
    assert " - need 0.3G " in chat


def test_models(deployment: Deployment, capsys) -> None:
    code, out, _ = run(deployment, capsys, "models")
    assert code == 0
    assert any(
        line.split()[:2] == ["chat", "ready"] and "gpt-4o-mini" in line for line in out.splitlines()
    )


def test_start_stop_and_refusal(deployment: Deployment, capsys) -> None:
    assert run(deployment, capsys, "start", "qwen-32b")[:2] == (0, "qwen-32b: ready\n")
    assert run(deployment, capsys, "stop", "qwen-32b")[:2] == (0, "qwen-32b: stopped\n")
    code, _, err = run(deployment, capsys, "stop", "chat")
    assert code == 1
    assert err.startswith("error: 409: model 'chat' is preloaded and stays running")


def test_reload_group_and_queue(deployment: Deployment, capsys) -> None:
    assert run(deployment, capsys, "reload", "qwen-32b")[:2] == (0, "no changes\n")
    assert run(deployment, capsys, "reload")[:2] == (0, "no changes\n")
    code, out, _ = run(deployment, capsys, "group", "status")
    assert code == 0 and out.splitlines()[0].split() == ["GROUP", "RUNNING", "MEMBERS"]
    code, out, _ = run(deployment, capsys, "queue")
    assert code == 0 and out.splitlines()[0].split() == [
        "MODEL",
        "STATE",
        "IN-FLIGHT",
        "QUEUED",
        "OLDEST",
        "WAIT",
    ]
    assert run(deployment, capsys, "queue", "model-name", "--clear")[:2] == (
        0,
        "model-name: cleared 0 waiting request(s)\n",
    )


def test_an_unreachable_server_is_a_clear_error(capsys) -> None:
    code = main(["status", "--url", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: cannot reach http://127.0.0.1:9")
    assert "is `proxifier serve` running there?" in err
