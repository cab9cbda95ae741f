"""What a model actor reports about itself: its stats (the instance's and the slots'), and why
it cannot be stopped now.

Plain reading: nothing here changes a part or calls one.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from actors.model.instance import Instance
from actors.process import rss_bytes
from proxifier.lifecycle import ModelState
from proxifier.model_files import describe_progress
from proxifier.slots import SlotQueue


def stats(name: str, instance: Instance, slots: SlotQueue) -> dict[str, Any]:
    now = time.time()
    llama = instance.llama
    pid = llama.process.pid if llama.process is not None else None
    running = instance.state == ModelState.READY
    context = ray.get_runtime_context() if ray.is_initialized() else None
    return {
        "name": name,
        "state": str(instance.state),
        "pid": pid,
        "node_id": context.get_node_id() if context else None,
        "host": llama.host if pid else None,
        "port": llama.port if pid else None,
        "instance": llama.number,
        "started_at": llama.started_at if pid else None,
        "ready_at": llama.ready_at if running else None,
        "uptime": now - llama.ready_at if running and llama.ready_at else 0.0,
        "in_flight": len(slots.leases),
        "slots": slots.slots,
        "queue_depth": len(slots.waiters),
        "max_queue_size": slots.max_queue,
        "oldest_wait": slots.oldest_wait(now),
        "requests_served": slots.served,
        "leases_granted": slots.granted,
        "last_used": slots.last_release,
        "idle_for": slots.idle_for(now),
        "busy": slots.busy,
        "restarts": instance.restarts,
        "last_error": instance.last_error,
        "failed_until": instance.failed_until if instance.state == ModelState.FAILED else None,
        "stop_reason": instance.stop_reason,
        "retired": instance.retired,
        "memory_measured": llama.measured,
        "rss_bytes": rss_bytes(pid),
        "actor_pid": os.getpid(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else [],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "log_tail": llama.log.tail(20),
        "download": llama.download,
        "progress": (
            describe_progress(llama.download["done"], llama.download["total"])
            if llama.download
            else None
        ),
    }


def busy_reason(slots: SlotQueue, jobs: int) -> str | None:
    """Why the model cannot be stopped for idleness or eviction now, or None."""
    if slots.leases or slots.waiters or jobs:
        return f"busy: {len(slots.leases)} in flight, {len(slots.waiters)} waiting" + (
            f", {jobs} async job(s)" if jobs else ""
        )
    return None
