"""`proxifier serve` as a user runs it: a subprocess with its own Ray cluster, used, then stopped
with SIGINT. Nothing it started may remain: no Ray process, no llama-server."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

from tests.helpers import free_port, haproxy_env, wait_gone


def test_serve_then_ctrl_c_leaves_nothing_behind(
    fake_server: Path, tiny_model: Path, tmp_path: Path, repo: Path
) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": {
                    "chat": {
                        "model_path": str(tiny_model),
                        "llama_server": str(fake_server),
                        "auto_start": True,
                    }
                }
            }
        )
    )
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "proxifier"),
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        # Serve's HAProxy listens on fixed side ports (stats 8404, metrics 9101), taken here by
        # the test session's own cluster; the Python proxy has none, so two clusters can run.
        "--ingress",
        "python",
    ]
    log = tmp_path / "serve.log"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
    env_without_address = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("w") as out:
        server = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=repo,
            env={
                **env_without_address,
                "RAY_AUTH_MODE": "disabled",
                "PROXIFIER_HOME": str(tmp_path),
                # Ray's temp folder of its own, where a cluster is marked that died without
                # `ray stop`: nothing listens at its address.
                "RAY_TMPDIR": str(ray_tmp),
            },
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while "Ctrl-C stops the server" not in log.read_text():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert "but nothing answers there" in text and "starting a local Ray cluster" in text
        assert f"LLM Proxifier is serving {url}/v1" in text
        assert "chat" in text and f"curl {url}/v1/chat/completions" in text
        # A quiet console: the product's lines, Ray's in the files it names.
        logs = re.search(r"Logs: Ray, Serve and HAProxy in (\S+); llama-server in (\S+) ", text)
        assert logs and Path(logs[1]).is_dir(), text
        assert logs[2] == str(tmp_path / "logs")
        while "chat: ready (loaded in" not in log.read_text():  # the event, as it happens
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
        assert reply.status_code == 200
        llama_pid = httpx.get(f"{url}/admin/models/chat/status").json()["pid"]
        ray_pids = [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        assert llama_pid in ray_pids or psutil.pid_exists(llama_pid)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=120) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
    text = log.read_text()
    assert "stopped" in text
    for noise in ("INFO", "(ServeController", "(ServeReplica", "(ProxyActor", "raylet"):
        assert noise not in text, text
    assert wait_gone(llama_pid)
    for pid in ray_pids:
        assert wait_gone(pid, timeout=30), psutil.Process(pid).cmdline()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_serve_names_a_taken_port_and_what_holds_it(tiny_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump({"models": {"chat": {"model_path": str(tiny_model)}}}))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        command = [str(Path(sys.executable).parent / "proxifier"), "serve", "--config"]
        done = subprocess.run(
            [*command, str(config), "--port", str(port), "--ingress", "python"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )
    assert done.returncode == 3, done.stderr
    assert f"error: port {port} is taken by python" in done.stderr
    assert f"(pid {os.getpid()})" in done.stderr


def test_the_try_it_lines_run_as_printed_with_auth_on_all_interfaces(
    fake_server: Path, tiny_model: Path, tmp_path: Path, repo: Path
) -> None:
    assert shutil.which("curl"), "curl is missing (scripts/setup installs it)"
    (tmp_path / "auth.yaml").write_text(
        yaml.safe_dump({"api_keys": {"user": {"key": "sk-try-it", "permissions": ["models"]}}})
    )
    config = tmp_path / "models.yaml"
    model = {"model_path": str(tiny_model), "llama_server": str(fake_server)}
    config.write_text(
        yaml.safe_dump({"settings": {"auth_file": "auth.yaml"}, "models": {"chat": model}})
    )
    port = free_port()
    command = [str(Path(sys.executable).parent / "proxifier"), "serve", "--config", str(config)]
    command += ["--host", "0.0.0.0", "--port", str(port), "--ingress", "python"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "disabled", "PROXIFIER_HOME": str(tmp_path)}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=repo, env=env)
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops the server" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        banner = next(line for line in text.splitlines() if "LLM Proxifier is serving" in line)
        dashboard = re.search(r"dashboard: (\S+),", banner)
        assert dashboard, banner  # the banner names the dashboard, at an address that answers
        assert httpx.get(dashboard.group(1), timeout=30).status_code == 200
        block = text.split("Try it:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        hint, curl, python = (line.strip() for line in block)
        assert hint == (
            "auth is on: export PROXIFIER_API_KEY=<a key with the models permission> (one of: user)"
        )
        assert "0.0.0.0" not in curl + python
        # No virtual environment active: the line names the interpreter that has the client.
        shell_env = {**env, "PROXIFIER_API_KEY": "sk-try-it", "PATH": "/usr/bin:/bin"}
        shell_env.pop("VIRTUAL_ENV", None)
        assert shlex.split(python)[0] == sys.executable
        answered = subprocess.run(
            ["bash", "-c", curl], capture_output=True, text=True, timeout=120, env=shell_env
        )
        assert answered.returncode == 0, answered.stderr
        assert json.loads(answered.stdout)["object"] == "chat.completion", answered.stdout
        printed = subprocess.run(
            ["bash", "-c", python], capture_output=True, text=True, timeout=120, env=shell_env
        )
        assert printed.returncode == 0 and printed.stdout.strip(), printed.stderr
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=120) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()


def test_two_serves_back_to_back_behind_haproxy_both_come_up(
    fake_server: Path, tiny_model: Path, tmp_path: Path, repo: Path
) -> None:
    """The second starts the moment the first has exited, while the first one's HAProxy may
    still be letting go of its side ports: it waits for them rather than failing."""
    config = tmp_path / "models.yaml"
    model = {"model_path": str(tiny_model), "llama_server": str(fake_server)}
    config.write_text(yaml.safe_dump({"models": {"chat": model}}))
    port = free_port()
    command = [str(Path(sys.executable).parent / "proxifier"), "serve", "--config", str(config)]
    command += ["--port", str(port)]  # the default ingress: HAProxy
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")
    }
    env |= {"RAY_AUTH_MODE": "disabled", "PROXIFIER_HOME": str(tmp_path)}
    env |= haproxy_env(Path(tempfile.mkdtemp(prefix="hp", dir="/tmp")))  # the same for both
    for run in (1, 2):
        log = tmp_path / f"serve-{run}.log"
        with log.open("w") as out:
            server = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=repo, env=env
            )
        try:
            deadline = time.monotonic() + 120
            while "Ctrl-C stops the server" not in log.read_text():
                assert server.poll() is None, f"run {run}: {log.read_text()}"
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            reply = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                timeout=60,
            )
            assert reply.status_code == 200, reply.text
            server.send_signal(signal.SIGINT)
            assert server.wait(timeout=120) == 0, log.read_text()
        finally:
            if server.poll() is None:
                server.kill()
