"""A spare Ray worker process on each node, started before a model actor needs one.
Ray's raylet only, best effort: a failure costs the speed-up, never an actor; no product state.

A new actor takes a new worker process, and starting one (Python, `import ray`, registering
with the raylet, this job's runtime env) costs ~1.2 s on a 2-core host: more than the tiny
model's whole load. A worker the raylet started for this job and runtime env that never ran
anything fits any actor of the job, whatever its resources or node pinning (those are settled
when the actor is scheduled), so the model actor placed on that node starts in ~50 ms.

Ray 2.60 has no Python API for this; the raylet's `PrestartWorkers` call (what Ray's own core
worker uses for task backlogs) is made directly. Being Ray-internal, any failure only costs the
speed-up: it is logged once and the next actor starts cold, as it would without this.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

log = logging.getLogger("proxifier")

# How long the raylet keeps an unused spare for sure; after that it is an idle worker like any
# other, which the raylet ends when its node has more of those than CPUs.
KEEP_ALIVE_S = 600
_failed = False  # the first failure switches this off for the process, with one log line


def prestart(node_id: str, count: int = 1) -> bool:
    """Ask the raylet of `node_id` to start `count` workers for this job's runtime env.
    Returns whether it accepted (it starts them in the background). Blocking: call it in a
    thread from async code."""
    global _failed
    if _failed:
        return False
    try:
        _prestart(node_id, count)
        return True
    except Exception as error:  # Ray-internal API: a change there costs speed, never a start
        _failed = True
        log.warning("spare Ray workers are off (model actors start cold): %r", error)
        return False


def _prestart(node_id: str, count: int) -> None:
    from ray._common.network_utils import build_address
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    node = _alive_node(node_id)
    if node is None:
        return
    worker = ray._private.worker.global_worker
    channel = init_grpc_channel(build_address(node["NodeManagerAddress"], node["NodeManagerPort"]))
    try:
        request = node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.PYTHON,
            job_id=worker.current_job_id.binary(),
            keep_alive_duration_secs=KEEP_ALIVE_S,
            num_workers=count,
        )
        # The runtime env a model actor created from here inherits: the worker fits it only
        # if the two are the same string.
        request.runtime_env_info.CopyFrom(worker.core_worker.get_job_config().runtime_env_info)
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(request, timeout=5)
    finally:
        channel.close()


def _alive_node(node_id: str) -> dict[str, Any] | None:
    return next((n for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]), None)
