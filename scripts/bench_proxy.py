#!/usr/bin/env python3
"""Benchmark: what the product adds on top of llama-server, measured in one process.

Starts a local Ray cluster, deploys the product with the tiny model on the real llama-server,
plus a trivial Serve endpoint (Serve's own floor), then sends the same chat requests
  direct     straight to llama-server (URL and key from a lease),
  proxy      through the product,
  floor      to the trivial endpoint (no model: what Ray Serve alone costs),
non-streamed and streamed, at concurrency 1, 8 and 32, and prints requests/s, p50/p99 latency,
time to first token, and the ratios and differences to `direct`.

usage: .venv/bin/python scripts/bench_proxy.py [--seconds S] [--rounds R] [--max-tokens N]
                                                [--lease-hold S]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[float, float]:
    """(latency, time to first token) of one request, in seconds. Like the product's own
    upstream client, it retries once when a pooled connection turns out closed (llama-server
    closes keep-alive connections now and then), so `direct` is not penalised for it."""
    try:
        return await _one(client, url, body, headers)
    except httpx.RemoteProtocolError:
        return await _one(client, url, body, headers)


async def _one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[float, float]:
    started = time.perf_counter()
    first = None
    if body.get("stream"):
        async with client.stream("POST", url, json=body, headers=headers) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if (
                    first is None
                    and line.startswith("data: {")
                    and '"content":"' in line.replace(" ", "")
                ):
                    first = time.perf_counter() - started
    else:
        response = await client.post(url, json=body, headers=headers)
        response.raise_for_status()
    latency = time.perf_counter() - started
    return latency, first if first is not None else latency


async def load(
    url: str, body: dict[str, Any], headers: dict[str, str], concurrency: int, seconds: float
) -> dict[str, Any]:
    """`concurrency` clients sending `body` back to back for `seconds`."""
    latencies: list[float] = []
    firsts: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    stop_at = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)) as client:
        await one(client, url, body, headers)  # warm the connection and the model

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                try:
                    latency, first = await one(client, url, body, headers)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append(latency)
                firsts.append(first)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return {"latencies": latencies, "firsts": firsts, "elapsed": elapsed, "errors": errors}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds pooled: requests/s over the time of all rounds, percentiles over all requests."""
    latencies = [x for run in runs for x in run["latencies"]]
    firsts = [x for run in runs for x in run["firsts"]]
    errors: collections.Counter[str] = sum((run["errors"] for run in runs), collections.Counter())
    return {
        "rps": len(latencies) / sum(run["elapsed"] for run in runs),
        "p50": pct(latencies, 0.5) * 1e3,
        "p99": pct(latencies, 0.99) * 1e3,
        "ttft": pct(firsts, 0.5) * 1e3,
        "errors": errors,
        "n": len(latencies),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per target and round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per cell; targets alternate in each"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--lease-hold", type=float, help="settings.queue.lease_hold (default: the product's)"
    )
    args = parser.parse_args()

    import ray
    from fastapi import FastAPI
    from ray import serve

    from actors.controller import get_controller
    from proxifier.llama import find_llama_server
    from serve_app.app import build_app
    from serve_app.run import HARDENING

    home = Path(tempfile.mkdtemp())
    queue_settings = {} if args.lease_hold is None else {"lease_hold": args.lease_hold}
    config = home / "models.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "settings": {"queue": queue_settings},
                "models": {
                    "tiny": {
                        "model_path": str(REPO / "models" / "tiny.gguf"),
                        "llama_server": find_llama_server(),
                        "context_length": 4096,
                        "parallel": 32,
                        "preload": True,
                    }
                },
            }
        )
    )
    mode = "HAProxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Python proxy"
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": HARDENING},
    )
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": None})
    serve.run(build_app({"config": str(config)}), name="proxifier", route_prefix="/")

    floor_app = FastAPI()

    @floor_app.post("/v1/chat/completions")
    async def floor() -> dict[str, Any]:
        return {"object": "chat.completion", "choices": [{"message": {"content": "x"}}]}

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    @serve.ingress(floor_app)
    class Floor:
        pass

    serve.run(Floor.bind(), name="floor", route_prefix="/floor")
    controller = get_controller()
    handle = ray.get(controller.get_model.remote("tiny"))
    lease = ray.get(handle.acquire.remote("bench-direct"))
    ray.get(handle.release.remote(lease["lease_id"]))

    base = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": args.max_tokens}
    targets = {
        "direct": (
            f"{lease['url']}/v1/chat/completions",
            {"Authorization": f"Bearer {lease['api_key']}"},
        ),
        "proxy": (f"http://127.0.0.1:{port}/v1/chat/completions", {}),
        "floor": (f"http://127.0.0.1:{port}/floor/v1/chat/completions", {}),
    }
    print(
        f"tiny model, max_tokens={args.max_tokens}, {args.rounds} x {args.seconds:g} s per cell, "
        f"Serve: {mode}, {os.cpu_count()} cores\n"
    )
    header = (
        f"{'mode':<7}{'conc':>5} {'target':<7}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'ttft ms':>9}  vs direct"
    )
    print(header)
    results: dict[tuple[bool, int, str], dict[str, Any]] = {}
    grants: dict[tuple[bool, int], int] = {}
    for stream in (False, True):
        for concurrency in (1, 8, 32):
            names = [n for n in targets if not (stream and n == "floor")]
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            grants[(stream, concurrency)] = 0
            # Targets alternate within each round, so a machine that drifts (other load,
            # thermal) drifts for all of them alike.
            for _ in range(args.rounds):
                for name in names:
                    url, headers = targets[name]
                    body = {**base, "model": "tiny", "stream": stream}
                    granted = ray.get(handle.stats.remote())["leases_granted"]
                    runs[name].append(
                        asyncio.run(load(url, body, headers, concurrency, args.seconds))
                    )
                    if name == "proxy":
                        now_granted = ray.get(handle.stats.remote())["leases_granted"]
                        grants[(stream, concurrency)] += now_granted - granted
            for name in names:
                result = results[(stream, concurrency, name)] = summary(runs[name])
                direct = results[(stream, concurrency, "direct")]
                note = ""
                if name != "direct":
                    note = (
                        f"rps x{result['rps'] / direct['rps']:.2f}, "
                        f"p50 +{result['p50'] - direct['p50']:.1f} ms, "
                        f"p99 +{result['p99'] - direct['p99']:.1f} ms, "
                        f"ttft +{result['ttft'] - direct['ttft']:.1f} ms"
                    )
                if name == "proxy" and not stream:
                    # What the product could reach if it cost nothing beyond Serve's own
                    # hop: llama-server's and Serve's time per request, added up.
                    floor = summary(runs["floor"])
                    ceiling = 1 / (1 / direct["rps"] + 1 / floor["rps"])
                    note += (
                        f", Serve-bound ceiling {ceiling:.1f}/s (x{result['rps'] / ceiling:.2f})"
                    )
                if name == "proxy":
                    # Requests that took over a slot the replica held made no actor call.
                    served = result["n"] + args.rounds  # + each round's warm-up request
                    fresh = grants[(stream, concurrency)] / served
                    note += f", new lease for {fresh:.0%} of requests"
                if result["errors"]:
                    kinds = ", ".join(f"{n} {k}" for k, n in result["errors"].most_common())
                    note += f" (failed: {kinds})"
                print(
                    f"{'stream' if stream else 'json':<7}{concurrency:>5} {name:<7}"
                    f"{result['rps']:>8.1f}{result['p50']:>9.1f}{result['p99']:>9.1f}"
                    f"{result['ttft']:>9.1f}  {note}"
                )
    floor_p50 = results[(False, 1, "floor")]["p50"]
    print(f"\nServe's floor (trivial endpoint, concurrency 1): p50 {floor_p50:.1f} ms")
    ray.get(controller.shutdown.remote())
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
