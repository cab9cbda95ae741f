"""A stopped or failed model's llama-server log, read where it was written: on the node the
model last ran on (a small task pinned there), since a worker's log is not on the head."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.model.instance_files import InstanceLog
from actors.process import log_tail


@ray.remote(num_cpus=0, max_retries=0)
def _tail(name: str, lines: int) -> list[str]:
    return log_tail(InstanceLog(name).path, lines)


def log_lines_on(node_id: str, name: str, lines: int) -> Any:
    """A ref to the last `lines` lines of the model's log file on `node_id`."""
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return _tail.options(scheduling_strategy=strategy).remote(name, lines)
