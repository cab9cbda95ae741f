"""A host's GPUs: what an operator declares on `ray start` (labels), what `nvidia-smi` reports,
and the `ray start` flags that declare them (`proxifier node`). Pure: the probing itself runs
in `actors.gpu_probe`."""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

GiB = 1024**3
MEMORY_LABEL = "gpu-memory-gb"  # per GPU, in GiB: the operator's word wins over detection
TYPE_LABEL = "gpu-type"
# nvidia-smi's arguments for each question (CSV, no header, MiB).
NVIDIA_SMI_QUERY = ["--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]
NVIDIA_SMI_APPS = ["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory: int  # bytes


def declared_gpu_memory(labels: Mapping[str, str]) -> float | None:
    """Bytes per GPU from the node's `gpu-memory-gb` label; None when absent or not a number."""
    value = labels.get(MEMORY_LABEL)
    if value is None:
        return None
    try:
        gib = float(value)
    except ValueError:
        return None
    return gib * GiB if gib > 0 else None


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits` (MiB)."""
    gpus = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        try:
            mib = float(parts[2])
        except ValueError:
            continue
        gpus.append(Gpu(int(parts[0]), parts[1], int(mib * 1024**2)))
    return gpus


def process_usage(text: str, pid: int) -> int | None:
    """Bytes of GPU memory process `pid` holds, summed over GPUs, from
    `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` (MiB);
    None when it is not listed (no GPU work, or another PID namespace)."""
    total, found = 0, False
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].replace(".", "", 1).isdigit():
            total += int(float(parts[1]) * 1024**2)
            found = True
    return total if found else None


def gpu_type(name: str) -> str:
    """A label value for a GPU's product name: "NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA A100-SXM4-40GB" -> "a100", "NVIDIA GeForce RTX 4090" -> "rtx4090"."""
    words = re.sub(r"^(nvidia|amd)\s+", "", name.strip().lower())
    words = re.sub(r"^(geforce|quadro|tesla|radeon)\s+", "", words)
    match = re.match(r"(rtx|gtx)?\s*([a-z]*\d+[a-z]*)", words)
    if match is None:
        return re.sub(r"[^a-z0-9]+", "-", words).strip("-") or "gpu"
    return (match.group(1) or "") + match.group(2)


def ray_start_flags(gpus: Sequence[Gpu]) -> list[str]:
    """The `ray start` flags that declare these GPUs: their count, their memory and type as
    labels (what the scheduler places by), and the type as a custom resource (what a model's
    `resources:` can ask for). Mixed cards: the smallest memory, so every GPU holds the claim."""
    if not gpus:
        return ["--num-gpus=0"]
    kind = gpu_type(gpus[0].name) if len({g.name for g in gpus}) == 1 else "mixed"
    memory_gib = math.floor(min(g.memory for g in gpus) / GiB * 10) / 10  # never more
    labels = f"{MEMORY_LABEL}={memory_gib:g},{TYPE_LABEL}={kind}"
    flags = [f"--num-gpus={len(gpus)}", f"--labels={labels}"]
    if kind != "mixed":
        flags.append("--resources=" + shlex.quote(json.dumps({f"gpu_type:{kind}": len(gpus)})))
    return flags


def memory_gib_text(gpus: Sequence[Gpu]) -> str:
    return ", ".join(f"GPU {g.index}: {g.name}, {g.memory / GiB:.1f} GiB" for g in gpus)
