#!/usr/bin/env python3
"""Benchmark of record: what the proxifier costs on top of llama-server, against its peers.

One run, one machine, the same llama-server processes behind every target:
  direct     llama-server itself (URL and key from a lease),
  haproxy    a bare HAProxy hop in front of it (the haproxy binary Ray ships): any proxy's floor,
  floor      the least a Ray Serve ingress does: a second Serve app in the product's own cluster
             that forwards bytes with aiohttp, no auth/lease/queue (scripts/serve_floor.py),
  litellm    LiteLLM's proxy, 1 worker (`--litellm`; installed into its own venv on first use),
  proxifier  `proxifier serve` on its defaults.
Load comes from `wrk` (C, so the client costs little) with a Lua body; targets alternate within
each round so a drifting machine drifts for all of them alike. For each workload (chat JSON,
chat streamed, embeddings) and connection count it reports requests/s, p50/p99, the share of
direct, the latency added, and the CPU per request beyond llama-server: the machine's busy time
(/proc/stat) minus llama-server's and wrk's own, per request. Streams add time to first token
(a Python client at one connection), and `cold` times a model's first answer after a spawn by
hand against a request to a stopped model through the proxifier.

usage: .venv/bin/python scripts/bench_proxy.py [--seconds S] [--rounds R] [--connections 1,8,32]
            [--workloads json,stream,embed,cold] [--litellm] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its targets, beside it

from bench_targets import (  # noqa: E402  (scripts/ is on sys.path: see above)
    LITELLM_KEY,
    PAUSED,
    free_port,
    leases,
    start_floor,
    start_haproxy,
    start_litellm,
    start_proxifier,
)

from proxifier.llama import find_llama_server  # noqa: E402

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")
TARGETS = ("direct", "haproxy", "floor", "litellm", "proxifier")
COLD_SPACING = 8.0  # seconds of quiet before each cold start
SETTLE = 10.0  # seconds between the product's start and the first measurement

# wrk posts BENCH_BODY and prints one JSON line of its own figures when done.
WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then wrk.headers["Authorization"] = auth end
done = function(summary, latency, requests)
  local e = summary.errors
  io.stderr:write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"failed": %d, "closed": %d, "non2xx": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.write + e.timeout, e.read, e.status))
end
"""


# ------------------------------------------------------------------ CPU accounting
def machine_busy_ticks(stat: str | None = None) -> int:
    """Busy clock ticks of all cores since boot (everything but idle and iowait)."""
    text = stat if stat is not None else Path("/proc/stat").read_text()
    fields = [int(x) for x in text.splitlines()[0].split()[1:]]
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)


def process_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks; 0 when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])  # fields 14 and 15 of proc(5)


def pids_named(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def cpu_ms_per_request(busy_ticks: int, llama_ticks: int, client_ms: float, requests: int) -> float:
    """Machine CPU beyond llama-server's and the load generator's own, per request."""
    if requests <= 0:
        return float("nan")
    return ((busy_ticks - llama_ticks) * TICK_MS - client_ms) / requests


# ------------------------------------------------------------------ load
@dataclass
class Run:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    failed: int  # errors and non-2xx answers
    closed: int  # connections the server closed under wrk (llama-server does after a stream)
    cpu_ms: float  # per request, beyond llama-server and wrk


def parse_wrk(stderr: str) -> dict[str, Any]:
    for line in stderr.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[len("BENCH ") :])
    raise RuntimeError(f"wrk printed no summary:\n{stderr[-2000:]}")


def run_wrk(
    url: str, body: bytes, auth: str, connections: int, seconds: float, script: Path
) -> Run:
    env = {**os.environ, "BENCH_BODY": body.decode(), "BENCH_AUTH": auth}
    argv = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "60s", "-s", str(script), url]  # fmt: skip
    llamas = pids_named("llama-server")
    with tempfile.TemporaryFile() as err:
        llama_before = sum(process_ticks(p) for p in llamas)
        busy_before = machine_busy_ticks()
        process = subprocess.Popen(argv, env=env, stdout=err, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        busy = machine_busy_ticks() - busy_before
        llama = sum(process_ticks(p) for p in llamas) - llama_before
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{text[-2000:]}")
    figures = parse_wrk(text)
    wrk_ms = (usage.ru_utime + usage.ru_stime) * 1000
    requests = figures["requests"]
    return Run(
        requests=requests,
        seconds=figures["duration_us"] / 1e6,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        failed=figures["failed"] + figures["non2xx"],
        closed=figures["closed"],
        cpu_ms=cpu_ms_per_request(busy, llama, wrk_ms, requests),
    )


@dataclass
class Cell:
    runs: list[Run] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return sum(r.requests for r in self.runs) / sum(r.seconds for r in self.runs)

    @property
    def p50(self) -> float:
        return statistics.median(r.p50_ms for r in self.runs)

    @property
    def p99(self) -> float:
        return statistics.median(r.p99_ms for r in self.runs)

    @property
    def cpu(self) -> float:
        total = sum(r.requests for r in self.runs)
        return sum(r.cpu_ms * r.requests for r in self.runs) / total if total else float("nan")

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.runs)

    @property
    def closed(self) -> int:
        return sum(r.closed for r in self.runs)


