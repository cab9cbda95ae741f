"""The product on hosts made of namespaces (tests/multihost/hosts.py), set up as a user does it:
`ray start --head` on the head, `ray start --address HEAD:6379` on each GPU worker with its
fake GPUs and labels, `proxifier serve --address HEAD:6379 --host 0.0.0.0` on the head with
auth on, and a client on a host of its own.

The test process stays outside every namespace; it reaches the client host through a Unix
socket (`socat` in the client's namespace forwards each connection to the head's port), so
every request it sends crosses the bridge as a remote client's would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.multihost.hosts import Hosts

VENV = Path(sys.executable).parent
PORT = 8000
# Ray's node health checks at test speed (Ray's own network-failure tests use 1 s x 2); the
# product's own timeouts stay at their defaults.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "2",
    "RAY_USAGE_STATS_ENABLED": "0",
}
MARKER = Path("/tmp/ray/ray_current_cluster")  # `ray start --head` notes itself here


@dataclass
class Worker:
    gpus: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)


class ProductOnHosts:
    """Ray on every host, the product on the head, a client door; faults through `net`."""

    def __init__(
        self,
        net: Hosts,
        workers: Mapping[str, Worker],
        head: str = "head",
        store: str | None = None,
        ray_env: Mapping[str, str] | None = None,
    ) -> None:
        self.net, self.workers, self.head = net, dict(workers), head
        self.ray_env = {**RAY_ENV, **(ray_env or {})}  # on every host's Ray
        self.store = store  # the host that runs Redis for GCS fault tolerance, if any
        self.key = "px-" + secrets.token_urlsafe(24)
        self.door = net.root / "client.sock"
        self.serve_log = net[head].root / "serve.log"
        self._marker = MARKER.read_bytes() if MARKER.exists() else None

    @property
    def head_address(self) -> str:
        return f"{self.net[self.head].ip}:6379"

    def env(self, host: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        home = self.net[host].root / "home"
        home.mkdir(parents=True, exist_ok=True)
        return {**self.ray_env, "PROXIFIER_HOME": str(home), **(extra or {})}

    # ------------------------------------------------------------------ Ray
    def ray_start(self, host: str) -> None:
        h = self.net[host]
        temp = self.net.temp_dir(host)
        argv = [
            str(VENV / "ray"), "start", "--node-ip-address", h.ip, "--temp-dir", str(temp),
            "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats",
        ]  # fmt: skip
        env = self.env(host)
        if host == self.head:
            argv += ["--head", "--port", "6379", "--num-cpus", "2", "--num-gpus", "0",
                     "--include-dashboard", "false"]  # fmt: skip
            env.update(self.gcs_env())
        else:
            worker = self.workers[host]
            labels = ",".join(f"{k}={v}" for k, v in {"host": host, **worker.labels}.items())
            argv += ["--address", self.head_address, "--num-cpus", "1",
                     "--num-gpus", str(worker.gpus), "--labels", labels]  # fmt: skip
        self.net.run(host, argv, env=env)

    def gcs_env(self) -> dict[str, str]:
        """GCS fault tolerance as Ray documents it, for the head's GCS: its tables in Redis,
        under a namespace of this cluster's own (nothing without a Redis host)."""
        if self.store is None:
            return {}
        return {
            "RAY_REDIS_ADDRESS": f"{self.net[self.store].ip}:6379",
            "RAY_external_storage_namespace": self.net.prefix,
        }

    def start_redis(self) -> None:
        assert self.store is not None
        h = self.net[self.store]
        self.net.start(
            self.store,
            ["redis-server", "--bind", h.ip, "--port", "6379", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--dir", str(h.root)],
            "redis.log",
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while "PONG" not in self._redis_ping():
            assert time.monotonic() < deadline, "redis-server did not come up"
            time.sleep(0.1)  # an outside process starting: nothing to await

    def _redis_ping(self) -> str:
        assert self.store is not None
        with contextlib.suppress(RuntimeError):
            ip = self.net[self.store].ip
            return self.net.run(self.store, ["redis-cli", "-h", ip, "-p", "6379", "ping"])
        return ""

    def kill_gcs(self) -> list[str]:
        """SIGKILL the head's GCS server; returns its command line, to start it again."""
        (pid,) = self.net.processes(self.head, "gcs_server")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        os.kill(pid, 9)
        return [a.decode() for a in argv]

    def start_gcs(self, argv: list[str]) -> None:
        """The GCS server again, as Ray started it (KubeRay would restart the head's pod)."""
        env = {**self.env(self.head), **self.gcs_env()}
        self.net.start(self.head, argv, "gcs-again.log", env=env)

    # ------------------------------------------------------------------ the product
    def serve(self, models: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
        root = self.net[self.head].root
        auth = root / "auth.yaml"
        auth.write_text(
            yaml.safe_dump(
                {"enabled": True, "api_keys": {"ops": {"key": self.key, "permissions": ["admin"]}}}
            )
        )
        config = root / "models.yaml"
        full = {"settings": {"auth_file": str(auth), **(settings or {})}, "models": models}
        config.write_text(yaml.safe_dump(full))
        self.net.start(
            self.head,
            [str(VENV / "proxifier"), "serve", "--config", str(config),
             "--address", self.head_address, "--host", "0.0.0.0", "--port", str(PORT)],
            "serve.log",
            env=self.env(self.head, {"PROXIFIER_API_KEY": self.key}),
        )  # fmt: skip
        self.net.start(
            "client",
            ["socat", f"UNIX-LISTEN:{self.door},fork,reuseaddr,unlink-early",
             f"TCP:{self.net[self.head].ip}:{PORT}"],
            "door.log",
        )  # fmt: skip

    def _as_client(self, timeout: float) -> dict[str, Any]:
        """A client on the client host, with the admin key (httpx.Client's arguments)."""
        return {
            "base_url": f"http://{self.net[self.head].ip}:{PORT}",
            "headers": {"Authorization": f"Bearer {self.key}"},
            "timeout": timeout,
        }

    def client(self, timeout: float = 30.0) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.door))
        return httpx.Client(transport=transport, **self._as_client(timeout))

    def async_client(self, timeout: float = 30.0) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(self.door))
        limits = httpx.Limits(max_connections=64)
        return httpx.AsyncClient(transport=transport, limits=limits, **self._as_client(timeout))

    def wait_until(self, what: str, check: Callable[[], bool], deadline: float) -> float:
        """Poll `check` (each poll bounded by its client's timeout) until true; seconds taken.
        Past `deadline` seconds the wait fails, naming `what` and the serve log's tail."""
        start = time.monotonic()
        while True:
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError, KeyError):
                if check():
                    return time.monotonic() - start
            if time.monotonic() - start > deadline:
                raise AssertionError(f"{what}: not within {deadline} s\n{self.log_tail()}")
            time.sleep(0.2)  # polling an outside system: there is no event to await

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.serve_log.read_text(errors="replace").splitlines()
            return "serve.log:\n" + "\n".join(text[-lines:])
        return "(no serve.log)"

    def nodes(self, http: httpx.Client) -> list[dict[str, Any]]:
        return http.get("/admin/cluster").raise_for_status().json()["nodes"]

    def alive_hosts(self, http: httpx.Client) -> set[str]:
        """The hosts Ray counts alive, by their `host` label (the head has none)."""
        return {n["labels"].get("host", self.head) for n in self.nodes(http) if n.get("alive")}

    def models(self, http: httpx.Client) -> dict[str, dict[str, Any]]:
        answer = http.get("/admin/models/status").raise_for_status().json()
        entries = answer.get("models", answer)
        if isinstance(entries, dict):
            return entries
        return {m["name"]: m for m in entries}

    def where(self, http: httpx.Client, model: str) -> str | None:
        """The host a model's llama-server runs on (by its address), or None."""
        host_ip = self.models(http).get(model, {}).get("host")
        return next((h.name for h in self.net.hosts.values() if h.ip == host_ip), None)

    def llama_servers(self) -> dict[str, list[int]]:
        """Per host, the PIDs of the fake llama-server processes running there."""
        return {name: self.net.processes(name, "fake-llama-server") for name in self.net.hosts}

    def held(self, http: httpx.Client, models: list[str]) -> dict[str, tuple[int, int]]:
        """Per model with any: (slots taken, requests queued)."""
        queues = {m: http.get(f"/admin/queue/{m}/status").json() for m in models}
        taken = {m: (q["in_flight"], q["depth"]) for m, q in queues.items()}
        return {m: counts for m, counts in taken.items() if any(counts)}

    def assert_quiet(self, http: httpx.Client, models: list[str]) -> None:
        """After the faults healed: every model answers, no slot or queue place is held, and
        in every host exactly the llama-servers of live model actors run (no orphan, no
        zombie instance, no duplicate)."""
        for model in models:
            answer = http.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert answer.status_code == 200, (model, answer.text)
        # (A replica holds a finished slot a moment for its next request: lease_hold.)
        self.wait_until("no slot or queue place is held", lambda: not self.held(http, models), 30)
        owned: dict[str, list[int]] = {name: [] for name in self.net.hosts}
        for name, status in self.models(http).items():
            host = self.where(http, name)
            if host is not None and status.get("pid"):
                owned[host].append(status["pid"])
        running = self.llama_servers()
        assert {h: sorted(p) for h, p in running.items()} == {
            h: sorted(p) for h, p in owned.items()
        }

    def stop(self) -> None:
        """Ctrl-C to serve (it stops its models), then every host's processes go with it."""
        head = self.net[self.head]
        for proc in head.procs[:1]:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(2)
                with contextlib.suppress(Exception):
                    proc.wait(timeout=60)
        if self._marker is not None:
            MARKER.write_bytes(self._marker)
        else:
            with contextlib.suppress(OSError):
                MARKER.unlink()


def dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))


@contextlib.contextmanager
def product_on(
    net: Hosts,
    workers: Mapping[str, Worker],
    store: str | None = None,
    ray_env: Mapping[str, str] | None = None,
) -> Iterator[ProductOnHosts]:
    product = ProductOnHosts(net, workers, store=store, ray_env=ray_env)
    try:
        if store is not None:
            product.start_redis()
        product.ray_start(product.head)
        for worker in workers:
            product.ray_start(worker)
        yield product
    finally:
        product.stop()
        os.sync()
