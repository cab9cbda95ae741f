"""Finding a node's GPUs and their memory: NVML when nvidia-ml-py is installed, else
`nvidia-smi`, run on the node itself by a small Ray task pinned there. It probes and reports,
parsed by proxifier.gpu_inventory; it decides nothing, calls no actor and no serve_app."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from proxifier.gpu_inventory import (
    NVIDIA_SMI_APPS,
    NVIDIA_SMI_QUERY,
    Gpu,
    parse_nvidia_smi,
    process_usage,
)

PROBE_TIMEOUT = 20.0  # seconds nvidia-smi may take on a busy host


def local_gpus() -> list[Gpu]:
    """This host's GPUs; [] when there are none, or neither NVML nor nvidia-smi answers."""
    try:
        import pynvml  # nvidia-ml-py: optional

        pynvml.nvmlInit()
        try:
            found = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                device = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = pynvml.nvmlDeviceGetName(device)
                name = name.decode() if isinstance(name, bytes) else str(name)
                found.append(Gpu(index, name, int(pynvml.nvmlDeviceGetMemoryInfo(device).total)))
            return found
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # not installed, no driver, no GPU: try nvidia-smi
        pass
    answer = _nvidia_smi(NVIDIA_SMI_QUERY)
    return [] if answer is None else parse_nvidia_smi(answer)


def _nvidia_smi(arguments: list[str]) -> str | None:
    """nvidia-smi's output for these arguments; None when it is missing or fails."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        done = subprocess.run(
            [binary, *arguments],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def process_gpu_memory(pid: int) -> int | None:
    """Bytes of GPU memory one process holds (its CUDA context included), by NVML or
    nvidia-smi; None when neither can tell."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            total, found = 0, False
            for index in range(pynvml.nvmlDeviceGetCount()):
                device = pynvml.nvmlDeviceGetHandleByIndex(index)
                for process in pynvml.nvmlDeviceGetComputeRunningProcesses(device):
                    if process.pid == pid and process.usedGpuMemory:
                        total, found = total + int(process.usedGpuMemory), True
            return total if found else None
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # not installed, no driver: try nvidia-smi
        pass
    answer = _nvidia_smi(NVIDIA_SMI_APPS)
    return None if answer is None else process_usage(answer, pid)


@ray.remote(num_cpus=0, max_retries=0)
def _probe() -> list[Gpu]:
    return local_gpus()


async def node_gpus(node_id: str) -> list[Gpu]:
    """The GPUs of one node, probed there."""
    strategy: Any = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return await _probe.options(scheduling_strategy=strategy).remote()
