#!/usr/bin/env python3
"""Benchmark: what replicas buy (issue 23). One `proxifier serve`, three models on the fake
llama-server whose answers take a fixed time (it sleeps between tokens: little CPU), one slot
each, 1, 2 and 4 replicas; the same number of clients on each, in alternating rounds. Reports
requests/s, the throughput ratio per doubling (target >= 1.8) and the queue wait's p95 (a
request's time beyond the fastest answer of its model in that round).

usage: .venv/bin/python scripts/bench_replicas.py [--clients 8] [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench_targets import free_port, started, wait_http  # noqa: E402

COUNTS = (1, 2, 4)
TOKENS = 8
TOKEN_DELAY = 0.05  # seconds per token: an answer takes 0.4 s of sleeping


def config(port: int) -> dict[str, object]:
    fake = {
        "model_path": str(REPO / "models" / "tiny.gguf"),
        "llama_server": str(REPO / "tests" / "fakes" / "fake-llama-server"),
        "num_gpus": 0,
        "parallel": 1,
        "env": {"FAKE_LLAMA_TOKEN_DELAY": str(TOKEN_DELAY)},
    }
    models = {f"r{n}": {**fake, "replicas": n} for n in COUNTS}
    return {"settings": {"port": port, "queue": {"queue_timeout": 120}}, "models": models}


def ask(url: str, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    began = time.monotonic()
    answer = httpx.post(
        f"{url}/v1/chat/completions", json={**body, "max_tokens": TOKENS}, timeout=300
    )
    answer.raise_for_status()
    return time.monotonic() - began


def load(url: str, model: str, clients: int, seconds: float) -> tuple[int, list[float]]:
    """Every client asks again as soon as it is answered, for `seconds`: how many answers
    came within them (the ones still queued at the end would flatter a slower setup), and
    the times every answer took."""
    answers: list[tuple[float, float]] = []  # (when it came, how long it took)
    stop = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop:
            took = ask(url, model)
            answers.append((time.monotonic(), took))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    within = sum(1 for came, _ in answers if came <= stop)
    return within, [took for _, took in answers]


def ready(url: str, model: str, count: int) -> bool:
    status = httpx.get(f"{url}/admin/models/{model}/status", timeout=30).json()
    replicas = status.get("replicas") or ([status] if status.get("state") == "ready" else [])
    return sum(1 for r in replicas if r["state"] == "ready") == count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        home = Path(folder)
        port = free_port()
        (home / "models.yaml").write_text(yaml.safe_dump(config(port)))
        proxifier = str(Path(sys.executable).parent / "proxifier")
        process = stack.enter_context(
            started(
                [proxifier, "serve", "--config", str(home / "models.yaml")],
                home / "serve.log",
                env={**os.environ, "PROXIFIER_HOME": str(home)},
            )
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", "proxifier serve", 300, process)
        for n in COUNTS:
            ask(url, f"r{n}")  # starts it; the scaler adds its other replicas
            give_up = time.monotonic() + 120
            while not ready(url, f"r{n}", n):
                if time.monotonic() > give_up:
                    raise RuntimeError(f"r{n} did not get {n} ready replicas")
                time.sleep(0.5)
        print(f"{args.clients} clients, answers of {TOKENS * TOKEN_DELAY:.2f} s, one slot each")
        done: dict[int, list[float]] = {n: [] for n in COUNTS}
        rates: dict[int, list[float]] = {n: [] for n in COUNTS}
        for _ in range(args.rounds):
            for n in COUNTS:
                within, times = load(url, f"r{n}", args.clients, args.seconds)
                rates[n].append(within / args.seconds)
                fastest = min(times)
                done[n] += [t - fastest for t in times]
        print(f"{'replicas':>8} {'req/s':>7} {'x prev':>7} {'wait p95 s':>11}")
        previous = None
        for n in COUNTS:
            rate = statistics.mean(rates[n])
            waits = sorted(done[n])
            p95 = waits[int(0.95 * (len(waits) - 1))]
            ratio = f"{rate / previous:.2f}" if previous else "-"
            print(f"{n:>8} {rate:>7.2f} {ratio:>7} {p95:>11.2f}")
            previous = rate
    return 0


if __name__ == "__main__":
    sys.exit(main())