def first_token_ms(url: str, body: dict[str, Any], auth: str, count: int) -> float:
    """Median time to the first content chunk of a streamed chat, one request at a time, each
    on a new connection (llama-server closes one after a stream anyway). A bare socket, like
    wrk's C: an HTTP client library costs more per chunk than the difference measured here
    (httpx added ~4 ms to the proxifier's figure and not to direct's)."""
    host, port = url.removeprefix("http://").split("/", 1)[0].rsplit(":", 1)
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", "Connection: close"]  # fmt: skip
    if auth:
        head.append(f"Authorization: {auth}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + data
    times = []
    for _ in range(count + 5):  # the first few warm up
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            sock.sendall(request)
            seen, first = b"", None
            while chunk := sock.recv(65536):
                seen += chunk
                if first is None and b'"content":"' in seen:
                    first = (time.perf_counter() - started) * 1e3
            if b" 200 " not in seen.split(b"\r\n", 1)[0]:
                raise RuntimeError(f"{url} answered {seen[:200]!r}")
        times.append(first if first is not None else (time.perf_counter() - started) * 1e3)
    return statistics.median(times[5:])


def measuring(target: str) -> None:
    for name, group in PAUSED.items():
        os.killpg(group, signal.SIGCONT if name == target else signal.SIGSTOP)


# ------------------------------------------------------------------ cold start
def cold_by_hand(where: Path, model: Path, parallel: int) -> float:
    """Seconds from spawning llama-server to its first chat answer, /health polled every 5 ms."""
    port = free_port()
    argv = [find_llama_server(), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-c", "4096", "-np", str(parallel)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=30) as client, where.open("ab") as log:
        began = time.perf_counter()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None:
                    raise RuntimeError(f"llama-server exited ({where})")
                time.sleep(0.005)
            client.post(f"{url}/v1/chat/completions", json=chat_body(8)).raise_for_status()
            return time.perf_counter() - began
        finally:
            process.terminate()
            process.wait()


def cold_through_proxifier(url: str) -> tuple[float, dict[str, float]]:
    """Seconds from a chat request for a stopped model to its answer, and the phases of its
    start as the `ready` event reports them."""
    model = f"{url}/admin/models/tiny-cold"
    with httpx.Client(timeout=120) as client:
        if client.get(f"{model}/status").json()["state"] != "stopped":
            client.post(f"{model}/stop").raise_for_status()
        while client.get(f"{model}/status").json()["state"] != "stopped":
            time.sleep(0.05)
        seen = client.get(f"{url}/admin/events").json()["events"]
        since = seen[-1]["seq"] if seen else -1
        began = time.perf_counter()
        client.post(
            f"{url}/v1/chat/completions", json={**chat_body(8), "model": "tiny-cold"}
        ).raise_for_status()
        took = time.perf_counter() - began
        events = client.get(f"{url}/admin/events", params={"since": since}).json()["events"]
    ready = [e for e in events if e["kind"] == "ready" and e.get("model") == "tiny-cold"]
    return took, ready[-1].get("phases", {}) if ready else {}


# ------------------------------------------------------------------ the run
def chat_body(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


WORKLOADS = {
    "json": ("/v1/chat/completions", "tiny"),
    "stream": ("/v1/chat/completions", "tiny"),
    "embed": ("/v1/embeddings", "tiny-embed"),
}


def body_for(workload: str, model: str, max_tokens: int) -> dict[str, Any]:
    if workload == "embed":
        return {"model": model, "input": "hello world"}
    return {**chat_body(max_tokens, stream=workload == "stream"), "model": model}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3, help="per target and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", default="1,8,32")
    parser.add_argument("--workloads", default="json,stream,embed,cold")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=4, help="llama-server -np")
    parser.add_argument("--cold-rounds", type=int, default=5)
    parser.add_argument("--litellm", action="store_true", help="add LiteLLM (installs it once)")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for `proxifier serve` (to try a setting)",
    )
    args = parser.parse_args()

    if shutil.which("wrk") is None:
        install_wrk()
    workloads = args.workloads.split(",")
    connections = [int(c) for c in args.connections.split(",")]
    wanted = [t for t in args.targets.split(",") if t != "litellm" or args.litellm]
    home = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    script = home / "post.lua"
    script.write_text(WRK_SCRIPT)
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(f"bench_proxy {time.strftime('%Y-%m-%d')} commit {commit}, {os.cpu_count()} cores, "
          f"llama-server -np {args.parallel}, max_tokens {args.max_tokens}, "
          f"{args.rounds} x {args.seconds:g} s per cell; logs in {home}", flush=True)  # fmt: skip

    results: dict[str, Any] = {"commit": commit, "cells": [], "cold": {}, "ttft": {}}
    with ExitStack() as stack:
        env = dict(item.split("=", 1) for item in args.env)
        product, _ = start_proxifier(home, stack, args.parallel, env)
        # Settled, as after any start: the product starts a spare Ray worker (a second of
        # CPU) 5 s after its models loaded.
        time.sleep(SETTLE)
        where = leases(home)
        urls = {"direct": where, "proxifier": product}
        if "haproxy" in wanted:
            urls["haproxy"] = start_haproxy(home, stack, where)
        if "floor" in wanted:
            urls["floor"] = start_floor(product, where)
        if "litellm" in wanted:
            urls["litellm"] = start_litellm(home, stack, where)
        names = [t for t in TARGETS if t in wanted]

        def address(target: str, path: str, model: str) -> tuple[str, str]:
            if target == "direct":
                return f"{where[model]['url']}{path}", f"Bearer {where[model]['key']}"
            auth = f"Bearer {LITELLM_KEY}" if target == "litellm" else ""
            return f"{urls[target]}{path}", auth

        print(f"\n{'load':<7}{'conn':>5} {'target':<10}{'req/s':>8}{'share':>7}{'p50 ms':>8}"
              f"{'added':>8}{'p99 ms':>8}{'CPU ms/req':>11}", flush=True)  # fmt: skip
        for workload in (w for w in workloads if w in WORKLOADS):
            path, model = WORKLOADS[workload]
            body = json.dumps(body_for(workload, model, args.max_tokens)).encode()
            for target in names:  # warm each target (connections, the model's cache)
                url, auth = address(target, path, model)
                measuring(target)
                run_wrk(url, body, auth, 1, 1, script)
            for conns in connections:
                cells = {t: Cell() for t in names}
                for _ in range(args.rounds):
                    for target in names:
                        url, auth = address(target, path, model)
                        measuring(target)
                        cells[target].runs.append(
                            run_wrk(url, body, auth, conns, args.seconds, script)
                        )
                direct = cells["direct"]
                for target in names:
                    cell = cells[target]
                    row = {
                        "workload": workload,
                        "connections": conns,
                        "target": target,
                        "rps": cell.rps,
                        "share": cell.rps / direct.rps,
                        "p50_ms": cell.p50,
                        "added_p50_ms": cell.p50 - direct.p50,
                        "p99_ms": cell.p99,
                        "cpu_ms": cell.cpu,
                        "failed": cell.failed,
                        "closed": cell.closed,
                    }
                    results["cells"].append(row)
                    failed = f"  ({cell.failed} failed)" if cell.failed else ""
                    if cell.closed:
                        failed += f"  ({cell.closed} connections closed by the server)"
                    print(f"{workload:<7}{conns:>5} {target:<10}{cell.rps:>8.1f}"
                          f"{row['share']:>7.2f}{cell.p50:>8.2f}{row['added_p50_ms']:>+8.2f}"
                          f"{cell.p99:>8.2f}{cell.cpu:>11.2f}{failed}", flush=True)  # fmt: skip
            if workload == "stream":
                for target in names:
                    url, auth = address(target, path, model)
                    measuring(target)
                    try:
                        results["ttft"][target] = first_token_ms(
                            url, body_for("stream", model, args.max_tokens), auth, 50
                        )
                    except (OSError, RuntimeError) as error:  # one target, not the whole run
                        print(f"time to first token of {target}: {error}", flush=True)
                        results["ttft"][target] = float("nan")
                base = results["ttft"]["direct"]
                print("time to first token, 1 connection: " + ", ".join(
                    f"{t} {ms:.2f} ms ({ms - base:+.2f})" for t, ms in results["ttft"].items()
                ), flush=True)  # fmt: skip
        if "cold" in workloads:
            measuring("proxifier")
            by_hand, through, phases = [], [], collections.defaultdict(list)
            for _ in range(args.cold_rounds):
                # A stopped model's next request comes after its idle timeout, not seconds
                # after its last start: the rounds leave the machine quiet in between (the
                # product replaces a node's spare worker 5 s after a start).
                time.sleep(COLD_SPACING)
                by_hand.append(
                    cold_by_hand(home / "cold.log", REPO / "models" / "tiny.gguf", args.parallel)
                )
                time.sleep(COLD_SPACING)
                took, reported = cold_through_proxifier(product)
                through.append(took)
                for phase, seconds in reported.items():
                    phases[phase].append(seconds)
            hand, proxied = statistics.median(by_hand), statistics.median(through)
            median_phases = {p: statistics.median(v) for p, v in phases.items()}
            results["cold"] = {
                "by_hand_s": hand,
                "proxifier_s": proxied,
                "added_s": proxied - hand,
                "phases_s": median_phases,
            }
            print(f"\ncold start (median of {args.cold_rounds}): llama-server by hand "
                  f"{hand:.3f} s, through the proxifier {proxied:.3f} s, "
                  f"added {proxied - hand:+.3f} s; its phases: " + ", ".join(
                      f"{p} {s * 1000:.0f} ms" for p, s in median_phases.items()
                  ), flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def install_wrk() -> None:
    """wrk is a Debian package; installed when this runs as root, else the command to run."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit("wrk is not installed: `sudo apt-get install -y wrk`")
    print("installing wrk (apt-get)", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True)


if __name__ == "__main__":
    sys.exit(main())
