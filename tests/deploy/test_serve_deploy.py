"""`serve deploy configs/serve.yaml` on a running cluster (`ray start --head`), as an operator
does it: the file's own runtime env turns HAProxy and the hardening hook on, its relative
`configs/demo.yaml` is found though nothing runs in the repository, the tiny model answers on
the real llama-server, and `serve shutdown` leaves no llama-server behind (issue 16).

The cluster is this test's alone: its own temp dir, free ports (Serve's HAProxy side ports and
files included: other clusters run on this machine) and its own session, which is how it is
stopped. Never `ray stop`: that stops every Ray cluster on the machine."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from openai import OpenAI

from tests.deploy.manifests import REPO, SERVE_YAML
from tests.helpers import free_port, haproxy_env, wait_gone

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent  # the venv's `ray` and `serve`
# Kill the proxifier controller the way a crash would (Ray restarts it), then wait until the
# new one runs and has heard again, from the ingress's health checks, which app it serves.
RESTART_CONTROLLER = """
import sys, time
import ray
ray.init(address=sys.argv[1], namespace="proxifier", log_to_driver=False)
from actors.controller import get_controller
controller = get_controller()
before = ray.get(controller.pid.remote(), timeout=60)
ray.kill(controller, no_restart=False)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        if ray.get(controller.pid.remote(), timeout=10) != before:
            break
    except Exception:
        pass
    time.sleep(0.2)
while time.monotonic() < deadline:
    events = ray.get(controller.events_since.remote(), timeout=30)
    watched = [e["application"] for e in events if e["kind"] == "serve_app_watched"]
    if watched:
        print("WATCHED " + " ".join(watched), flush=True)
        break
    time.sleep(0.2)
"""
HI = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
STARTUP = 120.0  # seconds: `ray start` takes ~7 s on a quiet 2-core machine, far more on a busy one


@dataclass
class Head:
    process: subprocess.Popen[bytes]
    dashboard: str
    env: dict[str, str]
    log: Path
    gcs: str  # host:port, for a Python driver

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: `ray start` leads a session of its own, and Ray's
        daemons, workers (each its own process group), HAProxy and llama-server stay in it."""
        return session_processes(self.process.pid)

    def python(self, code: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """A short driver on this cluster: `code` gets the GCS address as sys.argv[1]."""
        return subprocess.run(
            [sys.executable, "-c", code, self.gcs],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=REPO,
        )

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(BIN / "serve"), *args, "--address", self.dashboard],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=self.log.parent,
        )
        assert done.returncode == 0, f"serve {args[0]}: {done.stdout}\n{done.stderr}"
        return done


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
    return found


def stop_session(head: subprocess.Popen[bytes]) -> None:
    """SIGTERM every process of the cluster's session (what `ray stop` does, for this cluster
    only), SIGKILL what is left after a grace period."""
    members = session_processes(head.pid)
    for process in members:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=20)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=10)
    leftover = session_processes(head.pid)
    assert not leftover, [p.cmdline() for p in leftover]


