#!/usr/bin/env python3
"""The floor of any product built on Ray Serve: the least a Serve ingress can do per request.

Deploys, into the running cluster, a second Serve application (`/floor`) that forwards every
POST to the model's llama-server with aiohttp and nothing else: no auth, no lease, no queue,
no JSON parse, as many requests at once as the client sends. scripts/bench_proxy.py measures
it beside the proxifier in the same run, on the same Serve settings and HAProxy, so the share
of direct that Ray Serve itself leaves is a number, not a guess.

usage (bench_proxy.py runs it): FLOOR_UPSTREAMS='{"chat": {"url": .., "key": ..},
"embed": {...}}' python scripts/serve_floor.py
"""

from __future__ import annotations

import json
import os
from typing import Any

import aiohttp
import ray
from ray import serve

from serve_app.relay import STALE_CONNECTION  # what a pooled connection llama-server closed raises

Scope = dict[str, Any]


def forwarder(upstreams: dict[str, dict[str, str]]) -> Any:
    """A raw ASGI app: body in, the upstream's status and bytes out."""
    session: Any = None

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            if session is not None:
                await session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if session is None:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
            )
        where = upstreams["embed" if scope["path"].endswith("/embeddings") else "chat"]
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {where['key']}"}
        url = f"{where['url']}{path}"
        try:
            answer = await session.post(url, data=body, headers=headers)
        except STALE_CONNECTION:
            # llama-server closes a connection after each stream; the pool finds out on reuse
            answer = await session.post(url, data=body, headers=headers)
        async with answer:
            await send({
                "type": "http.response.start",
                "status": answer.status,
                "headers": [(b"content-type", answer.headers["Content-Type"].encode())],
            })  # fmt: skip
            async for chunk in answer.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


def main() -> None:
    upstreams = json.loads(os.environ["FLOOR_UPSTREAMS"])
    ray.init(address="auto", log_to_driver=False)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    @serve.ingress(lambda: forwarder(upstreams))
    class Floor:
        pass

    serve.run(Floor.bind(), name="floor", route_prefix="/floor")
    print("FLOOR READY", flush=True)


if __name__ == "__main__":
    main()
