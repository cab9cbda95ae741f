"""The operator commands (`proxifier status|models|start|stop|reload|group|queue|logs`) over
HTTP."""

from __future__ import annotations

import re

import pytest

from proxifier.cli import main
from proxifier.cli_admin import CLEAR
from tests.helpers import wait_for
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
        "REPLICAS",
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
    assert chat.split()[1:5] == ["ready", "-", "9", "production"]  # one instance: no count
    # Configured with num_gpus: 0: the column says no GPU, not what one would need.
    assert chat.split()[6] == "-" and "need" not in chat


def test_models(deployment: Deployment, capsys) -> None:
    code, out, _ = run(deployment, capsys, "models")
    assert code == 0
    assert any(
        line.split()[:2] == ["chat", "ready"] and "gpt-4o-mini" in line for line in out.splitlines()
    )


def test_start_stop_and_refusal(deployment: Deployment, capsys) -> None:
    code, out, _ = run(deployment, capsys, "start", "qwen-32b")
    assert code == 0 and re.fullmatch(r"qwen-32b: ready in \d+\.\d s", out.splitlines()[-1])
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


def test_start_follows_the_load_until_ready(deployment: Deployment, capsys) -> None:
    run(deployment, capsys, "stop", "loading")  # its fake llama-server loads for 3 s
    code, out, err = run(deployment, capsys, "start", "loading")
    lines = out.splitlines()
    assert code == 0, err
    assert re.fullmatch(r"loading: loading \(\d+ s\)", lines[0])  # printed as it changes
    assert re.fullmatch(r"loading: ready in \d+\.\d s", lines[-1])
    assert deployment.status("loading")["state"] == "ready"


def test_start_without_waiting_and_a_start_that_fails(deployment: Deployment, capsys) -> None:
    run(deployment, capsys, "stop", "loading")
    assert run(deployment, capsys, "start", "loading", "--no-wait")[:2] == (
        0,
        "loading: starting\n",
    )
    wait_for(lambda: deployment.status("loading")["state"] == "ready", timeout=60)
    code, out, err = run(deployment, capsys, "start", "broken")
    assert code == 1
    assert out.splitlines()[-1].startswith("broken: failed: model 'broken' failed: llama-server")
    assert "  error: corrupt model (fake)" in err.splitlines()  # its log's lines say why


def test_status_watch_redraws(deployment: Deployment, capsys) -> None:
    code, out, _ = run(deployment, capsys, "status", "--watch", "--interval", "0.1", "--count", "2")
    # Not a terminal: frames one after another, no screen-clearing codes in the output.
    assert CLEAR not in out and "\x1b" not in out
    frames = out.split("\n\n")
    assert code == 0 and len(frames) == 2
    for frame in frames:
        lines = frame.splitlines()
        assert re.fullmatch(r"every 0.1s, \d\d:\d\d:\d\d \(Ctrl-C quits\)", lines[0])
        assert lines[1] == f"{deployment.url}: ok, controller reachable"
        assert lines[2].split()[:2] == ["MODEL", "STATE"]


def test_logs_of_a_failed_and_of_a_stopped_model(deployment: Deployment, capsys) -> None:
    """`proxifier logs` reads the model's llama-server log also when no instance runs: a
    failed start's reason, and the lines of one that stopped (before, both were empty)."""
    run(deployment, capsys, "start", "broken")  # fails: its log says why
    code, out, _ = run(deployment, capsys, "logs", "broken", "-n", "20")
    assert code == 0 and "error: corrupt model (fake)" in out.splitlines(), out
    assert run(deployment, capsys, "start", "nofim")[0] == 0
    pid = deployment.status("nofim")["pid"]
    assert run(deployment, capsys, "stop", "nofim")[0] == 0
    wait_for(lambda: deployment.status("nofim")["state"] == "stopped", timeout=60)
    code, out, _ = run(deployment, capsys, "logs", "nofim")
    assert code == 0 and f"(pid {pid})" in out, out  # its "listening on ..." line