def until(predicate: Callable[[], bool], timeout: float, every: float = 0.25) -> None:
    """tests.helpers.wait_for at a gentler pace: each check here is an HTTP request through
    the cluster under test, which shares the machine's two cores."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: its wait is the interval between checks
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached in {timeout:g} s")
        pause.wait(every)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def head(tmp_path: Path, real_server: str, tiny_model: Path) -> Iterator[Head]:
    # Short: Ray's unix socket paths (temp dir + session + sockets/...) must fit in 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))
    home = tmp_path / "home"  # PROXIFIER_HOME: model logs here, llama-server where it looks
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "llama-server").symlink_to(real_server)
    env = {
        k: v
        for k, v in os.environ.items()
        # Serve's settings must come from serve.yaml itself, not from this shell (conftest
        # sets them in the test process for its own cluster).
        if k not in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")
    }
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "PROXIFIER_HOME": str(home),
            # Replicas behind HAProxy hold on 30 s before they stop; no client is left here.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        }
        | haproxy_env(temp / "haproxy")
    )
    dashboard_port = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    command = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus"]
    command += ["0", "--temp-dir", str(temp), "--dashboard-host", "127.0.0.1"]
    command += ["--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())]
    log = tmp_path / "ray-start.log"
    with log.open("wb") as out:
        # Its own session: the handle on every process of this cluster, and nothing else.
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            return answers(f"{dashboard}/api/serve/applications/")

        until(ready, timeout=STARTUP)
        yield Head(process, dashboard, env, log, f"127.0.0.1:{ports['--port']}")
    finally:
        stop_session(process)
        shutil.rmtree(temp, ignore_errors=True)


def checked_in_serve_yaml(path: Path, port: int) -> Path:
    """configs/serve.yaml with only the HTTP port changed (8000 may be taken here); its
    relative `config: configs/demo.yaml` stays as it is: finding it is part of the test."""
    config = yaml.safe_load(SERVE_YAML.read_text())
    config["http_options"]["port"] = port
    assert config["applications"][0]["args"]["config"] == "configs/demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def model_status(url: str, model: str) -> dict[str, Any]:
    try:
        reply = httpx.get(f"{url}/admin/models/{model}/status", timeout=30)
    except httpx.TransportError:
        return {}
    return reply.json() if reply.status_code == 200 else {}


def llama_servers(head: Head) -> list[int]:
    return [p.pid for p in head.processes() if p.name() == "llama-server"]


def test_serve_deploy_of_the_checked_in_config(head: Head, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The cluster runs in tmp_path: a relative path found there would not be the repository's.
    assert not (tmp_path / "configs").exists() and (REPO / "configs" / "demo.yaml").is_file()
    deployed = head.cli("deploy", str(checked_in_serve_yaml(tmp_path / "serve.yaml", port)))
    assert "Sent deploy request successfully" in deployed.stdout + deployed.stderr

    # demo.yaml's tiny-chat starts at boot; the app answers once Serve has it running.
    until(lambda: model_status(url, "tiny-chat").get("state") == "ready", timeout=STARTUP)

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(**HI)
    assert raw.http_response.status_code == 200
    assert raw.parse().choices[0].message.content is not None

    # The file's controller_options started Serve in HAProxy mode...
    assert any(p.name() == "haproxy" for p in head.processes()), "no HAProxy: env not applied"
    # ...and the worker setup hook runs where HTTP arrives: in the replicas (HAProxy's usual
    # target) and in Serve's own proxy (HAProxy's fallback while no replica is up). A client's
    # 1 ms timeout is ignored there; without the hook Serve answers 408 long before the model.
    fallback = f"http://127.0.0.1:{head.env['RAY_SERVE_FALLBACK_PROXY_HTTP_PORT']}"
    for where in (url, fallback):
        reply = httpx.post(
            f"{where}/v1/chat/completions",
            json=HI,
            headers={"x-request-timeout-seconds": "0.001"},
            timeout=60,
        )
        assert reply.status_code == 200, f"{where}: {reply.text}"

    started = llama_servers(head)
    assert model_status(url, "tiny-chat")["pid"] in started
    # Ray restarts a controller that died; the new one must know again what to watch (the
    # replicas say it at their health checks), or the shutdown below would leave the models.
    restarted = head.python(RESTART_CONTROLLER)
    assert "WATCHED proxifier" in restarted.stdout, restarted.stdout + restarted.stderr
    shutdown = head.cli("shutdown", "-y")  # exits 0 even when it fails: read what it said
    assert "Sent shutdown request" in shutdown.stdout + shutdown.stderr
    until(lambda: not answers(f"{url}/health"), timeout=60)
    # A model stops within settings.stop_grace (10 s) of being told to.
    left = [pid for pid in started if not wait_gone(pid, timeout=30)]
    assert not left, f"llama-server {left} outlived `serve shutdown`"
