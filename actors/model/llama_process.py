"""The current llama-server process of one model and how to reach it: its number, address,
key, log, HTTP client, its model file's download and what its load measured.

The steps of one start, without the state machine: `Instance` decides when they run and what a
failure means; nothing here calls another part of the actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import ray

from actors.gpu_probe import process_gpu_memory
from actors.model.instance_files import InstanceLog, KeyFile
from actors.process import free_port, spawn
from proxifier.config import ModelConfig
from proxifier.gpu_memory import parse_load_log
from proxifier.lifecycle import health_poll_delays
from proxifier.llama import build_argv
from proxifier.model_files import HfSource, fetch


class LlamaProcess:
    """One llama-server at a time (`number` counts them); `process` is None while none runs."""

    def __init__(self, name: str, calibrate: bool) -> None:
        self.name = name
        # Run llama-server at -lv 4, whose load log lists the memory it allocated per device,
        # and report that (the controller has no measurement for this file and these flags).
        self.calibrate = calibrate
        self.measured: dict[str, Any] | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.number = 0
        self.host: str | None = None
        self.port: int | None = None
        self.api_key: str | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.log = InstanceLog(name)
        self.key = KeyFile(name)
        self.download: dict[str, Any] | None = None  # file, done, total while fetching
        self._client: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def http(self) -> httpx.AsyncClient:
        if self._client is None:
            # Plain HTTP to its own llama-server only: no TLS context to build (20-40 ms,
            # on the path of a cold start).
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0), verify=False)
        return self._client

    async def fetch(self, source: HfSource, cache: Path, env: dict[str, str]) -> Path:
        """The model's file from the Hub into `cache`, its progress in `download` meanwhile."""
        self.download = {"file": source.label, "done": 0, "total": None}
        watching = True  # a cancelled start leaves the thread to finish; it reports no more

        def progress(done: int, total: int | None) -> None:  # called from the download thread
            if watching:
                self.download = {"file": source.label, "done": done, "total": total}

        try:
            return await asyncio.to_thread(fetch, source, cache, env, progress)
        finally:
            watching = False
            self.download = None

    async def spawn(
        self, model: ModelConfig, binary: str, model_file: Path
    ) -> asyncio.subprocess.Process:
        """Start the next instance: a fresh port, key and log mark."""
        self.number += 1
        instance = self.number
        host = await asyncio.to_thread(_bind_host)
        port = model.port or free_port(host)
        api_key = secrets.token_hex(24)
        argv = build_argv(
            model,
            binary=binary,
            model_file=str(model_file),
            host=host,
            port=port,
            api_key_file=str(self.key.write(api_key)),
            alias=self.name,
            log_verbosity=4 if self.calibrate else None,
        )
        env = {**os.environ, **model.env}
        self.log.begin(instance)
        process = await spawn(argv, env, self.log.path)
        self.process, self.host, self.port, self.api_key = process, host, port, api_key
        self.started_at = time.time()
        return process

    async def wait_ready(
        self, process: asyncio.subprocess.Process, url: str, timeout: float
    ) -> str | None:
        """Poll /health until 200 while watching the process; a reason when it never gets there."""
        give_up = time.monotonic() + timeout
        exited = asyncio.ensure_future(process.wait())
        try:
            for delay in health_poll_delays():
                await asyncio.wait({exited}, timeout=delay)
                if exited.done():
                    return (
                        f"llama-server exited with code {process.returncode} while loading; "
                        "the last lines of its log:\n" + "\n".join(self.log.tail(20))
                    )
                with contextlib.suppress(httpx.TransportError):
                    response = await self.http().get(f"{url}/health", timeout=2.0)
                    if response.status_code == 200:
                        return None
                if time.monotonic() > give_up:
                    return (
                        f"llama-server was not ready after {timeout:g}s (startup_timeout); "
                        "the last lines of its log:\n" + "\n".join(self.log.tail(20))
                    )
        finally:
            exited.cancel()
        raise AssertionError("unreachable")

    async def measure(self, pid: int) -> dict[str, Any] | None:
        """What the load log says this instance allocated per device, and what the GPU says
        the process holds (kept in `measured`); None when the log is no measurement."""
        measured = parse_load_log(self.log.text())
        # A load whose weights on some GPU went unlogged is no measurement.
        if measured is None or not all(
            "model" in kinds for device, kinds in measured.buffers.items() if device != "CPU"
        ):
            return None
        self.measured = {
            "buffers": measured.buffers,
            "gpu": measured.gpu,
            "projected": measured.projected,
            # What the GPU says the process holds, its CUDA context included.
            "process": await asyncio.to_thread(process_gpu_memory, pid),
        }
        return self.measured


def _bind_host() -> str:
    """The node's address as Ray knows it, which every other node (and so every ingress
    replica, wherever it runs, now or after nodes join) reaches it by; only the instance key
    lets anyone in. Loopback only outside Ray."""
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
